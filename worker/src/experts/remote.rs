//! The MoE executor of a shard: splits a layer's expert work by the shard that runs it, sends each
//! peer its share in one RunExperts call while the local experts run, and adds up the results.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use latentserve_proto::v1::{ExpertRows, RunExpertsRequest, WireDtype};

use super::peers::{PeerUnavailable, Peers};
use super::placement::Placement;
use super::wire;
use crate::metrics::Metrics;
use crate::model::{DispatchPlan, ExpertExecutor, ExpertWork, ModelError};

/// One layer's expert work for one peer: the distinct token rows it needs, each once, and the
/// expert entries indexing into them.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerWork {
    pub rank: usize,
    /// Rows of the layer's hidden batch, ascending; entry `i` is row `i` of the message.
    pub token_rows: Vec<u32>,
    /// Expert entries with rows renumbered into `token_rows`.
    pub experts: Vec<ExpertWork>,
}

/// Splits `plan` by the shard that runs each (expert, token) pair: the local part and one
/// [`PeerWork`] per peer that gets anything (ascending rank). Pure.
pub fn split_plan(
    plan: &DispatchPlan,
    placement: &Placement,
    local_rank: usize,
) -> (DispatchPlan, Vec<PeerWork>) {
    let loads: Vec<(usize, usize)> = plan
        .works
        .iter()
        .map(|w| (w.expert, w.rows.len()))
        .collect();
    let assigned = placement.assign(&loads, local_rank);
    let mut per_shard: Vec<Vec<ExpertWork>> = vec![Vec::new(); placement.shard_count()];
    for (work, ranks) in plan.works.iter().zip(&assigned) {
        for (rank, works) in per_shard.iter_mut().enumerate() {
            let mut part = ExpertWork {
                expert: work.expert,
                rows: Vec::new(),
                weights: Vec::new(),
            };
            for ((&row, &weight), _) in work
                .rows
                .iter()
                .zip(&work.weights)
                .zip(ranks)
                .filter(|(_, r)| **r == rank)
            {
                part.rows.push(row);
                part.weights.push(weight);
            }
            if !part.rows.is_empty() {
                works.push(part);
            }
        }
    }
    let local = DispatchPlan {
        works: std::mem::take(&mut per_shard[local_rank]),
    };
    let peers = per_shard
        .into_iter()
        .enumerate()
        .filter(|(_, works)| !works.is_empty())
        .map(|(rank, works)| {
            let mut token_rows: Vec<u32> = works.iter().flat_map(|w| w.rows.clone()).collect();
            token_rows.sort_unstable();
            token_rows.dedup();
            let experts = works
                .into_iter()
                .map(|w| ExpertWork {
                    expert: w.expert,
                    rows: w
                        .rows
                        .iter()
                        .map(|r| token_rows.binary_search(r).unwrap_or_default() as u32)
                        .collect(),
                    weights: w.weights,
                })
                .collect();
            PeerWork {
                rank,
                token_rows,
                experts,
            }
        })
        .collect();
    (local, peers)
}

/// The network side of expert parallelism, shared by every step of the engine.
pub struct ShardedExperts {
    placement: Placement,
    peers: Arc<Peers>,
    fingerprint: String,
    wire_dtype: WireDtype,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    /// Off during the engine's warm-up step, which must not wait for peers that may still be
    /// loading: it runs the local experts only (its output is discarded).
    exchange: AtomicBool,
}

impl ShardedExperts {
    /// `runtime`: where the peer calls run; the engine thread blocks on them outside of it.
    pub fn new(
        placement: Placement,
        peers: Arc<Peers>,
        fingerprint: String,
        wire_dtype: WireDtype,
        runtime: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            placement,
            peers,
            fingerprint,
            wire_dtype,
            runtime,
            metrics,
            exchange: AtomicBool::new(false),
        }
    }

    /// Starts exchanging with peers; called once the engine has warmed up.
    pub fn enable_exchange(&self) {
        self.exchange.store(true, Ordering::SeqCst);
    }

    /// An executor for one forward: `local` runs this shard's experts.
    pub fn with_local<'a>(self: &'a Arc<Self>, local: &'a dyn ExpertExecutor) -> ShardedStep<'a> {
        ShardedStep {
            sharded: self,
            local,
        }
    }

    /// Sends one peer its work and returns (token rows, their weighted sums).
    async fn call_peer(
        self: Arc<Self>,
        layer: usize,
        hidden: Arc<Vec<f32>>,
        hidden_size: usize,
        work: PeerWork,
    ) -> Result<(Vec<u32>, Vec<f32>), PeerUnavailable> {
        let rank = work.rank;
        let mut client = self.peers.client(rank)?;
        let address = self
            .peers
            .peer(rank)
            .map(|p| p.address.clone())
            .unwrap_or_default();
        // (tokens, hidden_size): the rows this peer needs, each once.
        let mut rows = Vec::with_capacity(work.token_rows.len() * hidden_size);
        for &r in &work.token_rows {
            let r = r as usize;
            rows.extend_from_slice(&hidden[r * hidden_size..(r + 1) * hidden_size]);
        }
        let tokens = work.token_rows.len();
        let payload = wire::encode(&rows, tokens, hidden_size, self.wire_dtype);
        let request = RunExpertsRequest {
            layer: layer as u32,
            fingerprint: self.fingerprint.clone(),
            hidden: Some(payload),
            experts: work
                .experts
                .into_iter()
                .map(|w| ExpertRows {
                    expert: w.expert as u32,
                    rows: w.rows,
                    weights: w.weights,
                })
                .collect(),
            response_dtype: self.wire_dtype as i32,
        };
        let bytes = prost::Message::encoded_len(&request);
        self.metrics.record_expert_dispatch(&address, bytes as u64);
        let started = Instant::now();
        let timeout = self.peers.timeouts().rpc;
        let answer = tokio::time::timeout(timeout, client.run_experts(request)).await;
        self.metrics
            .record_expert_rpc(&address, started.elapsed().as_secs_f64());
        let fail = |code: &str, reason: String| {
            self.metrics.record_expert_rpc_error(&address, code);
            self.peers.mark_failed(rank, &reason)
        };
        let response = match answer {
            Err(_) => {
                return Err(fail(
                    "DeadlineExceeded",
                    format!("RunExperts timed out after {timeout:?}"),
                ));
            }
            Ok(Err(status)) => {
                return Err(fail(
                    &format!("{:?}", status.code()),
                    format!("RunExperts failed: {}", status.message()),
                ));
            }
            Ok(Ok(response)) => response.into_inner(),
        };
        let sums = response
            .partial_sums
            .ok_or_else(|| "answer without partial_sums".to_owned())
            .and_then(|rows| {
                if rows.rows as usize != tokens || rows.cols as usize != hidden_size {
                    return Err(format!(
                        "answer has {}x{} values for {tokens}x{hidden_size}",
                        rows.rows, rows.cols
                    ));
                }
                wire::decode(&rows).map_err(|e| e.to_string())
            })
            .map_err(|reason| fail("Internal", reason))?;
        Ok((work.token_rows, sums))
    }
}

/// [`ShardedExperts`] bound to the local experts of one forward.
pub struct ShardedStep<'a> {
    sharded: &'a Arc<ShardedExperts>,
    local: &'a dyn ExpertExecutor,
}

impl ExpertExecutor for ShardedStep<'_> {
    fn run_experts(
        &self,
        layer: usize,
        hidden: &[f32],
        hidden_size: usize,
        plan: &DispatchPlan,
    ) -> Result<Vec<f32>, ModelError> {
        let sharded = self.sharded;
        let (local_plan, peer_works) =
            split_plan(plan, &sharded.placement, sharded.peers.local_rank());
        if peer_works.is_empty() || !sharded.exchange.load(Ordering::SeqCst) {
            return self
                .local
                .run_experts(layer, hidden, hidden_size, &local_plan);
        }
        // Fail fast, before any work, when a peer is known to be down.
        for work in &peer_works {
            if let Err(unavailable) = sharded.peers.client(work.rank) {
                return Err(ModelError::ExpertsUnavailable(unavailable.to_string()));
            }
        }
        let shared = Arc::new(hidden.to_vec());
        let calls: Vec<_> = peer_works
            .into_iter()
            .map(|work| {
                let call = sharded
                    .clone()
                    .call_peer(layer, shared.clone(), hidden_size, work);
                sharded.runtime.spawn(call)
            })
            .collect();
        // The local experts run while the peers compute theirs.
        let local = self
            .local
            .run_experts(layer, hidden, hidden_size, &local_plan);
        let answers = sharded.runtime.block_on(futures::future::join_all(calls));
        let mut out = local?;
        for answer in answers {
            let (token_rows, sums) = answer
                .map_err(|e| ModelError::Experts(format!("expert call task failed: {e}")))?
                .map_err(|e| ModelError::ExpertsUnavailable(e.to_string()))?;
            for (&row, sum) in token_rows.iter().zip(sums.chunks_exact(hidden_size)) {
                let row = row as usize;
                for (o, s) in out[row * hidden_size..(row + 1) * hidden_size]
                    .iter_mut()
                    .zip(sum)
                {
                    *o += s;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(expert: usize, rows: &[u32], weights: &[f32]) -> ExpertWork {
        ExpertWork {
            expert,
            rows: rows.to_vec(),
            weights: weights.to_vec(),
        }
    }

    #[test]
    fn a_plan_splits_by_shard_and_each_token_crosses_once_per_peer() {
        // 8 experts over 2 shards: 0..4 on shard 0, 4..8 on shard 1.
        let placement = Placement::default_for(8, 1, 2).unwrap();
        let plan = DispatchPlan {
            works: vec![
                work(1, &[0, 2], &[0.1, 0.2]),
                work(5, &[0, 1], &[0.3, 0.4]),
                work(7, &[0, 3], &[0.5, 0.6]),
            ],
        };
        let (local, peers) = split_plan(&plan, &placement, 0);
        assert_eq!(local.works, vec![work(1, &[0, 2], &[0.1, 0.2])]);
        assert_eq!(peers.len(), 1);
        let peer = &peers[0];
        assert_eq!(peer.rank, 1);
        // Token 0 goes to experts 5 and 7 but crosses once.
        assert_eq!(peer.token_rows, vec![0, 1, 3]);
        assert_eq!(
            peer.experts,
            vec![work(5, &[0, 1], &[0.3, 0.4]), work(7, &[0, 2], &[0.5, 0.6])]
        );
    }

    #[test]
    fn a_replicated_expert_is_split_between_local_and_peer() {
        let placement = Placement::parse(r#"{"experts": [[0], [0, 1], [1], [1]]}"#, 4, 2).unwrap();
        let plan = DispatchPlan {
            works: vec![work(1, &[0, 1, 2, 3], &[1.0, 2.0, 3.0, 4.0])],
        };
        let (local, peers) = split_plan(&plan, &placement, 0);
        // Both replicas empty: ties go local first, then alternate.
        assert_eq!(local.works, vec![work(1, &[0, 2], &[1.0, 3.0])]);
        assert_eq!(peers[0].token_rows, vec![1, 3]);
        assert_eq!(peers[0].experts, vec![work(1, &[0, 1], &[2.0, 4.0])]);
    }
}
