//! Which worker takes a request: pure functions over what the router knows of each endpoint.
//!
//! `prefix-aware` (the default) is consistent hashing with bounded loads, made precise by the
//! workers' cache reports and by what each request costs where:
//! 1. endpoints whose load has reached the bound `ceil(LOAD_BOUND * (total load + 1) / n)` (and
//!    at least [`MIN_LOAD_BOUND`]) are passed over, so a hot prefix spills to a second worker
//!    instead of queueing on one;
//! 2. among the rest, the cheapest wins: the prompt tokens it would have to compute (what it does
//!    not hold of the prompt, counted [`MISS_WEIGHT`] times) plus the prefill already queued
//!    there. A worker holding the prefix thus wins unless it is so backed up with prefill that
//!    the request would see its first token sooner elsewhere, and a new prefix goes where the
//!    least prefill waits;
//! 3. ties (typically: idle workers and a new prefix) go to the longest cached prefix, then the
//!    least loaded, then by rendezvous hashing of the prompt's first block, so requests with the
//!    same new prefix meet on the same worker.
//!
//! The answer is an order, not one endpoint: retries take the next.

use std::hash::{DefaultHasher, Hash, Hasher};

/// How far above the mean load one endpoint may go before new requests pass it over (the `c`
/// of consistent hashing with bounded loads). Its authors recommend 1.25 for requests of equal
/// cost; here the cost order already sends a request past a holder backed up with prefill, and
/// every spill past a holder that is merely busy decoding costs a prefix copy that evicts others:
/// with 1.25 the hit rate in caches that cannot hold every prefix everywhere was 0.84 of the
/// ideal, with 2.0 0.94 (benchmarks/README.md).
pub const LOAD_BOUND: f64 = 2.0;

/// The bound never falls below this many requests in flight: a worker running a few requests
/// batches one more at the cost of its uncached tokens only, while an idle worker without the
/// prefix would compute all of them (at low load, plain bounded loads would scatter a prefix).
pub const MIN_LOAD_BOUND: usize = 4;

/// How much more a prompt token an endpoint must compute weighs than one queued there: computing
/// it delays everything after it on that worker, and a second copy of a prefix costs cache room.
pub const MISS_WEIGHT: usize = 4;

/// The balancing policy (`--policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Longest cached prefix first, within bounded loads; rendezvous hashing for new prefixes.
    PrefixAware,
    /// Fewest outstanding and queued requests.
    LeastLoaded,
    /// Each request to the next endpoint.
    RoundRobin,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::PrefixAware => "prefix-aware",
            Policy::LeastLoaded => "least-loaded",
            Policy::RoundRobin => "round-robin",
        }
    }
}

/// What the router knows of one endpoint when a request arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Stable name of the endpoint (its address); rendezvous hashing mixes it in.
    pub name: String,
    /// Requests in flight on it: the larger of what this router sent and what it reports.
    pub load: usize,
    /// Leading blocks of the prompt it holds (or was just sent) in its prefix cache.
    pub cached_blocks: usize,
    /// Prompt tokens of requests sent to it that it has not answered yet (their prefill).
    pub pending_tokens: usize,
    /// Tokens of this prompt it would compute (0 when the prompt's tokens are not known).
    pub uncached_tokens: usize,
}

impl Candidate {
    /// What sending the request here costs, in prompt tokens (see the module docs).
    pub fn cost(&self) -> usize {
        self.pending_tokens
            .saturating_add(MISS_WEIGHT.saturating_mul(self.uncached_tokens))
    }
}

/// Why the first endpoint of a [`Decision`] was chosen (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// It holds the longest cached prefix.
    Prefix,
    /// Nobody holds any of the prefix: the least busy endpoint (rendezvous hashing on ties).
    Hash,
    /// Every endpoint was at the load bound: the least loaded.
    Overloaded,
    LeastLoaded,
    RoundRobin,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Prefix => "prefix",
            Reason::Hash => "hash",
            Reason::Overloaded => "overloaded",
            Reason::LeastLoaded => "least_loaded",
            Reason::RoundRobin => "round_robin",
        }
    }
}

/// The endpoints to try, best first (indices into the candidates), and why the first won.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub order: Vec<usize>,
    pub reason: Reason,
}

/// The load at which an endpoint stops taking new requests while others are below it.
pub fn load_bound(candidates: &[Candidate]) -> usize {
    let total: usize = candidates.iter().map(|c| c.load).sum();
    let bound = ((LOAD_BOUND * (total + 1) as f64) / candidates.len().max(1) as f64).ceil();
    (bound as usize).max(MIN_LOAD_BOUND)
}

/// Orders `candidates` for a request whose first block hashes to `affinity`. `turn` is a
/// counter the caller advances per request (round robin). `None` when there is no candidate.
pub fn decide(
    policy: Policy,
    candidates: &[Candidate],
    affinity: u64,
    turn: usize,
) -> Option<Decision> {
    if candidates.is_empty() {
        return None;
    }
    let by_load = |a: &usize, b: &usize| {
        let (ca, cb) = (&candidates[*a], &candidates[*b]);
        ca.load
            .cmp(&cb.load)
            .then_with(|| rank(cb, affinity).cmp(&rank(ca, affinity)))
    };
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    let reason = match policy {
        Policy::RoundRobin => {
            order.rotate_left(turn % candidates.len());
            Reason::RoundRobin
        }
        Policy::LeastLoaded => {
            order.sort_by(by_load);
            Reason::LeastLoaded
        }
        Policy::PrefixAware => {
            let bound = load_bound(candidates);
            let (mut open, mut full): (Vec<usize>, Vec<usize>) =
                order.into_iter().partition(|&i| candidates[i].load < bound);
            open.sort_by(|a, b| {
                let (ca, cb) = (&candidates[*a], &candidates[*b]);
                ca.cost()
                    .cmp(&cb.cost())
                    .then_with(|| cb.cached_blocks.cmp(&ca.cached_blocks))
                    .then_with(|| ca.load.cmp(&cb.load))
                    .then_with(|| rank(cb, affinity).cmp(&rank(ca, affinity)))
            });
            full.sort_by(by_load);
            let reason = match open.first() {
                None => Reason::Overloaded,
                Some(&first) if candidates[first].cached_blocks > 0 => Reason::Prefix,
                Some(_) => Reason::Hash,
            };
            order = open;
            order.extend(full);
            reason
        }
    };
    Some(Decision { order, reason })
}

/// Rendezvous (highest random weight) rank of an endpoint for a key: each key ranks the
/// endpoints in its own pseudo-random order, and removing an endpoint moves only its keys.
fn rank(candidate: &Candidate, affinity: u64) -> u64 {
    let mut hasher = DefaultHasher::new();
    affinity.hash(&mut hasher);
    candidate.name.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prompts in these tests are 10 blocks of 16 tokens.
    const PROMPT_BLOCKS: usize = 10;
    const BLOCK_TOKENS: usize = 16;

    fn candidate(name: &str, load: usize, cached_blocks: usize) -> Candidate {
        Candidate {
            name: name.to_owned(),
            load,
            cached_blocks,
            pending_tokens: 0,
            uncached_tokens: PROMPT_BLOCKS.saturating_sub(cached_blocks) * BLOCK_TOKENS,
        }
    }

    fn pending(mut candidate: Candidate, tokens: usize) -> Candidate {
        candidate.pending_tokens = tokens;
        candidate
    }

    fn idle(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| candidate(&format!("10.0.0.{i}:50051"), 0, 0))
            .collect()
    }

    #[test]
    fn no_candidate_no_decision() {
        assert_eq!(decide(Policy::PrefixAware, &[], 1, 0), None);
    }

    #[test]
    fn the_longest_cached_prefix_wins() {
        let candidates = vec![
            candidate("a", 1, 2),
            candidate("b", 0, 5),
            candidate("c", 0, 0),
        ];
        let decision = decide(Policy::PrefixAware, &candidates, 7, 0).unwrap();
        assert_eq!(decision.reason, Reason::Prefix);
        assert_eq!(decision.order[..2], [1, 0]);
        // At low load a busy holder of the prefix still beats an idle worker without it.
        let candidates = vec![candidate("a", 3, 4), candidate("b", 0, 0)];
        assert_eq!(
            decide(Policy::PrefixAware, &candidates, 7, 0)
                .unwrap()
                .order[0],
            0
        );
    }

    #[test]
    fn a_holder_backed_up_with_prefill_loses_to_an_idle_worker() {
        // Holding 8 of 10 blocks saves 128 tokens, each counted MISS_WEIGHT times: worth
        // waiting behind that many queued tokens, not more.
        let saved = MISS_WEIGHT * 8 * BLOCK_TOKENS;
        let holder_waits = |queued| {
            let candidates = vec![pending(candidate("a", 2, 8), queued), candidate("b", 0, 0)];
            decide(Policy::PrefixAware, &candidates, 7, 0).unwrap()
        };
        let decision = holder_waits(saved - 1);
        assert_eq!((decision.order[0], decision.reason), (0, Reason::Prefix));
        let decision = holder_waits(saved + 1);
        assert_eq!((decision.order[0], decision.reason), (1, Reason::Hash));
        assert_eq!(decision.order[1], 0, "the holder stays the retry");
    }

    #[test]
    fn a_new_prefix_goes_where_the_least_prefill_waits() {
        let candidates = vec![
            pending(candidate("a", 1, 0), 500),
            candidate("b", 3, 0),
            pending(candidate("c", 1, 0), 40),
        ];
        let decision = decide(Policy::PrefixAware, &candidates, 11, 0).unwrap();
        assert_eq!(decision.order, vec![1, 2, 0]);
        assert_eq!(decision.reason, Reason::Hash);
        // Without prefill queued anywhere, the least loaded.
        let candidates = vec![candidate("a", 2, 0), candidate("b", 1, 0)];
        assert_eq!(
            decide(Policy::PrefixAware, &candidates, 11, 0)
                .unwrap()
                .order[0],
            1
        );
    }

    #[test]
    fn a_new_prefix_always_lands_on_the_same_endpoint_and_prefixes_spread() {
        let candidates = idle(4);
        let mut firsts = std::collections::BTreeSet::new();
        for affinity in 0..64u64 {
            let first = decide(Policy::PrefixAware, &candidates, affinity, 0).unwrap();
            assert_eq!(first.reason, Reason::Hash);
            // Same key, same answer, whatever the turn.
            let again = decide(Policy::PrefixAware, &candidates, affinity, 9).unwrap();
            assert_eq!(first.order, again.order);
            firsts.insert(first.order[0]);
        }
        assert_eq!(firsts.len(), 4, "64 keys reach every endpoint");
    }

    #[test]
    fn removing_an_endpoint_moves_only_its_keys() {
        let four = idle(4);
        let three: Vec<Candidate> = four[..3].to_vec();
        for affinity in 0..200u64 {
            let before = decide(Policy::PrefixAware, &four, affinity, 0)
                .unwrap()
                .order[0];
            let after = decide(Policy::PrefixAware, &three, affinity, 0)
                .unwrap()
                .order[0];
            if before != 3 {
                assert_eq!(before, after, "key {affinity} moved");
            }
        }
    }

    #[test]
    fn a_hot_prefix_spills_to_another_endpoint_at_the_load_bound() {
        // The holder of the prefix has 6 in flight, the others 1: bound = ceil(2 * 10 / 4) = 5.
        let candidates = vec![
            candidate("a", 6, 8),
            candidate("b", 1, 0),
            candidate("c", 1, 2),
            candidate("d", 1, 0),
        ];
        assert_eq!(load_bound(&candidates), 5);
        let decision = decide(Policy::PrefixAware, &candidates, 3, 0).unwrap();
        assert_eq!(
            decision.order[0], 2,
            "the next-longest prefix below the bound"
        );
        assert_eq!(decision.reason, Reason::Prefix);
        assert_eq!(*decision.order.last().unwrap(), 0);
    }

    #[test]
    fn the_bound_always_leaves_an_endpoint_open() {
        // The bound is above the mean load, so someone is always below it.
        for loads in [vec![5, 5], vec![0, 9, 9], vec![100], vec![3, 3, 3, 3]] {
            let candidates: Vec<Candidate> = loads
                .iter()
                .enumerate()
                .map(|(i, &load)| candidate(&i.to_string(), load, 1))
                .collect();
            let decision = decide(Policy::PrefixAware, &candidates, 1, 0).unwrap();
            assert_ne!(decision.reason, Reason::Overloaded, "{loads:?}");
            assert!(candidates[decision.order[0]].load < load_bound(&candidates));
        }
    }

    #[test]
    fn least_loaded_and_round_robin() {
        let candidates = vec![
            candidate("a", 3, 9),
            candidate("b", 1, 0),
            candidate("c", 2, 0),
        ];
        let least = decide(Policy::LeastLoaded, &candidates, 0, 0).unwrap();
        assert_eq!(least.order, vec![1, 2, 0]);
        assert_eq!(least.reason, Reason::LeastLoaded);
        let turns: Vec<usize> = (0..4)
            .map(|turn| {
                decide(Policy::RoundRobin, &candidates, 0, turn)
                    .unwrap()
                    .order[0]
            })
            .collect();
        assert_eq!(turns, vec![0, 1, 2, 0]);
    }

    #[test]
    fn every_endpoint_is_in_the_order_once_for_retries() {
        let candidates = vec![
            candidate("a", 9, 1),
            candidate("b", 0, 0),
            candidate("c", 0, 4),
        ];
        for policy in [Policy::PrefixAware, Policy::LeastLoaded, Policy::RoundRobin] {
            let mut order = decide(policy, &candidates, 5, 1).unwrap().order;
            order.sort_unstable();
            assert_eq!(order, vec![0, 1, 2], "{policy:?}");
        }
    }
}
