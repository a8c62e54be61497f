//! The placement file (`--expert-placement FILE`), as the operator stores it in a ConfigMap:
//!
//! ```json
//! {"version": "3", "shardCount": 4,
//!  "experts": [[0], [0, 1], [1], [2], [3], ...],
//!  "layers": {"1": [[2], [0], [1, 3], ...], "2": [...]}}
//! ```
//!
//! `layers` maps a decoder layer index (an MoE layer) to its entries; `experts` is the entry
//! list of every MoE layer `layers` does not name. Entry `e` lists the ranks holding routed
//! expert `e`. `version` is informational (the worker logs it and reports it in its metrics);
//! `shardCount`, when present, must equal the worker's `--shard-count`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{GroupPlacement, LayerPlacement};

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_count: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<Vec<Vec<usize>>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layers: BTreeMap<String, Vec<Vec<usize>>>,
}

/// What the file must fit: the model's routed experts per layer, its MoE layers, the group size.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape<'a> {
    pub n_experts: usize,
    /// Decoder layer indices of the MoE layers, ascending.
    pub moe_layers: &'a [usize],
    pub shard_count: usize,
}

impl PlacementFile {
    /// Every layer of `placement` written out explicitly.
    pub fn from_placement(placement: &GroupPlacement, version: Option<String>) -> Self {
        Self {
            version,
            shard_count: Some(placement.shard_count),
            experts: None,
            layers: placement
                .layers
                .iter()
                .map(|(layer, p)| (layer.to_string(), p.entries().to_vec()))
                .collect(),
        }
    }

    /// Compact JSON, one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a placement file always serializes")
    }

    /// Parses the JSON text; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("not a placement file: {e}"))
    }

    /// Checks the file against the model and resolves it into one placement per MoE layer. The
    /// error names the field at fault (`layers["3"]: experts[5] lists no shard`).
    pub fn resolve(&self, shape: ModelShape<'_>) -> Result<GroupPlacement, String> {
        if let Some(count) = self.shard_count
            && count != shape.shard_count
        {
            return Err(format!(
                "`shardCount` is {count} but the group has {} shards",
                shape.shard_count
            ));
        }
        if self.experts.is_none() && self.layers.is_empty() {
            return Err("the file has neither `experts` nor `layers`".to_owned());
        }
        let check = |field: &str, entries: &Vec<Vec<usize>>| {
            if entries.len() != shape.n_experts {
                return Err(format!(
                    "{field} has {} entries but the model has {} routed experts",
                    entries.len(),
                    shape.n_experts
                ));
            }
            LayerPlacement::new(entries.clone(), shape.shard_count)
                .map_err(|e| format!("{field}: {e}"))
        };
        let default = self
            .experts
            .as_ref()
            .map(|entries| check("`experts`", entries))
            .transpose()?;
        let mut layers = BTreeMap::new();
        for (key, entries) in &self.layers {
            let field = format!("`layers[\"{key}\"]`");
            let layer: usize = key
                .parse()
                .map_err(|_| format!("{field}: the key is not a layer index"))?;
            if !shape.moe_layers.contains(&layer) {
                return Err(format!(
                    "{field}: layer {layer} is not an MoE layer of this model ({})",
                    describe_layers(shape.moe_layers)
                ));
            }
            layers.insert(layer, check(&field, entries)?);
        }
        for &layer in shape.moe_layers {
            if layers.contains_key(&layer) {
                continue;
            }
            match &default {
                Some(default) => {
                    layers.insert(layer, default.clone());
                }
                None => {
                    return Err(format!(
                        "MoE layer {layer} has no entry in `layers` and there is no `experts` default"
                    ));
                }
            }
        }
        Ok(GroupPlacement {
            shard_count: shape.shard_count,
            layers,
        })
    }
}

/// `MoE layers: 1-3, 5` style text for errors.
fn describe_layers(layers: &[usize]) -> String {
    match (layers.first(), layers.last()) {
        (Some(first), Some(last)) if last - first + 1 == layers.len() => {
            format!("MoE layers: {first}..={last}")
        }
        (Some(_), Some(_)) => format!("MoE layers: {layers:?}"),
        _ => "it has no MoE layer".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: ModelShape<'static> = ModelShape {
        n_experts: 4,
        moe_layers: &[1, 2, 3],
        shard_count: 2,
    };

    #[test]
    fn a_flat_file_applies_to_every_moe_layer() {
        let file = PlacementFile::parse(r#"{"experts": [[0], [1, 0], [1], [1]]}"#).unwrap();
        let placement = file.resolve(SHAPE).unwrap();
        assert_eq!(placement.layers.len(), 3);
        assert_eq!(placement.layers[&2].replicas(1), &[0, 1]);
    }

    #[test]
    fn per_layer_entries_override_the_default_and_round_trip() {
        let text = r#"{"version": "7", "shardCount": 2,
            "experts": [[0], [0], [1], [1]],
            "layers": {"2": [[1], [0], [0, 1], [1]]}}"#;
        let placement = PlacementFile::parse(text).unwrap().resolve(SHAPE).unwrap();
        assert_eq!(placement.layers[&1].experts_of(0), vec![0, 1]);
        assert_eq!(placement.layers[&2].experts_of(0), vec![1, 2]);
        let written = PlacementFile::from_placement(&placement, Some("7".into()));
        let again = PlacementFile::parse(&written.to_json())
            .unwrap()
            .resolve(SHAPE)
            .unwrap();
        assert_eq!(again, placement);
    }

    #[test]
    fn bad_files_name_the_field() {
        let err = |text: &str| {
            PlacementFile::parse(text)
                .and_then(|f| f.resolve(SHAPE))
                .unwrap_err()
        };
        assert!(err(r#"{"experts": [[0], [1]]}"#).contains("`experts` has 2 entries"));
        assert!(err(r#"{"experts": [[0], [], [1], [1]]}"#).contains("experts[1] lists no shard"));
        assert!(err(r#"{"experts": [[0], [2], [1], [1]]}"#).contains("names shard 2"));
        assert!(err(r#"{"experts": [[0], [1, 1], [1], [1]]}"#).contains("a shard twice"));
        assert!(err(r#"{"expert": []}"#).contains("not a placement file"));
        assert!(err(r#"{}"#).contains("neither"));
        assert!(
            err(r#"{"shardCount": 4, "experts": [[0], [0], [1], [1]]}"#)
                .contains("`shardCount` is 4")
        );
        let e = err(r#"{"layers": {"0": [[0], [0], [1], [1]]}}"#);
        assert!(
            e.contains(r#"`layers["0"]`: layer 0 is not an MoE layer"#),
            "{e}"
        );
        let e = err(r#"{"layers": {"x": [[0], [0], [1], [1]]}}"#);
        assert!(e.contains("not a layer index"), "{e}");
        let e = err(r#"{"layers": {"1": [[0], [0], [1], [1]]}}"#);
        assert!(e.contains("MoE layer 2 has no entry"), "{e}");
        let e = err(r#"{"experts": [[0], [0], [1], [1]], "layers": {"3": [[0], [], [1], [1]]}}"#);
        assert!(
            e.contains(r#"`layers["3"]`: experts[1] lists no shard"#),
            "{e}"
        );
    }
}
