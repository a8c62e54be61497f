//! `generate`: one generation from a prompt, without a server.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use super::WeightDtype;
use super::model_dir::resolve_model_dir;
use crate::model::generate::generate_ids;
use crate::model::{DeepSeekModel, LoadOptions, Tokenizer};

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
    pub device: super::DeviceArgs,
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
