//! `init-random --config FILE --out DIR [--seed N] [--dtype f32|f16]`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::WeightDtype;
use crate::model::random::{RandomDtype, init_random};

#[derive(Debug, Args)]
pub struct InitRandomArgs {
    /// A DeepSeek-V2/V3 config.json.
    #[arg(long)]
    pub config: PathBuf,
    /// Output model directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage dtype of the written weights.
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
}

pub fn run(args: &InitRandomArgs) -> anyhow::Result<()> {
    let dtype = match args.dtype {
        WeightDtype::F32 => RandomDtype::F32,
        WeightDtype::F16 => RandomDtype::F16,
    };
    let bytes = init_random(&args.config, &args.out, args.seed, dtype).with_context(|| {
        format!(
            "writing a random model for {} into {}",
            args.config.display(),
            args.out.display()
        )
    })?;
    tracing::info!(out = %args.out.display(), mib = bytes >> 20, "random model written");
    Ok(())
}
