//! `init-random`: a model directory with random weights for a config (benchmarks, tests).
//!
//! Tensors are generated and streamed to `model.safetensors` one at a time, so a model larger
//! than memory can be written. Matrices are uniform with the standard deviation
//! `initializer_range` (default 0.02) like transformers' init, norms are ones, so activations stay
//! finite through any depth.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{ModelConfig, ModelError, config::TopkMethod};

/// What a random tensor is filled with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fill {
    Random,
    Ones,
    Zeros,
}

/// Every tensor (name, shape, fill) a checkpoint of `config` holds, in hub naming.
fn tensor_plan(config: &ModelConfig) -> Vec<(String, Vec<usize>, Fill)> {
    let (h, heads) = (config.hidden_size, config.num_attention_heads);
    let qk = config.qk_head_dim();
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![config.vocab_size, h],
        Fill::Random,
    )];
    let mlp = |t: &mut Vec<_>, prefix: String, width: usize| {
        t.push((
            format!("{prefix}.gate_proj.weight"),
            vec![width, h],
            Fill::Random,
        ));
        t.push((
            format!("{prefix}.up_proj.weight"),
            vec![width, h],
            Fill::Random,
        ));
        t.push((
            format!("{prefix}.down_proj.weight"),
            vec![h, width],
            Fill::Random,
        ));
    };
    for layer in 0..config.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        t.push((format!("{p}.input_layernorm.weight"), vec![h], Fill::Ones));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Fill::Ones,
        ));
        match config.q_lora_rank {
            Some(rank) => {
                t.push((
                    format!("{p}.self_attn.q_a_proj.weight"),
                    vec![rank, h],
                    Fill::Random,
                ));
                t.push((
                    format!("{p}.self_attn.q_a_layernorm.weight"),
                    vec![rank],
                    Fill::Ones,
                ));
                t.push((
                    format!("{p}.self_attn.q_b_proj.weight"),
                    vec![heads * qk, rank],
                    Fill::Random,
                ));
            }
            None => t.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![heads * qk, h],
                Fill::Random,
            )),
        }
        t.push((
            format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
            vec![config.latent_dim(), h],
            Fill::Random,
        ));
        t.push((
            format!("{p}.self_attn.kv_a_layernorm.weight"),
            vec![config.kv_lora_rank],
            Fill::Ones,
        ));
        t.push((
            format!("{p}.self_attn.kv_b_proj.weight"),
            vec![
                heads * (config.qk_nope_head_dim + config.v_head_dim),
                config.kv_lora_rank,
            ],
            Fill::Random,
        ));
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, heads * config.v_head_dim],
            Fill::Random,
        ));
        match config.moe {
            Some(moe) if config.is_moe_layer(layer) => {
                t.push((
                    format!("{p}.mlp.gate.weight"),
                    vec![moe.n_routed_experts, h],
                    Fill::Random,
                ));
                if moe.topk_method == TopkMethod::NoauxTc {
                    t.push((
                        format!("{p}.mlp.gate.e_score_correction_bias"),
                        vec![moe.n_routed_experts],
                        Fill::Zeros,
                    ));
                }
                for e in 0..moe.n_routed_experts {
                    mlp(
                        &mut t,
                        format!("{p}.mlp.experts.{e}"),
                        moe.moe_intermediate_size,
                    );
                }
                if moe.n_shared_experts > 0 {
                    mlp(
                        &mut t,
                        format!("{p}.mlp.shared_experts"),
                        moe.moe_intermediate_size * moe.n_shared_experts,
                    );
                }
            }
            _ => mlp(&mut t, format!("{p}.mlp"), config.intermediate_size),
        }
    }
    t.push(("model.norm.weight".to_string(), vec![h], Fill::Ones));
    if !config.tie_word_embeddings {
        t.push((
            "lm_head.weight".to_string(),
            vec![config.vocab_size, h],
            Fill::Random,
        ));
    }
    t
}

/// Storage dtype of a random checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomDtype {
    F32,
    F16,
}

/// Writes `config.json` (a copy of `config_path`), `model.safetensors` and, if the directory has
/// none, a byte-level `tokenizer.json` into `out`. Returns the bytes of weights written.
pub fn init_random(
    config_path: &Path,
    out: &Path,
    seed: u64,
    dtype: RandomDtype,
) -> Result<u64, ModelError> {
    let config = ModelConfig::from_file(config_path)?;
    let text = std::fs::read_to_string(config_path).map_err(|source| ModelError::Io {
        path: config_path.to_path_buf(),
        source,
    })?;
    let std_dev = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("initializer_range").and_then(|r| r.as_f64()))
        .unwrap_or(0.02) as f32;
    std::fs::create_dir_all(out).map_err(|source| ModelError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| ModelError::Io { path, source }
    };
    std::fs::write(out.join("config.json"), &text).map_err(io(&out.join("config.json")))?;

    let plan = tensor_plan(&config);
    let (dtype_name, elem) = match dtype {
        RandomDtype::F32 => ("F32", 4),
        RandomDtype::F16 => ("F16", 2),
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, _) in &plan {
        let bytes = shape.iter().product::<usize>() * elem;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype_name, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    // The data section starts 8-byte aligned.
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let path = out.join("model.safetensors");
    let mut file = BufWriter::new(File::create(&path).map_err(io(&path))?);
    file.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|()| file.write_all(&header))
        .map_err(io(&path))?;
    let mut rng = StdRng::seed_from_u64(seed);
    // Uniform(-a, a) has standard deviation a / sqrt(3).
    let bound = std_dev * 3f32.sqrt();
    let mut buf = Vec::new();
    for (_, shape, fill) in &plan {
        let count: usize = shape.iter().product();
        buf.clear();
        for _ in 0..count {
            let v = match fill {
                Fill::Random => rng.random_range(-bound..bound),
                Fill::Ones => 1.0,
                Fill::Zeros => 0.0,
            };
            match dtype {
                RandomDtype::F32 => buf.extend_from_slice(&v.to_le_bytes()),
                RandomDtype::F16 => buf.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            }
        }
        file.write_all(&buf).map_err(io(&path))?;
    }
    file.flush().map_err(io(&path))?;

    let tokenizer_path = out.join("tokenizer.json");
    if !tokenizer_path.exists() && config.vocab_size >= 258 {
        let tokenizer = byte_level_tokenizer_json(config.bos_token_id, &config.eos_token_ids);
        std::fs::write(&tokenizer_path, tokenizer.to_string()).map_err(io(&tokenizer_path))?;
    }
    Ok(offset as u64)
}

/// GPT-2's reversible map from bytes to printable characters.
fn byte_to_char() -> Vec<char> {
    let printable = |b: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xa1..=0xac).contains(&b)
            || (0xae..=0xff).contains(&b)
    };
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// A byte-level BPE tokenizer without merges: ids 0 and 1 are `<|bos|>` / `<|eos|>` (or the
/// config's ids), every byte is one token after them. Enough for benchmarks and round trips.
fn byte_level_tokenizer_json(bos: Option<u32>, eos: &[u32]) -> serde_json::Value {
    let bos = bos.unwrap_or(0);
    let eos = eos.first().copied().unwrap_or(1);
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|bos|>".into(), bos.into());
    vocab.insert("<|eos|>".into(), eos.into());
    let mut next = 0u32;
    for c in byte_to_char() {
        while next == bos || next == eos {
            next += 1;
        }
        vocab.insert(c.to_string(), next.into());
        next += 1;
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
                                        "trim_offsets": true, "use_regex": true});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(bos, "<|bos|>"), special(eos, "<|eos|>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}
