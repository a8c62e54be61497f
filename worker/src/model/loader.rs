//! Memory-mapped safetensors checkpoints (one file or sharded with `model.safetensors.index.json`).
//!
//! Tensors are decoded only when asked for, so tensors nobody asks for (multi-token-prediction
//! layers, routed experts another shard holds) are never read from disk. f32, f16, bf16 and FP8
//! E4M3 (with DeepSeek-V3's 128x128 `weight_scale_inv` block scales) decode to f32 or f16.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::ModelError;

/// Decides which routed experts a worker loads: `filter(layer, expert)`.
pub type ExpertFilter = Arc<dyn Fn(usize, usize) -> bool + Send + Sync>;

/// How to load a checkpoint.
#[derive(Clone)]
pub struct LoadOptions {
    /// Storage dtype of the projection weights: F32 (default) or F16. Norms, router and biases
    /// always stay f32; activations are always f32.
    pub dtype: DType,
    /// Routed experts to load; `None` loads all. Tensors of experts left out are never read.
    pub expert_filter: Option<ExpertFilter>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            expert_filter: None,
        }
    }
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("dtype", &self.dtype)
            .field("expert_filter", &self.expert_filter.is_some())
            .finish()
    }
}

impl LoadOptions {
    pub fn loads_expert(&self, layer: usize, expert: usize) -> bool {
        self.expert_filter
            .as_ref()
            .is_none_or(|filter| filter(layer, expert))
    }
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
}

struct TensorRef {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the mapped file.
    start: usize,
    end: usize,
}

/// An opened checkpoint: every tensor's location, nothing decoded yet.
pub struct WeightStore {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorRef>,
    progress: Progress,
}

struct Progress {
    planned_bytes: AtomicU64,
    loaded_bytes: AtomicU64,
    started: Instant,
    last_log: Mutex<Instant>,
}

const BLOCK: usize = 128;

impl WeightStore {
    /// Maps the checkpoint in `dir`: `model.safetensors.index.json` if present, else
    /// `model.safetensors`, else every `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let file_names: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io {
                path: index_path.clone(),
                source,
            })?;
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|err| ModelError::Safetensors {
                    path: index_path.clone(),
                    message: format!("invalid index JSON: {err}"),
                })?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Safetensors {
                    path: index_path.clone(),
                    message: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<PathBuf> = Vec::new();
            for file in map.values() {
                let file = file.as_str().ok_or_else(|| ModelError::Safetensors {
                    path: index_path.clone(),
                    message: format!("weight_map value {file} is not a file name"),
                })?;
                let path = dir.join(file);
                if !names.contains(&path) {
                    names.push(path);
                }
            }
            names
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            let mut names: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|ext| ext == "safetensors"))
                .collect();
            names.sort();
            if names.is_empty() {
                return Err(ModelError::Io {
                    path: dir.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no model.safetensors, model.safetensors.index.json or *.safetensors",
                    ),
                });
            }
            names
        };

        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = HashMap::new();
        for (file_index, path) in file_names.into_iter().enumerate() {
            let file = File::open(&path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the checkpoint is opened read-only; like every mmap-based loader we rely on
            // the file not being truncated by another process while the worker runs.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|err| ModelError::Safetensors {
                    path: path.clone(),
                    message: format!("{err} (truncated or corrupt file?)"),
                })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                tensors.insert(
                    name,
                    TensorRef {
                        file: file_index,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + start,
                        end: data_start + end,
                    },
                );
            }
            files.push(MappedFile { path, mmap });
        }
        let now = Instant::now();
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            tensors,
            progress: Progress {
                planned_bytes: AtomicU64::new(0),
                loaded_bytes: AtomicU64::new(0),
                started: now,
                last_log: Mutex::new(now),
            },
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Names of all tensors in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Sets the byte total progress is reported against: the tensors `will_load` selects.
    pub fn plan(&self, will_load: impl Fn(&str) -> bool) -> u64 {
        let total: u64 = self
            .tensors
            .iter()
            .filter(|(name, _)| will_load(name))
            .map(|(_, t)| (t.end - t.start) as u64)
            .sum();
        self.progress.planned_bytes.store(total, Ordering::Relaxed);
        total
    }

    /// Logs the total load time and rate.
    pub fn finish(&self) {
        let loaded = self.progress.loaded_bytes.load(Ordering::Relaxed);
        let secs = self.progress.started.elapsed().as_secs_f64();
        tracing::info!(
            dir = %self.dir.display(),
            loaded_mib = loaded as f64 / (1 << 20) as f64,
            seconds = format!("{secs:.2}"),
            mib_per_s = format!("{:.0}", loaded as f64 / (1 << 20) as f64 / secs.max(1e-9)),
            "weights loaded"
        );
    }

    fn entry(&self, name: &str) -> Result<&TensorRef, ModelError> {
        self.tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })
    }

    /// Loads `name`, checks its shape, and returns it in `dtype` (F32 or F16) on the CPU.
    pub fn load(&self, name: &str, expected: &[usize], dtype: DType) -> Result<Tensor, ModelError> {
        let entry = self.entry(name)?;
        if entry.shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
            });
        }
        self.decode(
            name,
            entry,
            0,
            entry.shape.iter().product(),
            expected,
            dtype,
        )
    }

    /// Loads row `index` of dim 0 of a stacked tensor (e.g. one expert of a fused
    /// `(experts, out, in)` tensor) with shape `inner`.
    pub fn load_slice(
        &self,
        name: &str,
        index: usize,
        expected_full: &[usize],
        dtype: DType,
    ) -> Result<Tensor, ModelError> {
        let entry = self.entry(name)?;
        if entry.shape != expected_full {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: expected_full.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let inner = &expected_full[1..];
        let count: usize = inner.iter().product();
        self.decode(name, entry, index * count, count, inner, dtype)
    }

    /// Loads a 1-D f32 vector (norm weights, router bias).
    pub fn load_vec(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.load(name, &[len], DType::F32)?;
        Ok(t.to_vec1::<f32>()?)
    }

    fn decode(
        &self,
        name: &str,
        entry: &TensorRef,
        first: usize,
        count: usize,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor, ModelError> {
        let elem = match entry.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F8_E4M3 => 1,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let file = &self.files[entry.file];
        let start = entry.start + first * elem;
        let end = start + count * elem;
        let bytes = file
            .mmap
            .get(start..end.min(entry.end))
            .filter(|b| b.len() == count * elem)
            .ok_or_else(|| ModelError::Safetensors {
                path: file.path.clone(),
                message: format!("tensor `{name}` lies outside the file"),
            })?;
        let tensor = match (entry.dtype, dtype) {
            (Dtype::F16, DType::F16) => Tensor::from_vec(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                    .collect::<Vec<_>>(),
                shape,
                &Device::Cpu,
            )?,
            (source, _) => {
                let values: Vec<f32> = match source {
                    Dtype::F32 => bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                    Dtype::F16 => bytes
                        .chunks_exact(2)
                        .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                        .collect(),
                    Dtype::BF16 => bytes
                        .chunks_exact(2)
                        .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                        .collect(),
                    _ => self.dequantize_fp8(name, bytes, first, shape)?,
                };
                let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
                if dtype == DType::F32 {
                    t
                } else {
                    t.to_dtype(dtype)?
                }
            }
        };
        self.report(bytes.len() as u64);
        Ok(tensor)
    }

    /// FP8 E4M3 weights times their `weight_scale_inv` 128x128 block scales (the last blocks of a
    /// row or column may be partial).
    fn dequantize_fp8(
        &self,
        name: &str,
        bytes: &[u8],
        first: usize,
        shape: &[usize],
    ) -> Result<Vec<f32>, ModelError> {
        let &[rows, cols] = shape else {
            return Err(ModelError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("F8_E4M3 with shape {shape:?} (only 2-D block-scaled weights)"),
            });
        };
        if first != 0 {
            return Err(ModelError::UnsupportedDtype {
                name: name.to_string(),
                dtype: "F8_E4M3 in a stacked tensor".into(),
            });
        }
        let scale_name = match name.strip_suffix(".weight") {
            Some(prefix) => format!("{prefix}.weight_scale_inv"),
            None => format!("{name}_scale_inv"),
        };
        let scale_shape = [rows.div_ceil(BLOCK), cols.div_ceil(BLOCK)];
        let scales = self
            .load(&scale_name, &scale_shape, DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let table = fp8_e4m3_table();
        let mut out = Vec::with_capacity(rows * cols);
        for (r, row) in bytes.chunks_exact(cols).enumerate() {
            let scale_row = &scales[(r / BLOCK) * scale_shape[1]..][..scale_shape[1]];
            out.extend(
                row.iter()
                    .enumerate()
                    .map(|(c, &b)| table[b as usize] * scale_row[c / BLOCK]),
            );
        }
        Ok(out)
    }

    fn report(&self, bytes: u64) {
        let p = &self.progress;
        let loaded = p.loaded_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let planned = p.planned_bytes.load(Ordering::Relaxed).max(loaded);
        let Ok(mut last) = p.last_log.lock() else {
            return;
        };
        if last.elapsed().as_secs_f64() >= 2.0 {
            *last = Instant::now();
            let secs = p.started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                percent = format!("{:.1}", 100.0 * loaded as f64 / planned.max(1) as f64),
                loaded_mib = loaded >> 20,
                total_mib = planned >> 20,
                mib_per_s = format!("{:.0}", loaded as f64 / (1 << 20) as f64 / secs),
                "loading weights"
            );
        }
    }
}

/// The 256 values of the E4M3 "fn" format (1 sign, 4 exponent bits with bias 7, 3 mantissa bits,
/// no infinities, 0x7f/0xff are NaN).
fn fp8_e4m3_table() -> [f32; 256] {
    let mut table = [0f32; 256];
    for (bits, value) in table.iter_mut().enumerate() {
        let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
        let exponent = ((bits >> 3) & 0xf) as i32;
        let mantissa = (bits & 0x7) as f32;
        *value = if bits & 0x7f == 0x7f {
            f32::NAN
        } else if exponent == 0 {
            sign * mantissa / 8.0 * 2f32.powi(-6)
        } else {
            sign * (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
        };
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_table_matches_known_values() {
        let t = fp8_e4m3_table();
        assert_eq!(t[0x00], 0.0);
        assert_eq!(t[0x38], 1.0); // exponent 7, mantissa 0
        assert_eq!(t[0x40], 2.0);
        assert_eq!(t[0xb8], -1.0);
        assert_eq!(t[0x7e], 448.0); // the largest finite value
        assert_eq!(t[0x01], 2f32.powi(-9)); // the smallest subnormal
        assert!(t[0x7f].is_nan() && t[0xff].is_nan());
    }
}
