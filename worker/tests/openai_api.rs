//! The OpenAI-compatible API: OpenAI's own Python SDK against a `serve` process, and the same
//! answers through gRPC and HTTP from an in-process server on 127.0.0.1.

mod serve_support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use latentserve_proto::v1::{
    ChatMessage, Conversation, DetokenizeRequest, TokenizeRequest, generate_request,
};
use serde_json::{Value, json};
use serve_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const QUESTION: &str = "What is 37 plus 48?";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Runs tests/python/test_openai_client.py against `base_url` with `--check check`.
async fn python_client(base_url: &str, check: &str) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/python/test_openai_client.py");
    let output = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--base-url", base_url, "--check", check])
        .output()
        .await
        .expect("python3 runs (scripts/install-deps installs the openai package)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the openai SDK check `{check}` failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

fn demo_args() -> latentserve_worker::cli::serve::ServeArgs {
    let mut serve_args = args("v3-tiny-f32");
    serve_args.model = Some(demo_model());
    serve_args.model_name = Some("demo".into());
    // The demo's prompts are short: small blocks let the prefix cache share them.
    serve_args.block_size = 4;
    serve_args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openais_python_sdk_gets_completions_and_chat_from_a_serve_process() {
    let (openai_port, metrics_port) = (free_port(), free_port());
    // No --model: the demo model, with its chat template.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_latentserve-worker"))
        .arg("serve")
        .args(["--grpc-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(["--openai-addr", &format!("127.0.0.1:{openai_port}")])
        .args(["--block-size", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the worker starts");
    let metrics = format!("127.0.0.1:{metrics_port}")
        .parse()
        .expect("address");
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the worker exited before it was ready"
        );
        if tokio::net::TcpStream::connect(metrics).await.is_ok()
            && http_get_at(metrics, "/readyz").await.0 == 200
        {
            break;
        }
        assert!(Instant::now() < until, "the worker was not ready in 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    python_client(&format!("http://127.0.0.1:{openai_port}/v1"), "answers").await;
    child.kill().await.expect("kill the worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_sees_429_when_the_queue_is_full_and_503_while_draining() {
    let mut serve_args = demo_args();
    serve_args.max_queue = 0;
    let serving = serve(&serve_args).await;
    let base = format!(
        "http://{}/v1",
        serving.server.openai_addr.expect("OpenAI port")
    );
    python_client(&base, "queue-full").await;
    drain(serving).await;

    let serving = serve(&demo_args()).await;
    let base = format!(
        "http://{}/v1",
        serving.server.openai_addr.expect("OpenAI port")
    );
    serving.handle.start_draining();
    python_client(&base, "draining").await;
    drain(serving).await;
}

/// Streamed or whole, the choices' text of a completions answer.
fn completion_text(body: &str, stream: bool) -> String {
    if !stream {
        let answer: Value = serde_json::from_str(body).expect("JSON answer");
        return answer["choices"][0]["text"]
            .as_str()
            .expect("text")
            .to_owned();
    }
    let events = sse_data(body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    events[..events.len() - 1]
        .iter()
        .map(|event| {
            let chunk: Value = serde_json::from_str(event).expect("JSON chunk");
            chunk["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_carry_the_transformers_greedy_tokens() {
    let name = "v3-tiny-f32";
    let serving = serve(&args(name)).await;
    let reference = reference(name);
    let mut client = client(&serving).await;
    let (tokens, _) = generate(
        &mut client,
        greedy_request(&reference.prompt_ids, reference.greedy_ids.len() as u32),
    )
    .await
    .expect("gRPC generation");
    assert_eq!(tokens, reference.greedy_ids);
    let expected = client
        .detokenize(DetokenizeRequest {
            ids: reference.greedy_ids.clone(),
            skip_special_tokens: true,
        })
        .await
        .expect("detokenize")
        .into_inner()
        .text;
    let addr = serving.server.openai_addr.expect("OpenAI port");
    for stream in [false, true] {
        let body = json!({
            "model": name,
            "prompt": reference.prompt_ids,
            "max_tokens": reference.greedy_ids.len(),
            "temperature": 0,
            "ignore_eos": true,
            "stream": stream,
        });
        let (status, answer) = http_post_at(addr, "/v1/completions", &body.to_string()).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            completion_text(&answer, stream),
            expected,
            "stream {stream}"
        );
    }
    drain(serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_gets_the_same_greedy_answer_through_grpc_and_openai_chat() {
    let serving = serve(&demo_args()).await;
    let mut client = client(&serving).await;
    let conversation = Conversation {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: QUESTION.into(),
        }],
        add_generation_prompt: None,
    };
    let rendered = client
        .tokenize(TokenizeRequest {
            chat: Some(conversation.clone()),
            ..TokenizeRequest::default()
        })
        .await
        .expect("tokenize a conversation")
        .into_inner();
    assert!(rendered.prompt_text.contains(QUESTION), "{rendered:?}");

    // gRPC with the rendered token ids, and gRPC with the conversation itself, both ending at the
    // model's EOS as the chat answer does.
    let until_eos = |ids: &[u32]| {
        let mut request = greedy_request(ids, 8);
        request.stopping.as_mut().expect("stopping").ignore_eos = false;
        request
    };
    let (by_ids, _) = generate(&mut client, until_eos(&rendered.ids))
        .await
        .expect("token-id prompt");
    let mut by_chat = until_eos(&[]);
    by_chat.prompt = Some(generate_request::Prompt::Chat(conversation));
    let (by_conversation, _) = generate(&mut client, by_chat).await.expect("chat prompt");
    assert_eq!(by_ids, by_conversation);
    let text = client
        .detokenize(DetokenizeRequest {
            ids: by_ids,
            skip_special_tokens: true,
        })
        .await
        .expect("detokenize")
        .into_inner()
        .text;

    let body = json!({
        "model": "demo",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "temperature": 0,
    });
    let addr = serving.server.openai_addr.expect("OpenAI port");
    let (status, answer) = http_post_at(addr, "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(answer["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(
        answer["usage"]["prompt_tokens"],
        rendered.ids.len(),
        "the chat prompt is the rendered conversation"
    );
    drain(serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_openai_errors_that_name_the_problem() {
    let serving = serve(&demo_args()).await;
    let addr = serving.server.openai_addr.expect("OpenAI port");
    let cases = [
        ("{", 400, "the body is not JSON"),
        ("[1]", 400, "must be a JSON object"),
        (
            r#"{"prompt": "x", "temperature": "hot"}"#,
            400,
            "temperature: invalid type",
        ),
        (
            r#"{"prompt": "x", "n": 100}"#,
            400,
            "n must be between 1 and 64",
        ),
        (
            r#"{"prompt": "x", "model": "other"}"#,
            404,
            "does not exist",
        ),
    ];
    for (body, status, message) in cases {
        let (got, answer) = http_post_at(addr, "/v1/completions", body).await;
        assert_eq!(got, status, "{body}: {answer}");
        let answer: Value = serde_json::from_str(&answer).expect("JSON error");
        let text = answer["error"]["message"].as_str().expect("message");
        assert!(text.contains(message), "{body}: {text}");
    }
    // A body past the limit is refused once the limit is read; the rest may never be taken.
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let size = 17 << 20;
    let sender = tokio::spawn(async move {
        let head = format!(
            "POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
        );
        let _ = writer.write_all(head.as_bytes()).await;
        let _ = writer.write_all(&vec![b' '; size]).await;
        writer
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), reader.read_to_end(&mut answer))
        .await
        .expect("answered within 60 s");
    drop(sender.await);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.0 413"), "{answer}");
    assert!(answer.contains("the body limit is"), "{answer}");
    let (status, _) = http_get_at(addr, "/health").await;
    assert_eq!(status, 200);
    drain(serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_salt_keeps_one_tenants_prefixes_from_another() {
    let serving = serve(&demo_args()).await;
    let addr = serving.server.openai_addr.expect("OpenAI port");
    let cached = |salt: Option<&'static str>| async move {
        let mut body = json!({"prompt": QUESTION, "max_tokens": 1, "temperature": 0});
        if let Some(salt) = salt {
            body["cache_salt"] = salt.into();
        }
        let (status, answer) = http_post_at(addr, "/v1/completions", &body.to_string()).await;
        assert_eq!(status, 200, "{answer}");
        let answer: Value = serde_json::from_str(&answer).expect("JSON");
        answer["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached_tokens")
    };
    assert_eq!(
        cached(Some("tenant-a")).await,
        0,
        "a first prompt finds nothing"
    );
    assert_eq!(
        cached(Some("tenant-b")).await,
        0,
        "another salt finds nothing"
    );
    assert_eq!(cached(None).await, 0, "nor does the unsalted cache");
    assert!(
        cached(Some("tenant-a")).await > 0,
        "the same salt finds its prefix"
    );
    assert!(
        cached(None).await > 0,
        "and so does the unsalted cache its own"
    );
    drain(serving).await;
}

/// True when the server closes `stream` within `seconds` (a read ends or fails).
async fn closed_within(stream: &mut tokio::net::TcpStream, seconds: u64) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(seconds), stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_at_once_on_both_client_ports() {
    let mut serve_args = demo_args();
    serve_args.max_connections = 2;
    let serving = serve(&serve_args).await;
    let openai = serving.server.openai_addr.expect("OpenAI port");
    for addr in [serving.server.grpc_addr, openai] {
        let connect = || tokio::net::TcpStream::connect(addr);
        let mut first = connect().await.expect("first connection");
        let _second = connect().await.expect("second connection");
        let mut third = connect().await.expect("the kernel accepts the third");
        assert!(
            closed_within(&mut third, 10).await,
            "{addr}: the third stays open"
        );
        assert!(
            !closed_within(&mut first, 1).await,
            "{addr}: the first was closed"
        );
        // Closing one frees its slot for the next client.
        drop(first);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut fourth = connect().await.expect("fourth connection");
        assert!(
            !closed_within(&mut fourth, 1).await,
            "{addr}: a freed slot is not reused"
        );
    }
    drain(serving).await;
}
