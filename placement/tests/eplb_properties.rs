//! Properties of the balanced placement over many pseudo-random and skewed expert counts.

use std::collections::BTreeMap;

use latentserve_placement::eplb::{BalanceOptions, balanced};
use latentserve_placement::layout::contiguous;
use latentserve_placement::load::{ExpertLoad, predicted_imbalance, rank_loads};
use latentserve_placement::{GroupPlacement, PlacementError};

/// SplitMix64: a few lines, deterministic, good enough to vary test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A random permutation of 0..n.
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut items: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
        items
    }
}

/// One layer's tokens per expert, of a kind picked by `kind`.
fn layer_counts(rng: &mut Rng, n_experts: usize, kind: usize) -> Vec<f64> {
    match kind % 5 {
        // Uniform.
        0 => (0..n_experts).map(|_| rng.below(1000) as f64).collect(),
        // Zipf-like: the i-th hottest expert gets ~ 1 / i^s of the tokens.
        1 | 2 => {
            let s = if kind % 5 == 1 { 1.0 } else { 1.6 };
            let rank = rng.permutation(n_experts);
            rank.iter()
                .map(|&r| (100_000.0 / ((r + 1) as f64).powf(s)).round())
                .collect()
        }
        // Mostly idle experts.
        3 => (0..n_experts)
            .map(|_| {
                if rng.below(10) < 7 {
                    0.0
                } else {
                    rng.below(5000) as f64
                }
            })
            .collect(),
        // Nothing routed at all.
        _ => vec![0.0; n_experts],
    }
}

/// (n_experts, shard_count, redundant, n_group, nodes, min_replicas)
const SHAPES: &[(usize, usize, usize, usize, usize, usize)] = &[
    (8, 2, 0, 1, 1, 1),
    (8, 8, 0, 1, 1, 1),
    (10, 4, 1, 1, 1, 1),
    (16, 4, 1, 4, 2, 1),
    (16, 4, 4, 4, 1, 2),
    (20, 6, 1, 1, 1, 1),
    (33, 5, 7, 1, 1, 2),
    (60, 8, 1, 4, 2, 1),
    (64, 8, 2, 8, 2, 1),
    (64, 8, 8, 8, 2, 2),
    (64, 8, 8, 8, 4, 2),
    (48, 6, 1, 4, 3, 1),
    (12, 3, 20, 1, 1, 1),
    (256, 32, 1, 8, 4, 1),
];

fn options(shape: (usize, usize, usize, usize, usize, usize)) -> BalanceOptions {
    let (_, shard_count, redundant, n_group, nodes, min_replicas) = shape;
    BalanceOptions {
        shard_count,
        redundant,
        n_group,
        nodes,
        min_replicas,
    }
}

/// Checks every property of `placement` for `load` under `options`.
fn check(placement: &GroupPlacement, load: &ExpertLoad, options: &BalanceOptions, what: &str) {
    let n_experts = load.layers[&0].len();
    let slots = options.slots_per_rank(n_experts);
    assert_eq!(placement.shard_count, options.shard_count);
    assert_eq!(
        placement.layers.keys().collect::<Vec<_>>(),
        load.layers.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (layer, p) in &placement.layers {
        assert_eq!(p.n_experts(), n_experts, "{what} layer {layer}");
        for e in 0..n_experts {
            // LayerPlacement itself guarantees distinct, in-range ranks.
            assert!(
                p.replicas(e).len() >= options.min_replicas,
                "{what} layer {layer}: expert {e} on {:?}",
                p.replicas(e)
            );
        }
        for rank in 0..options.shard_count {
            assert!(
                p.experts_of(rank).len() <= slots,
                "{what}: rank {rank} over capacity"
            );
        }
        if options.hierarchical(n_experts) {
            // Every replica of a group's experts stays on one node.
            let group_size = n_experts / options.n_group;
            let ranks_per_node = options.shard_count / options.nodes;
            for group in 0..options.n_group {
                let mut nodes: Vec<usize> = (group * group_size..(group + 1) * group_size)
                    .flat_map(|e| p.replicas(e).iter().map(|r| r / ranks_per_node))
                    .collect();
                nodes.dedup();
                assert_eq!(
                    nodes.len(),
                    1,
                    "{what} layer {layer}: group {group} on {nodes:?}"
                );
            }
        }
    }
    if options.min_replicas >= 2 {
        for down in 0..options.shard_count {
            assert!(
                placement.covered_by(|r| r != down),
                "{what}: rank {down} down"
            );
        }
    }
    let baseline = contiguous(
        n_experts,
        options.n_group,
        options.shard_count,
        options.redundant,
    )
    .unwrap();
    let baseline =
        GroupPlacement::uniform(options.shard_count, &baseline, load.layers.keys().copied());
    let ours = predicted_imbalance(placement, load);
    let theirs = predicted_imbalance(&baseline, load);
    assert!(
        ours <= theirs + 1e-9,
        "{what}: ours {ours} vs contiguous {theirs}"
    );
}

#[test]
fn placements_are_valid_and_beat_the_contiguous_layout() {
    let mut rng = Rng(0x5eed);
    let mut checked = 0;
    for &shape in SHAPES {
        let options = options(shape);
        for trial in 0..12 {
            // Five layers, one of each kind, in a rotating order; an all-zero layer among them.
            let load = ExpertLoad {
                layers: (0..5)
                    .map(|l| (l, layer_counts(&mut rng, shape.0, l + trial)))
                    .collect::<BTreeMap<_, _>>(),
            };
            let placement = balanced(&load, &options).unwrap();
            check(
                &placement,
                &load,
                &options,
                &format!("{shape:?} trial {trial}"),
            );
            checked += 1;
        }
    }
    assert_eq!(checked, SHAPES.len() * 12);
}

#[test]
fn a_slot_stays_free_only_where_any_replica_would_raise_the_nodes_busiest_rank() {
    let mut rng = Rng(7);
    let (mut free, mut total) = (0, 0);
    for &shape in SHAPES {
        let options = options(shape);
        for kind in 0..5 {
            let counts = layer_counts(&mut rng, shape.0, kind);
            let load = ExpertLoad {
                layers: BTreeMap::from([(0, counts.clone())]),
            };
            let layer = &balanced(&load, &options).unwrap().layers[&0];
            let loads = rank_loads(layer, options.shard_count, &counts);
            let slots = options.slots_per_rank(shape.0);
            for (rank, &rank_load) in loads.iter().enumerate() {
                let held = layer.experts_of(rank).len();
                // Under the hierarchical policy a rank takes only its node's experts.
                let node_size = if options.hierarchical(shape.0) {
                    options.shard_count / options.nodes
                } else {
                    options.shard_count
                };
                let same_node = |e: usize| layer.replicas(e)[0] / node_size == rank / node_size;
                let node = rank / node_size * node_size..(rank / node_size + 1) * node_size;
                let max = loads[node].iter().copied().fold(0.0, f64::max);
                // A rank holds each expert at most once: slots beyond its node's experts stay free.
                let usable = slots.min(shape.0 * node_size / options.shard_count);
                total += usable;
                free += usable - held;
                if held == usable {
                    continue;
                }
                for e in (0..shape.0).filter(|&e| !layer.holds(rank, e) && same_node(e)) {
                    let share = counts[e] / (layer.replicas(e).len() + 1) as f64;
                    assert!(
                        rank_load + share > max,
                        "{shape:?} kind {kind}: rank {rank} could take expert {e}"
                    );
                }
            }
        }
    }
    // Usable slots left free are the exception.
    assert!(free * 100 < total, "{free} of {total} slots free");
}

#[test]
fn too_few_slots_for_two_replicas_is_an_error_naming_the_numbers() {
    let load = ExpertLoad {
        layers: BTreeMap::from([(3, vec![1.0; 16])]),
    };
    let mut options = options((16, 4, 1, 1, 1, 2));
    let err = balanced(&load, &options).unwrap_err().to_string();
    assert!(err.contains("32 slots") && err.contains("20"), "{err}");
    assert!(err.contains("redundant must be at least 4"), "{err}");
    options.redundant = 4;
    assert!(balanced(&load, &options).is_ok());
    options.shard_count = 17;
    assert_eq!(
        balanced(&load, &options),
        Err(PlacementError::TooManyShards {
            shards: 17,
            experts: 16
        })
    );
}
