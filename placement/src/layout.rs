//! Placements that need no measurement: the default layout of a group, with optional redundant
//! copies so that the group survives the loss of a rank.

use crate::{LayerPlacement, PlacementError};

/// The default placement of `n_experts` routed experts in `n_group` groups over `shard_count`
/// ranks, plus `redundant` extra expert slots per rank.
///
/// Primary copies: whole expert groups per rank when `shard_count` divides `n_group` (group-limited
/// routing then bounds how many ranks a token visits by `topk_group`), otherwise contiguous,
/// equally sized (within one) ranges of expert ids.
///
/// Redundant copies: rank `r` fills its extra slots with the primary experts of rank `r + 1`, then
/// `r + 2`, ... (mod `shard_count`), in id order. With `redundant >= n_experts / shard_count` every
/// expert has two ranks, so any one rank can fail.
pub fn contiguous(
    n_experts: usize,
    n_group: usize,
    shard_count: usize,
    redundant: usize,
) -> Result<LayerPlacement, PlacementError> {
    if shard_count == 0 || shard_count > n_experts {
        return Err(PlacementError::TooManyShards {
            shards: shard_count,
            experts: n_experts,
        });
    }
    let primary: Vec<usize> = if n_group > 1
        && n_group.is_multiple_of(shard_count)
        && n_experts.is_multiple_of(n_group)
    {
        let group_size = n_experts / n_group;
        let groups_per_rank = n_group / shard_count;
        (0..n_experts)
            .map(|e| e / group_size / groups_per_rank)
            .collect()
    } else {
        // Rank r holds [r * E / N, (r + 1) * E / N).
        (0..n_experts)
            .map(|e| e * shard_count / n_experts)
            .collect()
    };
    let mut replicas: Vec<Vec<usize>> = primary.iter().map(|&r| vec![r]).collect();
    if shard_count > 1 {
        let primary = &primary;
        for rank in 0..shard_count {
            let donors = (1..shard_count).map(|step| (rank + step) % shard_count);
            let extra: Vec<usize> = donors
                .flat_map(|donor| (0..n_experts).filter(move |&e| primary[e] == donor))
                .filter(|&e| primary[e] != rank)
                .take(redundant)
                .collect();
            for e in extra {
                replicas[e].push(rank);
            }
        }
    }
    LayerPlacement::new(replicas, shard_count).map_err(PlacementError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(p: &LayerPlacement) -> Vec<usize> {
        (0..p.n_experts()).map(|e| p.replicas(e)[0]).collect()
    }

    #[test]
    fn whole_groups_per_rank_when_the_rank_count_divides_the_groups() {
        let p = contiguous(16, 4, 2, 0).unwrap();
        assert_eq!(p.experts_of(0), (0..8).collect::<Vec<_>>());
        assert_eq!(p.experts_of(1), (8..16).collect::<Vec<_>>());
        let p = contiguous(16, 4, 4, 0).unwrap();
        assert_eq!(p.experts_of(2), vec![8, 9, 10, 11]);
        assert!((0..16).all(|e| p.replicas(e).len() == 1));
    }

    #[test]
    fn contiguous_ranges_when_groups_do_not_divide() {
        let p = contiguous(16, 4, 3, 0).unwrap();
        assert_eq!(
            owners(&p),
            vec![0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]
        );
        let p = contiguous(10, 1, 4, 0).unwrap();
        assert_eq!(owners(&p), vec![0, 0, 0, 1, 1, 2, 2, 2, 3, 3]);
        assert_eq!(contiguous(8, 2, 1, 0).unwrap().experts_of(0).len(), 8);
    }

    #[test]
    fn too_many_ranks_is_an_error() {
        assert_eq!(
            contiguous(4, 1, 5, 0),
            Err(PlacementError::TooManyShards {
                shards: 5,
                experts: 4
            })
        );
    }

    #[test]
    fn redundant_slots_mirror_the_next_rank_so_one_rank_may_fail() {
        // 16 experts over 4 ranks, 4 extra slots each: rank r also holds rank r + 1's experts.
        let p = contiguous(16, 4, 4, 4).unwrap();
        assert_eq!(p.experts_of(0), (0..8).collect::<Vec<_>>());
        assert_eq!(p.experts_of(3), vec![0, 1, 2, 3, 12, 13, 14, 15]);
        for down in 0..4 {
            assert!(p.covered_by(|r| r != down), "rank {down} down");
        }
        // Two down is not covered.
        assert!(!p.covered_by(|r| r >= 2));
        // One slot each: rank r holds the first expert of rank r + 1.
        let p = contiguous(16, 4, 4, 1).unwrap();
        assert_eq!(p.experts_of(1), vec![4, 5, 6, 7, 8]);
        assert!(!p.covered_by(|r| r != 1));
        // More slots than there are other experts: everything, once.
        let p = contiguous(4, 1, 2, 10).unwrap();
        assert!((0..4).all(|e| p.replicas(e) == [0, 1]));
        // One rank cannot mirror anything.
        assert!(contiguous(4, 1, 1, 3).unwrap().replicas(0) == [0]);
    }
}
