//! Which shard holds which routed expert, and which replica a token's expert work goes to.
//!
//! Pure: no I/O except [`Placement::from_file`]. The placement is the same for every MoE layer
//! (expert `e` of every layer lives on the same shards), as in DeepSeek's own expert parallelism.

use std::path::Path;

use serde::Deserialize;

/// A placement that cannot be built or does not fit the model; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "--shard-count {shards} is larger than the {experts} routed experts: a shard would hold none"
    )]
    TooManyShards { shards: usize, experts: usize },
    #[error("--shard-rank {rank} is out of range for --shard-count {shards}")]
    RankOutOfRange { rank: usize, shards: usize },
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// Expert -> the shards holding it (one, or several for a replicated hot expert).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    shard_count: usize,
    /// `replicas[e]`: ranks holding expert `e`, ascending, never empty.
    replicas: Vec<Vec<usize>>,
}

/// The `--expert-placement` file: `{"experts": [[0], [0, 1], [1], ...]}`, entry `e` listing the
/// ranks that hold routed expert `e`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacementFile {
    experts: Vec<Vec<usize>>,
}

impl Placement {
    /// The default placement of `n_experts` routed experts in `n_group` groups over `shard_count`
    /// shards: whole groups per shard when `shard_count` divides `n_group` (group-limited routing
    /// then bounds how many shards a token visits by `topk_group`), otherwise contiguous,
    /// equally sized (within one) ranges of expert ids.
    pub fn default_for(
        n_experts: usize,
        n_group: usize,
        shard_count: usize,
    ) -> Result<Self, PlacementError> {
        if shard_count == 0 || shard_count > n_experts {
            return Err(PlacementError::TooManyShards {
                shards: shard_count,
                experts: n_experts,
            });
        }
        let replicas = if n_group > 1
            && n_group.is_multiple_of(shard_count)
            && n_experts.is_multiple_of(n_group)
        {
            let group_size = n_experts / n_group;
            let groups_per_shard = n_group / shard_count;
            (0..n_experts)
                .map(|e| vec![e / group_size / groups_per_shard])
                .collect()
        } else {
            // Shard r holds [r * E / N, (r + 1) * E / N).
            (0..n_experts)
                .map(|e| vec![e * shard_count / n_experts])
                .collect()
        };
        Ok(Self {
            shard_count,
            replicas,
        })
    }

    /// Reads an explicit placement (see [`PlacementFile`]) and checks it against the model and
    /// the shard count.
    pub fn from_file(
        path: &Path,
        n_experts: usize,
        shard_count: usize,
    ) -> Result<Self, PlacementError> {
        let error = |message: String| PlacementError::File {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        Self::parse(&text, n_experts, shard_count).map_err(error)
    }

    /// Parses and validates the JSON of a placement file; the error names the entry at fault.
    pub fn parse(text: &str, n_experts: usize, shard_count: usize) -> Result<Self, String> {
        let file: PlacementFile =
            serde_json::from_str(text).map_err(|e| format!("not a placement file: {e}"))?;
        if file.experts.len() != n_experts {
            return Err(format!(
                "`experts` has {} entries but the model has {n_experts} routed experts",
                file.experts.len()
            ));
        }
        let mut replicas = Vec::with_capacity(n_experts);
        for (expert, shards) in file.experts.into_iter().enumerate() {
            if shards.is_empty() {
                return Err(format!("experts[{expert}] lists no shard"));
            }
            let mut sorted = shards.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != shards.len() {
                return Err(format!("experts[{expert}] lists a shard twice: {shards:?}"));
            }
            if let Some(&bad) = sorted.iter().find(|&&s| s >= shard_count) {
                return Err(format!(
                    "experts[{expert}] names shard {bad} but --shard-count is {shard_count}"
                ));
            }
            replicas.push(sorted);
        }
        Ok(Self {
            shard_count,
            replicas,
        })
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    pub fn n_experts(&self) -> usize {
        self.replicas.len()
    }

    /// Ranks holding `expert`, ascending.
    pub fn replicas(&self, expert: usize) -> &[usize] {
        &self.replicas[expert]
    }

    /// Whether shard `rank` holds (loads) `expert`.
    pub fn holds(&self, rank: usize, expert: usize) -> bool {
        self.replicas
            .get(expert)
            .is_some_and(|shards| shards.contains(&rank))
    }

    /// The experts shard `rank` holds, ascending.
    pub fn experts_of(&self, rank: usize) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&e| self.holds(rank, e))
            .collect()
    }

    /// A canonical text form, part of the shard fingerprint.
    pub fn canonical(&self) -> String {
        let entries: Vec<String> = self
            .replicas
            .iter()
            .map(|shards| {
                shards
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        format!("shards={};experts={}", self.shard_count, entries.join("/"))
    }

    /// Decides which shard runs each (expert, token) pair of one MoE layer.
    ///
    /// `works` lists each expert that got tokens with the number of its tokens. Returns one entry
    /// per input work, in order: for each of its tokens, the rank that runs it. An expert held by
    /// one shard goes there; for a replicated expert each token goes to the replica with the
    /// fewest (expert, token) pairs assigned so far in this layer, counting every single-replica
    /// expert first; ties prefer `local_rank` (no bytes on the wire), then the lower rank.
    pub fn assign(&self, works: &[(usize, usize)], local_rank: usize) -> Vec<Vec<usize>> {
        let mut load = vec![0usize; self.shard_count];
        for &(expert, tokens) in works {
            if let [only] = self.replicas[expert].as_slice() {
                load[*only] += tokens;
            }
        }
        works
            .iter()
            .map(|&(expert, tokens)| match self.replicas[expert].as_slice() {
                [only] => vec![*only; tokens],
                shards => (0..tokens)
                    .map(|_| {
                        let chosen = *shards
                            .iter()
                            .min_by_key(|&&s| (load[s], s != local_rank, s))
                            .expect("a placement never has an expert without a shard");
                        load[chosen] += 1;
                        chosen
                    })
                    .collect(),
            })
            .collect()
    }
}

/// Checks a rank against a shard count.
pub fn check_rank(rank: usize, shard_count: usize) -> Result<(), PlacementError> {
    if rank >= shard_count {
        return Err(PlacementError::RankOutOfRange {
            rank,
            shards: shard_count,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(placement: &Placement) -> Vec<usize> {
        (0..placement.n_experts())
            .map(|e| placement.replicas(e)[0])
            .collect()
    }

    #[test]
    fn whole_groups_per_shard_when_the_shard_count_divides_the_groups() {
        // 16 experts in 4 groups of 4; 2 shards take 2 groups each.
        let p = Placement::default_for(16, 4, 2).unwrap();
        assert_eq!(p.experts_of(0), (0..8).collect::<Vec<_>>());
        assert_eq!(p.experts_of(1), (8..16).collect::<Vec<_>>());
        // 4 shards: one group each.
        let p = Placement::default_for(16, 4, 4).unwrap();
        assert_eq!(p.experts_of(2), vec![8, 9, 10, 11]);
        // Every expert on exactly one shard.
        assert!((0..16).all(|e| p.replicas(e).len() == 1));
    }

    #[test]
    fn contiguous_ranges_when_groups_do_not_divide() {
        // 4 groups over 3 shards: ranges of 6, 5, 5 (floor(e * 3 / 16)).
        let p = Placement::default_for(16, 4, 3).unwrap();
        assert_eq!(
            owners(&p),
            vec![0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]
        );
        // No groups at all (V2-Lite style, n_group = 1): ranges.
        let p = Placement::default_for(10, 1, 4).unwrap();
        assert_eq!(owners(&p), vec![0, 0, 0, 1, 1, 2, 2, 2, 3, 3]);
        // One shard holds everything.
        let p = Placement::default_for(8, 2, 1).unwrap();
        assert_eq!(p.experts_of(0).len(), 8);
    }

    #[test]
    fn too_many_shards_or_a_bad_rank_is_an_error() {
        assert_eq!(
            Placement::default_for(4, 1, 5),
            Err(PlacementError::TooManyShards {
                shards: 5,
                experts: 4
            })
        );
        assert!(check_rank(2, 2).is_err());
        assert!(check_rank(1, 2).is_ok());
    }

    #[test]
    fn placement_file_with_a_replica_parses_and_bad_files_name_the_entry() {
        let p = Placement::parse(r#"{"experts": [[0], [1, 0], [1], [1]]}"#, 4, 2).unwrap();
        assert_eq!(p.replicas(1), &[0, 1]);
        assert!(p.holds(0, 1) && p.holds(1, 1));
        assert_eq!(p.experts_of(0), vec![0, 1]);
        assert_eq!(p.experts_of(1), vec![1, 2, 3]);

        let err = Placement::parse(r#"{"experts": [[0], [1]]}"#, 4, 2).unwrap_err();
        assert!(
            err.contains("2 entries") && err.contains("4 routed experts"),
            "{err}"
        );
        let err = Placement::parse(r#"{"experts": [[0], [], [1], [1]]}"#, 4, 2).unwrap_err();
        assert!(err.contains("experts[1] lists no shard"), "{err}");
        let err = Placement::parse(r#"{"experts": [[0], [2], [1], [1]]}"#, 4, 2).unwrap_err();
        assert!(err.contains("experts[1] names shard 2"), "{err}");
        let err = Placement::parse(r#"{"experts": [[0], [1, 1], [1], [1]]}"#, 4, 2).unwrap_err();
        assert!(err.contains("experts[1] lists a shard twice"), "{err}");
        let err = Placement::parse(r#"{"expert": []}"#, 4, 2).unwrap_err();
        assert!(err.contains("not a placement file"), "{err}");
    }

    #[test]
    fn from_file_names_the_path() {
        let err = Placement::from_file(Path::new("/nonexistent/placement.json"), 4, 2).unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/placement.json: "));
    }

    #[test]
    fn single_replica_experts_go_to_their_shard() {
        let p = Placement::default_for(8, 1, 2).unwrap();
        let assigned = p.assign(&[(1, 2), (6, 3)], 0);
        assert_eq!(assigned, vec![vec![0, 0], vec![1, 1, 1]]);
    }

    #[test]
    fn a_replicated_expert_spreads_its_tokens_over_the_least_loaded_replicas() {
        // Expert 1 lives on shards 0 and 1. Shard 1 already has 2 tokens of expert 2.
        let p = Placement::parse(r#"{"experts": [[0], [0, 1], [1], [1]]}"#, 4, 2).unwrap();
        let assigned = p.assign(&[(1, 6), (2, 2)], 1);
        // Shard 0 first catches up (2 tokens), then they alternate, local (1) first on ties.
        assert_eq!(assigned[0], vec![0, 0, 1, 0, 1, 0]);
        assert_eq!(assigned[1], vec![1, 1]);
        let on = |s| assigned[0].iter().filter(|&&x| x == s).count();
        assert_eq!((on(0), on(1)), (4, 2));
    }

    #[test]
    fn canonical_form_distinguishes_placements() {
        let a = Placement::default_for(8, 2, 2).unwrap();
        let b =
            Placement::parse(r#"{"experts": [[0],[0],[0],[0],[1],[1],[1],[0,1]]}"#, 8, 2).unwrap();
        assert_ne!(a.canonical(), b.canonical());
        assert_eq!(
            a.canonical(),
            Placement::default_for(8, 2, 2).unwrap().canonical()
        );
    }
}
