//! The MoE executor of a shard: splits a layer's expert work by the shard that runs it, sends each
//! peer its share in one RunExperts call while the local experts run, and adds up the results.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use latentserve_proto::v1::{ExpertRows, RunExpertsRequest, WireDtype};

use super::peers::{PeerUnavailable, Peers};
use super::placement::{AssignError, Placement};
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

/// Splits MoE layer `layer`'s `plan` by the shard that runs each (expert, token) pair, among the
/// shards for which `usable(rank)` is true: the local part and one [`PeerWork`] per peer that
/// gets anything (ascending rank). Pure.
pub fn split_plan(
    plan: &DispatchPlan,
    placement: &Placement,
    layer: usize,
    local_rank: usize,
    usable: impl Fn(usize) -> bool,
) -> Result<(DispatchPlan, Vec<PeerWork>), AssignError> {
    let loads: Vec<(usize, usize)> = plan
        .works
        .iter()
        .map(|w| (w.expert, w.rows.len()))
        .collect();
    let assigned = placement.assign(layer, &loads, local_rank, usable)?;
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
    Ok((local, peers))
}

/// The work of peers whose calls failed, back as one plan over the layer's original rows, to be
/// split again over the shards left. An expert split between several failed peers becomes one
/// entry (its rows are disjoint: each (token, expert) pair went to one shard), so that the new
/// call to a replica names it once. Pure.
pub fn reclaim(lost: &[&PeerWork]) -> DispatchPlan {
    let mut by_expert: BTreeMap<usize, Vec<(u32, f32)>> = BTreeMap::new();
    for work in lost {
        for expert in &work.experts {
            let pairs = by_expert.entry(expert.expert).or_default();
            for (&row, &weight) in expert.rows.iter().zip(&expert.weights) {
                // Rows of the message index `token_rows`: map them back to the batch.
                if let Some(&original) = work.token_rows.get(row as usize) {
                    pairs.push((original, weight));
                }
            }
        }
    }
    DispatchPlan {
        works: by_expert
            .into_iter()
            .map(|(expert, mut pairs)| {
                pairs.sort_by_key(|&(row, _)| row);
                ExpertWork {
                    expert,
                    rows: pairs.iter().map(|&(row, _)| row).collect(),
                    weights: pairs.iter().map(|&(_, weight)| weight).collect(),
                }
            })
            .collect(),
    }
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

    /// Sends one peer its work and returns the weighted sums of its `token_rows`. Any failure
    /// marks the peer unusable until its next good handshake.
    async fn call_peer(
        self: Arc<Self>,
        layer: usize,
        hidden: Arc<Vec<f32>>,
        hidden_size: usize,
        work: Arc<PeerWork>,
    ) -> Result<Vec<f32>, PeerUnavailable> {
        let rank = work.rank;
        let mut client = self.peers.client(rank)?;
        let address = self.peers.address(rank);
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
                .iter()
                .map(|w| ExpertRows {
                    expert: w.expert as u32,
                    rows: w.rows.clone(),
                    weights: w.weights.clone(),
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
        response
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
            .map_err(|reason| fail("Internal", reason))
    }

    /// The error of a step that found an expert without a usable holder: it names a shard that
    /// holds the expert and why that shard is out (its failure in this step, or its state).
    fn unassignable(
        &self,
        error: AssignError,
        failed: &BTreeMap<usize, PeerUnavailable>,
    ) -> ModelError {
        let AssignError::NoUsableHolder {
            layer,
            expert,
            holders,
        } = &error
        else {
            return ModelError::Experts(error.to_string());
        };
        let reason = holders
            .iter()
            .find_map(|rank| failed.get(rank).cloned())
            .or_else(|| {
                holders
                    .iter()
                    .find_map(|&rank| self.peers.client(rank).err())
            });
        match reason {
            Some(unavailable) => ModelError::ExpertsUnavailable(format!(
                "{unavailable} (no usable shard holds expert {expert} of layer {layer})"
            )),
            None => ModelError::ExpertsUnavailable(error.to_string()),
        }
    }
}

/// Adds a peer's weighted sums of `token_rows` into the layer's output rows.
fn add_rows(out: &mut [f32], hidden_size: usize, token_rows: &[u32], sums: &[f32]) {
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
        let placement = &sharded.placement;
        let local_rank = sharded.peers.local_rank();
        if !sharded.exchange.load(Ordering::SeqCst) {
            let (local_plan, _) = split_plan(plan, placement, layer, local_rank, |_| true)
                .map_err(|e| ModelError::Experts(e.to_string()))?;
            return self
                .local
                .run_experts(layer, hidden, hidden_size, &local_plan);
        }
        // Peers whose call failed in this step: never chosen again for it, even if their state
        // flips back to ready meanwhile.
        let mut failed: BTreeMap<usize, PeerUnavailable> = BTreeMap::new();
        // Peers known to be down get no work in the first place: their experts go to a replica.
        let (mut local_plan, mut peer_works) =
            split_plan(plan, placement, layer, local_rank, |r| {
                r == local_rank || sharded.peers.is_usable(r)
            })
            .map_err(|e| sharded.unassignable(e, &failed))?;
        if peer_works.is_empty() {
            return self
                .local
                .run_experts(layer, hidden, hidden_size, &local_plan);
        }
        let shared = Arc::new(hidden.to_vec());
        // (tokens, hidden_size): the local results, then every peer's partial sums added in.
        let mut out = vec![0.0f32; hidden.len()];
        // Every round but the last loses at least one more peer, so there are at most
        // shard_count rounds; the last one runs on the local shard alone if it must.
        for _round in 0..placement.shard_count() {
            let works: Vec<Arc<PeerWork>> = peer_works.into_iter().map(Arc::new).collect();
            let calls: Vec<_> = works
                .iter()
                .map(|work| {
                    let call =
                        sharded
                            .clone()
                            .call_peer(layer, shared.clone(), hidden_size, work.clone());
                    sharded.runtime.spawn(call)
                })
                .collect();
            // The local experts run while the peers compute theirs.
            let local = (!local_plan.works.is_empty()).then(|| {
                self.local
                    .run_experts(layer, hidden, hidden_size, &local_plan)
            });
            let answers = sharded.runtime.block_on(futures::future::join_all(calls));
            if let Some(local) = local {
                for (o, l) in out.iter_mut().zip(local?) {
                    *o += l;
                }
            }
            let mut lost = Vec::new();
            for (work, answer) in works.iter().zip(answers) {
                let answer = answer
                    .map_err(|e| ModelError::Experts(format!("expert call task failed: {e}")))?;
                match answer {
                    Ok(sums) => add_rows(&mut out, hidden_size, &work.token_rows, &sums),
                    Err(unavailable) => {
                        failed.insert(work.rank, unavailable);
                        lost.push(work.as_ref());
                    }
                }
            }
            if lost.is_empty() {
                return Ok(out);
            }
            let retry = reclaim(&lost);
            (local_plan, peer_works) = split_plan(&retry, placement, layer, local_rank, |r| {
                r == local_rank || (!failed.contains_key(&r) && sharded.peers.is_usable(r))
            })
            .map_err(|e| sharded.unassignable(e, &failed))?;
            for work in &lost {
                let address = sharded.peers.address(work.rank);
                tracing::warn!(
                    peer = work.rank,
                    %address,
                    layer,
                    reason = %failed[&work.rank],
                    "expert call failed; running its work on a replica"
                );
                sharded.metrics.record_expert_retry(&address);
            }
        }
        Err(ModelError::ExpertsUnavailable(format!(
            "layer {layer}: expert work still failing after {} rounds of retries on replicas",
            placement.shard_count()
        )))
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

    fn all_up(_: usize) -> bool {
        true
    }

    #[test]
    fn a_plan_splits_by_shard_and_each_token_crosses_once_per_peer() {
        // 8 experts over 2 shards: 0..4 on shard 0, 4..8 on shard 1.
        let placement = Placement::default_for(8, 1, 2, 0, &[1]).unwrap();
        let plan = DispatchPlan {
            works: vec![
                work(1, &[0, 2], &[0.1, 0.2]),
                work(5, &[0, 1], &[0.3, 0.4]),
                work(7, &[0, 3], &[0.5, 0.6]),
            ],
        };
        let (local, peers) = split_plan(&plan, &placement, 1, 0, all_up).unwrap();
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
        let shape = latentserve_placement::file::ModelShape {
            n_experts: 4,
            moe_layers: &[1],
            shard_count: 2,
        };
        let placement = Placement::parse(r#"{"experts": [[0], [0, 1], [1], [1]]}"#, shape).unwrap();
        let plan = DispatchPlan {
            works: vec![work(1, &[0, 1, 2, 3], &[1.0, 2.0, 3.0, 4.0])],
        };
        let (local, peers) = split_plan(&plan, &placement, 1, 0, all_up).unwrap();
        // Both replicas empty: ties go local first, then alternate.
        assert_eq!(local.works, vec![work(1, &[0, 2], &[1.0, 3.0])]);
        assert_eq!(peers[0].token_rows, vec![1, 3]);
        assert_eq!(peers[0].experts, vec![work(1, &[0, 1], &[2.0, 4.0])]);
    }

    #[test]
    fn a_failed_peers_work_goes_back_to_the_original_rows_and_to_its_replicas() {
        // 6 experts over 3 shards (2 each), each shard also holding the next one's: expert e
        // on shards e / 2 and (e / 2 + 2) % 3.
        let placement = Placement::default_for(6, 1, 3, 2, &[4]).unwrap();
        let plan = DispatchPlan {
            works: vec![
                work(0, &[0, 5], &[0.1, 0.2]),
                work(2, &[1, 5, 7], &[0.3, 0.4, 0.5]),
                work(3, &[2], &[0.6]),
                work(4, &[3, 7], &[0.7, 0.8]),
            ],
        };
        // Shard 2 is down from the start: nothing goes there.
        let (local, peers) = split_plan(&plan, &placement, 4, 0, |r| r != 2).unwrap();
        assert!(peers.iter().all(|p| p.rank == 1), "{peers:?}");
        let pairs = |plan: &DispatchPlan| plan.works.iter().map(|w| w.rows.len()).sum::<usize>();
        assert_eq!(
            pairs(&local) + peers.iter().map(|p| pairs(&reclaim(&[p]))).sum::<usize>(),
            8
        );

        // All up, then shard 1 fails mid-step: its work comes back with the batch's rows and
        // goes to the shards left, none of it to shard 1.
        let (_, peers) = split_plan(&plan, &placement, 4, 0, all_up).unwrap();
        let lost = peers.iter().find(|p| p.rank == 1).unwrap();
        let back = reclaim(&[lost]);
        for expert in &back.works {
            let original = plan
                .works
                .iter()
                .find(|w| w.expert == expert.expert)
                .unwrap();
            for (row, weight) in expert.rows.iter().zip(&expert.weights) {
                let at = original.rows.iter().position(|r| r == row).unwrap();
                assert_eq!(original.weights[at], *weight);
            }
        }
        let (retry_local, retry_peers) = split_plan(&back, &placement, 4, 0, |r| r != 1).unwrap();
        assert!(retry_peers.iter().all(|p| p.rank == 2));
        assert_eq!(
            pairs(&retry_local)
                + retry_peers
                    .iter()
                    .map(|p| pairs(&reclaim(&[p])))
                    .sum::<usize>(),
            pairs(&back)
        );
        // Shards 1 and 2 both failed: expert 2 (shards 1 and 0) can go local, expert 4 (shards 2
        // and 1) has no holder left.
        let err = split_plan(&plan, &placement, 4, 0, |r| r == 0).unwrap_err();
        assert_eq!(
            err,
            AssignError::NoUsableHolder {
                layer: 4,
                expert: 4,
                holders: vec![1, 2]
            }
        );
    }

    #[test]
    fn an_expert_lost_on_two_peers_comes_back_as_one_entry() {
        let a = PeerWork {
            rank: 1,
            token_rows: vec![3, 8],
            experts: vec![work(5, &[1], &[0.5]), work(6, &[0, 1], &[0.1, 0.2])],
        };
        let b = PeerWork {
            rank: 2,
            token_rows: vec![2, 9],
            experts: vec![work(5, &[1, 0], &[0.7, 0.6])],
        };
        let back = reclaim(&[&a, &b]);
        assert_eq!(
            back.works,
            vec![
                work(5, &[2, 8, 9], &[0.6, 0.5, 0.7]),
                work(6, &[3, 8], &[0.1, 0.2])
            ]
        );
        assert!(reclaim(&[]).works.is_empty());
    }

    #[test]
    fn partial_sums_add_into_their_rows() {
        let mut out = vec![1.0; 6];
        add_rows(&mut out, 2, &[0, 2], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(out, vec![2.0, 3.0, 1.0, 1.0, 4.0, 5.0]);
    }
}
