//! The `serve` binary as a process: SIGTERM drains (health NOT_SERVING, new requests UNAVAILABLE,
//! the in-flight stream finishes) and the process exits 0.

mod serve_support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use latentserve_proto::v1::FinishReason;
use latentserve_proto::v1::inference_client::InferenceClient;
use serve_support::{
    DRAINED_REQUEST_TOKENS, greedy_request, http_get_at, long_context_model, metric,
};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

async fn health(channel: tonic::transport::Channel) -> Option<i32> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "latentserve.v1.Inference".into(),
        })
        .await
        .ok()
        .map(|response| response.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let grpc_port = free_port();
    let metrics_port = free_port();
    // A long-context model keeps the in-flight request running until the drain has begun.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_latentserve-worker"))
        .args(["serve", "--model"])
        .arg(long_context_model(dir.path()))
        .args(["--model-name", "v3-tiny-f32"])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(["--openai-addr", "127.0.0.1:0"])
        .args(["--drain-timeout", "60s"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the worker binary starts");
    let url = format!("http://127.0.0.1:{grpc_port}");

    // Bounded wait until health reports SERVING.
    let until = Instant::now() + Duration::from_secs(60);
    let channel = loop {
        if let Ok(channel) = tonic::transport::Channel::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
            && health(channel.clone()).await == Some(ServingStatus::Serving as i32)
        {
            break channel;
        }
        assert!(Instant::now() < until, "the worker never became SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut client = InferenceClient::new(channel.clone());
    let mut running = client
        .generate(greedy_request(&[3, 4, 5], DRAINED_REQUEST_TOKENS))
        .await
        .expect("accepted")
        .into_inner();
    running.message().await.expect("first").expect("some");

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().expect("pid").to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());

    let until = Instant::now() + Duration::from_secs(30);
    while health(channel.clone()).await != Some(ServingStatus::NotServing as i32) {
        assert!(Instant::now() < until, "health never turned NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = client
        .generate(greedy_request(&[3], 2))
        .await
        .expect_err("new requests are refused");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    // The request was still running once draining had begun: it had not generated all of its
    // tokens (the counter counts a token before it is streamed), so the drain had to wait for it.
    let metrics_addr = format!("127.0.0.1:{metrics_port}")
        .parse()
        .expect("address");
    let (_, text) = http_get_at(metrics_addr, "/metrics").await;
    let generated = metric(&text, "generation_tokens_total");
    assert!(
        generated < f64::from(DRAINED_REQUEST_TOKENS),
        "the request had finished ({generated} tokens) before draining began"
    );

    let mut tokens = 1;
    let mut finish = FinishReason::Unspecified;
    while let Some(message) = running.message().await.expect("the stream finishes") {
        tokens += message.token_ids.len();
        finish = message.finish_reason();
    }
    assert_eq!(
        (tokens, finish),
        (DRAINED_REQUEST_TOKENS as usize, FinishReason::Length)
    );

    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the worker exits after draining")
        .expect("wait");
    assert_eq!(exit.code(), Some(0));
}
