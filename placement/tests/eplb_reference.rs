//! Our balanced placement against the published EPLB (vLLM's implementation) on the counts in
//! `fixtures/eplb/reference.json`; `fixtures/eplb/README.md` says how that file is made.

use std::collections::BTreeMap;

use latentserve_placement::eplb::{BalanceOptions, balanced};
use latentserve_placement::load::{ExpertLoad, predicted_imbalance};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

/// One call of vLLM's `rebalance_experts` (fields as `generate.py` writes them).
#[derive(Deserialize)]
struct Case {
    name: String,
    n_experts: usize,
    shard_count: usize,
    redundant: usize,
    n_group: usize,
    nodes: usize,
    /// Physical expert slots, shard_count * (ceil(n_experts / shard_count) + redundant).
    num_replicas: usize,
    /// (layers, n_experts): tokens per expert.
    counts: Vec<Vec<f64>>,
    /// (layers, num_replicas): vLLM's expert per slot, slots contiguous per rank.
    phy2log: Vec<Vec<usize>>,
    /// vLLM's imbalance as `generate.py` computed it.
    imbalance: f64,
}

impl Case {
    fn load(&self) -> ExpertLoad {
        ExpertLoad {
            layers: self.counts.iter().cloned().enumerate().collect(),
        }
    }

    fn options(&self) -> BalanceOptions {
        BalanceOptions {
            shard_count: self.shard_count,
            redundant: self.redundant,
            n_group: self.n_group,
            nodes: self.nodes,
            min_replicas: 1,
        }
    }

    /// vLLM's imbalance recomputed here: each slot carries its expert's tokens / the expert's
    /// slot count (which may put two shares of one expert on one rank).
    fn reference_imbalance(&self) -> f64 {
        let per_rank = self.num_replicas / self.shard_count;
        let (mut max_sum, mut mean_sum) = (0.0, 0.0);
        for (counts, slots) in self.counts.iter().zip(&self.phy2log) {
            let mut copies = vec![0usize; self.n_experts];
            slots.iter().for_each(|&e| copies[e] += 1);
            let mut loads = vec![0.0; self.shard_count];
            for (slot, &e) in slots.iter().enumerate() {
                loads[slot / per_rank] += counts[e] / copies[e] as f64;
            }
            max_sum += loads.iter().copied().fold(0.0, f64::max);
            mean_sum += loads.iter().sum::<f64>() / self.shard_count as f64;
        }
        if mean_sum > 0.0 {
            max_sum / mean_sum
        } else {
            1.0
        }
    }
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/eplb/reference.json"
    );
    let text = std::fs::read_to_string(path).expect("reference.json is checked in");
    serde_json::from_str(&text).expect("reference.json parses")
}

#[test]
fn never_more_imbalanced_than_published_eplb() {
    let fixture = fixture();
    assert!(
        fixture.cases.len() >= 10,
        "only {} cases",
        fixture.cases.len()
    );
    let mut report = BTreeMap::new();
    for case in &fixture.cases {
        let options = case.options();
        assert_eq!(
            case.num_replicas,
            case.shard_count * options.slots_per_rank(case.n_experts),
            "{}: vLLM was given a different slot count",
            case.name
        );
        let theirs = case.reference_imbalance();
        assert!(
            (theirs - case.imbalance).abs() < 1e-9,
            "{}: fixture says {} but its map gives {theirs}",
            case.name,
            case.imbalance
        );
        let placement = balanced(&case.load(), &options).unwrap();
        assert!(placement.max_slots_per_rank() <= options.slots_per_rank(case.n_experts));
        let ours = predicted_imbalance(&placement, &case.load());
        report.insert(case.name.as_str(), (ours, theirs));
        assert!(
            ours <= theirs + 1e-9,
            "{}: ours {ours:.6} vs published {theirs:.6}",
            case.name
        );
    }
    for (name, (ours, theirs)) in report {
        println!("{name:28} ours {ours:.4}  published {theirs:.4}");
    }
}
