//! A real router in front of real workers on 127.0.0.1: two in-process workers serving the demo
//! model, the router started as `latentserve-router` starts, and real gRPC and HTTP clients.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser as _;
use latentserve_proto::v1::inference_client::InferenceClient;
use latentserve_proto::v1::{
    ChatMessage, Conversation, GenerateRequest, GenerateResponse, GetModelInfoRequest,
    SamplingParams, StoppingCriteria, TokenIds, TokenizeRequest, generate_request,
};
use latentserve_router::cli::{RouterArgs, start as start_router};
use latentserve_router::server::RunningRouter;
use latentserve_worker::cli::WeightDtype;
use latentserve_worker::cli::parse::OptionalAddr;
use latentserve_worker::cli::serve::{ServeArgs, Serving, start as start_worker};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::Channel;

/// Tokens per cache block on the workers: the demo's prompts are short.
const BLOCK_SIZE: u32 = 4;

fn demo_model() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo")
}

fn worker_args() -> ServeArgs {
    let loopback = "127.0.0.1:0".parse().expect("address");
    ServeArgs {
        model: Some(demo_model()),
        model_name: Some("demo".into()),
        grpc_addr: loopback,
        metrics_addr: loopback,
        openai_addr: OptionalAddr(Some(loopback)),
        chat_template: None,
        max_connections: 1024,
        idle_timeout: Duration::from_secs(300),
        http_header_timeout: Duration::from_secs(30),
        tls_cert: None,
        tls_key: None,
        tls_client_ca: None,
        tls_handshake_timeout: Duration::from_secs(10),
        max_batch_size: 16,
        max_tokens_per_step: 256,
        max_seq_len: None,
        kv_cache_memory: 16 << 20,
        block_size: BLOCK_SIZE,
        no_prefix_caching: false,
        max_queue: 64,
        drain_timeout: Duration::from_secs(5),
        dtype: WeightDtype::F32,
        shard: latentserve_worker::cli::shard_args::ShardArgs {
            experts_addr: loopback,
            ..Default::default()
        },
        device: Default::default(),
    }
}

async fn workers(n: usize) -> Vec<Serving> {
    let mut workers = Vec::new();
    for _ in 0..n {
        workers.push(start_worker(&worker_args()).await.expect("worker starts"));
    }
    workers
}

async fn router_for(workers: &[Serving], policy: &str) -> RunningRouter {
    let grpc: Vec<String> = workers
        .iter()
        .map(|w| w.server.grpc_addr.to_string())
        .collect();
    let openai: Vec<String> = workers
        .iter()
        .map(|w| w.server.openai_addr.expect("openai port").to_string())
        .collect();
    let args = RouterArgs::try_parse_from([
        "latentserve-router",
        "--endpoints",
        &grpc.join(","),
        "--openai-endpoints",
        &openai.join(","),
        "--grpc-addr",
        "127.0.0.1:0",
        "--openai-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--policy",
        policy,
    ])
    .expect("router flags");
    let router = start_router(&args).await.expect("router starts");
    // Bounded wait until every worker reports and the prompt files have arrived.
    let until = Instant::now() + Duration::from_secs(30);
    while router.pool().prompter().is_none()
        || !metrics(router.metrics_addr).await.contains(&format!(
            "latentserve_router_endpoints{{state=\"reporting\"}} {}",
            workers.len()
        ))
    {
        assert!(
            Instant::now() < until,
            "the workers never reported to the router"
        );
        router.pool().update_gauges();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    router
}

async fn client(addr: SocketAddr) -> InferenceClient<Channel> {
    InferenceClient::connect(format!("http://{addr}"))
        .await
        .expect("connects")
}

fn greedy(prompt: generate_request::Prompt, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(prompt),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..SamplingParams::default()
        }),
        stopping: Some(StoppingCriteria {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..StoppingCriteria::default()
        }),
        ..GenerateRequest::default()
    }
}

fn ids(prompt: &[u32], max_tokens: u32) -> GenerateRequest {
    greedy(
        generate_request::Prompt::TokenIds(TokenIds {
            ids: prompt.to_vec(),
        }),
        max_tokens,
    )
}

async fn generate(
    client: &mut InferenceClient<Channel>,
    request: GenerateRequest,
) -> Result<(Vec<u32>, GenerateResponse), tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut tokens = Vec::new();
    let mut last = None;
    while let Some(message) = stream.message().await? {
        tokens.extend(&message.token_ids);
        last = Some(message);
    }
    Ok((tokens, last.expect("at least one message")))
}

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(60),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("answer within 60 s")
    .expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}

async fn metrics(addr: SocketAddr) -> String {
    http(addr, "GET", "/metrics", "").await.1
}

/// A prompt of `blocks` full blocks that starts with `prefix` (distinct per prefix).
fn prompt(prefix: u32, suffix: u32) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..12).map(|i| 3 + (prefix * 13 + i) % 110).collect();
    ids.extend([5 + suffix % 100, 7, 9]);
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_through_the_router_are_the_workers_answers() {
    let workers = workers(2).await;
    let router = router_for(&workers, "prefix-aware").await;
    let mut direct = client(workers[0].server.grpc_addr).await;
    let mut routed = client(router.grpc_addr).await;

    let request = ids(&prompt(1, 1), 8);
    let (want, _) = generate(&mut direct, request.clone()).await.unwrap();
    let (got, last) = generate(&mut routed, request).await.unwrap();
    assert_eq!(got, want);
    assert_ne!(last.finish_reason, 0);

    // Text, chat, tokenize and model info pass through too.
    let chat = greedy(
        generate_request::Prompt::Chat(Conversation {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "What is 12 plus 30?".into(),
            }],
            add_generation_prompt: None,
        }),
        4,
    );
    let (want, _) = generate(&mut direct, chat.clone()).await.unwrap();
    assert_eq!(generate(&mut routed, chat).await.unwrap().0, want);
    let tokenized = routed
        .tokenize(TokenizeRequest {
            text: "What is 12 plus 30?".into(),
            ..TokenizeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!tokenized.ids.is_empty());
    let info = routed
        .get_model_info(GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.model, "demo");

    // A worker's refusal is the client's, unchanged and not retried.
    let err = generate(&mut routed, ids(&[], 4)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // The OpenAI API, whole and streamed.
    let openai = router.openai_addr.expect("openai port");
    let body = r#"{"model":"demo","messages":[{"role":"user","content":"What is 12 plus 30?"}],"max_tokens":4,"temperature":0}"#;
    let direct_openai = workers[0].server.openai_addr.unwrap();
    let (status, want) = http(direct_openai, "POST", "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{want}");
    let (status, got) = http(openai, "POST", "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{got}");
    let content = |text: &str| {
        let value: serde_json::Value = serde_json::from_str(text).expect("json");
        value["choices"][0]["message"]["content"].clone()
    };
    assert_eq!(content(&got), content(&want));
    let streamed = body.replace("\"temperature\":0", "\"temperature\":0,\"stream\":true");
    let (status, events) = http(openai, "POST", "/v1/chat/completions", &streamed).await;
    assert_eq!(status, 200);
    assert!(events.trim_end().ends_with("data: [DONE]"), "{events}");
    let (status, models) = http(openai, "GET", "/v1/models", "").await;
    assert_eq!(status, 200);
    assert!(models.contains("\"demo\""), "{models}");
    let (status, error) = http(openai, "POST", "/v1/chat/completions", "{\"messages\": 3}").await;
    assert_eq!(status, 400, "the worker's refusal passes through: {error}");

    let text = metrics(router.metrics_addr).await;
    assert!(
        text.contains("latentserve_router_requests_total{"),
        "{text}"
    );
    assert!(
        text.contains("latentserve_router_upstream_seconds_bucket"),
        "{text}"
    );
    router.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sharing_a_prefix_meet_where_it_is_cached() {
    let workers = workers(2).await;
    let router = router_for(&workers, "prefix-aware").await;
    let mut routed = client(router.grpc_addr).await;
    let shareable = |p: &[u32]| ((p.len() - 1) / BLOCK_SIZE as usize * BLOCK_SIZE as usize) as u32;
    let (mut hits, mut expected) = (0, 0);
    for round in 0..4 {
        for prefix in 0..6 {
            let request = ids(&prompt(prefix, round), 2);
            let (_, last) = generate(&mut routed, request).await.unwrap();
            let cached = last.usage.expect("usage").cached_prompt_tokens;
            if round > 0 {
                // 12 shared tokens = 3 full blocks were computed by the first round.
                expected += 1;
                hits += u32::from(cached >= 12);
            }
            assert!(cached <= shareable(&prompt(prefix, round)));
        }
    }
    assert_eq!(hits, expected, "every repeat of a prefix found it cached");

    // Round robin, the same kind of requests with fresh prefixes (an odd number, so that a
    // prefix alternates between the workers): repeats miss.
    let round_robin = router_for(&workers, "round-robin").await;
    let mut spread = client(round_robin.grpc_addr).await;
    let mut misses = 0;
    for round in 0..4 {
        for prefix in 100..105 {
            let (_, last) = generate(&mut spread, ids(&prompt(prefix, round), 2))
                .await
                .unwrap();
            if round > 0 && last.usage.unwrap().cached_prompt_tokens < 12 {
                misses += 1;
            }
        }
    }
    assert!(
        misses > 0,
        "round robin misses some repeats (it is the baseline)"
    );
    router.drain(Duration::from_secs(5)).await;
    round_robin.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_goes_away_costs_no_request_that_had_not_started() {
    let mut workers = workers(2).await;
    let router = router_for(&workers, "prefix-aware").await;
    let mut routed = client(router.grpc_addr).await;
    // Stop the second worker: its ports close; the router still lists it until it fails.
    let gone = workers.pop().expect("two workers");
    gone.server
        .drain(Duration::from_secs(5))
        .await
        .expect("drain");
    drop(gone.engine);
    for prefix in 0..12 {
        let (tokens, _) = generate(&mut routed, ids(&prompt(prefix, 0), 2))
            .await
            .expect("a request routed to the stopped worker is retried on the other");
        assert_eq!(tokens.len(), 2);
    }
    let openai = router.openai_addr.unwrap();
    for prefix in 0..4 {
        let body = format!(
            r#"{{"model":"demo","prompt":[{}],"max_tokens":2}}"#,
            prompt(prefix + 20, 0)
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        let (status, answer) = http(openai, "POST", "/v1/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
    }
    // With no worker at all: UNAVAILABLE and 503, at once.
    let last = workers.pop().expect("one worker");
    last.server
        .drain(Duration::from_secs(5))
        .await
        .expect("drain");
    drop(last.engine);
    let err = generate(&mut routed, ids(&prompt(1, 0), 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let (status, _) = http(openai, "POST", "/v1/completions", r#"{"prompt":"x"}"#).await;
    assert_eq!(status, 503);
    assert!(
        metrics(router.metrics_addr)
            .await
            .contains("latentserve_router_retries_total")
    );

    // Draining: readiness goes 503.
    let metrics_addr = router.metrics_addr;
    let drained = tokio::spawn(router.drain(Duration::from_secs(5)));
    drained.await.unwrap();
    assert!(tokio::net::TcpStream::connect(metrics_addr).await.is_err());
}
