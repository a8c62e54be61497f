//! `bench`: offline model speed on one model directory.
//!
//! Prefill of a 512-token prompt (best of 3 after a warm-up); decode at batch 1 at several cache
//! depths over the latent cache (absorbed attention) and, at the deepest, over a decompressed
//! per-head K/V cache; peak RSS; KV bytes per token; weight bytes read per decoded token against
//! a measured 2-thread memory read bandwidth. Cache rows below the measured depth are filled with
//! synthetic values: decode cost does not depend on them, and a 4000-token prefill would dominate
//! the run.
//!
//! `--batch-sizes 1,8,64` adds decode steps of that many sequences at once (each after
//! `--batch-depth` cached positions). `--random-weights --config FILE` benches a config with
//! random weights made in memory instead of a model directory (no checkpoint file, whatever the
//! model's size).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::Args;

use super::WeightDtype;
use crate::model::random::InMemoryRandomModel;
use crate::model::{
    CacheLayout, DeepSeekModel, LatentCache, LoadOptions, LogitsFor, ModelConfig, SequenceChunk,
};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model directory.
    #[arg(long, required_unless_present = "random_weights")]
    pub model: Option<PathBuf>,
    /// Bench the config of --config with random weights made in memory (no model directory).
    #[arg(long, conflicts_with = "model", requires = "config")]
    pub random_weights: bool,
    /// With --random-weights: a DeepSeek-V2/V3 config.json.
    #[arg(long, requires = "random_weights")]
    pub config: Option<PathBuf>,
    /// With --random-weights: seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage dtype of the weights.
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: usize,
    /// Timed prefills after an untimed warm-up one; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub prefill_repeats: usize,
    /// Cache depths at which decode is measured (clamped to the model context).
    #[arg(long, value_delimiter = ',', default_value = "128,2048,4000")]
    pub depths: Vec<usize>,
    /// Decode steps timed at each depth.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Batched decode: numbers of sequences decoding together, e.g. 1,8,64,256 (none by default).
    #[arg(long, value_delimiter = ',')]
    pub batch_sizes: Vec<usize>,
    /// Cached positions of every sequence in the batched decode.
    #[arg(long, default_value_t = 128)]
    pub batch_depth: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: super::DeviceArgs,
}

const BLOCK_SIZE: usize = 16;

/// Peak resident set size of this process in bytes (VmHWM), if the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Memory-read bandwidth in bytes/s: two threads summing halves of a 512 MiB array, best of 3.
pub fn read_bandwidth() -> f64 {
    let data: Vec<f32> = (0..(128 << 20)).map(|i| (i % 7) as f32).collect();
    let bytes = (data.len() * 4) as f64;
    let mut best = 0.0f64;
    for _ in 0..3 {
        let started = Instant::now();
        let sums: Vec<f32> = std::thread::scope(|s| {
            let handles: Vec<_> = data
                .chunks(data.len() / 2)
                .map(|half| {
                    s.spawn(move || {
                        let mut acc = [0f32; 16];
                        for chunk in half.chunks_exact(16) {
                            for k in 0..16 {
                                acc[k] += chunk[k];
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        std::hint::black_box(sums);
        best = best.max(bytes / started.elapsed().as_secs_f64());
    }
    best
}

fn tokens(config: &ModelConfig, n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + 13) % config.vocab_size) as u32)
        .collect()
}

/// Decode tokens/s at batch 1 after `depth` cached positions.
fn decode_rate(
    model: &DeepSeekModel,
    layout: CacheLayout,
    depth: usize,
    steps: usize,
) -> anyhow::Result<f64> {
    let config = model.config();
    let total = depth + steps;
    let blocks = total.div_ceil(BLOCK_SIZE);
    let mut cache =
        LatentCache::with_layout(config, blocks, BLOCK_SIZE, DType::F32, &Device::Cpu, layout)?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    cache.fill_synthetic(&table, depth, 7);
    let ids = tokens(config, steps);
    // One untimed step warms caches and thread pools.
    let warm = [ids[0]];
    model.forward(
        &[SequenceChunk {
            tokens: &warm,
            start_pos: depth,
            block_table: &table,
        }],
        &mut cache,
        LogitsFor::LastToken,
    )?;
    let started = Instant::now();
    for (i, id) in ids.iter().enumerate().skip(1) {
        model.forward(
            &[SequenceChunk {
                tokens: std::slice::from_ref(id),
                start_pos: depth + i,
                block_table: &table,
            }],
            &mut cache,
            LogitsFor::LastToken,
        )?;
    }
    Ok((steps - 1) as f64 / started.elapsed().as_secs_f64())
}

/// Batched decode: `batch` sequences, each after `depth` cached positions in its own blocks,
/// decode `steps` tokens together (the first step untimed). Returns (tokens/s, seconds per step).
fn batch_decode_rate(
    model: &DeepSeekModel,
    batch: usize,
    depth: usize,
    steps: usize,
) -> anyhow::Result<(f64, f64)> {
    let config = model.config();
    let per_sequence = (depth + steps).div_ceil(BLOCK_SIZE);
    let mut cache = LatentCache::new(
        config,
        batch * per_sequence,
        BLOCK_SIZE,
        DType::F32,
        &Device::Cpu,
    )?;
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| ((s * per_sequence) as u32..((s + 1) * per_sequence) as u32).collect())
        .collect();
    for (s, table) in tables.iter().enumerate() {
        cache.fill_synthetic(table, depth, 7 + s as u64);
    }
    let ids = tokens(config, batch * steps);
    let step = |cache: &mut LatentCache, i: usize| -> anyhow::Result<()> {
        let chunks: Vec<SequenceChunk> = tables
            .iter()
            .enumerate()
            .map(|(s, table)| SequenceChunk {
                tokens: std::slice::from_ref(&ids[i * batch + s]),
                start_pos: depth + i,
                block_table: table,
            })
            .collect();
        model.forward(&chunks, cache, LogitsFor::LastToken)?;
        Ok(())
    };
    step(&mut cache, 0)?;
    let started = Instant::now();
    for i in 1..steps {
        step(&mut cache, i)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let timed = (steps - 1) as f64;
    Ok((batch as f64 * timed / seconds, seconds / timed))
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    args.device.require_supported()?;
    let options = LoadOptions {
        dtype: args.dtype.candle(),
        ..LoadOptions::default()
    };
    let load_started = Instant::now();
    let (model, model_name, random_weights) = match (&args.model, &args.config) {
        (Some(dir), _) => {
            let model = DeepSeekModel::load(dir, &options)
                .with_context(|| format!("loading the model in {}", dir.display()))?;
            (model, dir.display().to_string(), serde_json::Value::Null)
        }
        (None, Some(config)) => {
            // Stored in the weight dtype when it is 16-bit, so the loader only copies.
            let storage = match options.dtype {
                DType::F16 | DType::BF16 => options.dtype,
                _ => DType::F32,
            };
            let random = InMemoryRandomModel::new(config, args.seed, storage)
                .with_context(|| format!("making random weights for {}", config.display()))?;
            let model = DeepSeekModel::load(random.dir(), &options)
                .with_context(|| format!("loading random weights for {}", config.display()))?;
            let info = serde_json::json!({
                "config": config.display().to_string(),
                "seed": args.seed,
                "storage_dtype": format!("{storage:?}").to_lowercase(),
                "bytes": random.weight_bytes(),
                "generate_seconds": random.generate_seconds(),
            });
            // Frees the in-memory checkpoint: the model holds its own copy now.
            drop(random);
            (model, format!("random:{}", config.display()), info)
        }
        (None, None) => anyhow::bail!("give --model DIR or --random-weights --config FILE"),
    };
    let load_seconds = load_started.elapsed().as_secs_f64();
    let config = model.config().clone();
    let context = config.max_position_embeddings;
    let steps = args.decode_tokens.max(2);

    let prefill_n = args.prefill_tokens.clamp(1, context);
    let blocks = prefill_n.div_ceil(BLOCK_SIZE);
    let mut cache = LatentCache::new(&config, blocks, BLOCK_SIZE, DType::F32, &Device::Cpu)?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let prompt = tokens(&config, prefill_n);
    // One untimed prefill first (first touches of the buffers, thread start-up), then the best
    // of `prefill_repeats`, as the peers measure: transformers_bench.py takes the best of 2
    // after a warm-up, llama-bench averages 5 after one.
    let mut prefill_runs = Vec::with_capacity(args.prefill_repeats);
    for repeat in 0..=args.prefill_repeats.max(1) {
        let started = Instant::now();
        model.forward(
            &[SequenceChunk {
                tokens: &prompt,
                start_pos: 0,
                block_table: &table,
            }],
            &mut cache,
            LogitsFor::LastToken,
        )?;
        if repeat > 0 {
            prefill_runs.push(prefill_n as f64 / started.elapsed().as_secs_f64());
        }
    }
    let prefill_rate = prefill_runs.iter().copied().fold(0.0, f64::max);
    tracing::info!(
        tokens = prefill_n,
        tokens_per_s = format!("{prefill_rate:.1}"),
        runs = ?prefill_runs,
        "prefill (best of the runs after a warm-up)"
    );

    let mut decode = Vec::new();
    for &depth in &args.depths {
        let depth = depth.min(context.saturating_sub(steps));
        let rate = decode_rate(&model, CacheLayout::Latent, depth, steps)?;
        tracing::info!(
            depth,
            tokens_per_s = format!("{rate:.1}"),
            "decode (absorbed, latent cache)"
        );
        decode.push(serde_json::json!({"depth": depth, "tokens_per_second": rate}));
    }
    let deepest = args
        .depths
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .min(context.saturating_sub(steps));
    let decompressed_rate = decode_rate(&model, CacheLayout::DecompressedHeads, deepest, steps)?;
    let absorbed_deepest = decode_rate(&model, CacheLayout::Latent, deepest, steps)?;
    tracing::info!(
        depth = deepest,
        absorbed = format!("{absorbed_deepest:.1}"),
        decompressed = format!("{decompressed_rate:.1}"),
        "decode at depth: absorbed vs decompressed per-head cache"
    );

    let mut batch_decode = Vec::new();
    let batch_depth = args.batch_depth.min(context.saturating_sub(steps));
    for &batch in &args.batch_sizes {
        let (rate, step_seconds) = batch_decode_rate(&model, batch.max(1), batch_depth, steps)?;
        tracing::info!(
            batch,
            depth = batch_depth,
            tokens_per_s = format!("{rate:.1}"),
            step_ms = format!("{:.2}", step_seconds * 1e3),
            "batched decode"
        );
        batch_decode.push(serde_json::json!({
            "batch": batch.max(1),
            "depth": batch_depth,
            "steps": steps - 1,
            "tokens_per_second": rate,
            "step_seconds": step_seconds,
        }));
    }

    let latent_bytes = LatentCache::new(&config, 1, 1, DType::F32, &Device::Cpu)?.bytes_per_token();
    let heads_bytes = LatentCache::with_layout(
        &config,
        1,
        1,
        DType::F32,
        &Device::Cpu,
        CacheLayout::DecompressedHeads,
    )?
    .bytes_per_token();
    let weight_bytes = model.weight_bytes_per_decode_token();
    let bandwidth = read_bandwidth();
    let batch1_rate = decode
        .first()
        .and_then(|d| d["tokens_per_second"].as_f64())
        .unwrap_or(0.0);
    let bandwidth_fraction = weight_bytes as f64 * batch1_rate / bandwidth;
    let report = serde_json::json!({
        "model": model_name,
        "dtype": format!("{:?}", args.dtype).to_lowercase(),
        "threads": rayon::current_num_threads(),
        "load_seconds": load_seconds,
        "prefill": {
            "tokens": prefill_n,
            "tokens_per_second": prefill_rate,
            "runs_tokens_per_second": prefill_runs,
        },
        "decode": decode,
        "decode_at_depth": {
            "depth": deepest,
            "absorbed_tokens_per_second": absorbed_deepest,
            "decompressed_tokens_per_second": decompressed_rate,
            "speedup": absorbed_deepest / decompressed_rate,
        },
        "kv_bytes_per_token": {
            "latent_f32": latent_bytes,
            "decompressed_f32": heads_bytes,
            "ratio": heads_bytes as f64 / latent_bytes as f64,
        },
        "weight_bytes_per_decode_token": weight_bytes,
        "read_bandwidth_bytes_per_second": bandwidth,
        "bandwidth_fraction_at_first_depth": bandwidth_fraction,
        "peak_rss_bytes": peak_rss_bytes(),
        "batch_decode": batch_decode,
        "random_weights": random_weights,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
