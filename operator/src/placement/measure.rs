//! What a measurement window says: each group's expert load per rank, how uneven it is, and
//! whether a new placement is worth a rollout. Pure.

use std::collections::BTreeMap;

use latentserve_placement::load::{self, ExpertLoad};

/// Routed (token, expert) pairs a window needs per (MoE layer, expert) on average before its
/// counts decide anything: fewer cannot tell a hot expert from chance.
pub const MIN_TOKENS_PER_EXPERT: f64 = 16.0;
/// A new placement must be predicted to lower the imbalance by at least this factor: smaller
/// gains do not pay for restarting every group.
pub const MIN_GAIN: f64 = 1.02;

/// One worker's counts over the window.
#[derive(Debug, Clone, PartialEq)]
pub struct PodLoad {
    pub group: i32,
    pub rank: usize,
    pub load: ExpertLoad,
}

/// The window's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Sum over groups and MoE layers of the busiest rank's load, over the sum of the mean
    /// rank's: how much longer the expert work of a step takes than with even shards. `None`
    /// without any load.
    pub imbalance: Option<f64>,
    /// Every pod's counts added up: the load a new placement is computed for.
    pub total: ExpertLoad,
    /// Routed (token, expert) pairs counted.
    pub tokens: f64,
}

/// Rank loads per group and layer (a rank's load: the pairs its experts ran), then the ratio.
pub fn measure(pods: &[PodLoad], shard_count: usize) -> Measurement {
    // (group, layer) -> tokens per rank.
    let mut ranks: BTreeMap<(i32, usize), Vec<f64>> = BTreeMap::new();
    let mut total = ExpertLoad::default();
    for pod in pods {
        total.add(&pod.load);
        for (&layer, experts) in &pod.load.layers {
            let loads = ranks
                .entry((pod.group, layer))
                .or_insert_with(|| vec![0.0; shard_count]);
            if let Some(slot) = loads.get_mut(pod.rank) {
                *slot += experts.iter().sum::<f64>();
            }
        }
    }
    Measurement {
        imbalance: load::imbalance_of(ranks.into_values()),
        tokens: total.total(),
        total,
    }
}

/// What to do with a window's measurement.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Too few routed tokens to judge.
    TooFewTokens { tokens: f64, needed: f64 },
    /// Even enough: below `minImbalance`.
    Even { measured: f64 },
    /// The best placement would not be enough better.
    NoGain { measured: f64, predicted: f64 },
    /// Roll out the new placement.
    Rebalance { measured: f64, predicted: f64 },
}

/// `entries`: (MoE layer, expert) pairs the model has, for the token floor.
pub fn decide(
    measured: f64,
    predicted: f64,
    tokens: f64,
    entries: usize,
    min_imbalance: f64,
) -> Decision {
    let needed = MIN_TOKENS_PER_EXPERT * entries as f64;
    if tokens < needed {
        Decision::TooFewTokens { tokens, needed }
    } else if measured < min_imbalance {
        Decision::Even { measured }
    } else if predicted * MIN_GAIN > measured {
        Decision::NoGain {
            measured,
            predicted,
        }
    } else {
        Decision::Rebalance {
            measured,
            predicted,
        }
    }
}

/// The rank of a worker pod from its name, `NAME-GROUP-RANK`.
pub fn rank_of_pod(pod_name: &str) -> Option<usize> {
    pod_name.rsplit_once('-')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(layers: &[(usize, &[f64])]) -> ExpertLoad {
        ExpertLoad {
            layers: layers.iter().map(|(l, v)| (*l, v.to_vec())).collect(),
        }
    }

    #[test]
    fn imbalance_is_the_busiest_rank_over_the_mean_summed_over_groups_and_layers() {
        // Group 0, 2 ranks. Layer 1: rank 0 ran 30, rank 1 ran 10 -> max 30, mean 20.
        // Layer 2: 20 and 20 -> max 20, mean 20. Group 1, layer 1: 10 and 10.
        let pods = [
            PodLoad {
                group: 0,
                rank: 0,
                load: load(&[(1, &[10.0, 20.0]), (2, &[20.0, 0.0])]),
            },
            PodLoad {
                group: 0,
                rank: 1,
                load: load(&[(1, &[0.0, 0.0, 10.0]), (2, &[0.0, 0.0, 20.0])]),
            },
            PodLoad {
                group: 1,
                rank: 0,
                load: load(&[(1, &[10.0])]),
            },
            PodLoad {
                group: 1,
                rank: 1,
                load: load(&[(1, &[0.0, 0.0, 10.0])]),
            },
        ];
        let m = measure(&pods, 2);
        // (30 + 20 + 10) / (20 + 20 + 10)
        assert!((m.imbalance.unwrap() - 60.0 / 50.0).abs() < 1e-12);
        assert_eq!(m.tokens, 100.0);
        assert_eq!(m.total.layers[&1], vec![20.0, 20.0, 20.0]);
        assert_eq!(measure(&[], 2).imbalance, None);
    }

    #[test]
    fn a_rollout_needs_tokens_imbalance_and_a_real_gain() {
        // 3 layers x 8 experts -> 384 pairs needed.
        assert!(matches!(
            decide(2.0, 1.0, 100.0, 24, 1.15),
            Decision::TooFewTokens { needed, .. } if needed == 384.0
        ));
        assert!(matches!(
            decide(1.1, 1.0, 1e4, 24, 1.15),
            Decision::Even { .. }
        ));
        assert!(matches!(
            decide(1.5, 1.49, 1e4, 24, 1.15),
            Decision::NoGain { .. }
        ));
        assert!(matches!(
            decide(1.5, 1.1, 1e4, 24, 1.15),
            Decision::Rebalance { .. }
        ));
    }

    #[test]
    fn pods_are_ranked_by_their_ordinal() {
        assert_eq!(rank_of_pod("demo-0-3"), Some(3));
        assert_eq!(rank_of_pod("my-model-12-0"), Some(0));
        assert_eq!(rank_of_pod("demo"), None);
    }
}
