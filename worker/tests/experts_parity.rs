//! Expert parallelism in one process: N shards of a fixture model, each with only its routed
//! experts loaded and its Experts service on a 127.0.0.1 port, exchanging over real gRPC. Their
//! logits must match one worker holding everything within 1e-5 and their greedy tokens exactly:
//! with the default placement, with per-layer placements and replicas, and when a peer's calls
//! fail and its work goes to a replica.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use latentserve_proto::v1::experts_server::{Experts, ExpertsServer};
use latentserve_proto::v1::{
    HandshakeRequest, HandshakeResponse, RunExpertsRequest, RunExpertsResponse,
};
use latentserve_worker::experts::service::ExpertsService;
use latentserve_worker::experts::shard::{Shard, ShardSettings, loaded_expert_bytes};
use latentserve_worker::metrics::Metrics;
use latentserve_worker::model::{
    DeepSeekModel, DispatchPlan, ExpertExecutor, LatentCache, LoadOptions, LogitsFor, ModelConfig,
    ModelError, SequenceChunk,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn prompt_ids(dir: &Path) -> Vec<u32> {
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    reference["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// One in-process shard: its model (only its experts), its Experts server and its peers.
struct TestShard {
    model: Arc<DeepSeekModel>,
    shard: Shard,
    sharded: Option<Arc<latentserve_worker::experts::remote::ShardedExperts>>,
    metrics: Arc<Metrics>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestShard {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Starts `n` shards of the model in `dir` and waits (bounded) until every one sees all peers.
fn start_group(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    n: usize,
    placement: Option<&Path>,
) -> Vec<TestShard> {
    start_group_with(runtime, dir, n, placement, 0, None)
}

/// An Experts service that answers handshakes as the real one does (so its peers take it for
/// usable) but fails every RunExperts call: a peer that breaks mid-step.
struct FailingRuns(ExpertsService);

#[tonic::async_trait]
impl Experts for FailingRuns {
    async fn handshake(
        &self,
        request: tonic::Request<HandshakeRequest>,
    ) -> Result<tonic::Response<HandshakeResponse>, tonic::Status> {
        self.0.handshake(request).await
    }

    async fn run_experts(
        &self,
        _: tonic::Request<RunExpertsRequest>,
    ) -> Result<tonic::Response<RunExpertsResponse>, tonic::Status> {
        Err(tonic::Status::internal("injected failure"))
    }
}

/// [`start_group`] with `--redundant-experts redundant`, and with the RunExperts calls of rank
/// `failing` (if any) always failing.
fn start_group_with(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    n: usize,
    placement: Option<&Path>,
    redundant: usize,
    failing: Option<usize>,
) -> Vec<TestShard> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap())
        .collect();
    let addresses: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let shards: Vec<TestShard> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let metrics = Arc::new(Metrics::new("fixture").unwrap());
            let settings = ShardSettings {
                rank,
                count: n,
                peers: if n > 1 { addresses.clone() } else { Vec::new() },
                expert_placement: placement.map(Path::to_path_buf),
                redundant_experts: redundant,
                ..ShardSettings::default()
            };
            let _guard = runtime.enter();
            let mut shard =
                Shard::new(&settings, dir, &config, "fixture", metrics.clone()).unwrap();
            let incoming = TcpListenerStream::new(listener);
            let server = if failing == Some(rank) {
                let service = ExpertsServer::new(FailingRuns(shard.service.clone()));
                runtime.spawn(async move {
                    tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming(incoming)
                        .await
                        .unwrap();
                })
            } else {
                let service = shard.service.clone().into_server();
                runtime.spawn(async move {
                    tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming(incoming)
                        .await
                        .unwrap();
                })
            };
            shard.start_monitor();
            let options = LoadOptions {
                expert_filter: shard.expert_filter(),
                ..LoadOptions::default()
            };
            let model = Arc::new(DeepSeekModel::load(dir, &options).unwrap());
            let sharded = shard.attach(model.clone(), runtime.handle().clone());
            if let Some(sharded) = &sharded {
                sharded.enable_exchange();
            }
            TestShard {
                model,
                shard,
                sharded,
                metrics,
                server,
            }
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(20);
    while !shards.iter().all(|s| s.shard.peers.health().all_usable()) {
        assert!(
            Instant::now() < until,
            "the shards never all saw each other"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    shards
}

/// Counts the tokens the local experts run, per expert.
struct Counting<'a> {
    inner: &'a dyn ExpertExecutor,
    tokens: Mutex<Vec<usize>>,
}

impl ExpertExecutor for Counting<'_> {
    fn run_experts(
        &self,
        layer: usize,
        hidden: &[f32],
        hidden_size: usize,
        plan: &DispatchPlan,
    ) -> Result<Vec<f32>, ModelError> {
        let mut tokens = self.tokens.lock().unwrap();
        for work in &plan.works {
            tokens[work.expert] += work.rows.len();
        }
        drop(tokens);
        self.inner.run_experts(layer, hidden, hidden_size, plan)
    }
}

/// Prefill of `prompt` (logits at every position) then `new_tokens` greedy decode steps, on
/// `shard`; also returns the tokens its local experts ran per expert.
fn generate(
    shard: &TestShard,
    prompt: &[u32],
    new_tokens: usize,
) -> (Vec<f32>, Vec<u32>, Vec<usize>) {
    let config = shard.model.config();
    let n_experts = config.moe.map_or(0, |m| m.n_routed_experts);
    let block_size = 16;
    let blocks = (prompt.len() + new_tokens).div_ceil(block_size);
    let mut cache = LatentCache::new(config, blocks, block_size, DType::F32, &Device::Cpu).unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let local = Counting {
        inner: shard.model.local_experts(),
        tokens: Mutex::new(vec![0; n_experts]),
    };
    let forward = |cache: &mut LatentCache, tokens: &[u32], start_pos: usize, logits| {
        let chunk = SequenceChunk {
            tokens,
            start_pos,
            block_table: &table,
        };
        let out = match &shard.sharded {
            Some(sharded) => shard.model.forward_with_experts(
                &[chunk],
                cache,
                logits,
                &sharded.with_local(&local),
            ),
            None => shard
                .model
                .forward_with_experts(&[chunk], cache, logits, &local),
        };
        out.unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let vocab = config.vocab_size;
    let prompt_logits = forward(&mut cache, prompt, 0, LogitsFor::AllTokens);
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32
    };
    let mut generated = vec![argmax(&prompt_logits[prompt_logits.len() - vocab..])];
    while generated.len() < new_tokens {
        let position = prompt.len() + generated.len() - 1;
        let last = [*generated.last().unwrap()];
        let logits = forward(&mut cache, &last, position, LogitsFor::LastToken);
        generated.push(argmax(&logits));
    }
    let tokens = local.tokens.into_inner().unwrap();
    (prompt_logits, generated, tokens)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn check_parity(name: &str) {
    let runtime = runtime();
    let dir = fixture(name);
    let prompt = prompt_ids(&dir);
    let single = start_group(&runtime, &dir, 1, None);
    let (reference_logits, reference_tokens, _) = generate(&single[0], &prompt, 16);
    let total_bytes = loaded_expert_bytes(single[0].model.local_experts());
    assert!(total_bytes > 0);
    drop(single);
    for n in [2, 4] {
        let group = start_group(&runtime, &dir, n, None);
        for shard in &group {
            let bytes = loaded_expert_bytes(shard.model.local_experts());
            assert_eq!(
                bytes * n,
                total_bytes,
                "{name}: shard {} of {n} loaded {bytes} expert bytes, total {total_bytes}",
                shard.shard.identity.rank
            );
        }
        // Every rank accepts requests: run the same prompt from each.
        for shard in &group {
            let (logits, tokens, _) = generate(shard, &prompt, 16);
            let diff = max_abs_diff(&logits, &reference_logits);
            assert!(
                diff <= 1e-5,
                "{name}: N = {n}, rank {}: logits differ from N = 1 by {diff}",
                shard.shard.identity.rank
            );
            assert_eq!(
                tokens, reference_tokens,
                "{name}: N = {n}, rank {}",
                shard.shard.identity.rank
            );
        }
        // The exchange really happened: every shard's experts ran tokens for a peer.
        for shard in &group {
            let text = shard.metrics.render();
            assert!(
                text.contains("latentserve_expert_dispatch_bytes_total{"),
                "{name}: N = {n}: rank {} sent nothing",
                shard.shard.identity.rank
            );
        }
    }
}

#[test]
fn v3_groups_on_1_2_4_shards_match_one_worker() {
    check_parity("v3-tiny-f32");
}

#[test]
fn v2_ranges_on_1_2_4_shards_match_one_worker() {
    check_parity("v2-lite-f16");
}

#[test]
fn a_replicated_expert_spreads_its_tokens_over_its_replicas() {
    let runtime = runtime();
    let dir = fixture("v3-tiny-f32");
    let prompt = prompt_ids(&dir);
    let single = start_group(&runtime, &dir, 1, None);
    let (reference_logits, reference_tokens, counts) = generate(&single[0], &prompt, 8);
    drop(single);
    // The busiest expert of the 8 that shard 1 holds by default gets a replica on shard 0.
    let hot = (8..16).max_by_key(|&e| counts[e]).unwrap();
    assert!(
        counts[hot] >= 4,
        "expert {hot} got only {} tokens",
        counts[hot]
    );
    let experts: Vec<Vec<usize>> = (0..16)
        .map(|e| match e {
            e if e == hot => vec![0, 1],
            e if e < 8 => vec![0],
            _ => vec![1],
        })
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        serde_json::json!({ "experts": experts }).to_string(),
    )
    .unwrap();

    let group = start_group(&runtime, &dir, 2, Some(file.path()));
    let (logits, tokens, local_counts) = generate(&group[0], &prompt, 8);
    assert!(max_abs_diff(&logits, &reference_logits) <= 1e-5);
    assert_eq!(tokens, reference_tokens);
    // Shard 0 ran part of the hot expert's tokens itself and sent the rest to shard 1.
    let on_shard_1: u64 = group[1]
        .metrics
        .render()
        .lines()
        .filter(|l| {
            l.starts_with("latentserve_expert_tokens_total{")
                && l.contains(&format!("expert=\"{hot}\","))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    let on_shard_0 = local_counts[hot] as u64;
    assert!(
        on_shard_0 > 0 && on_shard_1 > 0,
        "expert {hot}: {on_shard_0} tokens on shard 0, {on_shard_1} on shard 1"
    );
    assert_eq!(on_shard_0 + on_shard_1, counts[hot] as u64);
}

/// Sum of a counter's series whose line contains `needle`.
fn counter(metrics: &Metrics, name: &str, needle: &str) -> u64 {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(needle))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn per_layer_placements_with_replicas_match_one_worker() {
    let runtime = runtime();
    let dir = fixture("v3-tiny-f32");
    let prompt = prompt_ids(&dir);
    let single = start_group(&runtime, &dir, 1, None);
    let (reference_logits, reference_tokens, _) = generate(&single[0], &prompt, 12);
    drop(single);
    // MoE layers 1 and 2 of 16 experts over 3 shards, laid out differently: layer 1 deals the
    // experts round-robin and copies 0..4 to the next shard; layer 2 gives contiguous blocks in
    // reverse rank order and copies 10..13 to the shard before.
    let layer_1: Vec<Vec<usize>> = (0..16)
        .map(|e| match e % 3 {
            r if e < 4 => vec![r, (r + 1) % 3],
            r => vec![r],
        })
        .collect();
    let layer_2: Vec<Vec<usize>> = (0..16)
        .map(|e| {
            let r = 2 - e * 3 / 16;
            if (10..13).contains(&e) {
                vec![r, (r + 2) % 3]
            } else {
                vec![r]
            }
        })
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        serde_json::json!({
            "version": "per-layer-test",
            "shardCount": 3,
            "layers": { "1": layer_1, "2": layer_2 },
        })
        .to_string(),
    )
    .unwrap();

    let group = start_group(&runtime, &dir, 3, Some(file.path()));
    for shard in &group {
        let rank = shard.shard.identity.rank;
        // The loader took each layer's experts of this rank, and nothing else.
        for (layer, entries) in [(1, &layer_1), (2, &layer_2)] {
            for (expert, ranks) in entries.iter().enumerate() {
                assert_eq!(
                    shard.model.local_experts().holds(layer, expert),
                    ranks.contains(&rank),
                    "rank {rank}, layer {layer}, expert {expert}"
                );
            }
        }
        let text = shard.metrics.render();
        assert!(
            text.contains(
                r#"latentserve_expert_placement_info{version="per-layer-test",model="fixture"} 1"#
            ),
            "rank {rank}: {text}"
        );
        let (logits, tokens, _) = generate(shard, &prompt, 12);
        let diff = max_abs_diff(&logits, &reference_logits);
        assert!(diff <= 1e-5, "rank {rank}: logits differ by {diff}");
        assert_eq!(tokens, reference_tokens, "rank {rank}");
    }
}

#[test]
fn a_peer_whose_calls_fail_has_its_work_run_on_a_replica() {
    let runtime = runtime();
    let dir = fixture("v3-tiny-f32");
    let prompt = prompt_ids(&dir);
    let single = start_group(&runtime, &dir, 1, None);
    let (reference_logits, reference_tokens, _) = generate(&single[0], &prompt, 8);
    drop(single);
    // Two shards, 8 redundant slots each: both hold all 16 experts, and rank 0 splits its
    // replicated work with rank 1, whose every RunExperts call fails.
    let group = start_group_with(&runtime, &dir, 2, None, 8, Some(1));
    let (logits, tokens, _) = generate(&group[0], &prompt, 8);
    let diff = max_abs_diff(&logits, &reference_logits);
    assert!(diff <= 1e-5, "logits differ by {diff}");
    assert_eq!(tokens, reference_tokens);
    let peer = group[0].shard.peers.address(1);
    let peer_label = format!("peer=\"{peer}\"");
    let retries = counter(
        &group[0].metrics,
        "latentserve_expert_retries_total",
        &peer_label,
    );
    let errors = counter(
        &group[0].metrics,
        "latentserve_expert_rpc_errors_total",
        &peer_label,
    );
    assert!(
        retries >= 1 && retries == errors,
        "{retries} retries, {errors} failed calls"
    );
}
