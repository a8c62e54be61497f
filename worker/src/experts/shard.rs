//! This worker's place in its serving group: the `serve` flags of expert parallelism, the
//! placement and fingerprint they lead to, and the pieces `serve` wires in (the expert filter of
//! the loader, the Experts service, the peer monitor, the sharded MoE executor).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use latentserve_proto::v1::WireDtype;
use tokio::sync::watch;

use super::peers::{PeerTimeouts, Peers, peer_ranks};
use super::placement::{Placement, check_rank};
use super::remote::ShardedExperts;
use super::service::{ExpertsService, LocalBackend, ShardIdentity};
use super::{fingerprint, model_digest};
use crate::model::moe::LocalExperts;
use crate::model::{
    DeepSeekModel, DispatchPlan, ExpertExecutor, ExpertFilter, ModelConfig, ModelError,
};
use crate::server::metrics::Metrics;

/// Element type of hidden rows sent between shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireDtypeArg {
    F32,
    F16,
    Bf16,
}

impl WireDtypeArg {
    pub fn wire(self) -> WireDtype {
        match self {
            WireDtypeArg::F32 => WireDtype::F32,
            WireDtypeArg::F16 => WireDtype::F16,
            WireDtypeArg::Bf16 => WireDtype::Bf16,
        }
    }
}

/// The expert-parallel flags of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ShardArgs {
    /// This worker's rank among the shards of its group (0-based).
    #[arg(long, default_value_t = 0)]
    pub shard_rank: u32,
    /// Shards (pods) per group; the routed experts are split across them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub shard_count: u32,
    /// gRPC addresses of the shards, HOST:PORT,...: all of them in rank order (this worker's own
    /// entry is skipped) or the others in rank order. DNS names are re-resolved on reconnect.
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// JSON map from routed expert to the shards holding it ({"experts": [[0], [0, 1], ...]}),
    /// replicas allowed; whole expert groups (or contiguous ranges) per shard by default.
    #[arg(long)]
    pub expert_placement: Option<PathBuf>,
    /// Element type of hidden rows and partial sums sent between shards.
    #[arg(long, value_enum, default_value_t = WireDtypeArg::F32)]
    pub expert_wire_dtype: WireDtypeArg,
    /// Longest a call to a peer's experts may take before its requests fail with UNAVAILABLE
    /// (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = crate::cli::serve::parse_duration)]
    pub expert_rpc_timeout: Duration,
}

impl Default for ShardArgs {
    fn default() -> Self {
        Self {
            shard_rank: 0,
            shard_count: 1,
            peers: Vec::new(),
            expert_placement: None,
            expert_wire_dtype: WireDtypeArg::F32,
            expert_rpc_timeout: Duration::from_secs(10),
        }
    }
}

/// A worker's shard: built before the model loads, so that the Experts service answers
/// handshakes (not ready) and the peers are watched while the weights load.
pub struct Shard {
    pub identity: ShardIdentity,
    pub service: ExpertsService,
    pub peers: Arc<Peers>,
    wire_dtype: WireDtype,
    metrics: Arc<Metrics>,
    monitor: Option<tokio::task::JoinHandle<()>>,
}

impl Shard {
    /// Validates the flags against the model directory's config: placement, peers, fingerprint.
    pub fn new(
        args: &ShardArgs,
        model_dir: &Path,
        config: &ModelConfig,
        model_name: &str,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let rank = args.shard_rank as usize;
        let count = args.shard_count as usize;
        check_rank(rank, count)?;
        let (n_experts, n_group) = config
            .moe
            .map_or((0, 1), |moe| (moe.n_routed_experts, moe.n_group));
        let placement = if count == 1 {
            Placement::default_for(n_experts.max(1), n_group, 1)?
        } else {
            if n_experts == 0 {
                anyhow::bail!(
                    "--shard-count {count}: the model in {} has no routed experts to split",
                    model_dir.display()
                );
            }
            match &args.expert_placement {
                Some(path) => Placement::from_file(path, n_experts, count)?,
                None => Placement::default_for(n_experts, n_group, count)?,
            }
        };
        if count > 1 && placement.experts_of(rank).is_empty() {
            tracing::warn!(rank, "the placement gives this shard no routed expert");
        }
        let peers = peer_ranks(&args.peers, rank, count).map_err(anyhow::Error::msg)?;
        let digest = model_digest(model_dir)
            .with_context(|| format!("reading the model identity of {}", model_dir.display()))?;
        let fingerprint = fingerprint(&digest, &placement);
        tracing::info!(
            rank,
            count,
            experts = ?placement.experts_of(rank),
            %fingerprint,
            "expert shard"
        );
        metrics.set_expert_shard(rank, count);
        let identity = ShardIdentity {
            rank,
            placement,
            fingerprint: fingerprint.clone(),
            model_name: model_name.to_owned(),
        };
        let service = ExpertsService::new(identity.clone(), metrics.clone());
        let timeouts = PeerTimeouts {
            rpc: args.expert_rpc_timeout,
            ..PeerTimeouts::default()
        };
        let peers = Arc::new(Peers::new(rank, count, peers, fingerprint, timeouts));
        Ok(Self {
            identity,
            service,
            peers,
            wire_dtype: args.expert_wire_dtype.wire(),
            metrics,
            monitor: None,
        })
    }

    /// The loader's filter: the routed experts this shard holds; `None` (load all) for one shard.
    pub fn expert_filter(&self) -> Option<ExpertFilter> {
        if self.identity.placement.shard_count() == 1 {
            return None;
        }
        let placement = self.identity.placement.clone();
        let rank = self.identity.rank;
        Some(Arc::new(move |_layer: usize, expert: usize| {
            placement.holds(rank, expert)
        }))
    }

    /// Starts handshaking the peers (on the current runtime).
    pub fn start_monitor(&mut self) {
        if self.monitor.is_none() && !self.peers.peers().is_empty() {
            self.monitor = Some(self.peers.spawn_monitor());
        }
    }

    /// True while every peer is usable; follows changes.
    pub fn peers_healthy(&self) -> watch::Receiver<bool> {
        self.peers.subscribe()
    }

    /// Lets the Experts service run the loaded model's experts for peers, and returns the
    /// executor the engine runs its own MoE layers with (`None` for a single shard).
    pub fn attach(
        &self,
        model: Arc<DeepSeekModel>,
        runtime: tokio::runtime::Handle,
    ) -> Option<Arc<ShardedExperts>> {
        let config = model.config();
        let backend = LocalBackend {
            hidden_size: config.hidden_size,
            num_layers: config.num_hidden_layers,
            experts: Arc::new(ModelExperts(model.clone())),
        };
        if self.service.backend().set(backend).is_err() {
            tracing::warn!("the Experts service already had a model; keeping the first");
        }
        if self.identity.placement.shard_count() == 1 {
            return None;
        }
        Some(Arc::new(ShardedExperts::new(
            self.identity.placement.clone(),
            self.peers.clone(),
            self.identity.fingerprint.clone(),
            self.wire_dtype,
            runtime,
            self.metrics.clone(),
        )))
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        if let Some(monitor) = self.monitor.take() {
            monitor.abort();
        }
    }
}

/// The routed experts of a shared model, for the Experts service.
struct ModelExperts(Arc<DeepSeekModel>);

impl ExpertExecutor for ModelExperts {
    fn run_experts(
        &self,
        layer: usize,
        hidden: &[f32],
        hidden_size: usize,
        plan: &DispatchPlan,
    ) -> Result<Vec<f32>, ModelError> {
        self.0
            .local_experts()
            .run_experts(layer, hidden, hidden_size, plan)
    }
}

/// Weight bytes of the routed experts loaded in this worker, over all layers.
pub fn loaded_expert_bytes(experts: &LocalExperts) -> usize {
    experts
        .layers
        .iter()
        .flatten()
        .flatten()
        .map(|mlp| mlp.weight_bytes())
        .sum()
}
