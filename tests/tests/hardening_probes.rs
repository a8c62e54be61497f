//! The probes of issue 17's findings, re-run: each finding's attack or careless request against
//! debug `latentserve-worker serve` processes on the demo model (127.0.0.1 only), and the operator
//! findings against the operator's builders. Prints one row per probe (fixed / NOT FIXED) and
//! fails if any is not fixed. `scripts/hardening-probes.sh` builds the binaries and runs it;
//! the result table is in docs/operations.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use latentserve_e2e::workspace_binary;
use latentserve_operator::crd::{
    HostPathSource, ModelDeployment, ModelDeploymentSpec, ModelSource, ServingSpec,
};
use latentserve_operator::discovery::{Features, KubeVersion};
use latentserve_operator::policy::Policy;
use latentserve_operator::resources::service::client_service;
use latentserve_operator::validate::{check_allowed, validate};
use latentserve_proto::v1::experts_client::ExpertsClient;
use latentserve_proto::v1::generate_request::Prompt;
use latentserve_proto::v1::inference_client::InferenceClient;
use latentserve_proto::v1::{
    ExpertRows, GenerateRequest, GetModelInfoRequest, HandshakeRequest, RunExpertsRequest,
    SamplingParams, StoppingCriteria, TokenIds, WireDtype,
};
use latentserve_worker::experts::placement::Placement;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;

const TOKEN: &str = "4c6174656e74536572766550726f6265734c6174656e74536572766550726f62";

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo")
}

/// A `serve` process; killed when dropped.
struct Worker {
    child: Child,
    grpc: SocketAddr,
    metrics: SocketAddr,
    experts: SocketAddr,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    fn start(extra: &[String], log: &Path) -> Worker {
        let ports = free_ports(3);
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let (grpc, metrics) = (addr(ports[0]), addr(ports[1]));
        let experts = extra
            .iter()
            .position(|a| a == "--experts-addr")
            .map(|at| extra[at + 1].parse().unwrap())
            .unwrap_or(addr(ports[2]));
        let mut command = workspace_binary("latentserve-worker").unwrap();
        command
            .arg("serve")
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--openai-addr", ""])
            .args(["--kv-cache-memory", "16Mi"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        Worker {
            child: command.spawn().unwrap(),
            grpc,
            metrics,
            experts,
        }
    }

    async fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::new(channel(self.grpc).await)
    }

    /// Waits until the model is loaded (GetModelInfo answers).
    async fn wait_loaded(&mut self) {
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "the worker exited"
            );
            if let Ok(ch) = try_channel(self.grpc).await
                && InferenceClient::new(ch)
                    .get_model_info(GetModelInfoRequest::default())
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(Instant::now() < until, "the worker never loaded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn try_channel(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
}

async fn channel(addr: SocketAddr) -> Channel {
    try_channel(addr).await.unwrap()
}

fn ids(n: u32) -> Vec<u32> {
    (0..n).map(|i| 3 + i % 90).collect()
}

fn request(prompt: Vec<u32>, max_tokens: u32, temperature: f32) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: prompt })),
        sampling: Some(SamplingParams {
            temperature: Some(temperature),
            seed: Some(7),
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

/// Runs a generation: (tokens, cached prompt tokens) or the error status.
async fn run(
    client: &mut InferenceClient<Channel>,
    request: GenerateRequest,
) -> Result<(Vec<u32>, u32), tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let (mut tokens, mut cached) = (Vec::new(), 0);
    while let Some(message) = stream.message().await? {
        tokens.extend(message.token_ids);
        if let Some(usage) = message.usage {
            cached = usage.cached_prompt_tokens;
        }
    }
    Ok((tokens, cached))
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    request
}

/// One probe's outcome.
struct Row {
    finding: &'static str,
    probe: &'static str,
    fixed: bool,
    seen: String,
}

fn deployment(path: &str, extra_args: Vec<String>) -> ModelDeployment {
    let mut md = ModelDeployment::new(
        "demo",
        ModelDeploymentSpec {
            model: ModelSource::HostPath(HostPathSource { path: path.into() }),
            replicas: 1,
            expert_shards: 2,
            image: None,
            image_pull_policy: None,
            resources: None,
            serving: Some(ServingSpec {
                extra_args,
                ..ServingSpec::default()
            }),
            node_selector: Default::default(),
            tolerations: vec![],
            affinity: None,
            priority_class_name: None,
            service_account_name: None,
            service: None,
            paused: false,
            tls: None,
            router: None,
            autoscaling: None,
            expert_placement: None,
        },
    );
    md.metadata.namespace = Some("models".into());
    md.metadata.uid = Some("5d0c7e59-1f0e-4a4b-9a53-3f3c6f0b2a10".into());
    md
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_finding_of_issue_17_is_fixed() {
    let dir = tempfile_dir();
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let mut rows = Vec::new();

    // A single worker, started as carelessly as the finding's: a max-seq-len far past the
    // model's context, a short idle timeout to see idle connections go.
    let mut single = Worker::start(
        &[
            "--max-seq-len".into(),
            "1048576".into(),
            "--idle-timeout".into(),
            "2s".into(),
        ],
        &dir.join("single.log"),
    );
    // A group of two shards with the group's token.
    let experts_ports = free_ports(2);
    let peers = experts_ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut group: Vec<Worker> = (0..2)
        .map(|rank| {
            let args: Vec<String> = [
                "--shard-count",
                "2",
                "--shard-rank",
                &rank.to_string(),
                "--experts-addr",
                &format!("127.0.0.1:{}", experts_ports[rank]),
                "--peers",
                &peers,
                "--experts-token-file",
                token.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            Worker::start(&args, &dir.join(format!("rank-{rank}.log")))
        })
        .collect();
    single.wait_loaded().await;
    for worker in &mut group {
        worker.wait_loaded().await;
    }

    // 1. The expert exchange: not on the client port, closed to strangers, bounded.
    let mut on_client_port = ExpertsClient::new(channel(single.grpc).await);
    let answer = on_client_port.handshake(HandshakeRequest::default()).await;
    rows.push(Row {
        finding: "1",
        probe: "Experts.Handshake on the client port",
        fixed: answer
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::Unimplemented),
        seen: format!("{:?}", answer.map(|_| "answered").map_err(|s| s.code())),
    });
    let mut experts = ExpertsClient::new(channel(group[1].experts).await);
    let stranger = experts.handshake(HandshakeRequest::default()).await;
    rows.push(Row {
        finding: "1",
        probe: "Handshake on the expert port without the group's token",
        fixed: stranger.as_ref().is_err_and(|s| {
            s.code() == tonic::Code::Unauthenticated && !s.message().contains("fingerprint")
        }),
        seen: format!(
            "{:?}",
            stranger
                .map(|_| "answered (fingerprint handed out)")
                .map_err(|s| s.code())
        ),
    });
    let fingerprint = experts
        .handshake(authorized(HandshakeRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .fingerprint;
    let placement = Placement::default_for(8, 4, 2, 0, &[1]).unwrap();
    let expert = placement.experts_of(1, 1)[0] as u32;
    let hidden = latentserve_worker::experts::wire::encode(&[0.5; 128], 1, 128, WireDtype::F32);
    let amplify = RunExpertsRequest {
        layer: 1,
        fingerprint: fingerprint.clone(),
        hidden: Some(hidden.clone()),
        experts: vec![ExpertRows {
            expert,
            rows: vec![0; 1_000_000],
            weights: vec![1.0; 1_000_000],
        }],
        response_dtype: WireDtype::F32 as i32,
    };
    let started = Instant::now();
    let answer = experts
        .clone()
        .max_encoding_message_size(64 << 20)
        .run_experts(authorized(amplify))
        .await;
    rows.push(Row {
        finding: "1",
        probe: "RunExperts naming one row 1,000,000 times (5 MB)",
        fixed: answer.as_ref().is_err_and(|s| {
            matches!(
                s.code(),
                tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
            )
        }),
        seen: format!(
            "{:?} in {:.2}s",
            answer.map(|_| "computed").map_err(|s| s.code()),
            started.elapsed().as_secs_f64()
        ),
    });

    // 2. A context limit past the model's: clamped, and an over-long prompt fails alone.
    let mut client = single.inference().await;
    let info = client
        .get_model_info(GetModelInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    let (mut long_client, mut short_client) = (single.inference().await, single.inference().await);
    let (long, short) = tokio::join!(
        run(&mut long_client, request(ids(100), 4, 0.0)),
        run(&mut short_client, request(ids(8), 4, 0.0)),
    );
    rows.push(Row {
        finding: "2",
        probe: "--max-seq-len 1048576, a 100-token prompt beside a short one",
        fixed: info.max_context <= 64
            && long
                .as_ref()
                .is_err_and(|s| s.code() == tonic::Code::InvalidArgument)
            && short.as_ref().is_ok_and(|(t, _)| t.len() == 4),
        seen: format!(
            "max_context {}; long: {:?}; short: {:?}",
            info.max_context,
            long.map(|(t, _)| t.len()).map_err(|s| s.code()),
            short.map(|(t, _)| t.len()).map_err(|s| s.code())
        ),
    });

    // 3. 120,000 stop strings.
    let mut stops = request(ids(8), 4, 0.0);
    stops.stopping.as_mut().unwrap().stop = (0..120_000).map(|i| format!("stop-{i:025}")).collect();
    let answer = run(&mut client, stops).await;
    rows.push(Row {
        finding: "3",
        probe: "120,000 stop strings (3.8 MB)",
        fixed: answer
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::InvalidArgument),
        seen: format!("{:?}", answer.map(|(t, _)| t.len()).map_err(|s| s.code())),
    });

    // 4. A tiny temperature is greedy, not garbage.
    let greedy = run(&mut client, request(ids(8), 8, 0.0)).await.unwrap().0;
    let tiny = run(&mut client, request(ids(8), 8, 1e-39)).await;
    rows.push(Row {
        finding: "4",
        probe: "temperature 1e-39 against greedy",
        fixed: tiny.as_ref().is_ok_and(|(t, _)| *t == greedy),
        seen: format!(
            "greedy {greedy:?}, 1e-39 {:?}",
            tiny.map(|(t, _)| t).map_err(|s| s.code())
        ),
    });

    // 5. Idle connections and TLS.
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(single.grpc).await.unwrap());
    }
    let started = Instant::now();
    let mut closed = 0;
    for stream in &mut idle {
        // The server speaks first (its HTTP/2 SETTINGS); read until it hangs up.
        let mut buf = Vec::new();
        let hung_up = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
            .await
            .is_ok();
        closed += usize::from(hung_up);
    }
    rows.push(Row {
        finding: "5",
        probe: "50 idle TCP connections, --idle-timeout 2s",
        fixed: closed == 50,
        seen: format!(
            "{closed}/50 closed after {:.1}s",
            started.elapsed().as_secs_f64()
        ),
    });
    let help = workspace_binary("latentserve-worker")
        .unwrap()
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    rows.push(Row {
        finding: "5",
        probe: "serve --help offers TLS (exercised in worker/tests/tls.rs)",
        fixed: [
            "--tls-cert",
            "--tls-key",
            "--tls-client-ca",
            "--tls-handshake-timeout",
        ]
        .iter()
        .all(|flag| help.contains(flag)),
        seen: "--tls-cert, --tls-key, --tls-client-ca".into(),
    });

    // 6. A 4 MB prompt to tokenize while the kubelet probes.
    let mut big = request(Vec::new(), 1, 0.0);
    big.prompt = Some(Prompt::Text("lorem ipsum ".repeat(350_000)));
    let mut big_client = single.inference().await.max_encoding_message_size(16 << 20);
    let tokenizing = tokio::spawn(async move { run(&mut big_client, big).await });
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        let mut probe = TcpStream::connect(single.metrics).await.unwrap();
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        probe.read_to_end(&mut answer).await.unwrap();
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = tokenizing.await;
    rows.push(Row {
        finding: "6",
        probe: "/healthz while a 4 MB prompt is tokenized",
        fixed: slowest < Duration::from_secs(1),
        seen: format!("slowest /healthz {:.0} ms", slowest.as_secs_f64() * 1000.0),
    });

    // 7. A 3 MiB request_id.
    let mut echo = request(ids(8), 4, 0.0);
    echo.request_id = "x".repeat(3 << 20);
    let answer = run(
        &mut single.inference().await.max_encoding_message_size(16 << 20),
        echo,
    )
    .await;
    rows.push(Row {
        finding: "7",
        probe: "a 3 MiB request_id",
        fixed: answer
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::InvalidArgument),
        seen: format!("{:?}", answer.map(|(t, _)| t.len()).map_err(|s| s.code())),
    });

    // 8. An absurd config.json: an error naming the field, not an abort.
    let absurd = dir.join("absurd");
    std::fs::create_dir_all(&absurd).unwrap();
    for entry in std::fs::read_dir(demo_dir()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), absurd.join(entry.file_name())).unwrap();
        }
    }
    let config = std::fs::read_to_string(absurd.join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["num_hidden_layers"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(absurd.join("config.json"), config.to_string()).unwrap();
    let output = workspace_binary("latentserve-worker")
        .unwrap()
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--openai-addr", "", "--model"])
        .arg(&absurd)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    rows.push(Row {
        finding: "8",
        probe: "config.json with num_hidden_layers 1e9",
        fixed: output.status.code() == Some(1) && stderr.contains("num_hidden_layers"),
        seen: format!(
            "exit {:?}, names the field: {}",
            output.status.code(),
            stderr.contains("num_hidden_layers")
        ),
    });

    // 9. RunExperts on a dense layer.
    let dense = RunExpertsRequest {
        layer: 0,
        fingerprint,
        hidden: Some(hidden),
        experts: vec![ExpertRows {
            expert,
            rows: vec![0],
            weights: vec![1.0],
        }],
        response_dtype: WireDtype::F32 as i32,
    };
    let answer = experts.run_experts(authorized(dense)).await;
    rows.push(Row {
        finding: "9",
        probe: "RunExperts on dense layer 0",
        fixed: answer
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::InvalidArgument),
        seen: format!("{:?}", answer.map(|_| "computed").map_err(|s| s.code())),
    });

    // 10. Another tenant's prefix.
    let salted = |salt: &str| {
        let mut r = request(ids(40), 2, 0.0);
        r.cache_salt = salt.into();
        r
    };
    let first = run(&mut client, salted("tenant-a")).await.unwrap().1;
    let other = run(&mut client, salted("tenant-b")).await.unwrap().1;
    let same = run(&mut client, salted("tenant-a")).await.unwrap().1;
    rows.push(Row {
        finding: "10",
        probe: "cached_prompt_tokens of the same prefix under another cache_salt",
        fixed: first == 0 && other == 0 && same > 0,
        seen: format!("tenant a {first}, tenant b {other}, tenant a again {same}"),
    });

    // 11-14: the operator, from its builders and validator.
    let features = Features::from_discovery(
        KubeVersion::new(1, 33),
        &["policy/v1", "networking.k8s.io/v1"].map(String::from),
    );
    let etc = deployment("/etc", vec![]);
    let refused = validate(&etc, &features)
        .map(|spec| check_allowed(&spec, &Policy::default()).is_err())
        .unwrap_or(true);
    rows.push(Row {
        finding: "11",
        probe: "model.hostPath /etc with the chart's default allow-list",
        fixed: refused,
        seen: format!("refused: {refused}"),
    });
    rows.push(Row {
        finding: "12",
        probe: "a ModelDeployment named like a foreign Service (operator reconcile test objects_of_our_names_that_we_do_not_control_are_left_alone)",
        fixed: true,
        seen: "covered by the operator's fake-API reconcile test".into(),
    });
    let md = deployment("/srv/models/demo", vec![]);
    let service = client_service(&validate(&md, &features).unwrap());
    let ports: Vec<String> = service
        .spec
        .unwrap()
        .ports
        .unwrap()
        .into_iter()
        .filter_map(|p| p.name)
        .collect();
    rows.push(Row {
        finding: "13",
        probe: "ports of the client Service",
        fixed: !ports.iter().any(|p| p == "metrics"),
        seen: ports.join(", "),
    });
    let overriding = deployment("/srv/models/demo", vec!["--max-seq-len=1048576".into()]);
    let refused = validate(&overriding, &features).is_err();
    rows.push(Row {
        finding: "14",
        probe: "serving.extraArgs --max-seq-len=1048576",
        fixed: refused,
        seen: format!("refused: {refused}"),
    });

    println!("\n| finding | probe | result | observed |\n| --- | --- | --- | --- |");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} |",
            row.finding,
            row.probe,
            if row.fixed { "fixed" } else { "NOT FIXED" },
            row.seen
        );
    }
    drop((single, group));
    let _ = std::fs::remove_dir_all(&dir);
    let open: Vec<_> = rows
        .iter()
        .filter(|r| !r.fixed)
        .map(|r| r.finding)
        .collect();
    assert!(open.is_empty(), "findings not fixed: {open:?}");
}

/// A temporary directory that lives as long as the test process.
fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "latentserve-probes-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
