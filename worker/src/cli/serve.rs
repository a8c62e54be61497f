//! `latentserve-worker serve`: loads a model and serves it over gRPC and OpenAI's HTTP API, with
//! metrics and probes on a third port, until SIGTERM (or Ctrl-C) drains it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Args;
use latentserve_proto::v1::{ModelInfo, PromptFiles, SpecialToken};

use super::WeightDtype;
use super::model_dir::resolve_model_dir;
use super::parse::{OptionalAddr, parse_duration, parse_memory_size, parse_optional_addr};
use super::shard_args::ShardArgs;
use crate::engine::blocks::{BlockManager, blocks_for_budget};
use crate::engine::codec::TokenCodec;
use crate::engine::executor::DeepSeekExecutor;
use crate::engine::scheduler::{RequestCounts, Scheduler, SchedulerConfig};
use crate::engine::{Engine, EngineHandle};
use crate::experts::shard::Shard;
use crate::metrics::Metrics;
use crate::model::chat_template::ChatTemplate;
use crate::model::config::ModelType;
use crate::model::loader::WeightStore;
use crate::model::{DeepSeekModel, LatentCache, LoadOptions, ModelConfig, Tokenizer};
use crate::server::connections::{ConnectionLimits, DEFAULT_MAX_CONNECTIONS};
use crate::server::tls::TlsFiles;
use crate::server::validate::RequestLimits;
use crate::server::{ExpertsEndpoint, ListenAddrs, LoadedModel, RunningServer};

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
    /// Address of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /// /v1/models, /health); '' serves none.
    #[arg(long, default_value = "0.0.0.0:8000", value_parser = parse_optional_addr)]
    pub openai_addr: OptionalAddr,
    /// Open connections each port (gRPC, OpenAI, expert exchange) keeps; more are closed at once.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// How long a connection may stay open with no request in flight (HTTP/2 pings do not count),
    /// e.g. 5m; 0 keeps idle connections open.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// How long an HTTP/1 client of the OpenAI port has to send a request's headers.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
    /// TLS on the gRPC and OpenAI ports: the certificate chain (PEM, leaf first), e.g. a
    /// cert-manager Secret's tls.crt. Reloaded when the file changes.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1), e.g. tls.key.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by these CAs (PEM), e.g. ca.crt: mutual TLS.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// How long a client has to finish its TLS handshake.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// Jinja chat template for chat requests, replacing the model's own (tokenizer_config.json's
    /// chat_template or chat_template.jinja).
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
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
    pub device: super::DeviceArgs,
}

/// The ports and their limits, from the flags.
fn listen_addrs(args: &ServeArgs) -> ListenAddrs {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        }),
        _ => None,
    };
    ListenAddrs {
        connections: ConnectionLimits {
            max_connections: args.max_connections as usize,
            handshake_timeout: args.tls_handshake_timeout,
            idle_timeout: (!args.idle_timeout.is_zero()).then_some(args.idle_timeout),
        },
        http_header_timeout: args.http_header_timeout,
        tls,
        ..ListenAddrs::new(args.grpc_addr, args.metrics_addr, args.openai_addr.0)
    }
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
        &args.shard.settings()?,
        &model_dir,
        &config,
        &model_name,
        metrics.clone(),
    )
    .context("setting up the expert shard")?;
    let addrs = listen_addrs(args);
    // A worker alone in its group has no exchange to serve: nobody may call its experts.
    let experts = (args.shard.shard_count > 1).then(|| ExpertsEndpoint {
        service: shard.service.clone().into_server(),
        addr: args.shard.experts_addr,
        auth: shard.auth.clone(),
        activity: shard.service.activity(),
    });
    let server = RunningServer::start(&addrs, metrics.clone(), experts)
        .await
        .context("starting the gRPC and HTTP servers")?;
    // Peers are watched while the weights load, so the group is ready as soon as all are.
    shard.start_monitor();
    server.follow_peers(shard.group_health());
    let shard = Arc::new(shard);

    let load_args = args.clone();
    let load_metrics = metrics.clone();
    let load_shard = shard.clone();
    let runtime = tokio::runtime::Handle::current();
    let (engine, loaded) = tokio::task::spawn_blocking(move || {
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
    let handle = loaded.engine.clone();
    server.set_loaded(loaded).await;
    Ok(Serving {
        server,
        engine,
        handle,
        shard,
    })
}

fn load_engine(
    args: &ServeArgs,
    dir: &Path,
    model_name: String,
    metrics: Arc<Metrics>,
    shard: &Shard,
    runtime: tokio::runtime::Handle,
) -> anyhow::Result<(Engine, LoadedModel)> {
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
    let chat_template = load_chat_template(dir, &tokenizer, args.chat_template.as_deref())?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer_json = std::fs::read(&tokenizer_path)
        .with_context(|| format!("reading {}", tokenizer_path.display()))?;
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

    let max_seq_len = context_limit(args.max_seq_len, config.max_position_embeddings)?;
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
        max_context: u32::try_from(max_seq_len).unwrap_or(u32::MAX),
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
        num_expert_groups: moe.map_or(1, |m| m.n_group) as u32,
    };
    tracing::info!(
        blocks = num_blocks,
        block_size,
        capacity_tokens,
        bytes_per_token,
        "latent cache allocated"
    );

    let prompt_files = PromptFiles {
        model: info.model.clone(),
        tokenizer_json,
        eos_token_ids: tokenizer.eos_ids().to_vec(),
        bos_token_id: tokenizer.bos_id(),
        chat_template: chat_template
            .as_ref()
            .map(|t| t.text().to_owned())
            .unwrap_or_default(),
        special_tokens: chat_template
            .as_ref()
            .map(|t| t.special_tokens())
            .unwrap_or_default()
            .iter()
            .map(|(name, content)| SpecialToken {
                name: name.clone(),
                content: content.clone(),
            })
            .collect(),
        block_size: args.block_size,
        prefix_caching: !args.no_prefix_caching,
        max_seq_len: info.max_context,
    };
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
    );
    let (engine, handle) = Engine::start(scheduler, counts, metrics, args.max_queue as usize)
        .context("starting the engine")?;
    // The warm-up ran on local experts only; from now on steps exchange with the peers.
    if let Some(sharded) = &sharded {
        sharded.enable_exchange();
    }
    Ok((
        engine,
        LoadedModel {
            engine: handle,
            codec,
            info,
            limits,
            chat_template,
            prompt_files: Arc::new(prompt_files),
        },
    ))
}

/// The chat template chat requests are rendered with: `--chat-template`, else the model's own.
/// A model without one serves completions only; chat requests get an error that says so.
fn load_chat_template(
    dir: &Path,
    tokenizer: &Tokenizer,
    flag: Option<&Path>,
) -> anyhow::Result<Option<Arc<ChatTemplate>>> {
    let template = ChatTemplate::load(dir, tokenizer, flag).with_context(|| match flag {
        Some(file) => format!("loading the chat template {}", file.display()),
        None => format!("loading the chat template of {}", dir.display()),
    })?;
    match &template {
        Some(template) => tracing::info!(source = template.source(), "chat template loaded"),
        None => tracing::warn!(
            "the model has no chat template: chat requests are refused (use --chat-template FILE)"
        ),
    }
    Ok(template.map(Arc::new))
}

/// The context limit served: `--max-seq-len`, never past the model's own context
/// (`max_position_embeddings`), which its position tables and training cover. A larger flag (the
/// CRD allows up to 1048576) is clamped with a warning rather than failing every long request.
fn context_limit(flag: Option<u32>, model_context: usize) -> anyhow::Result<usize> {
    let limit = match flag {
        Some(requested) if requested as usize > model_context => {
            tracing::warn!(
                requested,
                model_context,
                "--max-seq-len exceeds the model's context (max_position_embeddings); serving the model's context"
            );
            model_context
        }
        Some(requested) => requested as usize,
        None => model_context,
    };
    if limit < 2 {
        bail!("--max-seq-len {limit} leaves no room for a prompt and a token");
    }
    Ok(limit)
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
    fn the_context_limit_never_exceeds_the_model_context() {
        assert_eq!(context_limit(None, 4096).unwrap(), 4096);
        assert_eq!(context_limit(Some(1024), 4096).unwrap(), 1024);
        assert_eq!(context_limit(Some(1_048_576), 4096).unwrap(), 4096);
        let error = context_limit(Some(1), 4096).unwrap_err().to_string();
        assert!(error.contains("--max-seq-len 1 leaves no room"), "{error}");
    }
}
