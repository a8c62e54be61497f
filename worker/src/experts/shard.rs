//! This worker's place in its serving group: the placement and fingerprint that its shard
//! settings lead to, and the pieces `serve` wires in (the expert filter of the loader, the
//! Experts service, the peer monitor, the sharded MoE executor). The command-line flags that fill
//! [`ShardSettings`] live in `cli::shard_args`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use latentserve_placement::file::ModelShape;
use latentserve_proto::v1::WireDtype;
use tokio::sync::watch;

use super::auth::ExpertsAuth;
use super::peers::{GroupHealth, PeerListError, PeerTimeouts, Peers, peer_ranks};
use super::placement::{Placement, PlacementError, check_rank};
use super::remote::ShardedExperts;
use super::service::{ExpertsService, LocalBackend, ShardIdentity};
use super::{fingerprint, model_digest};
use crate::metrics::Metrics;
use crate::model::moe::LocalExperts;
use crate::model::{
    DeepSeekModel, DispatchPlan, ExpertExecutor, ExpertFilter, ModelConfig, ModelError,
};

/// Where this worker sits in its group and how it talks to the other shards.
#[derive(Debug, Clone)]
pub struct ShardSettings {
    /// This worker's rank among the shards of its group (0-based).
    pub rank: usize,
    /// Shards (pods) per group; the routed experts are split across them.
    pub count: usize,
    /// Addresses of the shards: all of them in rank order, or the others in rank order.
    pub peers: Vec<String>,
    /// A placement file (per MoE layer, routed expert -> shards); the default layout when absent.
    pub expert_placement: Option<PathBuf>,
    /// Extra expert slots per shard in the default layout, holding copies of the next shard's
    /// experts (`>= experts / shards`: every expert on two shards, so any one shard may fail).
    pub redundant_experts: usize,
    /// Element type of hidden rows and partial sums sent between shards.
    pub wire_dtype: WireDtype,
    /// Longest a call to a peer's experts may take.
    pub rpc_timeout: Duration,
    /// The group's token: signs calls to peers and admits theirs; open (no token) by default.
    pub auth: ExpertsAuth,
}

impl Default for ShardSettings {
    fn default() -> Self {
        Self {
            rank: 0,
            count: 1,
            peers: Vec::new(),
            expert_placement: None,
            redundant_experts: 0,
            wire_dtype: WireDtype::F32,
            rpc_timeout: Duration::from_secs(10),
            auth: ExpertsAuth::open(),
        }
    }
}

/// Why a worker's shard settings do not fit its model or each other.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error("--shard-count {count}: the model in {} has no routed experts to split", dir.display())]
    NoRoutedExperts { count: usize, dir: PathBuf },
    #[error(transparent)]
    Peers(#[from] PeerListError),
    #[error("reading the model identity of {}", dir.display())]
    ModelIdentity {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A worker's shard: built before the model loads, so that the Experts service answers
/// handshakes (not ready) and the peers are watched while the weights load.
pub struct Shard {
    pub identity: ShardIdentity,
    pub service: ExpertsService,
    pub peers: Arc<Peers>,
    /// The group's token, which the Experts port requires of callers.
    pub auth: ExpertsAuth,
    wire_dtype: WireDtype,
    metrics: Arc<Metrics>,
    monitor: Option<tokio::task::JoinHandle<()>>,
}

impl Shard {
    /// Validates the settings against the model directory's config: placement, peers,
    /// fingerprint.
    pub fn new(
        settings: &ShardSettings,
        model_dir: &Path,
        config: &ModelConfig,
        model_name: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ShardError> {
        let rank = settings.rank;
        let count = settings.count;
        check_rank(rank, count)?;
        let (n_experts, n_group) = config
            .moe
            .map_or((0, 1), |moe| (moe.n_routed_experts, moe.n_group));
        let moe_layers: Vec<usize> = (0..config.num_hidden_layers)
            .filter(|&layer| config.moe.is_some() && config.is_moe_layer(layer))
            .collect();
        let redundant = settings.redundant_experts;
        let placement = if count == 1 {
            if redundant > 0 {
                return Err(PlacementError::RedundantWithoutPeers { redundant }.into());
            }
            Placement::default_for(n_experts.max(1), n_group, 1, 0, &moe_layers)?
        } else {
            if n_experts == 0 {
                return Err(ShardError::NoRoutedExperts {
                    count,
                    dir: model_dir.to_path_buf(),
                });
            }
            match &settings.expert_placement {
                Some(path) if redundant > 0 => {
                    return Err(PlacementError::RedundantWithFile {
                        redundant,
                        path: path.display().to_string(),
                    }
                    .into());
                }
                Some(path) => {
                    let shape = ModelShape {
                        n_experts,
                        moe_layers: &moe_layers,
                        shard_count: count,
                    };
                    Placement::from_file(path, shape)?
                }
                None => Placement::default_for(n_experts, n_group, count, redundant, &moe_layers)?,
            }
        };
        if count > 1
            && placement
                .moe_layers()
                .all(|layer| placement.experts_of(rank, layer).is_empty())
        {
            tracing::warn!(rank, "the placement gives this shard no routed expert");
        }
        let peers = peer_ranks(&settings.peers, rank, count)?;
        let digest = model_digest(model_dir).map_err(|source| ShardError::ModelIdentity {
            dir: model_dir.to_path_buf(),
            source,
        })?;
        let fingerprint = fingerprint(&digest, &placement);
        let version = placement.version().unwrap_or("default").to_owned();
        tracing::info!(
            rank,
            count,
            holds = %placement.describe_rank(rank),
            placement_version = %version,
            redundant,
            %fingerprint,
            "expert shard"
        );
        metrics.set_expert_shard(rank, count);
        metrics.set_expert_placement_version(&version);
        let identity = ShardIdentity {
            rank,
            placement,
            fingerprint: fingerprint.clone(),
            model_name: model_name.to_owned(),
        };
        let service = ExpertsService::new(identity.clone(), metrics.clone());
        let timeouts = PeerTimeouts {
            rpc: settings.rpc_timeout,
            ..PeerTimeouts::default()
        };
        let peers = Arc::new(Peers::new(
            rank,
            identity.placement.clone(),
            peers,
            fingerprint,
            timeouts,
            settings.auth.clone(),
        ));
        Ok(Self {
            identity,
            service,
            peers,
            auth: settings.auth.clone(),
            wire_dtype: settings.wire_dtype,
            metrics,
            monitor: None,
        })
    }

    /// The loader's filter: the routed experts this shard holds in each MoE layer; `None` (load
    /// all) for one shard.
    pub fn expert_filter(&self) -> Option<ExpertFilter> {
        if self.identity.placement.shard_count() == 1 {
            return None;
        }
        let placement = self.identity.placement.clone();
        let rank = self.identity.rank;
        Some(Arc::new(move |layer: usize, expert: usize| {
            placement.holds(rank, layer, expert)
        }))
    }

    /// Starts handshaking the peers (on the current runtime).
    pub fn start_monitor(&mut self) {
        if self.monitor.is_none() && !self.peers.peers().is_empty() {
            self.monitor = Some(self.peers.spawn_monitor());
        }
    }

    /// Which peers are usable and whether, with this shard, they hold every expert; follows
    /// changes.
    pub fn group_health(&self) -> watch::Receiver<GroupHealth> {
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
