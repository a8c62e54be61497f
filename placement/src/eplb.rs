//! The balanced placement from measured expert load: DeepSeek's EPLB method, with replicas of one
//! expert always on distinct ranks.
//!
//! Per MoE layer, EPLB (1) replicates the hottest experts, each new replica going to the expert
//! with the highest load per replica, until every expert slot is used, and (2) packs the replicas
//! onto ranks heaviest first, each onto the lightest rank with a free slot. Its hierarchical
//! policy first packs whole expert groups onto nodes (so that group-limited routing keeps a
//! token's traffic mostly inside few nodes) and then does (1) and (2) within each node.
//!
//! Published EPLB may put two replicas of one expert on one rank; a rank cannot hold an expert
//! twice here. So each layer (or node) is packed twice: once exactly as EPLB does, with such
//! pairs merged, and once with replication capped at one replica per rank and a packing that never
//! puts an expert on a rank twice. Both then go through a local search (shifts, swaps, extra
//! replicas, then also trading a replica from one expert to another) that lowers the most loaded
//! rank, slots left free are filled where that does not raise it, and the lighter result wins.
//!
//! Starting from EPLB's own packing keeps the result at least as balanced as EPLB's in nearly
//! every case. The exception is an expert so hot that EPLB gives it more replicas than there are
//! ranks (two on one rank carry twice the share): an even split over distinct ranks cannot say
//! that, and the result may then be a little (observed: under 1%) more imbalanced.

use std::ops::Range;

use crate::load::ExpertLoad;
use crate::{GroupPlacement, LayerPlacement, PlacementError};

/// How to balance a group: its ranks, their expert slots, and the model's expert groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceOptions {
    pub shard_count: usize,
    /// Extra expert slots per rank beyond ceil(n_experts / shard_count).
    pub redundant: usize,
    /// Expert groups of the model (config n_group; 1 = none). Used by the hierarchical policy.
    pub n_group: usize,
    /// Nodes the ranks are spread over, ranks contiguous per node (1 = global policy). When > 1
    /// and it divides shard_count and n_group, use EPLB's hierarchical policy (pack expert groups
    /// onto nodes, replicate within each node, pack onto the node's ranks); otherwise the global
    /// policy.
    pub nodes: usize,
    /// Least replicas per expert on distinct ranks (1, or 2 so that the group survives the loss
    /// of any one rank; needs enough slots, else an error naming the numbers).
    pub min_replicas: usize,
}

impl BalanceOptions {
    /// Expert slots of each rank: ceil(n_experts / shard_count) + redundant.
    pub fn slots_per_rank(&self, n_experts: usize) -> usize {
        n_experts.div_ceil(self.shard_count.max(1)) + self.redundant
    }

    /// Whether EPLB's hierarchical policy applies to `n_experts` experts: several nodes, each
    /// with whole expert groups and enough ranks for `min_replicas` distinct replicas.
    pub fn hierarchical(&self, n_experts: usize) -> bool {
        self.nodes > 1
            && self.shard_count.is_multiple_of(self.nodes)
            && self.n_group.is_multiple_of(self.nodes)
            && n_experts.is_multiple_of(self.n_group)
            && self.shard_count / self.nodes >= self.min_replicas
    }

    /// Checks the options against `n_experts`; the error names the numbers.
    fn check(&self, n_experts: usize) -> Result<(), PlacementError> {
        let invalid = |message: String| Err(PlacementError::Invalid(message));
        if self.shard_count == 0 || self.shard_count > n_experts {
            return Err(PlacementError::TooManyShards {
                shards: self.shard_count,
                experts: n_experts,
            });
        }
        if self.nodes == 0 || self.n_group == 0 {
            return invalid(format!(
                "nodes ({}) and n_group ({}) must be at least 1",
                self.nodes, self.n_group
            ));
        }
        let (min, shards) = (self.min_replicas, self.shard_count);
        if min == 0 || min > shards {
            return invalid(format!(
                "min_replicas is {min} but must be between 1 and the group's {shards} shards"
            ));
        }
        let slots = self.slots_per_rank(n_experts);
        if n_experts * min > shards * slots {
            let needed = (n_experts * min).div_ceil(shards) - n_experts.div_ceil(shards);
            return invalid(format!(
                "{min} replicas of each of {n_experts} experts need {} slots but {shards} shards \
                 x {slots} slots give {}: redundant must be at least {needed}",
                n_experts * min,
                shards * slots
            ));
        }
        Ok(())
    }
}

/// DeepSeek's EPLB for each layer of `load`: replicate the hottest experts (the expert with the
/// highest load per replica gets the next replica) until every slot (shard_count *
/// (ceil(E/N) + redundant)) is used, then pack the replicas onto ranks so that each rank's
/// expected load is even (heaviest first onto the lightest rank with a free slot), with replicas
/// of one expert always on distinct ranks.
///
/// Layers shorter than the longest are padded with zero load. Slots stay free only where every
/// expert that could use them already has a replica on every rank that has room.
pub fn balanced(
    load: &ExpertLoad,
    options: &BalanceOptions,
) -> Result<GroupPlacement, PlacementError> {
    let n_experts = load.layers.values().map(Vec::len).max().unwrap_or(0);
    if load.layers.is_empty() {
        return Err(PlacementError::Invalid(
            "the expert load has no layer to balance".to_owned(),
        ));
    }
    options.check(n_experts)?;
    let mut layers = std::collections::BTreeMap::new();
    for (&layer, counts) in &load.layers {
        if let Some((expert, bad)) = counts
            .iter()
            .enumerate()
            .find(|(_, t)| !t.is_finite() || **t < 0.0)
        {
            return Err(PlacementError::Invalid(format!(
                "layer {layer} expert {expert}: load {bad} is not a token count"
            )));
        }
        let mut counts = counts.clone();
        counts.resize(n_experts, 0.0);
        layers.insert(layer, balance_layer(&counts, options));
    }
    Ok(GroupPlacement {
        shard_count: options.shard_count,
        layers,
    })
}

/// Ranks and the experts they share: the whole group, or one node under the hierarchical policy.
struct Domain {
    ranks: Range<usize>,
    /// Global expert ids, in the order EPLB would number them inside the domain.
    experts: Vec<usize>,
}

/// One layer: split into domains, pack each, and collect expert -> ranks.
fn balance_layer(counts: &[f64], options: &BalanceOptions) -> LayerPlacement {
    let slots = options.slots_per_rank(counts.len());
    let mut replicas = vec![Vec::new(); counts.len()];
    for domain in domains(counts, options) {
        let weights: Vec<f64> = domain.experts.iter().map(|&e| counts[e]).collect();
        let packing = best_packing(&weights, domain.ranks.len(), slots, options.min_replicas);
        for (local_rank, held) in packing.held.iter().enumerate() {
            for &local_expert in held {
                replicas[domain.experts[local_expert]].push(domain.ranks.start + local_rank);
            }
        }
    }
    for ranks in &mut replicas {
        ranks.sort_unstable();
    }
    LayerPlacement::new(replicas, options.shard_count)
        .expect("every expert is packed onto at least one rank of its domain, at most once each")
}

/// The global policy's single domain, or one per node with the expert groups packed onto nodes
/// by total load (EPLB's hierarchical step 1).
fn domains(counts: &[f64], options: &BalanceOptions) -> Vec<Domain> {
    let n_experts = counts.len();
    if !options.hierarchical(n_experts) {
        return vec![Domain {
            ranks: 0..options.shard_count,
            experts: (0..n_experts).collect(),
        }];
    }
    let group_size = n_experts / options.n_group;
    let group_load: Vec<f64> = counts.chunks(group_size).map(|g| g.iter().sum()).collect();
    let ranks_per_node = options.shard_count / options.nodes;
    balanced_packing(&group_load, options.nodes, options.n_group / options.nodes)
        .into_iter()
        .enumerate()
        .map(|(node, groups)| Domain {
            ranks: node * ranks_per_node..(node + 1) * ranks_per_node,
            experts: groups
                .iter()
                .flat_map(|&g| g * group_size..(g + 1) * group_size)
                .collect(),
        })
        .collect()
}

/// EPLB's `balanced_packing`: items heaviest first (ties by index), each onto the lightest pack
/// (ties: lowest index) that holds fewer than `per_pack`. Returns each pack's items in the order
/// they were packed.
fn balanced_packing(weights: &[f64], packs: usize, per_pack: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]));
    let mut load = vec![0.0_f64; packs];
    let mut items = vec![Vec::new(); packs];
    for item in order {
        let pack = (0..packs)
            .filter(|&p| items[p].len() < per_pack)
            .min_by(|&a, &b| load[a].total_cmp(&load[b]))
            .expect("packs * per_pack >= items");
        load[pack] += weights[item];
        items[pack].push(item);
    }
    items
}

/// EPLB's `replicate_experts` with bounds: every expert starts with `min` replicas, then the one
/// with the highest load per replica (ties: lowest id) among those below `cap` gets the next,
/// until `total` replicas exist or every expert is at `cap`. Returns replicas per expert and the
/// order in which the extra ones were added.
fn replicate(weights: &[f64], total: usize, cap: usize, min: usize) -> (Vec<usize>, Vec<usize>) {
    let mut copies = vec![min; weights.len()];
    let mut added = Vec::new();
    for _ in (weights.len() * min)..total {
        let mut hottest: Option<(usize, f64)> = None;
        for (e, &w) in weights.iter().enumerate() {
            let per_replica = w / copies[e] as f64;
            if copies[e] < cap && hottest.is_none_or(|(_, best)| per_replica > best) {
                hottest = Some((e, per_replica));
            }
        }
        let Some((e, _)) = hottest else { break };
        copies[e] += 1;
        added.push(e);
    }
    (copies, added)
}

/// Which rank holds which expert inside one domain, with slot capacity per rank. An expert's
/// load is split evenly between the ranks holding it.
#[derive(Debug, Clone)]
struct Packing<'a> {
    /// Tokens per (domain-local) expert.
    weights: &'a [f64],
    slots: usize,
    /// Least ranks per expert; a step may not take an expert below it.
    min_copies: usize,
    /// `held[r]`: experts on rank `r`, in packing order.
    held: Vec<Vec<usize>>,
    /// `on[r][e]`: whether rank `r` holds expert `e`.
    on: Vec<Vec<bool>>,
    /// Ranks holding each expert.
    copies: Vec<usize>,
}

impl<'a> Packing<'a> {
    fn empty(weights: &'a [f64], ranks: usize, slots: usize, min_copies: usize) -> Self {
        Self {
            weights,
            slots,
            min_copies,
            held: vec![Vec::new(); ranks],
            on: vec![vec![false; weights.len()]; ranks],
            copies: vec![0; weights.len()],
        }
    }

    /// One replica's share of expert `e`'s tokens.
    fn share(&self, e: usize) -> f64 {
        self.weights[e] / self.copies[e].max(1) as f64
    }

    /// Tokens per rank.
    fn loads(&self) -> Vec<f64> {
        self.held
            .iter()
            .map(|experts| experts.iter().map(|&e| self.share(e)).sum())
            .collect()
    }

    fn max_load(&self) -> f64 {
        self.loads().into_iter().fold(0.0, f64::max)
    }

    /// Whether a replica of `expert` may be removed without going below `min_copies`.
    fn has_spare(&self, expert: usize) -> bool {
        self.copies[expert] > self.min_copies.max(1)
    }

    /// Ranks holding each expert, ascending.
    fn holders(&self) -> Vec<Vec<usize>> {
        let mut holders = vec![Vec::new(); self.weights.len()];
        for (rank, experts) in self.held.iter().enumerate() {
            experts.iter().for_each(|&e| holders[e].push(rank));
        }
        holders
    }

    fn has_room(&self, rank: usize) -> bool {
        self.held[rank].len() < self.slots
    }

    /// Whether `rank` may take a replica of `expert`: a free slot and no replica there yet.
    fn can_take(&self, rank: usize, expert: usize) -> bool {
        self.has_room(rank) && !self.on[rank][expert]
    }

    fn place(&mut self, rank: usize, expert: usize) {
        debug_assert!(self.can_take(rank, expert));
        self.held[rank].push(expert);
        self.on[rank][expert] = true;
        self.copies[expert] += 1;
    }

    fn remove(&mut self, rank: usize, expert: usize) {
        self.held[rank].retain(|&e| e != expert);
        self.on[rank][expert] = false;
        self.copies[expert] -= 1;
    }
}

/// The better of EPLB's own packing (pairs on one rank merged) and the distinct-rank packing,
/// each after [`improve`]. EPLB's packing is only a candidate with `min_replicas` 1, since merging
/// may leave an expert on one rank.
fn best_packing(weights: &[f64], ranks: usize, slots: usize, min_replicas: usize) -> Packing<'_> {
    let mut candidates = vec![distinct_packing(weights, ranks, slots, min_replicas)];
    if min_replicas == 1 {
        candidates.push(eplb_packing(weights, ranks, slots));
    }
    candidates
        .into_iter()
        .map(|mut packing| {
            improve(&mut packing);
            fill_free_slots(&mut packing);
            packing
        })
        .min_by(|a, b| a.max_load().total_cmp(&b.max_load()))
        .expect("at least one candidate")
}

/// Published EPLB within a domain: replicate uncapped into every slot, pack the replicas by
/// `balanced_packing` with `slots` per rank, then merge replicas of one expert that landed on
/// the same rank.
fn eplb_packing(weights: &[f64], ranks: usize, slots: usize) -> Packing<'_> {
    let (copies, added) = replicate(weights, ranks * slots, usize::MAX, 1);
    // Physical replicas in EPLB's numbering: every expert once, then the extras as added.
    let physical: Vec<usize> = (0..weights.len()).chain(added).collect();
    let shares: Vec<f64> = physical
        .iter()
        .map(|&e| weights[e] / copies[e] as f64)
        .collect();
    let mut packing = Packing::empty(weights, ranks, slots, 1);
    for (rank, items) in balanced_packing(&shares, ranks, slots)
        .into_iter()
        .enumerate()
    {
        for item in items {
            let expert = physical[item];
            if !packing.on[rank][expert] {
                packing.place(rank, expert);
            }
        }
    }
    packing
}

/// EPLB with replicas on distinct ranks: at least `min` and at most one replica per rank for
/// every expert, then heaviest replica first onto the lightest rank that has a free slot and
/// does not hold that expert yet.
fn distinct_packing(weights: &[f64], ranks: usize, slots: usize, min: usize) -> Packing<'_> {
    let cap = ranks.min(slots * ranks);
    let (copies, _) = replicate(weights, ranks * slots, cap, min);
    let share = |e: usize| weights[e] / copies[e] as f64;
    let mut replicas: Vec<usize> = (0..weights.len())
        .flat_map(|e| std::iter::repeat_n(e, copies[e]))
        .collect();
    replicas.sort_by(|&a, &b| share(b).total_cmp(&share(a)));
    let mut packing = Packing::empty(weights, ranks, slots, min);
    let mut load = vec![0.0_f64; ranks];
    for expert in replicas {
        let lightest = (0..ranks)
            .filter(|&r| packing.can_take(r, expert))
            .min_by(|&a, &b| load[a].total_cmp(&load[b]));
        let rank = lightest.unwrap_or_else(|| make_room(&mut packing, &mut load, expert, &share));
        packing.place(rank, expert);
        load[rank] += share(expert);
    }
    packing
}

/// When every rank with a free slot already holds `expert`: moves another expert from a full
/// rank lacking `expert` to a rank with room, and returns the full rank, which now has room.
///
/// Such a move always exists: `expert` has fewer replicas than ranks, so some rank lacks it and
/// (every rank with room holding it) that rank is full; a rank with room holds `expert` and at
/// most `slots - 2` others, so at least two of the full rank's experts are not on it.
fn make_room(
    packing: &mut Packing<'_>,
    load: &mut [f64],
    expert: usize,
    share: &impl Fn(usize) -> f64,
) -> usize {
    let ranks = 0..packing.held.len();
    let lightest = |candidates: Vec<usize>| {
        candidates
            .into_iter()
            .min_by(|&a, &b| load[a].total_cmp(&load[b]))
            .expect("a rank of that kind exists")
    };
    let full = lightest(ranks.clone().filter(|&r| !packing.on[r][expert]).collect());
    let roomy = lightest(ranks.filter(|&r| packing.has_room(r)).collect());
    let moved = packing.held[full]
        .iter()
        .copied()
        .filter(|&e| !packing.on[roomy][e])
        .min_by(|&a, &b| share(a).total_cmp(&share(b)))
        .expect("the full rank has an expert the roomy rank lacks");
    packing.remove(full, moved);
    packing.place(roomy, moved);
    load[full] -= share(moved);
    load[roomy] += share(moved);
    full
}

/// Uses slots left free (where EPLB's packing put an expert twice on a rank) for more replicas,
/// as EPLB fills every slot: the expert with the highest load per replica gets one on the
/// lightest rank that can take it, as long as that rank stays at or below the most loaded one.
/// A new replica only lowers the other ranks holding that expert, so the balance never worsens.
fn fill_free_slots(packing: &mut Packing<'_>) {
    loop {
        let loads = packing.loads();
        let max = loads.iter().copied().fold(0.0, f64::max);
        let fits = |e: usize, r: usize| {
            let share = packing.weights[e] / (packing.copies[e] + 1) as f64;
            packing.can_take(r, e) && loads[r] + share <= max
        };
        let mut experts: Vec<usize> = (0..packing.weights.len()).collect();
        experts.sort_by(|&a, &b| packing.share(b).total_cmp(&packing.share(a)));
        let pick = experts.into_iter().find_map(|e| {
            (0..loads.len())
                .filter(|&r| fits(e, r))
                .min_by(|&a, &b| loads[a].total_cmp(&loads[b]))
                .map(|r| (e, r))
        });
        let Some((expert, rank)) = pick else { return };
        packing.place(rank, expert);
    }
}

/// A change to a packing that [`improve`] considers; `top` is the most loaded rank.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Move `top`'s replica of `expert` to `to`.
    Shift { expert: usize, to: usize },
    /// Exchange `top`'s `expert` with `other` on rank `with`.
    Swap {
        expert: usize,
        with: usize,
        other: usize,
    },
    /// Add a replica of `top`'s `expert` on `to`, lowering the share of every rank holding it.
    Split { expert: usize, to: usize },
    /// On `to`, replace a spare replica of `dropped` with a new replica of `top`'s `expert`: moves
    /// a replica from an expert that needs it less to one that needs it more.
    Trade {
        expert: usize,
        to: usize,
        dropped: usize,
    },
    /// Remove `top`'s spare replica of `expert`; its other ranks take over its share.
    Drop { expert: usize },
}

/// `(rank, expert)` replicas a step removes and adds; at most two of each.
#[derive(Debug, Clone, Copy)]
struct Changes {
    removed: [(usize, usize); 2],
    n_removed: usize,
    added: [(usize, usize); 2],
    n_added: usize,
}

impl Changes {
    fn new(removed: &[(usize, usize)], added: &[(usize, usize)]) -> Self {
        let mut changes = Self {
            removed: [(0, 0); 2],
            n_removed: removed.len(),
            added: [(0, 0); 2],
            n_added: added.len(),
        };
        changes.removed[..removed.len()].copy_from_slice(removed);
        changes.added[..added.len()].copy_from_slice(added);
        changes
    }

    fn removed(&self) -> &[(usize, usize)] {
        &self.removed[..self.n_removed]
    }

    fn added(&self) -> &[(usize, usize)] {
        &self.added[..self.n_added]
    }

    /// Every change, removals first; an expert may appear twice.
    fn all(&self) -> impl Iterator<Item = &(usize, usize)> {
        self.removed().iter().chain(self.added())
    }
}

impl Step {
    fn changes(self, top: usize) -> Changes {
        match self {
            Step::Shift { expert, to } => Changes::new(&[(top, expert)], &[(to, expert)]),
            Step::Swap {
                expert,
                with,
                other,
            } => Changes::new(
                &[(top, expert), (with, other)],
                &[(top, other), (with, expert)],
            ),
            Step::Split { expert, to } => Changes::new(&[], &[(to, expert)]),
            Step::Trade {
                expert,
                to,
                dropped,
            } => Changes::new(&[(to, dropped)], &[(to, expert)]),
            Step::Drop { expert } => Changes::new(&[(top, expert)], &[]),
        }
    }
}

/// Local search: while some step lowers the most loaded rank while keeping every rank it
/// touches below that load, apply the one whose touched ranks end lightest. First with shifts,
/// swaps and splits only, then with trades and drops too: the second round starts from the
/// first's result and only lowers it, so the extra steps never make a packing worse than the
/// simple ones alone would.
fn improve(packing: &mut Packing<'_>) {
    search(packing, false);
    search(packing, true);
}

/// One round of [`improve`]; `trades` admits trades and drops. Each step lowers the ranks' loads
/// sorted descending (lexicographically), so it ends; the cap only guards against rounding.
fn search(packing: &mut Packing<'_>, trades: bool) {
    let limit = 10 * packing.held.len() * packing.slots + 100;
    for _ in 0..limit {
        let loads = packing.loads();
        let (top, &max) = loads
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("a domain has ranks");
        // Below this, a change is a real improvement and not rounding noise.
        let bar = max - max * 1e-12;
        let Some(step) = best_step(packing, &loads, top, bar, trades) else {
            return;
        };
        let changes = step.changes(top);
        changes
            .removed()
            .iter()
            .for_each(|&(r, e)| packing.remove(r, e));
        changes
            .added()
            .iter()
            .for_each(|&(r, e)| packing.place(r, e));
    }
}

/// Of the steps that leave every rank they touch below `bar`, the one whose heaviest touched
/// rank ends lightest.
fn best_step(
    packing: &Packing<'_>,
    loads: &[f64],
    top: usize,
    bar: f64,
    trades: bool,
) -> Option<Step> {
    let holders = packing.holders();
    let mut best: Option<(f64, Step)> = None;
    for_each_step(packing, top, trades, |step| {
        let limit = best.map_or(bar, |(b, _)| b.min(bar));
        if receiver_after(packing, loads, top, step) >= limit {
            return;
        }
        let changes = step.changes(top);
        if let Some(heaviest) = heaviest_below(packing, loads, &holders, &changes, limit) {
            best = Some((heaviest, step));
        }
    });
    best.map(|(_, step)| step)
}

/// Calls `visit` with every step from `top` that keeps the packing valid: slots, distinct
/// ranks, `min_copies`. Trades and drops only with `trades`.
fn for_each_step(packing: &Packing<'_>, top: usize, trades: bool, mut visit: impl FnMut(Step)) {
    for &expert in &packing.held[top] {
        if trades && packing.has_spare(expert) {
            visit(Step::Drop { expert });
        }
        for to in (0..packing.held.len()).filter(|&r| r != top && !packing.on[r][expert]) {
            if packing.has_room(to) {
                visit(Step::Shift { expert, to });
                visit(Step::Split { expert, to });
            }
            for &other in &packing.held[to] {
                if !packing.on[top][other] {
                    visit(Step::Swap {
                        expert,
                        with: to,
                        other,
                    });
                }
                if trades && packing.has_spare(other) {
                    visit(Step::Trade {
                        expert,
                        to,
                        dropped: other,
                    });
                }
            }
        }
    }
}

/// The new load of the rank that receives a replica (`top` for a drop), in O(1): a lower bound
/// of [`heaviest_below`] that rules most steps out cheaply.
fn receiver_after(packing: &Packing<'_>, loads: &[f64], top: usize, step: Step) -> f64 {
    let split = |e: usize| packing.weights[e] / (packing.copies[e] + 1) as f64;
    match step {
        Step::Shift { expert, to } => loads[to] + packing.share(expert),
        Step::Swap {
            expert,
            with,
            other,
        } => loads[with] + packing.share(expert) - packing.share(other),
        Step::Split { expert, to } => loads[to] + split(expert),
        Step::Trade {
            expert,
            to,
            dropped,
        } => loads[to] - packing.share(dropped) + split(expert),
        Step::Drop { expert } => loads[top] - packing.share(expert),
    }
}

/// The heaviest new load among the ranks the changes touch (those holding an expert whose
/// replica count changes, so its share moves, and those gaining or losing a replica), or `None`
/// as soon as one reaches `limit`.
fn heaviest_below(
    packing: &Packing<'_>,
    loads: &[f64],
    holders: &[Vec<usize>],
    changes: &Changes,
    limit: f64,
) -> Option<f64> {
    let mut heaviest = 0.0_f64;
    for &(rank, e) in changes.all() {
        for &r in holders[e].iter().chain([&rank]) {
            heaviest = heaviest.max(load_after(packing, loads[r], r, changes));
            if heaviest >= limit {
                return None;
            }
        }
    }
    Some(heaviest)
}

/// `rank`'s load after the changes, from its load `before`.
fn load_after(packing: &Packing<'_>, before: f64, rank: usize, changes: &Changes) -> f64 {
    let mut load = before;
    let mut seen = [usize::MAX; 4];
    for (i, &(_, e)) in changes.all().enumerate() {
        if seen.contains(&e) {
            continue;
        }
        seen[i] = e;
        let removed = changes.removed().iter().filter(|c| c.1 == e).count();
        let added = changes.added().iter().filter(|c| c.1 == e).count();
        let copies_after = packing.copies[e] + added - removed;
        let held_after = (packing.on[rank][e] && !changes.removed().contains(&(rank, e)))
            || changes.added().contains(&(rank, e));
        if packing.on[rank][e] {
            load -= packing.share(e);
        }
        if held_after {
            load += packing.weights[e] / copies_after as f64;
        }
    }
    load
}
