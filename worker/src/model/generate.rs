//! One generation straight on the model, without the engine: a prefill, then absorbed decode
//! steps over a private latent cache. `generate` and the reference tests use it; serving goes
//! through the engine's scheduler instead.

use std::time::Instant;

use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{DeepSeekModel, LatentCache, LogitsFor, ModelError, SequenceChunk};

/// Tokens per cache block for a single generation.
const BLOCK_SIZE: usize = 16;

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub generated_ids: Vec<u32>,
    /// Logits of the last prompt position: (vocab).
    pub first_logits: Vec<f32>,
    /// "eos" or "length".
    pub finish_reason: &'static str,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Picks the next token: argmax for temperature 0 (the first maximum, like torch), else a sample
/// from softmax(logits / temperature).
pub fn sample(logits: &[f32], temperature: f32, rng: &mut StdRng) -> u32 {
    if temperature <= 0.0 {
        // The first maximum, skipping NaN (which compares false with everything).
        let mut best: Option<usize> = None;
        for (i, &v) in logits.iter().enumerate() {
            if !v.is_nan() && best.is_none_or(|b| v > logits[b]) {
                best = Some(i);
            }
        }
        return best.unwrap_or(0) as u32;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // NaN and infinite logits get no weight; with nothing finite left, the first maximum wins.
    let weights: Vec<f64> = logits
        .iter()
        .map(|&v| {
            let weight = (((v - max) / temperature) as f64).exp();
            if weight.is_finite() { weight } else { 0.0 }
        })
        .collect();
    let total: f64 = weights.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return sample(logits, 0.0, rng);
    }
    let mut target = rng.random_range(0.0..total);
    for (i, w) in weights.iter().enumerate() {
        if target < *w {
            return i as u32;
        }
        target -= w;
    }
    (weights.len() - 1) as u32
}

/// Prefills `prompt` and decodes up to `max_new_tokens` with the absorbed path, stopping at any
/// of `stop_ids`.
pub fn generate_ids(
    model: &DeepSeekModel,
    prompt: &[u32],
    max_new_tokens: usize,
    temperature: f32,
    seed: u64,
    stop_ids: &[u32],
) -> Result<Generation, ModelError> {
    let context = model.config().max_position_embeddings;
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt is empty".into()));
    }
    if prompt.len() > context {
        return Err(ModelError::Input(format!(
            "prompt of {} tokens exceeds the model context of {context} (max_position_embeddings)",
            prompt.len()
        )));
    }
    let max_new_tokens = max_new_tokens.min(context - prompt.len());
    let total = prompt.len() + max_new_tokens;
    let blocks = total.div_ceil(BLOCK_SIZE).max(1);
    let mut cache = LatentCache::new(model.config(), blocks, BLOCK_SIZE, DType::F32, &Device::Cpu)?;
    let block_table: Vec<u32> = (0..blocks as u32).collect();
    let mut rng = StdRng::seed_from_u64(seed);

    let started = Instant::now();
    let logits = model.forward(
        &[SequenceChunk {
            tokens: prompt,
            start_pos: 0,
            block_table: &block_table,
        }],
        &mut cache,
        LogitsFor::LastToken,
    )?;
    let first_logits = logits.flatten_all()?.to_vec1::<f32>()?;
    let prefill_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut generated = Vec::with_capacity(max_new_tokens);
    let mut finish_reason = "length";
    let mut next_logits = first_logits.clone();
    while generated.len() < max_new_tokens {
        let token = sample(&next_logits, temperature, &mut rng);
        generated.push(token);
        if stop_ids.contains(&token) {
            finish_reason = "eos";
            break;
        }
        if generated.len() == max_new_tokens {
            break;
        }
        let logits = model.forward(
            &[SequenceChunk {
                tokens: &[token],
                start_pos: prompt.len() + generated.len() - 1,
                block_table: &block_table,
            }],
            &mut cache,
            LogitsFor::LastToken,
        )?;
        next_logits = logits.flatten_all()?.to_vec1::<f32>()?;
    }
    Ok(Generation {
        generated_ids: generated,
        first_logits,
        finish_reason,
        prefill_seconds,
        decode_seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum_and_sampling_is_seeded() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(sample(&[0.1, 3.0, 3.0, -1.0], 0.0, &mut rng), 1);
        let logits = [0.0, 1.0, 2.0, 0.5];
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| sample(&logits, 1.0, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        // A very low temperature is effectively greedy.
        let mut rng = StdRng::seed_from_u64(3);
        assert!((0..50).all(|_| sample(&logits, 0.01, &mut rng) == 2));
    }

    #[test]
    fn non_finite_logits_do_not_panic() {
        // An empty range in random_range panicked when every weight was NaN or 0.
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(sample(&[f32::NAN, 1.0, 0.5], 0.0, &mut rng), 1);
        for _ in 0..20 {
            let token = sample(&[f32::NAN, 1.0, 0.5], 1.0, &mut rng);
            assert!(token == 1 || token == 2, "sampled the NaN logit");
        }
        assert_eq!(sample(&[f32::NAN, f32::NAN], 1.0, &mut rng), 0);
        assert_eq!(sample(&[f32::INFINITY, 0.0, 1.0], 1.0, &mut rng), 0);
        assert_eq!(sample(&[f32::NEG_INFINITY; 3], 0.7, &mut rng), 0);
    }
}
