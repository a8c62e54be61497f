//! `generate`: one generation from a prompt, without a server.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::WeightDtype;
use super::model_dir::resolve_model_dir;
use crate::model::{
    DeepSeekModel, LatentCache, LoadOptions, LogitsFor, ModelError, SequenceChunk, Tokenizer,
};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model directory (config.json, safetensors, tokenizer.json); the demo model by default.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt text (needs the model's tokenizer.json).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// 0 is greedy; above 0 samples from softmax(logits / temperature).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Seed of the sampler (with --temperature > 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub json: bool,
    /// With --json: add `first_logits`, the logits of the last prompt position.
    #[arg(long)]
    pub logits: bool,
    /// Keep generating past EOS tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Storage dtype of the weights (computation is f32 either way).
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

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
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&v| (((v - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
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

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    args.device.require_supported()?;
    let dir = &resolve_model_dir(args.model.as_deref())?;
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!(
            "--temperature must be a finite number >= 0, got {}",
            args.temperature
        );
    }
    let options = LoadOptions {
        dtype: args.dtype.candle(),
        ..LoadOptions::default()
    };
    let model = DeepSeekModel::load(dir, &options)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Some(
            Tokenizer::load(dir, model.config())
                .with_context(|| format!("loading the tokenizer of {}", dir.display()))?,
        )
    } else {
        None
    };
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => {
            let Some(tokenizer) = &tokenizer else {
                bail!(
                    "--prompt needs {}; pass --prompt-ids instead",
                    dir.join("tokenizer.json").display()
                );
            };
            tokenizer
                .encode(text, true)
                .context("tokenizing the prompt")?
        }
        (None, None) => bail!("one of --prompt or --prompt-ids is required"),
    };
    let stop_ids: Vec<u32> = if args.ignore_eos {
        Vec::new()
    } else {
        match &tokenizer {
            Some(t) => t.eos_ids().to_vec(),
            None => {
                crate::model::tokenizer::special_ids(dir, model.config())
                    .context("reading generation_config.json")?
                    .0
            }
        }
    };
    let generation = generate_ids(
        &model,
        &prompt_ids,
        args.max_new_tokens,
        args.temperature,
        args.seed,
        &stop_ids,
    )
    .context("generating")?;
    let text = match &tokenizer {
        Some(t) => t
            .decode(&generation.generated_ids, true)
            .context("decoding the generated tokens")?,
        None => String::new(),
    };
    if args.json {
        let decode_steps = generation.generated_ids.len().saturating_sub(1);
        let mut out = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": generation.generated_ids,
            "text": text,
            "finish_reason": generation.finish_reason,
            "prefill_seconds": generation.prefill_seconds,
            "decode_seconds": generation.decode_seconds,
            "decode_tokens_per_second": if generation.decode_seconds > 0.0 {
                decode_steps as f64 / generation.decode_seconds
            } else {
                0.0
            },
        });
        if args.logits {
            out["first_logits"] = serde_json::json!(generation.first_logits);
        }
        println!("{out}");
    } else {
        println!("{text}");
    }
    Ok(())
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
}
