//! Expert parallelism across real `latentserve-worker serve` processes on 127.0.0.1 ports: the
//! same greedy tokens on 1, 2 and 4 shards from every rank, a shard killed mid-stream and
//! restarted, a shard killed under load with and without redundant experts, bad placement files
//! and flags refused at start, a peer serving another model refused, and the expert exchange
//! admitting only the shards that hold the group's token.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod serve_support;

use latentserve_proto::v1::experts_client::ExpertsClient;
use latentserve_proto::v1::inference_client::InferenceClient;
use latentserve_proto::v1::{
    GenerateRequest, GetModelInfoRequest, HandshakeRequest, RunExpertsRequest,
};
use serve_support::{greedy_request, http_get_at, metric};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn reference_ids(name: &str, key: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// The ports of a group of `n` shards: each rank's gRPC port, then each rank's expert port.
fn group_ports(n: usize) -> Vec<u16> {
    free_ports(2 * n)
}

/// Free 127.0.0.1 ports, checked by binding them. They come from below Linux's ephemeral range
/// (32768-60999): a port the kernel hands out for `:0` can be taken by any test's outgoing
/// connection between our check and the worker's bind, which failed a group start with
/// "Address already in use". Each test process takes its own slice of 600 ports (by pid), and a
/// counter keeps the tests of this process apart.
fn free_ports(n: usize) -> Vec<u16> {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    const SLICE: u16 = 600;
    let base = 20_000 + (std::process::id() % 20) as u16 * SLICE;
    let mut ports = Vec::with_capacity(n);
    for _ in 0..SLICE {
        if ports.len() == n {
            break;
        }
        let port = base + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SLICE;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    assert_eq!(
        ports.len(),
        n,
        "no {n} free ports in {base}..{}",
        base + SLICE
    );
    ports
}

/// A worker process; killed when dropped.
struct Worker {
    child: Child,
    port: u16,
    experts_port: u16,
    metrics_port: u16,
    log: PathBuf,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    /// Rank `rank` of the group whose [`group_ports`] are `ports`.
    fn start(model: &str, rank: usize, ports: &[u16], log_dir: &Path, extra: &[&str]) -> Worker {
        let shards = ports.len() / 2;
        let (grpc_ports, experts_ports) = ports.split_at(shards);
        let port = grpc_ports[rank];
        let peers: Vec<String> = experts_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let metrics_port = free_ports(1)[0];
        let log = log_dir.join(format!("rank-{rank}-{port}-{}.log", rand_suffix()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_latentserve-worker"));
        command
            .arg("serve")
            .arg("--model")
            .arg(fixture(model))
            .args(["--grpc-addr", &format!("127.0.0.1:{port}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--openai-addr", ""])
            .args(["--kv-cache-memory", "16Mi"])
            .args(["--shard-rank", &rank.to_string()])
            .args([
                "--experts-addr",
                &format!("127.0.0.1:{}", experts_ports[rank]),
            ])
            .args(["--shard-count", &shards.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if shards > 1 {
            command.args(["--peers", &peers.join(",")]);
        }
        Worker {
            child: command.spawn().unwrap(),
            port,
            experts_port: experts_ports[rank],
            metrics_port,
            log,
        }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where its peers reach its experts.
    fn experts_address(&self) -> String {
        format!("127.0.0.1:{}", self.experts_port)
    }

    /// Its /metrics text (empty while the port does not answer).
    async fn metrics(&self) -> String {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], self.metrics_port));
        match tokio::net::TcpStream::connect(address).await {
            Ok(_) => http_get_at(address, "/metrics").await.1,
            Err(_) => String::new(),
        }
    }

    /// Waits (bounded) for the process to exit on its own, e.g. after a start-up error, and
    /// returns its log.
    fn wait_for_exit(&mut self) -> String {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    !status.success(),
                    "exited with success:\n{}",
                    self.log_text()
                );
                return self.log_text();
            }
            assert!(
                Instant::now() < until,
                "still running after 60 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident set size in KiB, from /proc.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn channel(address: &str) -> Option<Channel> {
    tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()
}

async fn health(address: &str) -> Option<ServingStatus> {
    let channel = channel(address).await?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(answer.into_inner().status).ok()
}

/// Polls the health of `worker` until it is `wanted`, for at most 120 seconds (debug builds
/// load slowly on two shared cores).
async fn wait_health(worker: &mut Worker, wanted: ServingStatus) {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = worker.child.try_wait().unwrap() {
            panic!("worker exited with {status}:\n{}", worker.log_text());
        }
        if health(&worker.address()).await == Some(wanted) {
            return;
        }
        assert!(
            Instant::now() < until,
            "{} never became {wanted:?}:\n{}",
            worker.address(),
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn generate(address: &str, request: GenerateRequest) -> Result<Vec<u32>, tonic::Status> {
    let channel = channel(address)
        .await
        .ok_or_else(|| tonic::Status::unavailable("no connection"))?;
    let mut stream = InferenceClient::new(channel)
        .generate(request)
        .await?
        .into_inner();
    let mut tokens = Vec::new();
    while let Some(message) = stream.message().await? {
        tokens.extend(message.token_ids);
    }
    Ok(tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_two_and_four_processes_give_the_reference_tokens_from_every_rank() {
    let model = "v3-tiny-f32";
    let prompt = reference_ids(model, "prompt_ids");
    let expected = reference_ids(model, "greedy_ids");
    let logs = tempfile::tempdir().unwrap();
    for n in [1usize, 2, 4] {
        let ports = group_ports(n);
        let mut workers: Vec<Worker> = (0..n)
            .map(|rank| Worker::start(model, rank, &ports, logs.path(), &[]))
            .collect();
        for worker in &mut workers {
            wait_health(worker, ServingStatus::Serving).await;
        }
        for (rank, worker) in workers.iter().enumerate() {
            let tokens = generate(
                &worker.address(),
                greedy_request(&prompt, expected.len() as u32),
            )
            .await
            .unwrap_or_else(|e| panic!("N = {n}, rank {rank}: {e}\n{}", worker.log_text()));
            assert_eq!(tokens, expected, "N = {n}, rank {rank}");
            let info = InferenceClient::new(channel(&worker.address()).await.unwrap())
                .get_model_info(GetModelInfoRequest::default())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                info.local_routed_experts as usize * n,
                16,
                "N = {n}, rank {rank}"
            );
            eprintln!(
                "N = {n}, rank {rank}: {} local routed experts, RSS {} KiB",
                info.local_routed_experts,
                worker.rss_kib()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shard_fails_requests_clearly_and_the_group_recovers_when_it_returns() {
    let model = "v3-tiny-f32";
    let prompt = reference_ids(model, "prompt_ids");
    let expected = reference_ids(model, "greedy_ids");
    let logs = tempfile::tempdir().unwrap();
    let ports = group_ports(2);
    let rpc_timeout = ["--expert-rpc-timeout", "3s"];
    let mut first = Worker::start(model, 0, &ports, logs.path(), &rpc_timeout);
    let mut second = Worker::start(model, 1, &ports, logs.path(), &rpc_timeout);
    wait_health(&mut first, ServingStatus::Serving).await;
    wait_health(&mut second, ServingStatus::Serving).await;

    // A long stream on rank 0 (a short prompt, so that it may run to the 128-token context);
    // rank 1 dies after its first tokens.
    let channel0 = channel(&first.address()).await.unwrap();
    let short_prompt = &prompt[..8];
    let mut stream = InferenceClient::new(channel0)
        .generate(greedy_request(short_prompt, 120))
        .await
        .unwrap()
        .into_inner();
    let first_message = stream.message().await.unwrap().expect("a first token");
    assert!(!first_message.token_ids.is_empty());
    second.child.kill().unwrap();
    second.child.wait().unwrap();
    // The stream must end with UNAVAILABLE naming the lost shard, within a bounded time.
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(status) => return Err(status),
            }
        }
    })
    .await
    .expect("the stream must not hang when a shard dies");
    let status = ended.expect_err("the stream cannot finish 120 tokens without shard 1");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("expert shard 1")
            && status.message().contains(&second.experts_address()),
        "{status:?}"
    );
    wait_health(&mut first, ServingStatus::NotServing).await;
    // A new request fails fast the same way.
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        generate(&first.address(), greedy_request(&prompt, 8)),
    )
    .await
    .expect("a request must not hang while a shard is down")
    .expect_err("shard 1 is down");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("expert shard 1"), "{status:?}");

    // Rank 1 comes back on the same address: rank 0 recovers by itself.
    let mut second = Worker::start(model, 1, &ports, logs.path(), &rpc_timeout);
    wait_health(&mut second, ServingStatus::Serving).await;
    wait_health(&mut first, ServingStatus::Serving).await;
    let tokens = generate(
        &first.address(),
        greedy_request(&prompt, expected.len() as u32),
    )
    .await
    .unwrap();
    assert_eq!(tokens, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_serving_another_model_is_refused() {
    let logs = tempfile::tempdir().unwrap();
    let ports = group_ports(2);
    let mut first = Worker::start("v3-tiny-f32", 0, &ports, logs.path(), &[]);
    let _other = Worker::start("v3-neox-bf16-sharded", 1, &ports, logs.path(), &[]);
    // Rank 0 connects, sees the other fingerprint, says so, and stays NOT_SERVING.
    let until = Instant::now() + Duration::from_secs(120);
    while !first.log_text().contains("refused: it serves model") {
        assert!(
            Instant::now() < until,
            "rank 0 never refused its peer:\n{}",
            first.log_text()
        );
        assert!(
            first.child.try_wait().unwrap().is_none(),
            "{}",
            first.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        health(&first.address()).await,
        Some(ServingStatus::NotServing)
    );
    // Its tokens need shard 1's experts (every token visits 2 of the 4 groups, and shard 1
    // holds 2): refused, not computed with the wrong model.
    // The refusal can come before rank 0 has loaded its weights; wait those out.
    let until = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = generate(&first.address(), greedy_request(&[1, 2, 3], 4))
            .await
            .expect_err("a request needing the refused peer");
        if !status.message().contains("still loading") || Instant::now() >= until {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("expert shard 1"), "{status:?}");
}

/// A token file (Secret key `token`) in a directory of its own; the path to pass.
fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expert_exchange_admits_only_shards_with_the_groups_token() {
    const TOKEN: &str = "5f1d3c0a9b8e7d6c5f1d3c0a9b8e7d6c5f1d3c0a9b8e7d6c5f1d3c0a9b8e7d6c";
    const OTHER: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let model = "v3-tiny-f32";
    let prompt = reference_ids(model, "prompt_ids");
    let expected = reference_ids(model, "greedy_ids");
    let logs = tempfile::tempdir().unwrap();
    let token = token_file(logs.path(), "group", TOKEN);
    let flags = ["--experts-token-file", token.to_str().unwrap()];

    // Two shards with the token: the group serves the reference tokens.
    let ports = group_ports(2);
    let mut workers: Vec<Worker> = (0..2)
        .map(|rank| Worker::start(model, rank, &ports, logs.path(), &flags))
        .collect();
    for worker in &mut workers {
        wait_health(worker, ServingStatus::Serving).await;
    }
    let tokens = generate(
        &workers[0].address(),
        greedy_request(&prompt, expected.len() as u32),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", workers[0].log_text()));
    assert_eq!(tokens, expected);

    // Anyone else on the expert port: no token or a wrong one is UNAUTHENTICATED, and the
    // refusal gives nothing away.
    let mut experts = ExpertsClient::new(channel(&workers[1].experts_address()).await.unwrap());
    for presented in [None, Some(OTHER), Some(&TOKEN[..63])] {
        let handshake = HandshakeRequest {
            rank: 0,
            fingerprint: String::new(),
        };
        let status = experts
            .handshake(with_token(handshake, presented))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(!status.message().contains("fingerprint"), "{status:?}");
        let status = experts
            .run_experts(with_token(RunExpertsRequest::default(), presented))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    let answer = experts
        .handshake(with_token(
            HandshakeRequest {
                rank: 0,
                fingerprint: String::new(),
            },
            Some(TOKEN),
        ))
        .await
        .expect("the group's token is accepted")
        .into_inner();
    assert_eq!(answer.rank, 1);
    drop(workers);

    // A shard with another token is no peer: rank 0 never becomes ready.
    let other = token_file(logs.path(), "other", OTHER);
    let ports = group_ports(2);
    let mut first = Worker::start(model, 0, &ports, logs.path(), &flags);
    let _stranger = Worker::start(
        model,
        1,
        &ports,
        logs.path(),
        &["--experts-token-file", other.to_str().unwrap()],
    );
    let until = Instant::now() + Duration::from_secs(120);
    while !first.log_text().contains("only the shards of its group") {
        assert!(
            Instant::now() < until,
            "rank 0 was never refused by its peer:\n{}",
            first.log_text()
        );
        assert!(
            first.child.try_wait().unwrap().is_none(),
            "{}",
            first.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        health(&first.address()).await,
        Some(ServingStatus::NotServing)
    );
}

/// One streaming request on `address` that reports its first message on `started`, then
/// collects every token until the stream ends.
async fn stream_after_first_token(
    address: String,
    request: GenerateRequest,
    started: tokio::sync::mpsc::Sender<()>,
) -> Result<Vec<u32>, tonic::Status> {
    let channel = channel(&address)
        .await
        .ok_or_else(|| tonic::Status::unavailable("no connection"))?;
    let mut stream = InferenceClient::new(channel)
        .generate(request)
        .await?
        .into_inner();
    let mut tokens = Vec::new();
    let mut first = true;
    while let Some(message) = stream.message().await? {
        tokens.extend(message.token_ids);
        if std::mem::take(&mut first) {
            let _ = started.send(()).await;
        }
    }
    Ok(tokens)
}

/// Tokens per stream of [`kill_rank_1_under_load`]: hundreds of steps, so that every stream is
/// still running when rank 1 dies a few milliseconds after their first tokens, even on a much
/// faster machine.
const STREAM_TOKENS: u32 = 600;

/// Three shards of the 16-expert `v3-tiny-f32` architecture with a long context
/// ([`serve_support::long_context_model`]); rank 0 runs `STREAMS` concurrent streams and rank 1
/// is SIGKILLed once all have their first token. Returns the streams' results, the workers
/// (rank 1 dead) and the killed rank's expert address.
async fn kill_rank_1_under_load(
    logs: &Path,
    flags: &[&str],
) -> (Vec<Result<Vec<u32>, tonic::Status>>, Vec<Worker>, String) {
    const STREAMS: usize = 4;
    let model_dir = serve_support::long_context_model(logs);
    // An absolute path: `fixture` leaves it as it is.
    let model = model_dir.to_str().unwrap();
    let prompt = reference_ids("v3-tiny-f32", "prompt_ids");
    let ports = group_ports(3);
    let mut workers: Vec<Worker> = (0..3)
        .map(|rank| Worker::start(model, rank, &ports, logs, flags))
        .collect();
    for worker in &mut workers {
        wait_health(worker, ServingStatus::Serving).await;
    }
    let (started, mut started_rx) = tokio::sync::mpsc::channel(STREAMS);
    let streams: Vec<_> = (0..STREAMS)
        .map(|i| {
            // Different short prompts, so that the streams route to different experts.
            let prompt = prompt[i..i + 8].to_vec();
            tokio::spawn(stream_after_first_token(
                workers[0].address(),
                greedy_request(&prompt, STREAM_TOKENS),
                started.clone(),
            ))
        })
        .collect();
    drop(started);
    for _ in 0..STREAMS {
        tokio::time::timeout(Duration::from_secs(120), started_rx.recv())
            .await
            .expect("every stream gets its first token")
            .expect("a stream ended before its first token");
    }
    let killed = workers[1].experts_address();
    workers[1].child.kill().unwrap();
    workers[1].child.wait().unwrap();
    let mut results = Vec::new();
    for stream in streams {
        let result = tokio::time::timeout(Duration::from_secs(120), stream)
            .await
            .expect("no stream may hang when a shard dies")
            .unwrap();
        results.push(result);
    }
    (results, workers, killed)
}

/// Polls rank `worker`'s metrics until `predicate` holds, for at most 60 seconds.
async fn wait_metrics(worker: &Worker, what: &str, predicate: impl Fn(&str) -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let text = worker.metrics().await;
        if !text.is_empty() && predicate(&text) {
            return;
        }
        assert!(
            Instant::now() < until,
            "timed out waiting for {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_expert_on_two_shards_a_killed_rank_fails_no_request() {
    let logs = tempfile::tempdir().unwrap();
    // 16 experts over 3 shards hold 6, 5 and 5: 6 redundant slots mirror every one of them.
    let flags = ["--expert-rpc-timeout", "3s", "--redundant-experts", "6"];
    let (results, mut workers, killed) = kill_rank_1_under_load(logs.path(), &flags).await;
    for (i, result) in results.into_iter().enumerate() {
        let tokens = result.unwrap_or_else(|status| {
            panic!("stream {i} failed: {status:?}\n{}", workers[0].log_text())
        });
        assert_eq!(tokens.len(), STREAM_TOKENS as usize, "stream {i}");
    }
    // The survivors keep serving, and say that they do so without every peer.
    assert_eq!(
        health(&workers[0].address()).await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(
        health(&workers[2].address()).await,
        Some(ServingStatus::Serving)
    );
    wait_metrics(
        &workers[0],
        "rank 0 degraded with one usable peer",
        |text| {
            metric(text, "expert_group_degraded") == 1.0
                && metric(text, "expert_peers_usable") == 1.0
        },
    )
    .await;
    let text = workers[0].metrics().await;
    let retries: f64 = text
        .lines()
        .filter(|l| l.starts_with("latentserve_expert_retries_total{") && l.contains(&killed))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    eprintln!("rank 0 re-sent the work of {retries} failed calls to rank 1 on replicas");
    // New requests keep working too.
    let prompt = reference_ids("v3-tiny-f32", "prompt_ids");
    let tokens = generate(&workers[0].address(), greedy_request(&prompt, 8))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", workers[0].log_text()));
    assert_eq!(tokens.len(), 8);
    wait_health(&mut workers[2], ServingStatus::Serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redundancy_a_killed_rank_fails_its_requests_naming_the_shard() {
    let logs = tempfile::tempdir().unwrap();
    let flags = ["--expert-rpc-timeout", "3s"];
    let (results, mut workers, killed) = kill_rank_1_under_load(logs.path(), &flags).await;
    let mut failed = 0;
    for (i, result) in results.into_iter().enumerate() {
        // A stream whose last tokens needed none of rank 1's experts may finish; every other
        // one ends UNAVAILABLE, naming the lost shard.
        if let Err(status) = result {
            assert_eq!(
                status.code(),
                tonic::Code::Unavailable,
                "stream {i}: {status:?}"
            );
            assert!(
                status.message().contains("expert shard 1") && status.message().contains(&killed),
                "stream {i}: {status:?}"
            );
            failed += 1;
        }
    }
    assert!(failed > 0, "no stream needed rank 1's experts");
    wait_health(&mut workers[0], ServingStatus::NotServing).await;
    wait_metrics(&workers[0], "rank 0 not degraded but down", |text| {
        metric(text, "expert_group_degraded") == 0.0 && metric(text, "expert_peers_usable") == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_placement_files_and_flags_are_refused_at_start_naming_what_is_wrong() {
    let logs = tempfile::tempdir().unwrap();
    let model = "v3-tiny-f32";
    // The fixture has 3 layers: layer 0 dense, layers 1 and 2 MoE, 16 routed experts.
    let two_shards: Vec<Vec<usize>> = (0..16).map(|e| vec![e / 8]).collect();
    let write = |name: &str, value: serde_json::Value| {
        let path = logs.path().join(name);
        std::fs::write(&path, value.to_string()).unwrap();
        path
    };
    let cases = [
        (
            write(
                "dense-layer.json",
                serde_json::json!({"experts": two_shards, "layers": {"0": two_shards}}),
            ),
            r#"`layers["0"]`: layer 0 is not an MoE layer"#,
        ),
        (
            write(
                "missing-layer.json",
                serde_json::json!({"layers": {"1": two_shards}}),
            ),
            "MoE layer 2 has no entry in `layers` and there is no `experts` default",
        ),
        (
            write(
                "shard-count.json",
                serde_json::json!({"shardCount": 4, "experts": two_shards}),
            ),
            "`shardCount` is 4 but the group has 2 shards",
        ),
    ];
    for (path, field) in &cases {
        let ports = group_ports(2);
        let mut worker = Worker::start(
            model,
            0,
            &ports,
            logs.path(),
            &["--expert-placement", path.to_str().unwrap()],
        );
        let log = worker.wait_for_exit();
        assert!(
            log.contains(&format!("--expert-placement {}: {field}", path.display())),
            "{}:\n{log}",
            path.display()
        );
    }
    let (path, _) = &cases[0];
    let ports = group_ports(2);
    let mut worker = Worker::start(
        model,
        0,
        &ports,
        logs.path(),
        &[
            "--redundant-experts",
            "2",
            "--expert-placement",
            path.to_str().unwrap(),
        ],
    );
    let log = worker.wait_for_exit();
    assert!(
        log.contains(&format!(
            "--redundant-experts 2 and --expert-placement {} cannot be combined",
            path.display()
        )),
        "{log}"
    );
    let ports = group_ports(1);
    let mut worker = Worker::start(model, 0, &ports, logs.path(), &["--redundant-experts", "1"]);
    let log = worker.wait_for_exit();
    assert!(
        log.contains("--redundant-experts 1 needs --shard-count above 1"),
        "{log}"
    );
}

/// A group whose shards all get SIGTERM at once (a rollout, a new expert placement) finishes
/// the requests in flight: a shard with nothing of its own in flight keeps serving its experts
/// while its peers still call, and only then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_terminated_at_once_finishes_its_requests() {
    const STREAMS: usize = 3;
    let logs = tempfile::tempdir().unwrap();
    let model_dir = serve_support::long_context_model(logs.path());
    let model = model_dir.to_str().unwrap();
    let prompt = reference_ids("v3-tiny-f32", "prompt_ids");
    let ports = group_ports(2);
    let mut workers: Vec<Worker> = (0..2)
        .map(|rank| Worker::start(model, rank, &ports, logs.path(), &[]))
        .collect();
    for worker in &mut workers {
        wait_health(worker, ServingStatus::Serving).await;
    }
    let (started, mut started_rx) = tokio::sync::mpsc::channel(STREAMS);
    let streams: Vec<_> = (0..STREAMS)
        .map(|i| {
            tokio::spawn(stream_after_first_token(
                workers[0].address(),
                greedy_request(&prompt[i..i + 8], STREAM_TOKENS),
                started.clone(),
            ))
        })
        .collect();
    drop(started);
    for _ in 0..STREAMS {
        tokio::time::timeout(Duration::from_secs(120), started_rx.recv())
            .await
            .expect("every stream gets its first token")
            .expect("a stream ended before its first token");
    }
    // Rank 1 has nothing of its own in flight.
    for worker in &workers {
        let status = Command::new("kill")
            .args(["-TERM", &worker.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    for (i, stream) in streams.into_iter().enumerate() {
        let tokens = tokio::time::timeout(Duration::from_secs(120), stream)
            .await
            .expect("the drain ends every stream")
            .unwrap()
            .unwrap_or_else(|status| {
                panic!(
                    "stream {i} failed while its group drained: {status:?}\n{}\n{}",
                    workers[0].log_text(),
                    workers[1].log_text()
                )
            });
        assert_eq!(tokens.len(), STREAM_TOKENS as usize, "stream {i}");
    }
    for worker in &mut workers {
        let until = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = worker.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < until,
                "still running:\n{}",
                worker.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{}", worker.log_text());
    }
}
