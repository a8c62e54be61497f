//! Random weights for a config (benchmarks, tests): `init-random` writes a model directory, and
//! [`InMemoryRandomModel`] makes one whose weights exist only in memory (`bench --random-weights`).
//!
//! `init-random` generates tensors and streams them to `model.safetensors` one at a time, so a
//! model larger than memory can be written. Matrices are uniform with the standard deviation
//! `initializer_range` (default 0.02) like transformers' init, norms are ones, so activations stay
//! finite through any depth.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::DType;
use half::{bf16, f16};
use memmap2::MmapMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

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
    let (config, text, std_dev) = read_config(config_path)?;
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
    let (header, offset) = safetensors_header(&plan, dtype_name, elem);
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

/// The parsed config, its text, and the standard deviation of random matrices
/// (`initializer_range`, 0.02 by default).
fn read_config(config_path: &Path) -> Result<(ModelConfig, String, f32), ModelError> {
    let config = ModelConfig::from_file(config_path)?;
    let text = std::fs::read_to_string(config_path).map_err(|source| ModelError::Io {
        path: config_path.to_path_buf(),
        source,
    })?;
    let std_dev = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("initializer_range").and_then(|r| r.as_f64()))
        .unwrap_or(0.02) as f32;
    Ok((config, text, std_dev))
}

/// The safetensors header of `plan` (padded so the data section starts 8-byte aligned) and the
/// byte length of the data section.
fn safetensors_header(
    plan: &[(String, Vec<usize>, Fill)],
    dtype_name: &str,
    elem: usize,
) -> (Vec<u8>, usize) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, _) in plan {
        let bytes = shape.iter().product::<usize>() * elem;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype_name, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    (header, offset)
}

/// Elements per independently seeded piece of a tensor in [`InMemoryRandomModel`]: the pieces
/// are generated in parallel, and the values do not depend on the number of threads.
const PIECE: usize = 1 << 20;

/// A model directory for a config whose weights exist only in memory, for `bench
/// --random-weights`: V2-Lite-sized models need no 30 GB file and no writable tmpfs.
///
/// The directory (a private temporary folder) holds `config.json` and `model.safetensors`; on
/// Linux the latter is a link to an anonymous memory file (`memfd_create`), so the regular loader
/// maps it like any checkpoint and nothing touches a disk or `/dev/shm`. The weights are generated
/// in parallel straight into that memory (one seeded stream per 2^20-element piece, so the
/// values depend on the seed only). Keep this value alive while loading the model and drop it
/// after: that frees the memory file and removes the folder. Peak memory while loading is the
/// random checkpoint in its storage dtype plus the model being built.
#[derive(Debug)]
pub struct InMemoryRandomModel {
    dir: PathBuf,
    /// The memory file; closing it (with the loader's mapping gone) frees the weights.
    _weights: File,
    weight_bytes: u64,
    generate_seconds: f64,
}

impl InMemoryRandomModel {
    /// Generates random weights for the config at `config_path`, stored as `dtype` (F32, F16 or
    /// BF16: the loader converts from there to its weight dtype).
    pub fn new(config_path: &Path, seed: u64, dtype: DType) -> Result<Self, ModelError> {
        let started = Instant::now();
        let (config, text, std_dev) = read_config(config_path)?;
        let (dtype_name, elem) = match dtype {
            DType::F32 => ("F32", 4),
            DType::F16 => ("F16", 2),
            DType::BF16 => ("BF16", 2),
            other => {
                return Err(ModelError::Input(format!(
                    "random weights in {other:?} (f32, f16 or bf16)"
                )));
            }
        };
        let dir = unique_temp_dir()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source: std::io::Error| ModelError::Io { path, source }
        };
        let result = (|| {
            std::fs::write(dir.join("config.json"), &text).map_err(io(&dir.join("config.json")))?;
            let plan = tensor_plan(&config);
            let (header, data_len) = safetensors_header(&plan, dtype_name, elem);
            let weights_path = dir.join("model.safetensors");
            let file = memory_file(&weights_path).map_err(io(&weights_path))?;
            let total = 8 + header.len() + data_len;
            file.set_len(total as u64).map_err(io(&weights_path))?;
            // SAFETY: the file is private to this process (an anonymous memory file or a new file
            // in a folder only we know of) and nothing else maps or resizes it while we write.
            let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(io(&weights_path))?;
            map[..8].copy_from_slice(&(header.len() as u64).to_le_bytes());
            map[8..8 + header.len()].copy_from_slice(&header);
            fill_random(
                &mut map[8 + header.len()..],
                &plan,
                elem,
                dtype,
                std_dev,
                seed,
            );
            map.flush().map_err(io(&weights_path))?;
            Ok::<_, ModelError>((file, data_len as u64))
        })();
        match result {
            Ok((file, weight_bytes)) => {
                let generate_seconds = started.elapsed().as_secs_f64();
                tracing::info!(
                    mib = weight_bytes >> 20,
                    seconds = format!("{generate_seconds:.2}"),
                    "random weights generated in memory"
                );
                Ok(Self {
                    dir,
                    _weights: file,
                    weight_bytes,
                    generate_seconds,
                })
            }
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(err)
            }
        }
    }

    /// The model directory to load (`config.json` + `model.safetensors`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of weights generated.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Seconds spent generating them.
    pub fn generate_seconds(&self) -> f64 {
        self.generate_seconds
    }
}

impl Drop for InMemoryRandomModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new empty folder under the system's temporary directory, private to this call.
fn unique_temp_dir() -> Result<PathBuf, ModelError> {
    let base = std::env::temp_dir();
    for attempt in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!(
            "latentserve-random-{}-{nanos}-{attempt}",
            std::process::id()
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(ModelError::Io { path: dir, source }),
        }
    }
    Err(ModelError::Io {
        path: base,
        source: std::io::Error::other("no free name for a temporary folder"),
    })
}

/// An anonymous memory file reachable at `path` (a link to `/proc/self/fd/N`) on Linux; a plain
/// file at `path` where memory files are not available.
fn memory_file(path: &Path) -> std::io::Result<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::{AsRawFd, FromRawFd};
        unsafe extern "C" {
            fn memfd_create(name: *const std::ffi::c_char, flags: std::ffi::c_uint) -> i32;
        }
        const MFD_CLOEXEC: std::ffi::c_uint = 1;
        // SAFETY: a NUL-terminated name and valid flags; a non-negative result is a new file
        // descriptor that nothing else owns.
        let fd = unsafe { memfd_create(c"latentserve-random-weights".as_ptr(), MFD_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
            let file = unsafe { File::from_raw_fd(fd) };
            std::os::unix::fs::symlink(format!("/proc/self/fd/{}", file.as_raw_fd()), path)?;
            return Ok(file);
        }
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "memfd_create failed; random weights go to a file in the temporary folder"
        );
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
}

/// Fills the data section of a safetensors buffer with `plan`'s tensors in `dtype`.
fn fill_random(
    data: &mut [u8],
    plan: &[(String, Vec<usize>, Fill)],
    elem: usize,
    dtype: DType,
    std_dev: f32,
    seed: u64,
) {
    // Uniform(-a, a) has standard deviation a / sqrt(3).
    let bound = std_dev * 3f32.sqrt();
    let mut pieces = Vec::new();
    let mut rest = data;
    for (index, (_, shape, fill)) in plan.iter().enumerate() {
        let bytes = shape.iter().product::<usize>() * elem;
        let (tensor, tail) = rest.split_at_mut(bytes);
        rest = tail;
        for (piece, chunk) in tensor.chunks_mut(PIECE * elem).enumerate() {
            pieces.push((index, piece, *fill, chunk));
        }
    }
    pieces
        .into_par_iter()
        .for_each(|(tensor, piece, fill, chunk)| {
            let mut rng = StdRng::seed_from_u64(splitmix(
                seed ^ splitmix((tensor as u64) << 32 | piece as u64),
            ));
            for out in chunk.chunks_exact_mut(elem) {
                let v = match fill {
                    Fill::Random => rng.random_range(-bound..bound),
                    Fill::Ones => 1.0,
                    Fill::Zeros => 0.0,
                };
                match dtype {
                    DType::F16 => out.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
                    DType::BF16 => out.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
                    _ => out.copy_from_slice(&v.to_le_bytes()),
                }
            }
        });
}

/// SplitMix64's finalizer: decorrelates the seeds of neighbouring pieces.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeepSeekModel, LoadOptions};

    fn tiny_config() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v3-tiny-f32/config.json")
    }

    fn weights(model: &InMemoryRandomModel) -> Vec<u8> {
        std::fs::read(model.dir().join("model.safetensors")).unwrap()
    }

    #[test]
    fn in_memory_weights_load_and_depend_only_on_the_seed() {
        let a = InMemoryRandomModel::new(&tiny_config(), 5, DType::F16).unwrap();
        let b = InMemoryRandomModel::new(&tiny_config(), 5, DType::F16).unwrap();
        let c = InMemoryRandomModel::new(&tiny_config(), 6, DType::F16).unwrap();
        assert_eq!(weights(&a), weights(&b));
        assert_ne!(weights(&a), weights(&c));
        let model = DeepSeekModel::load(
            a.dir(),
            &LoadOptions {
                dtype: DType::F16,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        assert_eq!(model.config().num_hidden_layers, 3);
        let dir = a.dir().to_path_buf();
        drop(a);
        assert!(!dir.exists(), "the temporary folder is removed on drop");
    }

    #[test]
    fn in_memory_weights_in_bf16_and_f32_load() {
        for dtype in [DType::BF16, DType::F32] {
            let random = InMemoryRandomModel::new(&tiny_config(), 1, dtype).unwrap();
            assert!(random.weight_bytes() > 0);
            DeepSeekModel::load(random.dir(), &LoadOptions::default()).unwrap();
        }
        assert!(InMemoryRandomModel::new(&tiny_config(), 1, DType::U8).is_err());
    }
}
