//! Which shard of a serving group holds which routed expert, per MoE layer.
//!
//! Pure: no I/O. Shared by the worker (which loads and runs what a placement gives its rank) and
//! the operator (which measures expert load and computes balanced placements).
//!
//! - [`file`]: the placement file, `--expert-placement`, as the operator writes it into a
//!   ConfigMap and the worker reads it;
//! - [`layout`]: the placements that need no measurement (whole groups or contiguous ranges,
//!   with optional redundant copies of the next rank's experts);
//! - [`eplb`]: the balanced placement from measured expert load (DeepSeek's EPLB method);
//! - [`load`]: expert load read from the workers' Prometheus counters, and imbalance.

pub mod eplb;
pub mod file;
pub mod layout;
pub mod load;

use std::collections::BTreeMap;

/// One MoE layer's placement: expert -> the ranks holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPlacement {
    /// `replicas[e]`: ranks holding expert `e`, ascending, distinct, never empty.
    replicas: Vec<Vec<usize>>,
}

impl LayerPlacement {
    /// Checks every entry: non-empty, no rank twice, every rank below `shard_count`. The error
    /// names the entry (`experts[3] ...`).
    pub fn new(replicas: Vec<Vec<usize>>, shard_count: usize) -> Result<Self, String> {
        let mut checked = Vec::with_capacity(replicas.len());
        for (expert, ranks) in replicas.into_iter().enumerate() {
            if ranks.is_empty() {
                return Err(format!("experts[{expert}] lists no shard"));
            }
            let mut sorted = ranks.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != ranks.len() {
                return Err(format!("experts[{expert}] lists a shard twice: {ranks:?}"));
            }
            if let Some(&bad) = sorted.iter().find(|&&r| r >= shard_count) {
                return Err(format!(
                    "experts[{expert}] names shard {bad} but the group has {shard_count} shards"
                ));
            }
            checked.push(sorted);
        }
        Ok(Self { replicas: checked })
    }

    pub fn n_experts(&self) -> usize {
        self.replicas.len()
    }

    /// Ranks holding `expert`, ascending.
    pub fn replicas(&self, expert: usize) -> &[usize] {
        &self.replicas[expert]
    }

    /// Every entry, expert by expert.
    pub fn entries(&self) -> &[Vec<usize>] {
        &self.replicas
    }

    /// Whether `rank` holds `expert`.
    pub fn holds(&self, rank: usize, expert: usize) -> bool {
        self.replicas
            .get(expert)
            .is_some_and(|ranks| ranks.binary_search(&rank).is_ok())
    }

    /// The experts `rank` holds, ascending.
    pub fn experts_of(&self, rank: usize) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&e| self.holds(rank, e))
            .collect()
    }

    /// Whether every expert has a rank for which `up(rank)` is true.
    pub fn covered_by(&self, up: impl Fn(usize) -> bool) -> bool {
        self.replicas
            .iter()
            .all(|ranks| ranks.iter().any(|&r| up(r)))
    }

    /// `rank,rank/rank/...`: part of the shard fingerprint and of the file's canonical form.
    pub fn canonical(&self) -> String {
        self.replicas
            .iter()
            .map(|ranks| {
                ranks
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// A whole group's placement: every MoE layer (by its decoder layer index) with its own
/// [`LayerPlacement`], all over the same `shard_count` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlacement {
    pub shard_count: usize,
    pub layers: BTreeMap<usize, LayerPlacement>,
}

impl GroupPlacement {
    /// The same layer placement on every one of `moe_layers`.
    pub fn uniform(
        shard_count: usize,
        layer: &LayerPlacement,
        moe_layers: impl IntoIterator<Item = usize>,
    ) -> Self {
        Self {
            shard_count,
            layers: moe_layers.into_iter().map(|l| (l, layer.clone())).collect(),
        }
    }

    /// Whether every expert of every layer has a rank for which `up(rank)` is true: the group
    /// can serve with only those ranks.
    pub fn covered_by(&self, up: impl Fn(usize) -> bool) -> bool {
        self.layers.values().all(|layer| layer.covered_by(&up))
    }

    /// The most experts any rank holds in any layer: the expert memory a rank must have room for.
    pub fn max_slots_per_rank(&self) -> usize {
        self.layers
            .values()
            .flat_map(|layer| (0..self.shard_count).map(|r| layer.experts_of(r).len()))
            .max()
            .unwrap_or(0)
    }
}

/// A placement that cannot be built or does not fit the model; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "a group of {shards} shards cannot split {experts} routed experts: a shard would hold none"
    )]
    TooManyShards { shards: usize, experts: usize },
    #[error("{0}")]
    Invalid(String),
}
