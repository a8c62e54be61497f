//! `latentserve-worker serve`: loads a model and serves it over gRPC, with metrics and probes on
//! a second port, until SIGTERM (or Ctrl-C) drains it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Args;
use latentserve_proto::v1::ModelInfo;

use super::WeightDtype;
use super::model_dir::resolve_model_dir;
use crate::engine::cache::BlockManager;
use crate::engine::deepseek::DeepSeekExecutor;
use crate::engine::detokenizer::TokenCodec;
use crate::engine::scheduler::{RequestCounts, Scheduler, SchedulerConfig};
use crate::engine::{Engine, EngineHandle};
use crate::experts::shard::{Shard, ShardArgs};
use crate::model::config::ModelType;
use crate::model::loader::WeightStore;
use crate::model::{DeepSeekModel, LatentCache, LoadOptions, ModelConfig, Tokenizer};
use crate::server::grpc::{LoadedModel, RequestLimits};
use crate::server::metrics::Metrics;
use crate::server::{ExpertsEndpoint, RunningServer};

fn dtype_name(dtype: WeightDtype) -> &'static str {
    match dtype {
        WeightDtype::F32 => "f32",
        WeightDtype::F16 => "f16",
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model directory (config.json, safetensors weights, tokenizer.json); the demo model that
    /// ships with the project by default.
    #[arg(long, env = "LATENTSERVE_MODEL")]
    pub model: Option<PathBuf>,
    /// Name the model is served under (label `model` of every metric); the directory name by default.
    #[arg(long)]
    pub model_name: Option<String>,
    /// Address of the gRPC API.
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Requests running at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch_size: u32,
    /// Tokens one engine step runs (decode tokens plus prefill chunks); longer prompts are split.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens_per_step: u32,
    /// Context limit (prompt + new tokens); the model's max_position_embeddings by default.
    #[arg(long)]
    pub max_seq_len: Option<u32>,
    /// Memory for the latent cache pool, e.g. 8Gi, 512Mi, 100M.
    #[arg(long, default_value = "1Gi", value_parser = parse_memory_size)]
    pub kv_cache_memory: u64,
    /// Tokens per cache block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub block_size: u32,
    /// Do not share cache blocks between prompts with a common prefix.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Requests waiting for admission before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 256)]
    pub max_queue: u32,
    /// After SIGTERM, how long in-flight requests may run before they are cancelled (e.g. 30s, 500ms).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Weight storage dtype in memory (activations are always f32).
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
    /// Expert parallelism: rank, shard count, peers, placement, wire dtype.
    #[command(flatten)]
    pub shard: ShardArgs,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

/// Parses a byte size: a number with an optional binary (Ki, Mi, Gi, Ti) or decimal (K, M, G, T)
/// suffix; a trailing `B` is allowed.
pub fn parse_memory_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let without_b = trimmed.strip_suffix('B').unwrap_or(trimmed);
    let split = without_b
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(without_b.len());
    let (number, unit) = without_b.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 8Gi, 512Mi or 100M"))?;
    let scale: u64 = match unit {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use Ki, Mi, Gi, Ti, K, M, G or T)"
            ));
        }
    };
    Ok((value * scale as f64) as u64)
}

/// Parses a duration: a number with an optional unit ms, s (default), m or h.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

/// Blocks of `block_size` tokens that fit in `budget` bytes, given the cache's bytes per block.
pub fn blocks_for_budget(budget: u64, bytes_per_block: usize) -> usize {
    if bytes_per_block == 0 {
        return 0;
    }
    (budget / bytes_per_block as u64) as usize
}

/// A server that is serving: the servers and the engine thread.
pub struct Serving {
    pub server: RunningServer,
    pub engine: Engine,
    pub handle: EngineHandle,
    /// The expert shard (its peer monitor stops when this is dropped).
    pub shard: Arc<Shard>,
}

/// Binds both ports (health NOT_SERVING), loads the model, runs the warm-up step and starts
/// serving. Used by `serve` and by in-process tests.
pub async fn start(args: &ServeArgs) -> anyhow::Result<Serving> {
    let model_dir = resolve_model_dir(args.model.as_deref())?;
    let model_name = match &args.model_name {
        Some(name) => name.clone(),
        None => model_dir_name(&model_dir),
    };
    let metrics = Arc::new(Metrics::new(&model_name).context("registering metrics")?);
    let config_path = model_dir.join("config.json");
    let config = ModelConfig::from_file(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let mut shard = Shard::new(
        &args.shard,
        &model_dir,
        &config,
        &model_name,
        metrics.clone(),
    )
    .context("setting up the expert shard")?;
    let server = RunningServer::start_with_experts(
        args.grpc_addr,
        args.metrics_addr,
        metrics.clone(),
        Some(ExpertsEndpoint {
            service: shard.service.clone().into_server(),
            addr: args.shard.experts_addr,
        }),
    )
    .await
    .context("starting the gRPC and HTTP servers")?;
    // Peers are watched while the weights load, so the group is ready as soon as all are.
    shard.start_monitor();
    server.follow_peers(shard.peers_healthy());
    let shard = Arc::new(shard);

    let load_args = args.clone();
    let load_metrics = metrics.clone();
    let load_shard = shard.clone();
    let runtime = tokio::runtime::Handle::current();
    let (engine, handle, info, limits, codec) = tokio::task::spawn_blocking(move || {
        load_engine(
            &load_args,
            &model_dir,
            model_name,
            load_metrics,
            &load_shard,
            runtime,
        )
    })
    .await
    .context("the model loading task panicked")??;
    server
        .set_loaded(LoadedModel {
            engine: handle.clone(),
            codec,
            info,
            limits,
        })
        .await;
    Ok(Serving {
        server,
        engine,
        handle,
        shard,
    })
}

type Loaded = (
    Engine,
    EngineHandle,
    ModelInfo,
    RequestLimits,
    Arc<dyn TokenCodec>,
);

fn load_engine(
    args: &ServeArgs,
    dir: &Path,
    model_name: String,
    metrics: Arc<Metrics>,
    shard: &Shard,
    runtime: tokio::runtime::Handle,
) -> anyhow::Result<Loaded> {
    let started = Instant::now();
    let model = DeepSeekModel::load(
        dir,
        &LoadOptions {
            dtype: args.dtype.candle(),
            expert_filter: shard.expert_filter(),
        },
    )
    .with_context(|| format!("loading the model from {}", dir.display()))?;
    let model = Arc::new(model);
    let sharded = shard.attach(model.clone(), runtime);
    let config = model.config().clone();
    let tokenizer = Tokenizer::load(dir, &config)
        .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
    let load_seconds = started.elapsed().as_secs_f64();
    metrics.model_load_seconds.set(load_seconds);
    tracing::info!(model = %dir.display(), seconds = load_seconds, "model loaded");

    let block_size = args.block_size as usize;
    let cache_dtype = args.dtype.candle();
    let bytes_per_block = LatentCache::bytes_for_blocks(&config, 1, block_size, cache_dtype);
    let num_blocks = blocks_for_budget(args.kv_cache_memory, bytes_per_block);
    if num_blocks == 0 {
        bail!(
            "--kv-cache-memory {} bytes holds no cache block: one block of {block_size} tokens takes {bytes_per_block} bytes",
            args.kv_cache_memory
        );
    }
    let cache = LatentCache::new(&config, num_blocks, block_size, cache_dtype, &Device::Cpu)
        .context("allocating the latent cache")?;
    let bytes_per_token = cache.bytes_per_token();
    metrics.kv_cache_bytes_per_token.set(bytes_per_token as i64);

    let max_seq_len = args
        .max_seq_len
        .map_or(config.max_position_embeddings, |n| n as usize);
    if max_seq_len < 2 {
        bail!("--max-seq-len {max_seq_len} leaves no room for a prompt and a token");
    }
    let capacity_tokens = num_blocks * block_size;
    let limits = RequestLimits {
        max_seq_len,
        vocab_size: config.vocab_size,
        cache_capacity_tokens: capacity_tokens,
    };
    let moe = config.moe;
    let local_experts = moe.map_or(0, |moe| {
        (0..moe.n_routed_experts)
            .filter(|&e| (0..config.num_hidden_layers).any(|l| model.local_experts().holds(l, e)))
            .count()
    });
    let info = ModelInfo {
        model: model_name,
        architecture: match config.model_type {
            ModelType::DeepseekV2 => "deepseek_v2",
            ModelType::DeepseekV3 => "deepseek_v3",
        }
        .to_owned(),
        parameter_count: parameter_count(dir)?,
        num_layers: config.num_hidden_layers as u32,
        num_routed_experts: moe.map_or(0, |m| m.n_routed_experts) as u32,
        num_experts_per_token: moe.map_or(0, |m| m.num_experts_per_tok) as u32,
        num_shared_experts: moe.map_or(0, |m| m.n_shared_experts) as u32,
        local_routed_experts: local_experts as u32,
        max_context: max_seq_len as u32,
        kv_cache_bytes_per_token: bytes_per_token as u64,
        kv_cache_capacity_tokens: capacity_tokens as u64,
        kv_cache_block_size: args.block_size,
        shard_rank: args.shard.shard_rank,
        shard_count: args.shard.shard_count,
        dtype: dtype_name(args.dtype).to_owned(),
        max_batch_size: args.max_batch_size,
        vocab_size: config.vocab_size as u32,
        peers: args.shard.peers.clone(),
        max_queue: args.max_queue,
    };
    tracing::info!(
        blocks = num_blocks,
        block_size,
        capacity_tokens,
        bytes_per_token,
        "latent cache allocated"
    );

    let codec: Arc<dyn TokenCodec> = Arc::new(tokenizer);
    let counts = Arc::new(RequestCounts::default());
    let scheduler = Scheduler::new(
        SchedulerConfig {
            max_batch_size: args.max_batch_size as usize,
            max_tokens_per_step: args.max_tokens_per_step as usize,
            max_seq_len,
        },
        DeepSeekExecutor::new(model, cache).with_sharded_experts(sharded.clone()),
        codec.clone(),
        BlockManager::new(num_blocks, block_size, !args.no_prefix_caching),
        counts.clone(),
        metrics,
    );
    let (engine, handle) = Engine::start(scheduler, counts, args.max_queue as usize)
        .map_err(anyhow::Error::msg)
        .context("starting the engine")?;
    // The warm-up ran on local experts only; from now on steps exchange with the peers.
    if let Some(sharded) = &sharded {
        sharded.enable_exchange();
    }
    Ok((engine, handle, info, limits, codec))
}

/// Parameters stored in the checkpoint (every tensor's element count).
fn parameter_count(dir: &Path) -> anyhow::Result<u64> {
    let store = WeightStore::open(dir)
        .with_context(|| format!("reading the tensor index of {}", dir.display()))?;
    let names: Vec<String> = store.names().map(str::to_owned).collect();
    Ok(names
        .iter()
        .filter(|name| !name.ends_with("weight_scale_inv"))
        .filter_map(|name| store.shape(name))
        .map(|shape| shape.iter().product::<usize>() as u64)
        .sum())
}

fn model_dir_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .as_deref()
        .unwrap_or(dir)
        .file_name()
        .map_or_else(
            || "model".to_owned(),
            |name| name.to_string_lossy().into_owned(),
        )
}

/// `serve`: runs until SIGTERM or Ctrl-C, then drains and returns.
pub async fn run(mut args: ServeArgs) -> anyhow::Result<()> {
    args.device.require_supported()?;
    args.shard.resolve_rank()?;
    let serving = start(&args).await?;
    shutdown_signal().await?;
    tracing::info!("shutdown signal received");
    let Serving {
        server,
        engine,
        handle,
        shard,
    } = serving;
    server
        .drain(args.drain_timeout)
        .await
        .context("draining the servers")?;
    drop(handle);
    drop(shard);
    tokio::task::spawn_blocking(move || engine.join())
        .await
        .context("joining the engine thread")?;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_size("8Gi"), Ok(8 << 30));
        assert_eq!(parse_memory_size("64Mi"), Ok(64 << 20));
        assert_eq!(parse_memory_size("1.5Ki"), Ok(1536));
        assert_eq!(parse_memory_size("100M"), Ok(100_000_000));
        assert_eq!(parse_memory_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_memory_size("4096"), Ok(4096));
        assert!(
            parse_memory_size("8Xi")
                .unwrap_err()
                .contains("unknown unit `Xi`")
        );
        assert!(parse_memory_size("lots").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn cache_blocks_from_a_budget() {
        assert_eq!(blocks_for_budget(64 << 20, 1 << 20), 64);
        assert_eq!(blocks_for_budget(100, 1000), 0);
        assert_eq!(blocks_for_budget(100, 0), 0);
    }
}
