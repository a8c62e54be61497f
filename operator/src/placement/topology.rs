//! How a group's shards sit on nodes, for EPLB's hierarchical policy (expert groups packed onto
//! nodes first, so that a token's experts are mostly on one node). Pure.

use std::collections::{BTreeMap, BTreeSet};

/// The number of nodes the shards are spread over, when every group's ranks sit on the nodes
/// in equal, contiguous blocks (ranks `[k N/M, (k+1) N/M)` on one node, a different node per
/// block) and all groups agree on M; 1 otherwise (or when a rank has no node yet), which selects
/// the global policy.
///
/// `groups`: per group, rank -> node name.
pub fn nodes(groups: &[BTreeMap<usize, String>], shard_count: usize) -> usize {
    let mut agreed = None;
    for ranks in groups {
        if ranks.len() != shard_count {
            return 1;
        }
        let nodes: Vec<&String> = ranks.values().collect();
        let distinct: BTreeSet<&String> = nodes.iter().copied().collect();
        let m = distinct.len();
        if m < 2 || !shard_count.is_multiple_of(m) {
            return 1;
        }
        let block = shard_count / m;
        let blocks: Vec<&[&String]> = nodes.chunks(block).collect();
        let uniform = blocks.iter().all(|b| b.iter().all(|n| *n == b[0]));
        let firsts: BTreeSet<&String> = blocks.iter().map(|b| b[0]).collect();
        if !uniform || firsts.len() != m {
            return 1;
        }
        match agreed {
            None => agreed = Some(m),
            Some(previous) if previous != m => return 1,
            Some(_) => {}
        }
    }
    agreed.unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(nodes: &[&str]) -> BTreeMap<usize, String> {
        nodes
            .iter()
            .enumerate()
            .map(|(r, n)| (r, (*n).to_owned()))
            .collect()
    }

    #[test]
    fn contiguous_equal_blocks_per_node_count_as_nodes() {
        let a = group(&["n1", "n1", "n2", "n2"]);
        let b = group(&["n3", "n3", "n4", "n4"]);
        assert_eq!(nodes(&[a.clone(), b], 4), 2);
        // One node, or one shard per node: no hierarchy to exploit, or 4 nodes of one rank.
        assert_eq!(nodes(&[group(&["n1"; 4])], 4), 1);
        assert_eq!(nodes(&[group(&["n1", "n2", "n3", "n4"])], 4), 4);
        // Interleaved, unequal, or a rank not scheduled yet: the global policy.
        assert_eq!(nodes(&[group(&["n1", "n2", "n1", "n2"])], 4), 1);
        assert_eq!(nodes(&[group(&["n1", "n1", "n1", "n2"])], 4), 1);
        assert_eq!(nodes(&[group(&["n1", "n1", "n2"])], 4), 1);
        // Groups that disagree.
        assert_eq!(nodes(&[a, group(&["n5"; 4])], 4), 1);
        assert_eq!(nodes(&[], 4), 1);
    }
}
