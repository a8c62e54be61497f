//! Rotary embedding of the `qk_rope_head_dim` slice of queries and keys, with YaRN scaling.
//!
//! Frequencies are computed like transformers' `_compute_yarn_parameters` (extrapolated and
//! interpolated frequencies blended by a linear ramp between the correction dims), and cos/sin
//! carry the attention factor `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`.

use super::config::{ModelConfig, yarn_mscale};

/// Inverse frequencies and cos/sin scaling of one model.
#[derive(Debug, Clone)]
pub struct Rope {
    /// (rope_dim / 2)
    inv_freq: Vec<f32>,
    attention_scaling: f32,
    interleave: bool,
}

/// cos and sin of every frequency at a set of positions: (positions, rope_dim / 2) each.
#[derive(Debug, Clone)]
pub struct RopeTable {
    half: usize,
    interleave: bool,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.qk_rope_head_dim;
        let base = config.rope.theta;
        // base^(2i/dim) for i in 0..dim/2, in f32 like the reference.
        let pos_freqs: Vec<f32> = (0..dim / 2)
            .map(|i| (base as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        let (inv_freq, attention_scaling) = match config.rope.yarn {
            None => (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0),
            Some(yarn) => {
                let correction_dim = |rotations: f64| {
                    dim as f64
                        * (yarn.original_max_position_embeddings as f64
                            / (rotations * 2.0 * std::f64::consts::PI))
                            .ln()
                        / (2.0 * base.ln())
                };
                let low = correction_dim(yarn.beta_fast).floor().max(0.0);
                let mut high = correction_dim(yarn.beta_slow).ceil().min(dim as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let factor = yarn.factor as f32;
                let inv_freq = pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
                        let extrapolation_weight = 1.0 - ramp;
                        let extrapolated = 1.0 / p;
                        let interpolated = 1.0 / (factor * p);
                        interpolated * (1.0 - extrapolation_weight)
                            + extrapolated * extrapolation_weight
                    })
                    .collect();
                // DeepSeek's rule; a missing mscale_all_dim (0) makes the denominator 1.
                let scaling = yarn_mscale(yarn.factor, yarn.mscale)
                    / yarn_mscale(yarn.factor, yarn.mscale_all_dim);
                (inv_freq, scaling as f32)
            }
        };
        Self {
            inv_freq,
            attention_scaling,
            interleave: config.rope.interleave,
        }
    }

    /// cos/sin (times the attention scaling) at each position.
    pub fn table(&self, positions: impl Iterator<Item = usize>) -> RopeTable {
        let half = self.inv_freq.len();
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for pos in positions {
            for &f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos() * self.attention_scaling);
                sin.push(angle.sin() * self.attention_scaling);
            }
        }
        RopeTable {
            half,
            interleave: self.interleave,
            cos,
            sin,
        }
    }
}

impl RopeTable {
    /// Rotates `x` (rope_dim values) in place by the angles of row `row`.
    #[inline]
    pub fn apply(&self, row: usize, x: &mut [f32]) {
        let half = self.half;
        let cos = &self.cos[row * half..(row + 1) * half];
        let sin = &self.sin[row * half..(row + 1) * half];
        if self.interleave {
            // Pairs (x[2i], x[2i+1]) rotate by angle i.
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = b * cos[i] + a * sin[i];
            }
        } else {
            // NeoX layout: pairs (x[i], x[i + half]).
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a * cos[i] - b * sin[i];
                x[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;

    fn config(rope: serde_json::Value, interleave: bool) -> ModelConfig {
        ModelConfig::from_json(
            &serde_json::json!({
                "model_type": "deepseek_v3", "vocab_size": 10, "hidden_size": 8,
                "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                "kv_lora_rank": 4, "qk_nope_head_dim": 4, "qk_rope_head_dim": 8, "v_head_dim": 4,
                "max_position_embeddings": 512, "rope_theta": 10000.0, "rope_scaling": rope,
                "rope_interleave": interleave
            })
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn plain_rope_rotates_pairs_by_position_times_frequency() {
        let rope = Rope::new(&config(serde_json::Value::Null, true));
        let table = rope.table([3usize].into_iter());
        let mut x = vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        table.apply(0, &mut x);
        for i in 0..4 {
            let theta = 3.0 * 10000f32.powf(-((2 * i) as f32) / 8.0);
            assert!((x[2 * i] - theta.cos()).abs() < 1e-5);
            assert!((x[2 * i + 1] - theta.sin()).abs() < 1e-5);
        }
        // NeoX layout rotates (x[i], x[i + 4]).
        let rope = Rope::new(&config(serde_json::Value::Null, false));
        let table = rope.table([3usize].into_iter());
        let mut x = vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        table.apply(0, &mut x);
        let theta0 = 3.0f32;
        assert!((x[0] - theta0.cos()).abs() < 1e-5 && (x[4] - theta0.sin()).abs() < 1e-5);
    }

    #[test]
    fn yarn_blends_frequencies_and_scales_cos_sin() {
        let rope = Rope::new(&config(
            serde_json::json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}),
            true,
        ));
        // The highest frequency (i = 0) is extrapolated: unchanged.
        assert!((rope.inv_freq[0] - 1.0).abs() < 1e-7);
        // The lowest frequencies are interpolated: divided by the factor.
        let plain_last = 1.0 / 10000f32.powf(6.0 / 8.0);
        assert!((rope.inv_freq[3] - plain_last / 4.0).abs() < 1e-9);
        let expected = (0.1 * 0.707 * 4f64.ln() + 1.0) / (0.1 * 4f64.ln() + 1.0);
        assert!((rope.attention_scaling as f64 - expected).abs() < 1e-6);
    }
}
