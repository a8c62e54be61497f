//! The DeepSeek-V2/V3 decoder: embedding -> layers (RMSNorm, MLA, RMSNorm, dense MLP or MoE) ->
//! final norm -> lm_head, batched over many sequences' prefill chunks and decode tokens.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use latentserve_kernels::Linear;

use super::ModelError;
use super::cache::{CacheLayout, LatentCache};
use super::config::{ModelConfig, TopkMethod};
use super::loader::{LoadOptions, WeightStore};
use super::mla::{ChunkSpan, MlaAttention, MlaWeights};
use super::moe::{DispatchPlan, ExpertExecutor, LocalExperts, Mlp, route};
use super::ops::{linear, project, rms_norm_rows};
use super::rope::Rope;

/// One sequence's share of a batched step: a prefill chunk or a single decode token.
#[derive(Debug, Clone, Copy)]
pub struct SequenceChunk<'a> {
    /// New tokens to run.
    pub tokens: &'a [u32],
    /// Position of tokens[0]. The cache already holds this sequence's positions [0, start_pos).
    pub start_pos: usize,
    /// Cache block ids of this sequence, in order; covers start_pos + tokens.len() positions.
    /// Blocks may be shared with other sequences (prefix caching) for positions < start_pos only.
    pub block_table: &'a [u32],
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// The last token of each chunk: (chunks, vocab).
    LastToken,
    /// Every token: (sum of chunk lengths, vocab), chunk order then token order.
    AllTokens,
}

/// The router of one MoE layer.
#[derive(Debug)]
struct Router {
    /// (n_routed_experts, hidden), always f32 like the reference.
    weight: Linear,
    correction_bias: Option<Vec<f32>>,
}

#[derive(Debug)]
enum FeedForward {
    Dense(Mlp),
    Moe { router: Router, shared: Option<Mlp> },
}

#[derive(Debug)]
struct DecoderLayer {
    input_norm: Vec<f32>,
    attention: MlaAttention,
    post_attention_norm: Vec<f32>,
    feed_forward: FeedForward,
}

/// A loaded DeepSeek-V2/V3 model.
#[derive(Debug)]
pub struct DeepSeekModel {
    config: ModelConfig,
    dtype: DType,
    /// (vocab, hidden) in the storage dtype.
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    experts: LocalExperts,
    final_norm: Vec<f32>,
    /// (vocab, hidden)
    lm_head: Linear,
    rope: Rope,
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn expert_of(name: &str) -> Option<usize> {
    let (_, rest) = name.split_once(".mlp.experts.")?;
    rest.split('.').next()?.parse().ok()
}

/// Loads tensors of one layer with names relative to `model.layers.{layer}.`.
struct LayerLoader<'a> {
    store: &'a WeightStore,
    prefix: String,
    dtype: DType,
}

impl LayerLoader<'_> {
    fn name(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }
    fn matrix(&self, rel: &str, out: usize, input: usize) -> Result<Tensor, ModelError> {
        self.store.load(&self.name(rel), &[out, input], self.dtype)
    }
    fn vector(&self, rel: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        self.store.load_vec(&self.name(rel), len)
    }
    /// A SwiGLU MLP stored as `{rel}.gate_proj/up_proj/down_proj.weight`.
    fn mlp(&self, rel: &str, hidden: usize, width: usize) -> Result<Mlp, ModelError> {
        let gate = self.matrix(&format!("{rel}.gate_proj.weight"), width, hidden)?;
        let up = self.matrix(&format!("{rel}.up_proj.weight"), width, hidden)?;
        let down = self.matrix(&format!("{rel}.down_proj.weight"), hidden, width)?;
        Ok(Mlp::new(
            linear(&Tensor::cat(&[&gate, &up], 0)?, self.dtype)?,
            linear(&down, self.dtype)?,
        ))
    }
}

impl DeepSeekModel {
    /// Loads `config.json` and the safetensors weights from `dir`.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self, ModelError> {
        if !matches!(options.dtype, DType::F32 | DType::F16) {
            return Err(ModelError::Input(format!(
                "unsupported weight dtype {:?} (f32 or f16)",
                options.dtype
            )));
        }
        let started = Instant::now();
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open(dir)?;
        let n_layers = config.num_hidden_layers;
        store.plan(|name| {
            let layer_ok = layer_of(name).is_none_or(|l| l < n_layers);
            let expert_ok = match (layer_of(name), expert_of(name)) {
                (Some(l), Some(e)) => options.loads_expert(l, e),
                _ => true,
            };
            layer_ok && expert_ok
        });
        let dtype = options.dtype;
        let (hidden, vocab) = (config.hidden_size, config.vocab_size);
        let embed_tokens = store.load("model.embed_tokens.weight", &[vocab, hidden], dtype)?;
        let lm_head = if config.tie_word_embeddings && !store.contains("lm_head.weight") {
            linear(&embed_tokens, dtype)?
        } else {
            linear(
                &store.load("lm_head.weight", &[vocab, hidden], dtype)?,
                dtype,
            )?
        };
        let final_norm = store.load_vec("model.norm.weight", hidden)?;

        let mut layers = Vec::with_capacity(n_layers);
        let mut experts = LocalExperts::default();
        for layer in 0..n_layers {
            let loader = LayerLoader {
                store: &store,
                prefix: format!("model.layers.{layer}."),
                dtype,
            };
            layers.push(Self::load_layer(&config, &loader)?);
            experts
                .layers
                .push(Self::load_experts(&config, &loader, layer, options)?);
        }
        store.finish();
        tracing::info!(
            dir = %dir.display(),
            layers = n_layers,
            dtype = ?dtype,
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "model ready"
        );
        Ok(Self {
            rope: Rope::new(&config),
            config,
            dtype,
            embed_tokens,
            layers,
            experts,
            final_norm,
            lm_head,
        })
    }

    fn load_layer(config: &ModelConfig, l: &LayerLoader) -> Result<DecoderLayer, ModelError> {
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        let qk = config.qk_head_dim();
        let kv_a_out = config.kv_lora_rank + config.qk_rope_head_dim;
        let kv_a = l.matrix("self_attn.kv_a_proj_with_mqa.weight", kv_a_out, hidden)?;
        let (q_in, q_a_norm, q_b_proj) = match config.q_lora_rank {
            Some(rank) => (
                l.matrix("self_attn.q_a_proj.weight", rank, hidden)?,
                Some(l.vector("self_attn.q_a_layernorm.weight", rank)?),
                Some(linear(
                    &l.matrix("self_attn.q_b_proj.weight", heads * qk, rank)?,
                    l.dtype,
                )?),
            ),
            None => (
                l.matrix("self_attn.q_proj.weight", heads * qk, hidden)?,
                None,
                None,
            ),
        };
        let kv_b = l.matrix(
            "self_attn.kv_b_proj.weight",
            heads * (config.qk_nope_head_dim + config.v_head_dim),
            config.kv_lora_rank,
        )?;
        let attention = MlaAttention::new(
            config,
            MlaWeights {
                input_proj: linear(&Tensor::cat(&[&q_in, &kv_a], 0)?, l.dtype)?,
                q_a_norm,
                q_b_proj,
                kv_a_norm: l.vector("self_attn.kv_a_layernorm.weight", config.kv_lora_rank)?,
                kv_b_f32: kv_b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                kv_b_proj: linear(&kv_b, l.dtype)?,
                o_proj: linear(
                    &l.matrix("self_attn.o_proj.weight", hidden, heads * config.v_head_dim)?,
                    l.dtype,
                )?,
            },
        )?;
        let layer = layer_index(&l.prefix);
        let feed_forward = match config.moe {
            Some(moe) if config.is_moe_layer(layer) => {
                let router_weight = l.store.load(
                    &l.name("mlp.gate.weight"),
                    &[moe.n_routed_experts, hidden],
                    DType::F32,
                )?;
                let correction_bias = if moe.topk_method == TopkMethod::NoauxTc {
                    Some(l.vector("mlp.gate.e_score_correction_bias", moe.n_routed_experts)?)
                } else {
                    None
                };
                let shared = if moe.n_shared_experts > 0 {
                    Some(l.mlp(
                        "mlp.shared_experts",
                        hidden,
                        moe.moe_intermediate_size * moe.n_shared_experts,
                    )?)
                } else {
                    None
                };
                FeedForward::Moe {
                    router: Router {
                        weight: linear(&router_weight, DType::F32)?,
                        correction_bias,
                    },
                    shared,
                }
            }
            _ => FeedForward::Dense(l.mlp("mlp", hidden, config.intermediate_size)?),
        };
        Ok(DecoderLayer {
            input_norm: l.vector("input_layernorm.weight", hidden)?,
            attention,
            post_attention_norm: l.vector("post_attention_layernorm.weight", hidden)?,
            feed_forward,
        })
    }

    /// The routed experts of one layer that `options` selects; per-expert tensors
    /// (`mlp.experts.{e}.gate_proj.weight`, hub style) or stacked ones (`mlp.experts.gate_up_proj`
    /// (experts, 2 * width, hidden) and `mlp.experts.down_proj` (experts, hidden, width)).
    fn load_experts(
        config: &ModelConfig,
        l: &LayerLoader,
        layer: usize,
        options: &LoadOptions,
    ) -> Result<Vec<Option<Mlp>>, ModelError> {
        let Some(moe) = config.moe.filter(|_| config.is_moe_layer(layer)) else {
            return Ok(Vec::new());
        };
        let (hidden, width) = (config.hidden_size, moe.moe_intermediate_size);
        let stacked = l.store.contains(&l.name("mlp.experts.gate_up_proj"));
        (0..moe.n_routed_experts)
            .map(|e| {
                if !options.loads_expert(layer, e) {
                    return Ok(None);
                }
                if stacked {
                    let gate_up = l.store.load_slice(
                        &l.name("mlp.experts.gate_up_proj"),
                        e,
                        &[moe.n_routed_experts, 2 * width, hidden],
                        l.dtype,
                    )?;
                    let down = l.store.load_slice(
                        &l.name("mlp.experts.down_proj"),
                        e,
                        &[moe.n_routed_experts, hidden, width],
                        l.dtype,
                    )?;
                    Ok(Some(Mlp::new(
                        linear(&gate_up, l.dtype)?,
                        linear(&down, l.dtype)?,
                    )))
                } else {
                    Ok(Some(l.mlp(&format!("mlp.experts.{e}"), hidden, width)?))
                }
            })
            .collect()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Storage dtype of the projection weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The routed experts held by this worker.
    pub fn local_experts(&self) -> &LocalExperts {
        &self.experts
    }

    /// Weight bytes one decoded token reads at batch 1: attention and dense/shared MLPs of every
    /// layer, the router and `num_experts_per_tok` routed experts of each MoE layer, and lm_head.
    pub fn weight_bytes_per_decode_token(&self) -> usize {
        let hidden = self.config.hidden_size;
        let mut bytes = self.lm_head.weight_bytes() + hidden * self.dtype.size_in_bytes();
        for (index, layer) in self.layers.iter().enumerate() {
            bytes += layer.attention.decode_weight_bytes();
            match &layer.feed_forward {
                FeedForward::Dense(mlp) => bytes += mlp.weight_bytes(),
                FeedForward::Moe { router, shared } => {
                    bytes += router.weight.weight_bytes();
                    bytes += shared.as_ref().map_or(0, Mlp::weight_bytes);
                    let k = self.config.moe.map_or(0, |m| m.num_experts_per_tok);
                    let expert = self.experts.layers[index]
                        .iter()
                        .flatten()
                        .next()
                        .map_or(0, Mlp::weight_bytes);
                    bytes += k * expert;
                }
            }
        }
        bytes
    }

    /// Runs a batched step with this worker's own experts. Returns f32 logits: (chunks, vocab)
    /// for `LastToken`, or (sum of tokens, vocab) for `AllTokens`.
    pub fn forward(
        &self,
        chunks: &[SequenceChunk],
        cache: &mut LatentCache,
        logits: LogitsFor,
    ) -> Result<Tensor, ModelError> {
        self.forward_with_experts(chunks, cache, logits, &self.experts)
    }

    /// Like [`forward`](Self::forward), with routed experts run by `experts` (e.g. an executor
    /// that sends the parts of each dispatch plan held elsewhere to other workers).
    pub fn forward_with_experts(
        &self,
        chunks: &[SequenceChunk],
        cache: &mut LatentCache,
        logits: LogitsFor,
        experts: &dyn ExpertExecutor,
    ) -> Result<Tensor, ModelError> {
        let spans = self.validate(chunks, cache)?;
        let hidden_size = self.config.hidden_size;
        let rows: usize = chunks.iter().map(|c| c.tokens.len()).sum();

        // (rows, hidden)
        let ids: Vec<u32> = chunks
            .iter()
            .flat_map(|c| c.tokens.iter().copied())
            .collect();
        let ids = Tensor::from_vec(ids, rows, &Device::Cpu)?;
        let mut hidden = self
            .embed_tokens
            .index_select(&ids, 0)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let table = self.rope.table(
            chunks
                .iter()
                .flat_map(|c| c.start_pos..c.start_pos + c.tokens.len()),
        );

        for (index, layer) in self.layers.iter().enumerate() {
            let mut x = hidden.clone();
            rms_norm_rows(&mut x, &layer.input_norm, self.config.rms_norm_eps);
            let attn = layer
                .attention
                .forward(&x, rows, &spans, &table, cache, index)?;
            hidden.iter_mut().zip(&attn).for_each(|(h, a)| *h += a);

            let mut x = hidden.clone();
            rms_norm_rows(&mut x, &layer.post_attention_norm, self.config.rms_norm_eps);
            let ff = match &layer.feed_forward {
                FeedForward::Dense(mlp) => mlp.forward(&x, rows)?,
                FeedForward::Moe { router, shared } => {
                    self.moe(index, router, shared.as_ref(), &x, rows, experts)?
                }
            };
            hidden.iter_mut().zip(&ff).for_each(|(h, f)| *h += f);
        }

        // Only the rows that get logits go through the final norm and lm_head.
        let mut selected: Vec<f32> = match logits {
            LogitsFor::AllTokens => hidden,
            LogitsFor::LastToken => spans
                .iter()
                .flat_map(|s| {
                    let last = s.first_row + s.len - 1;
                    hidden[last * hidden_size..(last + 1) * hidden_size]
                        .iter()
                        .copied()
                })
                .collect(),
        };
        let out_rows = selected.len() / hidden_size;
        rms_norm_rows(&mut selected, &self.final_norm, self.config.rms_norm_eps);
        let logits = project(&self.lm_head, &selected, out_rows)?;
        Ok(Tensor::from_vec(
            logits,
            (out_rows, self.config.vocab_size),
            &Device::Cpu,
        )?)
    }

    /// route -> dispatch plan -> experts -> combine, plus the shared experts.
    /// x: (rows, hidden) -> (rows, hidden)
    fn moe(
        &self,
        layer: usize,
        router: &Router,
        shared: Option<&Mlp>,
        x: &[f32],
        rows: usize,
        experts: &dyn ExpertExecutor,
    ) -> Result<Vec<f32>, ModelError> {
        let Some(moe) = self.config.moe else {
            return Err(ModelError::Config("MoE layer without MoE config".into()));
        };
        // (rows, n_routed_experts)
        let router_logits = project(&router.weight, x, rows)?;
        let routing = route(&router_logits, router.correction_bias.as_deref(), &moe);
        let plan = DispatchPlan::from_routing(&routing, moe.n_routed_experts);
        let mut out = experts.run_experts(layer, x, self.config.hidden_size, &plan)?;
        if out.len() != x.len() {
            return Err(ModelError::Experts(format!(
                "executor returned {} values for {} rows of {}",
                out.len(),
                rows,
                self.config.hidden_size
            )));
        }
        if let Some(shared) = shared {
            let s = shared.forward(x, rows)?;
            out.iter_mut().zip(&s).for_each(|(o, s)| *o += s);
        }
        Ok(out)
    }

    fn validate<'a>(
        &self,
        chunks: &[SequenceChunk<'a>],
        cache: &LatentCache,
    ) -> Result<Vec<ChunkSpan<'a>>, ModelError> {
        if chunks.is_empty() {
            return Err(ModelError::Input("no chunks to run".into()));
        }
        let c = &self.config;
        let expected_width = match cache.layout() {
            CacheLayout::Latent => c.latent_dim(),
            CacheLayout::DecompressedHeads => {
                c.num_attention_heads * (c.qk_head_dim() + c.v_head_dim)
            }
        };
        if cache.row_width() != expected_width {
            return Err(ModelError::Input(format!(
                "cache rows hold {} values, this model needs {expected_width}",
                cache.row_width()
            )));
        }
        let mut spans = Vec::with_capacity(chunks.len());
        let mut first_row = 0;
        for (i, chunk) in chunks.iter().enumerate() {
            if chunk.tokens.is_empty() {
                return Err(ModelError::Input(format!("chunk {i} has no tokens")));
            }
            if let Some(&bad) = chunk.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ModelError::Input(format!(
                    "token id {bad} out of range (vocab_size {})",
                    c.vocab_size
                )));
            }
            let end = chunk.start_pos + chunk.tokens.len();
            if end > c.max_position_embeddings {
                return Err(ModelError::Input(format!(
                    "sequence of {end} tokens exceeds the model context of {} \
                     (max_position_embeddings)",
                    c.max_position_embeddings
                )));
            }
            cache.check_block_table(chunk.block_table, end)?;
            spans.push(ChunkSpan {
                first_row,
                len: chunk.tokens.len(),
                start_pos: chunk.start_pos,
                block_table: chunk.block_table,
            });
            first_row += chunk.tokens.len();
        }
        Ok(spans)
    }
}

fn layer_index(prefix: &str) -> usize {
    layer_of(prefix).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_parse_layer_and_expert() {
        assert_eq!(
            layer_of("model.layers.12.mlp.experts.7.up_proj.weight"),
            Some(12)
        );
        assert_eq!(
            expert_of("model.layers.12.mlp.experts.7.up_proj.weight"),
            Some(7)
        );
        assert_eq!(
            expert_of("model.layers.1.mlp.shared_experts.up_proj.weight"),
            None
        );
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
    }
}
