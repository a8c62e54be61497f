//! Expert load as the workers count it, read from their Prometheus counters, and the imbalance a
//! placement gives that load.
//!
//! Imbalance is `sum_l max_r load(l, r) / sum_l mean_r load(l, r)`: every step waits for the
//! slowest rank at every MoE layer, so this is the slowdown versus perfect balance (1.0).

use std::collections::BTreeMap;

use crate::{GroupPlacement, LayerPlacement};

/// The counter each worker exports: tokens its router sent to each routed expert, per MoE layer.
pub const EXPERT_TOKENS_METRIC: &str = "latentserve_expert_tokens_total";

/// Tokens routed per (MoE layer, expert), e.g. summed over a group's workers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpertLoad {
    /// Decoder layer index -> tokens per expert (index = expert id).
    pub layers: BTreeMap<usize, Vec<f64>>,
}

impl ExpertLoad {
    /// Parses Prometheus text exposition; takes every sample of
    /// `latentserve_expert_tokens_total{layer="L",expert="E",...}` (other labels such as `model=`
    /// may be present, in any order, and samples that differ only in them are summed). Other
    /// metrics, comments and HELP/TYPE lines are ignored. Each layer's vector has max expert id + 1
    /// entries (missing = 0). Errors name the line (`line 7: ...`).
    pub fn from_prometheus_text(text: &str) -> Result<Self, String> {
        let mut load = Self::default();
        for (index, line) in text.lines().enumerate() {
            let sample =
                parse_expert_sample(line.trim()).map_err(|e| format!("line {}: {e}", index + 1))?;
            if let Some((layer, expert, tokens)) = sample {
                let counts = load.layers.entry(layer).or_default();
                if counts.len() <= expert {
                    counts.resize(expert + 1, 0.0);
                }
                counts[expert] += tokens;
            }
        }
        Ok(load)
    }

    /// Adds `other` entry by entry (e.g. another worker's counts).
    pub fn add(&mut self, other: &ExpertLoad) {
        for (&layer, theirs) in &other.layers {
            let ours = self.layers.entry(layer).or_default();
            if ours.len() < theirs.len() {
                ours.resize(theirs.len(), 0.0);
            }
            for (mine, their) in ours.iter_mut().zip(theirs) {
                *mine += their;
            }
        }
    }

    /// Counts since `earlier`: per entry current - earlier. An entry that went down means the
    /// worker restarted and its counter began again from zero, so the current value is what
    /// was counted since.
    pub fn since(&self, earlier: &ExpertLoad) -> ExpertLoad {
        let layers = self
            .layers
            .iter()
            .map(|(&layer, now)| {
                let before = earlier.layers.get(&layer).map_or(&[][..], Vec::as_slice);
                let delta = now
                    .iter()
                    .enumerate()
                    .map(|(e, &n)| {
                        let b = before.get(e).copied().unwrap_or(0.0);
                        if n >= b { n - b } else { n }
                    })
                    .collect();
                (layer, delta)
            })
            .collect();
        ExpertLoad { layers }
    }

    /// Tokens over every layer and expert.
    pub fn total(&self) -> f64 {
        self.layers.values().flatten().sum()
    }

    /// Pads every layer to `n_experts` entries (experts never routed to count 0); longer layers
    /// are left as they are.
    pub fn with_experts(mut self, n_experts: usize) -> Self {
        for counts in self.layers.values_mut() {
            if counts.len() < n_experts {
                counts.resize(n_experts, 0.0);
            }
        }
        self
    }
}

/// max rank load / mean rank load, summed over layers: `sum_l max_r load(l,r) / sum_l mean_r
/// load(l,r)`. Every step waits for the slowest rank at every layer, so this is the slowdown
/// versus perfect balance; 1.0 is perfect. A replicated expert's load is split evenly between its
/// ranks. Layers of `load` absent from the placement are ignored; returns 1.0 when there is no
/// load.
pub fn predicted_imbalance(placement: &GroupPlacement, load: &ExpertLoad) -> f64 {
    imbalance(load.layers.iter().filter_map(|(layer, counts)| {
        let layer = placement.layers.get(layer)?;
        Some(rank_loads(layer, placement.shard_count, counts))
    }))
}

/// The same ratio as [`predicted_imbalance`] from measured per-rank loads:
/// `rank_loads[layer][rank]` (what each worker's own counters say it ran).
pub fn measured_imbalance(rank_loads: &BTreeMap<usize, Vec<f64>>) -> f64 {
    imbalance(rank_loads.values().cloned())
}

/// Tokens each of `shard_count` ranks runs at one layer when `counts[e]` tokens go to expert `e`,
/// split evenly between its replicas. Experts beyond the placement's are not counted.
pub fn rank_loads(layer: &LayerPlacement, shard_count: usize, counts: &[f64]) -> Vec<f64> {
    let mut loads = vec![0.0; shard_count];
    for (ranks, &tokens) in layer.entries().iter().zip(counts) {
        let share = tokens / ranks.len() as f64;
        for &rank in ranks {
            loads[rank] += share;
        }
    }
    loads
}

/// `sum max / sum mean` over per-layer rank loads; 1.0 when nothing ran.
fn imbalance(layers: impl Iterator<Item = Vec<f64>>) -> f64 {
    imbalance_of(layers).unwrap_or(1.0)
}

/// `sum max / sum mean` over rank loads (one vector of per-rank loads per layer, or per group
/// and layer): the busiest rank's share of a step's routed work against an even split. `None`
/// when nothing ran.
pub fn imbalance_of(layers: impl Iterator<Item = Vec<f64>>) -> Option<f64> {
    let (mut max_sum, mut mean_sum) = (0.0, 0.0);
    for loads in layers.filter(|l| !l.is_empty()) {
        max_sum += loads.iter().copied().fold(0.0, f64::max);
        mean_sum += loads.iter().sum::<f64>() / loads.len() as f64;
    }
    (mean_sum > 0.0).then(|| max_sum / mean_sum)
}

/// `Some((layer, expert, tokens))` for a sample of [`EXPERT_TOKENS_METRIC`], `None` for any other
/// line.
fn parse_expert_sample(line: &str) -> Result<Option<(usize, usize, f64)>, String> {
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    if &line[..name_end] != EXPERT_TOKENS_METRIC {
        return Ok(None);
    }
    let rest = &line[name_end..];
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(inner) => parse_labels(inner)?,
        None => (Vec::new(), rest),
    };
    let label = |name: &str| -> Result<usize, String> {
        let value = labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .ok_or_else(|| format!("{EXPERT_TOKENS_METRIC} has no `{name}` label"))?;
        value
            .parse()
            .map_err(|_| format!("label {name}=\"{value}\" is not an index"))
    };
    let (layer, expert) = (label("layer")?, label("expert")?);
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next().unwrap_or("");
    let tokens: f64 = value
        .parse()
        .map_err(|_| format!("sample value `{value}` is not a number"))?;
    if !tokens.is_finite() || tokens < 0.0 {
        return Err(format!(
            "sample value `{value}` is not a token count (finite, >= 0)"
        ));
    }
    Ok(Some((layer, expert, tokens)))
}

/// `(name, value)` pairs of one sample.
type Labels = Vec<(String, String)>;

/// Parses `name="value",...}` (the text after `{`) into label pairs, undoing `\"`, `\\` and `\n`
/// escapes; returns the pairs and the text after `}`.
fn parse_labels(text: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = text.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest
            .find('=')
            .ok_or("a label has no `=`; the label set is not closed")?;
        let name = rest[..eq].trim().to_owned();
        let quoted = rest[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or_else(|| format!("label `{name}` has no quoted value"))?;
        let (value, after) = parse_quoted(quoted)
            .ok_or_else(|| format!("label `{name}` has an unterminated value"))?;
        labels.push((name, value));
        rest = after.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
}

/// The value up to the closing quote (escapes undone) and the text after it.
fn parse_quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            other => value.push(other),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = r#"# HELP latentserve_expert_tokens_total Tokens routed to each routed expert.
# TYPE latentserve_expert_tokens_total counter
latentserve_expert_tokens_total{model="ds-v3",layer="3",expert="0"} 120
latentserve_expert_tokens_total{expert="2",layer="3",model="ds-v3"} 30 1712345678000
latentserve_expert_tokens_total{layer="4", expert="1", model="ds-v3"} 7.5
latentserve_expert_tokens_total{model="other",layer="3",expert="0"} 5
# HELP latentserve_request_errors_total Failed requests.
# TYPE latentserve_request_errors_total counter
latentserve_request_errors_total{reason="bad \"json\" body",expert="9"} 3
latentserve_expert_tokens_total_created{layer="3",expert="0"} 1.7e9
process_cpu_seconds_total 12.5
"#;

    #[test]
    fn parses_a_realistic_exposition() {
        let load = ExpertLoad::from_prometheus_text(EXPOSITION).unwrap();
        assert_eq!(load.layers.len(), 2);
        // Both models' samples of (3, 0) are summed; expert 1 was never sampled.
        assert_eq!(load.layers[&3], vec![125.0, 0.0, 30.0]);
        assert_eq!(load.layers[&4], vec![0.0, 7.5]);
        assert_eq!(load.total(), 162.5);
        let padded = load.with_experts(4);
        assert_eq!(padded.layers[&4], vec![0.0, 7.5, 0.0, 0.0]);
    }

    #[test]
    fn bad_samples_name_the_line() {
        let err = |text: &str| ExpertLoad::from_prometheus_text(text).unwrap_err();
        let e = err("# x\nlatentserve_expert_tokens_total{layer=\"3\"} 1");
        assert!(e.starts_with("line 2:") && e.contains("`expert`"), "{e}");
        let e = err("latentserve_expert_tokens_total{layer=\"3\",expert=\"x\"} 1");
        assert!(e.contains("expert=\"x\" is not an index"), "{e}");
        let e = err("latentserve_expert_tokens_total{layer=\"3\",expert=\"1\"} lots");
        assert!(e.contains("`lots` is not a number"), "{e}");
        let e = err("latentserve_expert_tokens_total{layer=\"3\",expert=\"1} 1");
        assert!(e.contains("unterminated"), "{e}");
        let e = err("latentserve_expert_tokens_total{layer=\"3\",expert=\"1\"} -4");
        assert!(e.contains("not a token count"), "{e}");
    }

    #[test]
    fn since_takes_the_current_value_after_a_restart() {
        let earlier = ExpertLoad {
            layers: BTreeMap::from([(1, vec![10.0, 50.0]), (2, vec![4.0])]),
        };
        let now = ExpertLoad {
            // Expert 1 of layer 1 went down: that worker restarted and has counted 8 since.
            layers: BTreeMap::from([(1, vec![15.0, 8.0, 2.0]), (2, vec![4.0])]),
        };
        let delta = now.since(&earlier);
        assert_eq!(delta.layers[&1], vec![5.0, 8.0, 2.0]);
        assert_eq!(delta.layers[&2], vec![0.0]);
        let mut sum = delta.clone();
        sum.add(&earlier);
        assert_eq!(sum.layers[&1], vec![15.0, 58.0, 2.0]);
    }

    #[test]
    fn imbalance_on_hand_computed_examples() {
        // 4 experts on 2 ranks; expert 0 on both ranks.
        let layer = LayerPlacement::new(vec![vec![0, 1], vec![0], vec![1], vec![1]], 2).unwrap();
        let placement = GroupPlacement::uniform(2, &layer, [1, 2, 7]);
        // Layer 1: rank 0 = 40 + 10 = 50, rank 1 = 40 + 20 + 30 = 90: max 90, mean 70.
        // Layer 2: rank 0 = 0 + 30 = 30, rank 1 = 0 + 10 + 10 = 20: max 30, mean 25.
        // Layer 9 is not in the placement and is ignored.
        let load = ExpertLoad {
            layers: BTreeMap::from([
                (1, vec![80.0, 10.0, 20.0, 30.0]),
                (2, vec![0.0, 30.0, 10.0, 10.0]),
                (9, vec![1000.0, 0.0, 0.0, 0.0]),
            ]),
        };
        assert_eq!(rank_loads(&layer, 2, &load.layers[&1]), vec![50.0, 90.0]);
        let expected = (90.0 + 30.0) / (70.0 + 25.0);
        assert!((predicted_imbalance(&placement, &load) - expected).abs() < 1e-12);
        assert_eq!(predicted_imbalance(&placement, &ExpertLoad::default()), 1.0);

        let measured = BTreeMap::from([(1, vec![50.0, 90.0]), (2, vec![30.0, 20.0])]);
        assert!((measured_imbalance(&measured) - expected).abs() < 1e-12);
        let even = BTreeMap::from([(1, vec![5.0, 5.0, 5.0])]);
        assert_eq!(measured_imbalance(&even), 1.0);
        assert_eq!(measured_imbalance(&BTreeMap::new()), 1.0);
    }
}
