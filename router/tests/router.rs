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
use latentserve_router::pool::EndpointAddr;
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
    router_with(workers, policy, &[]).await
}

/// A router in front of `workers`, with more flags.
async fn router_with(workers: &[Serving], policy: &str, flags: &[&str]) -> RunningRouter {
    let grpc: Vec<String> = workers
        .iter()
        .map(|w| w.server.grpc_addr.to_string())
        .collect();
    let openai: Vec<String> = workers
        .iter()
        .map(|w| w.server.openai_addr.expect("openai port").to_string())
        .collect();
    let (grpc, openai) = (grpc.join(","), openai.join(","));
    let words = [
        "latentserve-router",
        "--endpoints",
        &grpc,
        "--openai-endpoints",
        &openai,
        "--grpc-addr",
        "127.0.0.1:0",
        "--openai-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--policy",
        policy,
    ];
    let args = RouterArgs::try_parse_from(words.iter().chain(flags)).expect("router flags");
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
    // Holding off: with no worker left, requests fail at once (the behaviour before holding).
    let router = router_with(&workers, "prefix-aware", &["--hold-queue", "0"]).await;
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

/// The pool entry of a worker, as `--endpoints` makes it (its own group).
fn endpoint_of(worker: &Serving) -> EndpointAddr {
    let grpc = worker.server.grpc_addr.to_string();
    EndpointAddr {
        group: grpc.clone(),
        grpc,
        openai: worker.server.openai_addr.map(|a| a.to_string()),
    }
}

async fn signal(metrics_addr: SocketAddr) -> serde_json::Value {
    let (status, body) = http(metrics_addr, "GET", "/v1/autoscaling", "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// Bounded wait until the router holds `n` requests.
async fn until_held(metrics_addr: SocketAddr, n: u64) {
    let until = Instant::now() + Duration::from_secs(30);
    while signal(metrics_addr).await["held_requests"] != n {
        assert!(Instant::now() < until, "never {n} held requests");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const COMPLETION: &str = r#"{"model":"demo","prompt":[5,6,7,8,9,10],"max_tokens":2}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_at_zero_are_held_until_a_worker_comes_and_the_queue_is_bounded() {
    let workers = workers(1).await;
    let router = router_with(&workers, "prefix-aware", &["--hold-queue", "2"]).await;
    // Scaled to zero: the router stays ready and says so in its signal.
    router.pool().set_endpoints([]);
    let zero = signal(router.metrics_addr).await;
    assert_eq!(zero["groups"], serde_json::json!([]));
    assert_eq!(zero["held_requests"], 0);
    assert_eq!(http(router.metrics_addr, "GET", "/readyz", "").await.0, 200);

    let grpc = router.grpc_addr;
    let held_grpc =
        tokio::spawn(async move { generate(&mut client(grpc).await, ids(&prompt(1, 0), 2)).await });
    until_held(router.metrics_addr, 1).await;
    let openai = router.openai_addr.expect("openai port");
    let held_openai =
        tokio::spawn(async move { http(openai, "POST", "/v1/completions", COMPLETION).await });
    until_held(router.metrics_addr, 2).await;

    // The queue is full: refused at once, naming the bound and the flag.
    let err = generate(&mut client(grpc).await, ids(&prompt(2, 0), 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--hold-queue"), "{err:?}");
    let (status, body) = http(openai, "POST", "/v1/completions", COMPLETION).await;
    assert_eq!(status, 429, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    let message = body["error"]["message"].as_str().expect("a message");
    assert!(
        message.contains("2 requests") && message.contains("--hold-queue"),
        "{message}"
    );
    let held = signal(router.metrics_addr).await;
    assert_eq!(held["held_requests"], 2);
    assert_eq!(held["held_rejected_total"], 2);
    assert_eq!(held["idle_seconds"], 0.0);
    assert!(held["oldest_held_seconds"].as_f64().expect("a number") >= 0.0);

    // A worker appears: both held requests are answered.
    router.pool().set_endpoints([endpoint_of(&workers[0])]);
    let (tokens, _) = tokio::time::timeout(Duration::from_secs(60), held_grpc)
        .await
        .expect("released")
        .unwrap()
        .expect("answered");
    assert_eq!(tokens.len(), 2);
    let (status, body) = held_openai.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(signal(router.metrics_addr).await["held_requests"], 0);
    let text = metrics(router.metrics_addr).await;
    assert!(
        text.contains("latentserve_router_cold_start_seconds_count 2"),
        "{text}"
    );
    assert!(
        text.contains("latentserve_router_hold_rejected_total{reason=\"full\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("latentserve_router_held_requests 0"),
        "{text}"
    );
    router.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_ends_at_its_deadline_or_the_hold_timeout_not_in_a_hang() {
    let workers = workers(1).await;
    let router = router_for(&workers, "prefix-aware").await;
    router.pool().set_endpoints([]);
    let mut routed = client(router.grpc_addr).await;
    let mut request = tonic::Request::new(ids(&prompt(1, 0), 2));
    request.set_timeout(Duration::from_secs(2));
    let err = tokio::time::timeout(Duration::from_secs(60), routed.generate(request))
        .await
        .expect("not a hang")
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert_eq!(signal(router.metrics_addr).await["held_requests"], 0);

    // Over HTTP there is no deadline: --hold-timeout ends the wait, with a 503.
    let short = router_with(&workers, "prefix-aware", &["--hold-timeout", "1s"]).await;
    short.pool().set_endpoints([]);
    let openai = short.openai_addr.expect("openai port");
    let (status, body) = http(openai, "POST", "/v1/completions", COMPLETION).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("--hold-timeout"), "{body}");
    let text = metrics(short.metrics_addr).await;
    assert!(
        text.contains("latentserve_router_hold_rejected_total{reason=\"timeout\"} 1"),
        "{text}"
    );
    router.drain(Duration::from_secs(5)).await;
    short.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoscaling_signal_describes_the_group_after_requests() {
    let workers = workers(1).await;
    let router = router_for(&workers, "prefix-aware").await;
    let mut routed = client(router.grpc_addr).await;
    for prefix in 0..5 {
        generate(&mut routed, ids(&prompt(prefix, 0), 2))
            .await
            .unwrap();
    }
    let openai = router.openai_addr.expect("openai port");
    let streamed = COMPLETION.replace("\"max_tokens\":2", "\"max_tokens\":2,\"stream\":true");
    let (status, events) = http(openai, "POST", "/v1/completions", &streamed).await;
    assert_eq!(status, 200, "{events}");

    // Bounded wait for the worker's last report (it is idle again) and the router's counts.
    let until = Instant::now() + Duration::from_secs(30);
    let group = loop {
        let signal = signal(router.metrics_addr).await;
        assert_eq!(signal["window_seconds"], 60);
        assert_eq!(signal["held_requests"], 0);
        assert_eq!(signal["oldest_held_seconds"], 0.0);
        let groups = signal["groups"].as_array().expect("groups").clone();
        assert_eq!(groups.len(), 1, "{signal}");
        let group = groups[0].clone();
        if group["in_flight_requests"] == 0 && group["running_requests"] == 0 {
            assert!(signal["idle_seconds"].as_f64().expect("a number") >= 0.0);
            break group;
        }
        assert!(Instant::now() < until, "never idle: {signal}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let name = workers[0].server.grpc_addr.to_string();
    assert_eq!(group["group"], name.as_str());
    assert_eq!(group["endpoints"], 1);
    assert_eq!(group["reporting_endpoints"], 1);
    assert_eq!(group["draining_endpoints"], 0);
    assert_eq!(group["waiting_requests"], 0);
    assert_eq!(group["queued_prompt_tokens"], 0);
    assert_eq!(
        group["ttft_samples"], 6,
        "five over gRPC, one streamed: {group}"
    );
    let p90 = group["ttft_p90_seconds"].as_f64().expect("a p90");
    assert!(p90 > 0.0 && p90.is_finite(), "{group}");
    let utilization = group["cache_utilization"].as_f64().expect("a number");
    assert!((0.0..=1.0).contains(&utilization), "{group}");

    router.pool().update_gauges();
    let text = metrics(router.metrics_addr).await;
    for family in [
        "latentserve_router_group_in_flight_requests",
        "latentserve_router_group_queued_prompt_tokens",
        "latentserve_router_group_cache_utilization",
    ] {
        assert!(
            text.contains(&format!("{family}{{group=\"{name}\"}}")),
            "{family}: {text}"
        );
    }
    router.drain(Duration::from_secs(5)).await;
}
