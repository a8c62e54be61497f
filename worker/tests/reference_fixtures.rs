//! The model core against Hugging Face transformers' outputs for the tiny fixtures in
//! `tests/fixtures/` (see its README): logits at every prompt position, greedy tokens, the cached
//! absorbed decode, f16 weights, batching, chunked prefill and split expert execution.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use latentserve_worker::model::generate::generate_ids;
use latentserve_worker::model::{
    CacheLayout, DeepSeekModel, DispatchPlan, ExpertExecutor, LatentCache, LoadOptions, LogitsFor,
    ModelError, SequenceChunk, Tokenizer,
};

const FIXTURES: [&str; 5] = [
    "v3-tiny-f32",
    "v3-neox-bf16-sharded",
    "v3-fp8",
    "v2-lite-f16",
    "v2-group-limited-bf16",
];

/// Maximum |ours - transformers| allowed on any logit with f32 weights.
const F32_TOLERANCE: f32 = 1e-4;
/// Maximum |ours - transformers| allowed on any logit with weights stored in f16 (the reference
/// runs the stored weights in f32; f16 storage rounds them to 11 significant bits).
const F16_TOLERANCE: f32 = 2e-2;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Reference {
    prompt_text: String,
    prompt_ids: Vec<u32>,
    /// (prompt, vocab)
    logits: Vec<Vec<f32>>,
    greedy_ids: Vec<u32>,
    /// (20, vocab)
    greedy_logits: Vec<Vec<f32>>,
}

fn reference(name: &str) -> Reference {
    let path = fixture_dir(name).join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let matrix = |key: &str| -> Vec<Vec<f32>> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect()
    };
    Reference {
        prompt_text: v["prompt_text"].as_str().unwrap().to_string(),
        prompt_ids: ids("prompt_ids"),
        logits: matrix("logits"),
        greedy_ids: ids("greedy_ids"),
        greedy_logits: matrix("greedy_logits"),
    }
}

fn load(name: &str, dtype: DType) -> DeepSeekModel {
    let options = LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    DeepSeekModel::load(&fixture_dir(name), &options).unwrap_or_else(|err| panic!("{name}: {err}"))
}

fn cache_for(model: &DeepSeekModel, tokens: usize) -> (LatentCache, Vec<u32>) {
    let block_size = 16;
    let blocks = tokens.div_ceil(block_size);
    let cache =
        LatentCache::new(model.config(), blocks, block_size, DType::F32, &Device::Cpu).unwrap();
    (cache, (0..blocks as u32).collect())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits of every position of `tokens` from one prefill.
fn full_forward(model: &DeepSeekModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let (mut cache, table) = cache_for(model, tokens.len());
    let logits = model
        .forward(
            &[SequenceChunk {
                tokens,
                start_pos: 0,
                block_table: &table,
            }],
            &mut cache,
            LogitsFor::AllTokens,
        )
        .unwrap();
    logits.to_vec2::<f32>().unwrap()
}

#[test]
fn prompt_logits_match_transformers_at_every_position() {
    for name in FIXTURES {
        let r = reference(name);
        let model = load(name, DType::F32);
        let ours = full_forward(&model, &r.prompt_ids);
        assert_eq!(ours.len(), r.logits.len());
        for (pos, (a, b)) in ours.iter().zip(&r.logits).enumerate() {
            let diff = max_abs_diff(a, b);
            assert!(
                diff < F32_TOLERANCE,
                "{name}: position {pos}: max diff {diff}"
            );
        }
    }
}

#[test]
fn cached_absorbed_decode_matches_transformers_and_full_forward() {
    for name in FIXTURES {
        let r = reference(name);
        let model = load(name, DType::F32);
        let generation =
            generate_ids(&model, &r.prompt_ids, r.greedy_ids.len(), 0.0, 0, &[]).unwrap();
        assert_eq!(
            generation.generated_ids, r.greedy_ids,
            "{name}: greedy tokens"
        );

        // Step by step: the absorbed decode over the latent cache against transformers' logits and
        // against our own decompressed full-sequence forward of the same tokens.
        let mut all: Vec<u32> = r.prompt_ids.clone();
        all.extend(&r.greedy_ids[..r.greedy_ids.len() - 1]);
        let full = full_forward(&model, &all);
        let step_logits = decode_step_logits(&model, &r, CacheLayout::Latent);
        for (k, ours) in step_logits.iter().enumerate() {
            let vs_reference = max_abs_diff(ours, &r.greedy_logits[k]);
            assert!(
                vs_reference < F32_TOLERANCE,
                "{name}: step {k}: {vs_reference} vs transformers"
            );
            let vs_full = max_abs_diff(ours, &full[r.prompt_ids.len() - 1 + k]);
            assert!(
                vs_full < F32_TOLERANCE,
                "{name}: step {k}: {vs_full} vs full forward"
            );
        }
    }
}

/// The logits of each greedy step: a prefill of the prompt, then the reference's greedy tokens
/// decoded one by one over a cache of `layout`.
fn decode_step_logits(model: &DeepSeekModel, r: &Reference, layout: CacheLayout) -> Vec<Vec<f32>> {
    let steps = &r.greedy_ids[..r.greedy_ids.len() - 1];
    let block_size = 16;
    let blocks = (r.prompt_ids.len() + steps.len()).div_ceil(block_size);
    let mut cache = LatentCache::with_layout(
        model.config(),
        blocks,
        block_size,
        DType::F32,
        &Device::Cpu,
        layout,
    )
    .unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut run = |tokens: &[u32], start_pos: usize| {
        model
            .forward(
                &[SequenceChunk {
                    tokens,
                    start_pos,
                    block_table: &table,
                }],
                &mut cache,
                LogitsFor::LastToken,
            )
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .remove(0)
    };
    let mut logits = vec![run(&r.prompt_ids, 0)];
    for (i, &token) in steps.iter().enumerate() {
        logits.push(run(&[token], r.prompt_ids.len() + i));
    }
    logits
}

#[test]
fn decode_over_a_decompressed_cache_matches_transformers() {
    // The per-head K/V layout is kept only to measure what the latent cache saves; it must still
    // compute the same model.
    for name in FIXTURES {
        let r = reference(name);
        let model = load(name, DType::F32);
        let steps = decode_step_logits(&model, &r, CacheLayout::DecompressedHeads);
        for (k, ours) in steps.iter().enumerate() {
            let diff = max_abs_diff(ours, &r.greedy_logits[k]);
            assert!(diff < F32_TOLERANCE, "{name}: step {k}: {diff}");
        }
    }
}

#[test]
fn f16_weights_stay_within_tolerance_and_keep_greedy_tokens() {
    for name in FIXTURES {
        let r = reference(name);
        let model = load(name, DType::F16);
        let ours = full_forward(&model, &r.prompt_ids);
        let worst = ours
            .iter()
            .zip(&r.logits)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0.0, f32::max);
        assert!(worst < F16_TOLERANCE, "{name}: f16 max diff {worst}");
        let generation =
            generate_ids(&model, &r.prompt_ids, r.greedy_ids.len(), 0.0, 0, &[]).unwrap();
        assert_eq!(
            generation.generated_ids, r.greedy_ids,
            "{name}: f16 greedy tokens"
        );
    }
}

#[test]
fn batched_forward_of_mixed_chunks_equals_each_alone() {
    let name = "v3-tiny-f32";
    let r = reference(name);
    let model = load(name, DType::F32);
    let p = &r.prompt_ids;
    // Sequence A: a 40-token prefill. Sequence B: a 30-token prompt already cached, then one
    // decode token. Sequence C: 20 tokens cached, then a 10-token prefill chunk (chunked prefill).
    let block_size = 16;
    let mut cache =
        LatentCache::new(model.config(), 12, block_size, DType::F32, &Device::Cpu).unwrap();
    let table_a: Vec<u32> = vec![0, 1, 2];
    let table_b: Vec<u32> = vec![5, 4];
    let table_c: Vec<u32> = vec![8, 9];
    for (table, tokens) in [(&table_b, &p[..30]), (&table_c, &p[..20])] {
        model
            .forward(
                &[SequenceChunk {
                    tokens,
                    start_pos: 0,
                    block_table: table,
                }],
                &mut cache,
                LogitsFor::LastToken,
            )
            .unwrap();
    }
    let batched = model
        .forward(
            &[
                SequenceChunk {
                    tokens: &p[..40],
                    start_pos: 0,
                    block_table: &table_a,
                },
                SequenceChunk {
                    tokens: &p[30..31],
                    start_pos: 30,
                    block_table: &table_b,
                },
                SequenceChunk {
                    tokens: &p[20..30],
                    start_pos: 20,
                    block_table: &table_c,
                },
            ],
            &mut cache,
            LogitsFor::AllTokens,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(batched.len(), 40 + 1 + 10);
    // Each row against transformers' logits at the same position of the same prompt.
    let expected: Vec<&Vec<f32>> = (0..40)
        .chain(30..31)
        .chain(20..30)
        .map(|pos| &r.logits[pos])
        .collect();
    for (row, (ours, theirs)) in batched.iter().zip(expected).enumerate() {
        let diff = max_abs_diff(ours, theirs);
        assert!(diff < F32_TOLERANCE, "row {row}: {diff}");
    }
}

/// Runs each half of a plan on a different worker's experts and adds the results, as expert
/// sharding does.
struct SplitExperts<'a> {
    even: &'a DeepSeekModel,
    odd: &'a DeepSeekModel,
}

impl ExpertExecutor for SplitExperts<'_> {
    fn run_experts(
        &self,
        layer: usize,
        hidden: &[f32],
        hidden_size: usize,
        plan: &DispatchPlan,
    ) -> Result<Vec<f32>, ModelError> {
        let even = plan.select(|e| e % 2 == 0);
        let odd = plan.select(|e| e % 2 == 1);
        let mut out = self
            .even
            .local_experts()
            .run_experts(layer, hidden, hidden_size, &even)?;
        let other = self
            .odd
            .local_experts()
            .run_experts(layer, hidden, hidden_size, &odd)?;
        out.iter_mut().zip(other).for_each(|(a, b)| *a += b);
        Ok(out)
    }
}

#[test]
fn experts_split_across_workers_give_the_same_logits() {
    let name = "v3-tiny-f32";
    let r = reference(name);
    let shard = |parity: usize| {
        let options = LoadOptions {
            dtype: DType::F32,
            expert_filter: Some(Arc::new(move |_layer, expert| expert % 2 == parity)),
        };
        DeepSeekModel::load(&fixture_dir(name), &options).unwrap()
    };
    let (even, odd) = (shard(0), shard(1));
    assert!(even.local_experts().holds(1, 0) && !even.local_experts().holds(1, 1));

    let (mut cache, table) = cache_for(&even, r.prompt_ids.len());
    let chunk = [SequenceChunk {
        tokens: &r.prompt_ids,
        start_pos: 0,
        block_table: &table,
    }];
    // Alone, a shard cannot run tokens routed to experts it does not hold.
    let err = even
        .forward(&chunk, &mut cache, LogitsFor::AllTokens)
        .unwrap_err();
    assert!(matches!(err, ModelError::ExpertNotLoaded { .. }), "{err}");

    let split = SplitExperts {
        even: &even,
        odd: &odd,
    };
    let logits = even
        .forward_with_experts(&chunk, &mut cache, LogitsFor::AllTokens, &split)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (pos, (a, b)) in logits.iter().zip(&r.logits).enumerate() {
        let diff = max_abs_diff(a, b);
        assert!(diff < F32_TOLERANCE, "position {pos}: {diff}");
    }
}

#[test]
fn tokenizer_reproduces_prompt_ids_and_eos() {
    for name in FIXTURES {
        let r = reference(name);
        let model = load(name, DType::F32);
        let tokenizer = Tokenizer::load(&fixture_dir(name), model.config()).unwrap();
        assert_eq!(
            tokenizer.encode(&r.prompt_text, true).unwrap(),
            r.prompt_ids,
            "{name}"
        );
        assert!(tokenizer.eos_ids().contains(&1), "{name}");
        assert_eq!(tokenizer.bos_id(), Some(0));
    }
}

#[test]
fn forward_rejects_bad_chunks_with_clear_errors() {
    let model = load("v3-tiny-f32", DType::F32);
    let context = model.config().max_position_embeddings;
    let (mut cache, table) = cache_for(&model, 32);
    let run = |cache: &mut LatentCache, tokens: &[u32], start_pos: usize, table: &[u32]| {
        model
            .forward(
                &[SequenceChunk {
                    tokens,
                    start_pos,
                    block_table: table,
                }],
                cache,
                LogitsFor::LastToken,
            )
            .unwrap_err()
            .to_string()
    };
    assert!(run(&mut cache, &[100_000], 0, &table).contains("token id 100000 out of range"));
    assert!(run(&mut cache, &[1; 40], 0, &table).contains("block table has 2 blocks"));
    assert!(run(&mut cache, &[1], context, &table).contains("exceeds the model context"));
    assert!(run(&mut cache, &[], 0, &table).contains("no tokens"));
}
