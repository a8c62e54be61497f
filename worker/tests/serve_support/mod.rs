//! Shared by the serve_* tests: fixture paths, an in-process server on 127.0.0.1, a client, and a
//! bounded wait for metrics.

#![allow(dead_code)] // each test binary uses a different part

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use latentserve_proto::v1::inference_client::InferenceClient;
use latentserve_proto::v1::{
    GenerateRequest, GenerateResponse, SamplingParams, StoppingCriteria, TokenIds, generate_request,
};
use latentserve_worker::cli::WeightDtype;
use latentserve_worker::cli::parse::OptionalAddr;
use latentserve_worker::cli::serve::{ServeArgs, Serving, start};
use latentserve_worker::model::random::{RandomDtype, init_random};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

pub const FIXTURES: [&str; 5] = [
    "v3-tiny-f32",
    "v3-neox-bf16-sharded",
    "v3-fp8",
    "v2-lite-f16",
    "v2-group-limited-bf16",
];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The transformers reference of a fixture.
pub struct Reference {
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub prompt_text: String,
}

pub fn reference(name: &str) -> Reference {
    let path = fixture(name).join("reference.json");
    let text = std::fs::read_to_string(&path).expect("reference.json is readable");
    let value: serde_json::Value = serde_json::from_str(&text).expect("reference.json parses");
    let ids = |key: &str| -> Vec<u32> {
        value[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} missing"))
            .iter()
            .map(|v| v.as_u64().expect("token id") as u32)
            .collect()
    };
    Reference {
        prompt_ids: ids("prompt_ids"),
        greedy_ids: ids("greedy_ids"),
        prompt_text: value["prompt_text"]
            .as_str()
            .expect("prompt_text")
            .to_owned(),
    }
}

/// Latent cache bytes of one block of `block_size` tokens in f32, from the fixture's config.
pub fn block_bytes(name: &str, block_size: usize) -> u64 {
    let text = std::fs::read_to_string(fixture(name).join("config.json")).expect("config");
    let config: serde_json::Value = serde_json::from_str(&text).expect("config parses");
    let get = |key: &str| config[key].as_u64().expect(key);
    (get("kv_lora_rank") + get("qk_rope_head_dim"))
        * get("num_hidden_layers")
        * 4
        * block_size as u64
}

pub fn args(model: &str) -> ServeArgs {
    ServeArgs {
        model: Some(fixture(model)),
        model_name: Some(model.to_owned()),
        grpc_addr: "127.0.0.1:0".parse().expect("address"),
        metrics_addr: "127.0.0.1:0".parse().expect("address"),
        openai_addr: OptionalAddr(Some("127.0.0.1:0".parse().expect("address"))),
        chat_template: None,
        max_connections: 1024,
        idle_timeout: Duration::from_secs(300),
        http_header_timeout: Duration::from_secs(30),
        tls_cert: None,
        tls_key: None,
        tls_client_ca: None,
        tls_handshake_timeout: Duration::from_secs(10),
        max_batch_size: 64,
        max_tokens_per_step: 256,
        max_seq_len: None,
        kv_cache_memory: 64 << 20,
        block_size: 16,
        no_prefix_caching: false,
        max_queue: 256,
        drain_timeout: Duration::from_secs(30),
        dtype: WeightDtype::F32,
        shard: latentserve_worker::cli::shard_args::ShardArgs {
            experts_addr: "127.0.0.1:0".parse().expect("address"),
            ..Default::default()
        },
        device: Default::default(),
    }
}

/// The context of [`long_context_model`].
pub const LONG_CONTEXT: u32 = 8192;
/// A request on [`long_context_model`] that runs for thousands of engine steps, for tests that
/// cancel it or let its deadline pass: it holds its batch slot while they look.
pub const LONG_REQUEST_TOKENS: u32 = 8000;
/// A request on [`long_context_model`] that a drain lets finish: hundreds of steps, so that it
/// still runs when the drain begins a few milliseconds after its first token, even on a much
/// faster machine, and finishes within seconds in a debug build.
pub const DRAINED_REQUEST_TOKENS: u32 = 500;

/// A random model (seed 7, f32) of the `v3-tiny-f32` fixture's architecture with an
/// [`LONG_CONTEXT`]-token context, written under `dir`. The fixtures' 128-token context decodes
/// in milliseconds, before a client could observe the request running.
pub fn long_context_model(dir: &Path) -> PathBuf {
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("v3-tiny-f32").join("config.json")).expect("config"),
    )
    .expect("config json");
    config["max_position_embeddings"] = LONG_CONTEXT.into();
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config.to_string()).expect("write config");
    let model = dir.join("model");
    init_random(&config_path, &model, 7, RandomDtype::F32).expect("random model");
    model
}

/// [`args`] for `v3-tiny-f32` (the name in every metric label) serving [`long_context_model`].
pub fn long_context_args(dir: &Path) -> ServeArgs {
    let mut serve_args = args("v3-tiny-f32");
    serve_args.model = Some(long_context_model(dir));
    serve_args
}

pub async fn serve(args: &ServeArgs) -> Serving {
    start(args).await.expect("server starts")
}

/// Drains the server (health NOT_SERVING, running requests finish) within 5 s.
pub async fn drain(serving: Serving) {
    serving
        .server
        .drain(Duration::from_secs(5))
        .await
        .expect("drain");
}

pub async fn client(serving: &Serving) -> InferenceClient<Channel> {
    InferenceClient::connect(format!("http://{}", serving.server.grpc_addr))
        .await
        .expect("client connects")
}

pub fn greedy_request(prompt: &[u32], max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: String::new(),
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds {
            ids: prompt.to_vec(),
        })),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..SamplingParams::default()
        }),
        stopping: Some(StoppingCriteria {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..StoppingCriteria::default()
        }),
        logprobs: 0,
        cache_salt: String::new(),
    }
}

pub fn seeded_request(prompt: &[u32], max_tokens: u32, seed: u64) -> GenerateRequest {
    let mut request = greedy_request(prompt, max_tokens);
    request.sampling = Some(SamplingParams {
        temperature: Some(0.8),
        top_p: Some(0.9),
        top_k: 50,
        seed: Some(seed),
        ..SamplingParams::default()
    });
    request
}

/// Runs a generation to its end: every token and the last message.
pub async fn generate(
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

/// GET on the metrics port.
pub async fn http_get(serving: &Serving, path: &str) -> (u16, String) {
    http_get_at(serving.server.metrics_addr, path).await
}

/// GET on a metrics port: the status code and the body.
pub async fn http_get_at(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics port accepts");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    status_and_body(&response)
}

/// The status code and the body of a raw HTTP/1 response.
fn status_and_body(response: &str) -> (u16, String) {
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned());
    (status, body)
}

/// POST of a JSON body: the status code and the body. HTTP/1.0, so that a streamed answer comes
/// back close-delimited rather than chunked.
pub async fn http_post_at(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the HTTP port accepts");
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(120),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("the answer ends within 120 s")
    .expect("read");
    status_and_body(&response)
}

/// The `data:` payloads of a server-sent event stream, `[DONE]` included.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.trim().strip_prefix("data:"))
        .map(|data| data.trim().to_owned())
        .collect()
}

/// The demo model that ships in models/demo.
pub fn demo_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo")
}

/// The value of an unlabelled (apart from `model`) metric.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(&format!("latentserve_{name}{{")))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found"))
}

/// Polls /metrics until `predicate` holds, for at most 30 seconds.
pub async fn wait_for_metrics(serving: &Serving, what: &str, predicate: impl Fn(&str) -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = http_get(serving, "/metrics").await;
        if predicate(&text) {
            return;
        }
        assert!(
            Instant::now() < until,
            "timed out waiting for {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
