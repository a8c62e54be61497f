//! Which shard holds which routed expert in each MoE layer, and which replica a token's expert
//! work goes to.
//!
//! The file format and the default layouts live in `latentserve-placement` (shared with the
//! operator, which writes balanced placements); this module is the worker's view of them: the
//! placement of its group over every MoE layer of its model, checked against `--shard-count`.
//! Pure: no I/O except [`Placement::from_file`].

use std::path::Path;

use latentserve_placement::file::{ModelShape, PlacementFile};
use latentserve_placement::{GroupPlacement, LayerPlacement, layout};

/// A placement that cannot be built or does not fit the model; the message names the flag, the
/// file and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "--shard-count {shards} is larger than the {experts} routed experts: a shard would hold none"
    )]
    TooManyShards { shards: usize, experts: usize },
    #[error("--shard-rank {rank} is out of range for --shard-count {shards}")]
    RankOutOfRange { rank: usize, shards: usize },
    #[error("--expert-placement {path}: {message}")]
    File { path: String, message: String },
    #[error(
        "--redundant-experts {redundant} and --expert-placement {path} cannot be combined: the file \
         already says where every copy of an expert goes (list the extra shards there)"
    )]
    RedundantWithFile { redundant: usize, path: String },
    #[error(
        "--redundant-experts {redundant} needs --shard-count above 1: a single shard has no other \
         shard to mirror"
    )]
    RedundantWithoutPeers { redundant: usize },
    #[error("the default placement: {0}")]
    Layout(String),
}

/// Why a layer's expert work cannot be assigned to the shards that are usable now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignError {
    #[error("layer {layer} is not an MoE layer of this placement")]
    NotMoeLayer { layer: usize },
    #[error("layer {layer} has no routed expert {expert}")]
    UnknownExpert { layer: usize, expert: usize },
    /// Every shard holding the expert is down (or failed in this step).
    #[error("no usable shard holds expert {expert} of layer {layer} (held by {holders:?})")]
    NoUsableHolder {
        layer: usize,
        expert: usize,
        holders: Vec<usize>,
    },
}

/// The group's placement over every MoE layer of the model: per layer, expert -> the shards
/// holding it (one, or several for a replicated expert).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    group: GroupPlacement,
    /// The file's `version`; `None` for the default layout or a file without one.
    version: Option<String>,
}

impl Placement {
    /// The default layout on every one of `moe_layers`: whole expert groups per shard when
    /// `shard_count` divides `n_group`, otherwise contiguous ranges of expert ids; plus
    /// `redundant` extra slots per shard holding copies of the next shard's experts (see
    /// [`layout::contiguous`]).
    pub fn default_for(
        n_experts: usize,
        n_group: usize,
        shard_count: usize,
        redundant: usize,
        moe_layers: &[usize],
    ) -> Result<Self, PlacementError> {
        let layer = layout::contiguous(n_experts, n_group, shard_count, redundant).map_err(
            |e| match e {
                latentserve_placement::PlacementError::TooManyShards { shards, experts } => {
                    PlacementError::TooManyShards { shards, experts }
                }
                latentserve_placement::PlacementError::Invalid(message) => {
                    PlacementError::Layout(message)
                }
            },
        )?;
        Ok(Self {
            group: GroupPlacement::uniform(shard_count, &layer, moe_layers.iter().copied()),
            version: None,
        })
    }

    /// Reads an explicit placement file (flat `experts`, per-layer `layers`, optional `version`
    /// and `shardCount`) and checks it against the model and the shard count.
    pub fn from_file(path: &Path, shape: ModelShape<'_>) -> Result<Self, PlacementError> {
        let error = |message: String| PlacementError::File {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        Self::parse(&text, shape).map_err(error)
    }

    /// Parses and resolves the JSON of a placement file; the error names the field at fault.
    pub fn parse(text: &str, shape: ModelShape<'_>) -> Result<Self, String> {
        let file = PlacementFile::parse(text)?;
        let group = file.resolve(shape)?;
        Ok(Self {
            group,
            version: file.version,
        })
    }

    pub fn shard_count(&self) -> usize {
        self.group.shard_count
    }

    /// The file's `version`, if it had one.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The MoE layers (decoder layer indices), ascending.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.group.layers.keys().copied()
    }

    /// One MoE layer's placement; `None` for a dense layer.
    pub fn layer(&self, layer: usize) -> Option<&LayerPlacement> {
        self.group.layers.get(&layer)
    }

    /// Whether shard `rank` holds (loads) `expert` of MoE layer `layer`.
    pub fn holds(&self, rank: usize, layer: usize, expert: usize) -> bool {
        self.layer(layer)
            .is_some_and(|placement| placement.holds(rank, expert))
    }

    /// The experts shard `rank` holds in `layer`, ascending (none for a dense layer).
    pub fn experts_of(&self, rank: usize, layer: usize) -> Vec<usize> {
        self.layer(layer)
            .map(|placement| placement.experts_of(rank))
            .unwrap_or_default()
    }

    /// Whether every expert of every MoE layer is held by a shard for which `up(rank)` is true:
    /// the group can serve every token with only those shards.
    pub fn covered_by(&self, up: impl Fn(usize) -> bool) -> bool {
        self.group.covered_by(up)
    }

    /// What shard `rank` holds, for the start-up log: the list when it is the same in every MoE
    /// layer, otherwise how many per layer.
    pub fn describe_rank(&self, rank: usize) -> String {
        let per_layer: Vec<Vec<usize>> = self
            .group
            .layers
            .values()
            .map(|layer| layer.experts_of(rank))
            .collect();
        match per_layer.first() {
            None => "no MoE layer".to_owned(),
            Some(first) if per_layer.iter().all(|experts| experts == first) => {
                format!("experts {first:?} in every MoE layer")
            }
            Some(_) => {
                let counts = per_layer.iter().map(Vec::len);
                let (min, max) = (counts.clone().min(), counts.max());
                format!(
                    "{}-{} experts per MoE layer (per-layer placement)",
                    min.unwrap_or(0),
                    max.unwrap_or(0)
                )
            }
        }
    }

    /// A canonical text form of every layer, part of the shard fingerprint: peers whose
    /// placement differs in any layer are refused. The version is left out (the same placement
    /// under another version number is still the same placement).
    pub fn canonical(&self) -> String {
        let layers: Vec<String> = self
            .group
            .layers
            .iter()
            .map(|(layer, placement)| format!("{layer}={}", placement.canonical()))
            .collect();
        format!(
            "shards={};layers={}",
            self.group.shard_count,
            layers.join(";")
        )
    }

    /// Decides which shard runs each (expert, token) pair of MoE layer `layer`, among the shards
    /// for which `usable(rank)` is true (the caller counts `local_rank` as usable).
    ///
    /// `works` lists each expert that got tokens with the number of its tokens. Returns one entry
    /// per input work, in order: for each of its tokens, the rank that runs it. An expert with
    /// one usable holder goes there; for one with several, each token goes to the usable holder
    /// with the fewest (expert, token) pairs assigned so far in this layer, counting every
    /// single-holder expert first; ties prefer `local_rank` (no bytes on the wire), then the
    /// lower rank. An expert without a usable holder is an error naming it.
    pub fn assign(
        &self,
        layer: usize,
        works: &[(usize, usize)],
        local_rank: usize,
        usable: impl Fn(usize) -> bool,
    ) -> Result<Vec<Vec<usize>>, AssignError> {
        let placement = self
            .layer(layer)
            .ok_or(AssignError::NotMoeLayer { layer })?;
        let holders: Vec<Vec<usize>> = works
            .iter()
            .map(|&(expert, _)| {
                let all = placement
                    .entries()
                    .get(expert)
                    .ok_or(AssignError::UnknownExpert { layer, expert })?;
                let up: Vec<usize> = all.iter().copied().filter(|&r| usable(r)).collect();
                if up.is_empty() {
                    return Err(AssignError::NoUsableHolder {
                        layer,
                        expert,
                        holders: all.clone(),
                    });
                }
                Ok(up)
            })
            .collect::<Result<_, _>>()?;
        let mut load = vec![0usize; self.group.shard_count];
        for (&(_, tokens), up) in works.iter().zip(&holders) {
            if let [only] = up.as_slice() {
                load[*only] += tokens;
            }
        }
        Ok(works
            .iter()
            .zip(&holders)
            .map(|(&(_, tokens), up)| match up.as_slice() {
                [only] => vec![*only; tokens],
                up => (0..tokens)
                    .map(|_| {
                        // `up` is never empty: checked above.
                        let chosen = up
                            .iter()
                            .copied()
                            .min_by_key(|&r| (load[r], r != local_rank, r))
                            .unwrap_or(local_rank);
                        load[chosen] += 1;
                        chosen
                    })
                    .collect(),
            })
            .collect())
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

    /// 4 experts, MoE layers 1 and 2, 2 shards.
    const SHAPE: ModelShape<'static> = ModelShape {
        n_experts: 4,
        moe_layers: &[1, 2],
        shard_count: 2,
    };

    fn all_up(_: usize) -> bool {
        true
    }

    #[test]
    fn the_default_is_the_same_in_every_moe_layer_and_absent_in_dense_ones() {
        let p = Placement::default_for(16, 4, 2, 0, &[1, 2]).unwrap();
        assert_eq!(p.moe_layers().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(p.experts_of(0, 1), (0..8).collect::<Vec<_>>());
        assert_eq!(p.experts_of(1, 2), (8..16).collect::<Vec<_>>());
        assert!(p.holds(0, 2, 3) && !p.holds(1, 2, 3));
        // Layer 0 is dense: nobody holds anything there.
        assert!(!p.holds(0, 0, 3));
        assert!(p.experts_of(0, 0).is_empty());
        assert_eq!(p.version(), None);
        assert_eq!(
            p.describe_rank(1),
            format!(
                "experts {:?} in every MoE layer",
                (8..16).collect::<Vec<_>>()
            )
        );
    }

    #[test]
    fn redundant_slots_copy_the_next_shard_so_any_one_may_fail() {
        // 16 experts over 3 shards (6, 5, 5), 6 extra slots: every expert on two shards.
        let p = Placement::default_for(16, 4, 3, 6, &[1, 2]).unwrap();
        for down in 0..3 {
            assert!(p.covered_by(|r| r != down), "shard {down} down");
        }
        assert!(!p.covered_by(|r| r == 0));
        let p = Placement::default_for(16, 4, 3, 0, &[1]).unwrap();
        assert!(!p.covered_by(|r| r != 2));
        assert!(p.covered_by(all_up));
    }

    #[test]
    fn too_many_shards_or_a_bad_rank_is_an_error() {
        assert_eq!(
            Placement::default_for(4, 1, 5, 0, &[1]),
            Err(PlacementError::TooManyShards {
                shards: 5,
                experts: 4
            })
        );
        assert!(check_rank(2, 2).is_err());
        assert!(check_rank(1, 2).is_ok());
    }

    #[test]
    fn a_per_layer_file_gives_each_layer_its_own_holders() {
        let p = Placement::parse(
            r#"{"version": "3", "experts": [[0], [0], [1], [1]],
                "layers": {"2": [[1], [0, 1], [0], [1]]}}"#,
            SHAPE,
        )
        .unwrap();
        assert_eq!(p.version(), Some("3"));
        assert_eq!(p.experts_of(0, 1), vec![0, 1]);
        assert_eq!(p.experts_of(0, 2), vec![1, 2]);
        assert_eq!(p.experts_of(1, 2), vec![0, 1, 3]);
        assert!(p.holds(1, 2, 0) && !p.holds(1, 1, 0));
        assert_eq!(
            p.describe_rank(1),
            "2-3 experts per MoE layer (per-layer placement)"
        );
    }

    #[test]
    fn bad_files_name_the_file_and_the_field() {
        let err = |text: &str| Placement::parse(text, SHAPE).unwrap_err();
        let e = err(r#"{"layers": {"0": [[0], [0], [1], [1]]}}"#);
        assert!(
            e.contains(r#"`layers["0"]`: layer 0 is not an MoE layer"#),
            "{e}"
        );
        let e = err(r#"{"layers": {"1": [[0], [0], [1], [1]]}}"#);
        assert!(e.contains("MoE layer 2 has no entry"), "{e}");
        let e = err(r#"{"shardCount": 3, "experts": [[0], [0], [1], [1]]}"#);
        assert!(e.contains("`shardCount` is 3"), "{e}");
        let e = err(r#"{"experts": [[0], [2], [1], [1]]}"#);
        assert!(e.contains("experts[1] names shard 2"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("placement.json");
        std::fs::write(&path, r#"{"experts": [[0], [0]]}"#).unwrap();
        let e = Placement::from_file(&path, SHAPE).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("--expert-placement {}: ", path.display()))
                && e.contains("`experts` has 2 entries"),
            "{e}"
        );
        let e = Placement::from_file(Path::new("/nonexistent/placement.json"), SHAPE)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--expert-placement /nonexistent/placement.json: "),
            "{e}"
        );
    }

    #[test]
    fn single_holder_experts_go_to_their_shard() {
        let p = Placement::default_for(8, 1, 2, 0, &[1]).unwrap();
        let assigned = p.assign(1, &[(1, 2), (6, 3)], 0, all_up).unwrap();
        assert_eq!(assigned, vec![vec![0, 0], vec![1, 1, 1]]);
    }

    #[test]
    fn a_replicated_expert_spreads_its_tokens_over_the_least_loaded_holders_of_its_layer() {
        // Layer 1: expert 1 on shards 0 and 1; layer 2: expert 1 on shard 0 only.
        let p = Placement::parse(
            r#"{"layers": {"1": [[0], [0, 1], [1], [1]], "2": [[0], [0], [1], [1]]}}"#,
            SHAPE,
        )
        .unwrap();
        // Shard 1 already has 2 tokens of expert 2: shard 0 first catches up, then they
        // alternate, local (1) first on ties.
        let assigned = p.assign(1, &[(1, 6), (2, 2)], 1, all_up).unwrap();
        assert_eq!(assigned[0], vec![0, 0, 1, 0, 1, 0]);
        assert_eq!(assigned[1], vec![1, 1]);
        let assigned = p.assign(2, &[(1, 6), (2, 2)], 1, all_up).unwrap();
        assert_eq!(assigned[0], vec![0; 6]);
    }

    #[test]
    fn assignment_leaves_out_shards_that_are_down() {
        // 8 experts over 3 shards, every expert on two of them.
        let p = Placement::default_for(8, 1, 3, 3, &[1]).unwrap();
        let works: Vec<(usize, usize)> = (0..8).map(|e| (e, 3)).collect();
        let assigned = p.assign(1, &works, 0, |r| r != 1).unwrap();
        for (ranks, &(expert, _)) in assigned.iter().zip(&works) {
            assert!(ranks.iter().all(|&r| r != 1), "expert {expert}: {ranks:?}");
            assert!(ranks.iter().all(|&r| p.holds(r, 1, expert)));
        }
        // Shards 1 and 2 down: experts only they hold have no usable holder.
        let err = p.assign(1, &works, 0, |r| r == 0).unwrap_err();
        assert!(
            matches!(err, AssignError::NoUsableHolder { layer: 1, ref holders, .. } if !holders.contains(&0)),
            "{err:?}"
        );
        assert_eq!(
            p.assign(0, &works, 0, all_up),
            Err(AssignError::NotMoeLayer { layer: 0 })
        );
        assert_eq!(
            p.assign(1, &[(8, 1)], 0, all_up),
            Err(AssignError::UnknownExpert {
                layer: 1,
                expert: 8
            })
        );
    }

    #[test]
    fn the_canonical_form_covers_every_layer() {
        let flat = Placement::parse(r#"{"experts": [[0], [0], [1], [1]]}"#, SHAPE).unwrap();
        let default = Placement::default_for(4, 1, 2, 0, &[1, 2]).unwrap();
        assert_eq!(flat.canonical(), default.canonical());
        let per_layer = Placement::parse(
            r#"{"version": "9", "experts": [[0], [0], [1], [1]], "layers": {"2": [[0], [1], [0], [1]]}}"#,
            SHAPE,
        )
        .unwrap();
        assert_ne!(per_layer.canonical(), default.canonical());
        assert!(per_layer.canonical().contains("1=0/0/1/1;2=0/1/0/1"));
    }
}
