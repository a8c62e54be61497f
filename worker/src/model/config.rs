//! `config.json` of DeepSeek-V2 / V3 checkpoints, in the hub style (`rope_scaling` + `rope_theta`)
//! and the transformers-5 style (`rope_parameters`), validated into one [`ModelConfig`].
//!
//! Parsing goes through a permissive raw struct first so that an unsupported value can be
//! reported with its key and value instead of a generic serde message.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::ModelError;

/// Which architecture family a checkpoint belongs to (`model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    DeepseekV2,
    DeepseekV3,
}

/// How router logits become scores (`scoring_func`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

/// How the top-k experts are chosen from the scores (`topk_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Plain top-k over all experts (V2).
    Greedy,
    /// Keep the `topk_group` groups with the highest max score, then top-k inside them (V2).
    GroupLimitedGreedy,
    /// Bias-corrected scores pick the groups (sum of each group's top 2) and the experts; the
    /// uncorrected scores weight them (V3).
    NoauxTc,
}

/// YaRN parameters (`rope_scaling` / `rope_parameters` with type `yarn`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// Rotary embedding of the `qk_rope_head_dim` slice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub yarn: Option<YarnScaling>,
    /// Rotate interleaved pairs (x[2i], x[2i+1]) (DeepSeek's layout) instead of the two halves
    /// (NeoX layout).
    pub interleave: bool,
}

/// Routed + shared experts of the MoE layers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_shared_experts: usize,
    pub moe_intermediate_size: usize,
    pub scoring_func: ScoringFunc,
    pub topk_method: TopkMethod,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
}

/// A validated DeepSeek-V2/V3 configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// `None` for a model without routed experts (every layer dense).
    pub moe: Option<MoeConfig>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// config.json as written by the hub and by transformers; every key optional here so that
/// validation can name what is missing.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    n_shared_experts: Option<usize>,
    n_routed_experts: Option<usize>,
    routed_scaling_factor: Option<f64>,
    topk_method: Option<String>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_layer_freq: Option<usize>,
    first_k_dense_replace: Option<usize>,
    norm_topk_prob: Option<bool>,
    scoring_func: Option<String>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    rope_interleave: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
}

impl RawConfig {
    /// The size keys with their upper bounds: far above every published DeepSeek model (V3: 61
    /// layers, hidden 7168, 256 routed experts, vocabulary 129280, context 163840), yet low
    /// enough that nothing sized from them exhausts memory before the weights are checked. A
    /// config that asks for a billion layers is refused by name instead of aborting in an
    /// allocation.
    fn size_keys(&self) -> [(&'static str, Option<usize>, usize); 20] {
        [
            ("vocab_size", self.vocab_size, 1 << 21),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("moe_intermediate_size", self.moe_intermediate_size, 1 << 18),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 10),
            ("num_attention_heads", self.num_attention_heads, 1 << 10),
            ("num_key_value_heads", self.num_key_value_heads, 1 << 10),
            ("n_shared_experts", self.n_shared_experts, 1 << 6),
            ("n_routed_experts", self.n_routed_experts, 1 << 12),
            ("n_group", self.n_group, 1 << 12),
            ("topk_group", self.topk_group, 1 << 12),
            ("num_experts_per_tok", self.num_experts_per_tok, 1 << 12),
            ("moe_layer_freq", self.moe_layer_freq, 1 << 10),
            ("first_k_dense_replace", self.first_k_dense_replace, 1 << 10),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 24,
            ),
            ("q_lora_rank", self.q_lora_rank, 1 << 16),
            ("kv_lora_rank", self.kv_lora_rank, 1 << 16),
            ("qk_nope_head_dim", self.qk_nope_head_dim, 1 << 12),
            ("qk_rope_head_dim", self.qk_rope_head_dim, 1 << 12),
            ("v_head_dim", self.v_head_dim, 1 << 12),
        ]
    }

    /// Every size key within its bound, checked before anything is sized from them.
    fn check_size_limits(&self) -> Result<(), ModelError> {
        for (key, value, limit) in self.size_keys() {
            if let Some(value) = value
                && value > limit
            {
                return Err(invalid(
                    key,
                    value,
                    &format!("exceeds the limit of {limit}"),
                ));
            }
        }
        Ok(())
    }
}

fn invalid(key: &str, value: impl std::fmt::Display, why: &str) -> ModelError {
    ModelError::Config(format!("{key} = {value}: {why}"))
}

fn required<T>(value: Option<T>, key: &str) -> Result<T, ModelError> {
    value.ok_or_else(|| ModelError::Config(format!("missing required key `{key}`")))
}

fn positive(value: Option<usize>, key: &str) -> Result<usize, ModelError> {
    let v = required(value, key)?;
    if v == 0 {
        return Err(invalid(key, v, "must be positive"));
    }
    Ok(v)
}

/// `0.1 * m * ln(s) + 1` for s > 1, else 1: YaRN's attention temperature correction.
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|err| match err {
            ModelError::Config(msg) => ModelError::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|err| ModelError::Config(format!("not a valid config.json: {err}")))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ModelError> {
        raw.check_size_limits()?;
        let model_type = match required(raw.model_type.as_deref(), "model_type")? {
            "deepseek_v2" => ModelType::DeepseekV2,
            "deepseek_v3" => ModelType::DeepseekV3,
            other => {
                return Err(invalid(
                    "model_type",
                    format!("{other:?}"),
                    "unsupported (supported: \"deepseek_v2\", \"deepseek_v3\")",
                ));
            }
        };
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(invalid(
                "hidden_act",
                format!("{act:?}"),
                "unsupported (supported: \"silu\")",
            ));
        }
        if raw.attention_bias == Some(true) {
            return Err(invalid("attention_bias", true, "unsupported (only false)"));
        }
        if raw.mlp_bias == Some(true) {
            return Err(invalid("mlp_bias", true, "unsupported (only false)"));
        }
        let num_attention_heads = positive(raw.num_attention_heads, "num_attention_heads")?;
        if let Some(kv_heads) = raw.num_key_value_heads
            && kv_heads != num_attention_heads
        {
            return Err(invalid(
                "num_key_value_heads",
                kv_heads,
                "MLA needs num_key_value_heads == num_attention_heads",
            ));
        }
        let qk_rope_head_dim = positive(raw.qk_rope_head_dim, "qk_rope_head_dim")?;
        if qk_rope_head_dim % 2 != 0 {
            return Err(invalid(
                "qk_rope_head_dim",
                qk_rope_head_dim,
                "must be even",
            ));
        }
        if raw.q_lora_rank == Some(0) {
            return Err(invalid("q_lora_rank", 0, "must be null or positive"));
        }
        let max_position_embeddings =
            positive(raw.max_position_embeddings, "max_position_embeddings")?;
        let rope = parse_rope(
            raw.rope_theta,
            raw.rope_scaling.as_ref(),
            raw.rope_parameters.as_ref(),
            raw.rope_interleave,
            max_position_embeddings,
        )?;
        let moe = parse_moe(model_type, &raw)?;
        let eos_token_ids = parse_token_ids(raw.eos_token_id.as_ref(), "eos_token_id")?;
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if rms_norm_eps.is_nan() || rms_norm_eps <= 0.0 {
            return Err(invalid("rms_norm_eps", rms_norm_eps, "must be positive"));
        }
        Ok(Self {
            model_type,
            vocab_size: positive(raw.vocab_size, "vocab_size")?,
            hidden_size: positive(raw.hidden_size, "hidden_size")?,
            intermediate_size: positive(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: positive(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            q_lora_rank: raw.q_lora_rank,
            kv_lora_rank: positive(raw.kv_lora_rank, "kv_lora_rank")?,
            qk_nope_head_dim: positive(raw.qk_nope_head_dim, "qk_nope_head_dim")?,
            qk_rope_head_dim,
            v_head_dim: positive(raw.v_head_dim, "v_head_dim")?,
            max_position_embeddings,
            rms_norm_eps,
            rope,
            moe,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
        })
    }

    /// Per-head query/key width: nope + rope parts.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Attention softmax scale: `qk_head_dim^-0.5`, times `mscale(factor, mscale_all_dim)^2` under
    /// YaRN (DeepSeek's temperature correction; the cos/sin carry the mscale ratio).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match self.rope.yarn {
            Some(yarn) if yarn.mscale_all_dim != 0.0 => {
                let m = yarn_mscale(yarn.factor, yarn.mscale_all_dim);
                base * m * m
            }
            _ => base,
        }
    }

    /// Values per token per layer in the latent cache: normalized c_kv ++ rotated k_pe.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Values per token (all layers) the MLA latent cache holds.
    pub fn kv_cache_values_per_token(&self) -> usize {
        self.latent_dim() * self.num_hidden_layers
    }

    /// Values per token (all layers) a per-head K/V cache would hold: heads x (qk_head_dim + v).
    pub fn decompressed_kv_values_per_token(&self) -> usize {
        self.num_attention_heads * (self.qk_head_dim() + self.v_head_dim) * self.num_hidden_layers
    }

    /// Whether decoder layer `layer` has routed experts (else a dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe.is_some_and(|moe| {
            layer >= moe.first_k_dense_replace && layer.is_multiple_of(moe.moe_layer_freq)
        })
    }
}

fn parse_token_ids(value: Option<&Value>, key: &str) -> Result<Vec<u32>, ModelError> {
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| invalid(key, v, "must be a token id or a list of token ids"))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

fn parse_moe(model_type: ModelType, raw: &RawConfig) -> Result<Option<MoeConfig>, ModelError> {
    let Some(n_routed_experts) = raw.n_routed_experts else {
        return Ok(None);
    };
    if n_routed_experts == 0 {
        return Err(invalid("n_routed_experts", 0, "must be null or positive"));
    }
    let num_experts_per_tok = positive(raw.num_experts_per_tok, "num_experts_per_tok")?;
    if num_experts_per_tok > n_routed_experts {
        return Err(invalid(
            "num_experts_per_tok",
            num_experts_per_tok,
            &format!("exceeds n_routed_experts = {n_routed_experts}"),
        ));
    }
    let (default_scoring, default_topk) = match model_type {
        ModelType::DeepseekV2 => ("softmax", "greedy"),
        ModelType::DeepseekV3 => ("sigmoid", "noaux_tc"),
    };
    let scoring_func = match raw.scoring_func.as_deref().unwrap_or(default_scoring) {
        "softmax" => ScoringFunc::Softmax,
        "sigmoid" => ScoringFunc::Sigmoid,
        other => {
            return Err(invalid(
                "scoring_func",
                format!("{other:?}"),
                "unsupported (supported: \"softmax\", \"sigmoid\")",
            ));
        }
    };
    let topk_method = match raw.topk_method.as_deref().unwrap_or(default_topk) {
        // "gready" is the spelling in DeepSeek-V2's own configuration file.
        "greedy" | "gready" => TopkMethod::Greedy,
        "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
        "noaux_tc" => TopkMethod::NoauxTc,
        other => {
            return Err(invalid(
                "topk_method",
                format!("{other:?}"),
                "unsupported (supported: \"greedy\", \"group_limited_greedy\", \"noaux_tc\")",
            ));
        }
    };
    let (n_group, topk_group) = match topk_method {
        TopkMethod::Greedy => (1, 1),
        _ => {
            let n_group = positive(raw.n_group, "n_group")?;
            let topk_group = positive(raw.topk_group, "topk_group")?;
            if n_routed_experts % n_group != 0 {
                return Err(invalid(
                    "n_group",
                    n_group,
                    &format!("must divide n_routed_experts = {n_routed_experts}"),
                ));
            }
            if topk_group > n_group {
                return Err(invalid(
                    "topk_group",
                    topk_group,
                    &format!("exceeds n_group = {n_group}"),
                ));
            }
            if topk_method == TopkMethod::NoauxTc && n_routed_experts / n_group < 2 {
                return Err(invalid(
                    "n_group",
                    n_group,
                    "noaux_tc scores a group by its top 2 experts: groups need >= 2 experts",
                ));
            }
            if topk_group * (n_routed_experts / n_group) < num_experts_per_tok {
                return Err(invalid(
                    "topk_group",
                    topk_group,
                    "the kept groups hold fewer experts than num_experts_per_tok",
                ));
            }
            (n_group, topk_group)
        }
    };
    let routed_scaling_factor = raw.routed_scaling_factor.unwrap_or(1.0);
    if !routed_scaling_factor.is_finite() {
        return Err(invalid(
            "routed_scaling_factor",
            routed_scaling_factor,
            "must be finite",
        ));
    }
    Ok(Some(MoeConfig {
        n_routed_experts,
        num_experts_per_tok,
        n_shared_experts: raw.n_shared_experts.unwrap_or(0),
        moe_intermediate_size: positive(raw.moe_intermediate_size, "moe_intermediate_size")?,
        scoring_func,
        topk_method,
        n_group,
        topk_group,
        norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
        routed_scaling_factor,
        first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(0),
        moe_layer_freq: match raw.moe_layer_freq {
            Some(0) => return Err(invalid("moe_layer_freq", 0, "must be positive")),
            other => other.unwrap_or(1),
        },
    }))
}

fn parse_rope(
    rope_theta: Option<f64>,
    rope_scaling: Option<&Value>,
    rope_parameters: Option<&Value>,
    rope_interleave: Option<bool>,
    max_position_embeddings: usize,
) -> Result<RopeConfig, ModelError> {
    // transformers 5 folds theta and scaling into `rope_parameters`; the hub style keeps them apart.
    let (scaling, key) = match (rope_parameters, rope_scaling) {
        (Some(params @ Value::Object(_)), _) => (Some(params), "rope_parameters"),
        (Some(Value::Null) | None, Some(Value::Null) | None) => (None, "rope_scaling"),
        (Some(Value::Null) | None, Some(scaling @ Value::Object(_))) => {
            (Some(scaling), "rope_scaling")
        }
        (Some(Value::Null) | None, Some(other)) => {
            return Err(invalid("rope_scaling", other, "must be an object or null"));
        }
        (Some(other), _) => {
            return Err(invalid(
                "rope_parameters",
                other,
                "must be an object or null",
            ));
        }
    };
    let get_f64 = |name: &str| -> Result<Option<f64>, ModelError> {
        match scaling.and_then(|s| s.get(name)) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| invalid(&format!("{key}.{name}"), v, "must be a number")),
        }
    };
    let theta = match get_f64("rope_theta")?.or(rope_theta) {
        Some(theta) if theta > 0.0 => theta,
        Some(theta) => return Err(invalid("rope_theta", theta, "must be positive")),
        None => 10000.0,
    };
    let rope_type = scaling
        .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| invalid(&format!("{key}.rope_type"), v, "must be a string"))
        })
        .transpose()?;
    let yarn = match rope_type.as_deref() {
        None | Some("default") => None,
        Some("yarn") => {
            let factor = required(get_f64("factor")?, &format!("{key}.factor"))?;
            if factor.is_nan() || factor < 1.0 {
                return Err(invalid(&format!("{key}.factor"), factor, "must be >= 1"));
            }
            let original = match get_f64("original_max_position_embeddings")? {
                Some(v) if v >= 1.0 && v.fract() == 0.0 => v as usize,
                Some(v) => {
                    return Err(invalid(
                        &format!("{key}.original_max_position_embeddings"),
                        v,
                        "must be a positive integer",
                    ));
                }
                None => max_position_embeddings,
            };
            Some(YarnScaling {
                factor,
                original_max_position_embeddings: original,
                beta_fast: get_f64("beta_fast")?.unwrap_or(32.0),
                beta_slow: get_f64("beta_slow")?.unwrap_or(1.0),
                mscale: get_f64("mscale")?.unwrap_or(1.0),
                mscale_all_dim: get_f64("mscale_all_dim")?.unwrap_or(0.0),
            })
        }
        Some(other) => {
            return Err(invalid(
                &format!("{key}.rope_type"),
                format!("{other:?}"),
                "unsupported (supported: \"default\", \"yarn\")",
            ));
        }
    };
    // DeepSeek's own code rotates interleaved pairs; transformers exposes the choice.
    let interleave = rope_interleave.unwrap_or(true);
    Ok(RopeConfig {
        theta,
        yarn,
        interleave,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3_json() -> serde_json::Value {
        serde_json::json!({
            "model_type": "deepseek_v3",
            "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
            "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 4, "n_shared_experts": 2, "n_routed_experts": 8,
            "routed_scaling_factor": 2.5, "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2,
            "num_experts_per_tok": 2, "first_k_dense_replace": 1, "norm_topk_prob": true,
            "scoring_func": "sigmoid", "max_position_embeddings": 256, "q_lora_rank": 32,
            "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
            "rope_theta": 10000.0,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0},
            "eos_token_id": [1, 2], "bos_token_id": 0
        })
    }

    fn parse(v: serde_json::Value) -> Result<ModelConfig, ModelError> {
        ModelConfig::from_json(&v.to_string())
    }

    #[test]
    fn hub_style_v3_parses_with_derived_quantities() {
        let c = parse(v3_json()).unwrap();
        assert_eq!(c.model_type, ModelType::DeepseekV3);
        assert_eq!(c.qk_head_dim(), 24);
        assert_eq!(c.latent_dim(), 24);
        assert_eq!(c.kv_cache_values_per_token(), 72);
        assert_eq!(c.decompressed_kv_values_per_token(), 4 * (24 + 12) * 3);
        let moe = c.moe.unwrap();
        assert_eq!(moe.topk_method, TopkMethod::NoauxTc);
        assert_eq!(moe.n_shared_experts, 2);
        assert!(!c.is_moe_layer(0));
        assert!(c.is_moe_layer(1) && c.is_moe_layer(2));
        let yarn = c.rope.yarn.unwrap();
        assert_eq!(yarn.original_max_position_embeddings, 64);
        assert!(c.rope.interleave);
        let m = 0.1 * 4f64.ln() + 1.0;
        assert!((c.softmax_scale() - 24f64.powf(-0.5) * m * m).abs() < 1e-12);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
    }

    #[test]
    fn absurd_sizes_are_refused_by_name_before_any_allocation() {
        // 1e9 layers or experts used to end in "memory allocation failed" and SIGABRT.
        let v3: RawConfig = serde_json::from_value(v3_json()).unwrap();
        for (key, _, limit) in v3.size_keys() {
            let mut v = v3_json();
            v[key] = serde_json::json!(1_000_000_000u64);
            let error = parse(v).unwrap_err().to_string();
            assert!(
                error.contains(&format!("{key} = 1000000000: exceeds the limit of {limit}")),
                "{error}"
            );
        }
        // Every bound is above DeepSeek-V3's own figures.
        let real = [
            ("vocab_size", 129_280),
            ("hidden_size", 7168),
            ("intermediate_size", 18_432),
            ("num_hidden_layers", 61),
            ("num_attention_heads", 128),
            ("n_routed_experts", 256),
            ("max_position_embeddings", 163_840),
            ("kv_lora_rank", 512),
            ("q_lora_rank", 1536),
        ];
        let bounds = v3.size_keys();
        for (key, value) in real {
            let limit = bounds.iter().find(|(k, _, _)| *k == key).unwrap().2;
            assert!(value <= limit, "{key}");
        }
    }

    #[test]
    fn transformers5_rope_parameters_parse() {
        let mut v = v3_json();
        let obj = v.as_object_mut().unwrap();
        obj.remove("rope_scaling");
        obj.remove("rope_theta");
        obj.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "yarn", "rope_theta": 50000.0, "factor": 2.0,
                               "original_max_position_embeddings": 128, "mscale": 1.0,
                               "mscale_all_dim": 0.5}),
        );
        obj.insert("rope_interleave".into(), false.into());
        let c = parse(v).unwrap();
        assert_eq!(c.rope.theta, 50000.0);
        assert!(!c.rope.interleave);
        let yarn = c.rope.yarn.unwrap();
        assert_eq!(yarn.factor, 2.0);
        assert_eq!(yarn.mscale_all_dim, 0.5);
        assert_eq!(yarn.beta_fast, 32.0);
    }

    #[test]
    fn default_rope_has_plain_softmax_scale() {
        let mut v = v3_json();
        v["rope_scaling"] = Value::Null;
        let c = parse(v).unwrap();
        assert!(c.rope.yarn.is_none());
        assert!((c.softmax_scale() - 24f64.powf(-0.5)).abs() < 1e-12);
    }

    #[test]
    fn v2_defaults_and_null_q_lora() {
        let mut v = v3_json();
        let obj = v.as_object_mut().unwrap();
        obj.insert("model_type".into(), "deepseek_v2".into());
        obj.remove("scoring_func");
        obj.remove("topk_method");
        obj.insert("q_lora_rank".into(), Value::Null);
        obj.insert("n_routed_experts".into(), Value::Null);
        let c = parse(v).unwrap();
        assert_eq!(c.q_lora_rank, None);
        assert!(c.moe.is_none());
        assert!(!c.is_moe_layer(2));

        let mut v = v3_json();
        v["model_type"] = "deepseek_v2".into();
        v.as_object_mut().unwrap().remove("scoring_func");
        v["topk_method"] = "group_limited_greedy".into();
        let moe = parse(v).unwrap().moe.unwrap();
        assert_eq!(moe.scoring_func, ScoringFunc::Softmax);
        assert_eq!(moe.topk_method, TopkMethod::GroupLimitedGreedy);
    }

    #[test]
    fn unsupported_values_name_key_and_value() {
        let cases = [
            ("model_type", Value::from("llama"), "model_type = \"llama\""),
            (
                "topk_method",
                Value::from("random"),
                "topk_method = \"random\"",
            ),
            (
                "scoring_func",
                Value::from("relu"),
                "scoring_func = \"relu\"",
            ),
            ("hidden_act", Value::from("gelu"), "hidden_act = \"gelu\""),
            ("topk_group", Value::from(5), "topk_group = 5"),
            ("n_group", Value::from(3), "n_group = 3"),
        ];
        for (key, value, expected) in cases {
            let mut v = v3_json();
            v[key] = value;
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains(expected), "{key}: {err}");
        }
        let mut v = v3_json();
        v["rope_scaling"]["type"] = "dynamic".into();
        let err = parse(v).unwrap_err().to_string();
        assert!(
            err.contains("rope_scaling.rope_type = \"dynamic\""),
            "{err}"
        );
        let mut v = v3_json();
        v.as_object_mut().unwrap().remove("kv_lora_rank");
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("kv_lora_rank"), "{err}");
    }
}
