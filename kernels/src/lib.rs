//! Dense projections `y = x W^T` and decode attention over a paged cache, for the decode path of
//! the latentserve worker.
//!
//! Decoding a DeepSeek-style model is a sequence of matrix-vector and few-row products whose cost
//! is reading the weights once from memory. [`Linear`] owns the weights (f32 or f16, always
//! accumulating in f32) and runs such products with kernels of its own: each weight row is read
//! once per call and applied to every input row, SIMD via runtime-detected AVX-512 or AVX2 (with
//! a portable fallback), split over the crate's thread pool by blocks of output rows. Larger
//! batches (prefill) go to the `gemm` crate's blocked product (`gemm.rs`). [`GatheredRows`]
//! runs the same kernels over rows that start anywhere in a buffer (a paged KV cache).

mod attention;
mod error;
mod gemm;
mod isa;
mod kernel;
mod parallel;
mod pool;

pub use attention::GatheredRows;
pub use error::KernelError;
pub use gemm::{Strided, StridedMut, matmul};
pub use isa::Isa;
pub use kernel::Element;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use std::sync::Mutex;

use crate::parallel::{Projection, Rows};

/// Batches of at least this many rows go to `gemm` instead of our kernels: from here on
/// the product is bound by arithmetic, not by reading the weights, and gemm's blocking wins.
/// Measured with `cargo bench -p latentserve-kernels` (see the crate's README).
pub const GEMM_MIN_ROWS: usize = 32;

/// Bytes of f32 an f16 weight is widened into at a time for the gemm product: each block costs
/// gemm one more packing of the input, so blocks are large, but bounded for wide models. 16 MiB
/// measured best of 1, 4 and 16 MiB for a 512-token prefill of the standard model.
pub const GEMM_F16_BLOCK_BYTES: usize = 16 << 20;

/// A dense projection `y = x W^T` with `W` stored row-major `(out_features, in_features)` in f32
/// or f16, always accumulating in f32.
#[derive(Debug, Clone)]
pub struct Linear {
    /// (out_features, in_features), contiguous, on the CPU, in the storage dtype.
    weight: Tensor,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    /// `weight`: (out, in) candle tensor of any float dtype; `dtype` is the storage dtype (F32 or
    /// F16). The weight is converted once here (and shares memory with `weight` when it is
    /// already contiguous in `dtype` on the CPU).
    pub fn new(weight: &Tensor, dtype: DType) -> Result<Self, KernelError> {
        if !matches!(dtype, DType::F32 | DType::F16) {
            return Err(KernelError::UnsupportedStorageDtype(dtype));
        }
        if !weight.dtype().is_float() {
            return Err(KernelError::WeightNotFloat(weight.dtype()));
        }
        let (out_features, in_features) = match weight.dims() {
            &[out_features, in_features] => (out_features, in_features),
            dims => return Err(KernelError::WeightRank(dims.to_vec())),
        };
        let weight = weight
            .to_device(&Device::Cpu)?
            .to_dtype(dtype)?
            .contiguous()?;
        Ok(Self {
            weight,
            out_features,
            in_features,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The storage dtype of the weights (F32 or F16).
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// Bytes the weights occupy in memory.
    pub fn weight_bytes(&self) -> usize {
        self.out_features * self.in_features * self.weight.dtype().size_in_bytes()
    }

    /// x: (n, in) f32 -> (n, out) f32. Our kernels for n < [`GEMM_MIN_ROWS`], the gemm product
    /// from there on.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, KernelError> {
        self.check_input(x)?;
        if x.dim(0)? >= GEMM_MIN_ROWS {
            self.forward_gemm(x)
        } else {
            self.forward_kernel(x, Isa::detect())
        }
    }

    /// Like [`Linear::forward`], but always with our kernels compiled for `isa`, whatever the
    /// batch size (for tests and benchmarks).
    pub fn forward_kernel(&self, x: &Tensor, isa: Isa) -> Result<Tensor, KernelError> {
        Ok(forward_kernels(&[(self, x)], isa)?.remove(0))
    }

    /// Like [`Linear::forward`], but always with the `gemm` crate's blocked product (the one
    /// candle's matmul runs on, called with operands laid out for it: see `gemm.rs`). F16
    /// weights are widened to f32 for the call, so that the inputs and the accumulation stay
    /// f32 as in the kernels: [`GEMM_F16_BLOCK_BYTES`] at a time with F16C. (candle's
    /// `to_dtype` widened the whole matrix one element at a time on every call, which made an
    /// f16 prefill 1.4x slower than an f32 one.)
    pub fn forward_gemm(&self, x: &Tensor) -> Result<Tensor, KernelError> {
        self.forward_gemm_blocks(x, self.f16_block_rows())
    }

    /// Rows of an f16 weight widened at a time: [`GEMM_F16_BLOCK_BYTES`] of f32.
    fn f16_block_rows(&self) -> usize {
        (GEMM_F16_BLOCK_BYTES / (4 * self.in_features.max(1))).max(1)
    }

    fn forward_gemm_blocks(&self, x: &Tensor, block_rows: usize) -> Result<Tensor, KernelError> {
        self.check_input(x)?;
        let x = x.contiguous()?;
        let n = x.dim(0)?;
        let y = {
            let (storage, layout) = x.storage_and_layout();
            let x = match cpu_storage(&storage)? {
                CpuStorage::F32(x) => contiguous_part(x, layout)?,
                other => return Err(KernelError::InputDtype(other.dtype())),
            };
            self.gemm_rows(x, n, block_rows)?
        };
        Ok(Tensor::from_vec(y, (n, self.out_features), &Device::Cpu)?)
    }

    /// Like [`Linear::forward`] on `n` rows of a row-major slice `x (n, in)`, returning
    /// `(n, out)` row-major, with no tensor in between (a prefill's activations are large enough
    /// that the copies into and out of tensors showed in profiles).
    pub fn forward_rows(&self, x: &[f32], n: usize) -> Result<Vec<f32>, KernelError> {
        if x.len() != n * self.in_features {
            return Err(KernelError::Length {
                what: "projection input",
                expected: n * self.in_features,
                got: x.len(),
            });
        }
        if n >= GEMM_MIN_ROWS {
            return self.gemm_rows(x, n, self.f16_block_rows());
        }
        let isa = Isa::detect();
        let mut transposed = vec![0f32; self.out_features * n];
        if n > 0 && self.out_features > 0 && self.in_features > 0 {
            let (storage, layout) = self.weight.storage_and_layout();
            let weights = weight_rows(&storage, layout)?;
            let projection = Projection {
                weights,
                in_features: self.in_features,
                x,
                n,
                out: &mut transposed,
            };
            parallel::run(isa, vec![projection]);
        }
        Ok(rows_from_transposed(transposed, self.out_features, n))
    }

    /// `x (n, in)` row-major -> `(n, out)` row-major through gemm, f16 weights widened
    /// `block_rows` rows at a time.
    fn gemm_rows(&self, x: &[f32], n: usize, block_rows: usize) -> Result<Vec<f32>, KernelError> {
        let (in_features, out_features) = (self.in_features, self.out_features);
        // (in, n): the column-major left operand gemm wants (see gemm.rs).
        let mut xt = vec![0f32; n * in_features];
        gemm::transpose(x, n, in_features, &mut xt);
        // (out, n): the product, column-major.
        let mut yt = vec![0f32; out_features * n];
        let (storage, layout) = self.weight.storage_and_layout();
        match cpu_storage(&storage)? {
            CpuStorage::F32(w) => {
                gemm::gemm_rows(&xt, n, in_features, contiguous_part(w, layout)?, &mut yt)?
            }
            CpuStorage::F16(w) => {
                let weights = contiguous_part(w, layout)?;
                let mut widened = vec![0f32; block_rows.min(out_features) * in_features];
                for (block, yt_block) in weights
                    .chunks(block_rows * in_features)
                    .zip(yt.chunks_mut(block_rows * n))
                {
                    let widened = &mut widened[..block.len()];
                    block.convert_to_f32_slice(widened);
                    gemm::gemm_rows(&xt, n, in_features, widened, yt_block)?;
                }
            }
            other => return Err(KernelError::UnexpectedStorage(other.dtype())),
        }
        let mut y = vec![0f32; n * out_features];
        gemm::transpose(&yt, out_features, n, &mut y);
        Ok(y)
    }

    /// Runs several projections (e.g. the MoE experts of one layer, each on the rows routed to
    /// it) in one parallel pass, so that small ones share the cores instead of each paying for
    /// its own fork and join. Returns the outputs in order; same rules as [`Linear::forward`].
    pub fn forward_many(pairs: &[(&Linear, &Tensor)]) -> Result<Vec<Tensor>, KernelError> {
        for (linear, x) in pairs {
            linear.check_input(x)?;
        }
        let mut outputs: Vec<Option<Tensor>> = vec![None; pairs.len()];
        let mut small = Vec::new();
        let mut small_indices = Vec::new();
        for (index, &(linear, x)) in pairs.iter().enumerate() {
            if x.dim(0)? >= GEMM_MIN_ROWS {
                outputs[index] = Some(linear.forward_gemm(x)?);
            } else {
                small.push((linear, x));
                small_indices.push(index);
            }
        }
        for (index, output) in small_indices
            .into_iter()
            .zip(forward_kernels(&small, Isa::detect())?)
        {
            outputs[index] = Some(output);
        }
        Ok(outputs.into_iter().flatten().collect())
    }

    fn check_input(&self, x: &Tensor) -> Result<(), KernelError> {
        if x.dtype() != DType::F32 {
            return Err(KernelError::InputDtype(x.dtype()));
        }
        if !x.device().is_cpu() {
            return Err(KernelError::InputNotCpu);
        }
        match x.dims() {
            &[_, in_features] if in_features == self.in_features => Ok(()),
            dims => Err(KernelError::InputShape {
                expected_in: self.in_features,
                got: dims.to_vec(),
            }),
        }
    }
}

/// `out (rows, n)` with `out[o * n + b] = w[o] . x[b]`, for weight rows `w (rows, in_features)`
/// packed one after the other and inputs `x (n, in_features)`, on the calling thread with the
/// projection kernels (`isa`). For callers that run many small products in parallel themselves,
/// such as the absorbed MLA products of a decode step, one head per task (see [`run_tasks`]).
/// Note the layout of `out`: for n = 1 it is simply one value per row.
pub fn project_packed<E: Element>(
    isa: Isa,
    w: &[E],
    in_features: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    if !isa.is_supported() {
        return Err(KernelError::IsaUnsupported(isa));
    }
    if in_features == 0 || !w.len().is_multiple_of(in_features) {
        return Err(KernelError::Length {
            what: "packed weight rows",
            expected: w.len().next_multiple_of(in_features.max(1)),
            got: w.len(),
        });
    }
    let rows = w.len() / in_features;
    for (what, expected, got) in [
        ("packed product input", n * in_features, x.len()),
        ("packed product output", rows * n, out.len()),
    ] {
        if expected != got {
            return Err(KernelError::Length {
                what,
                expected,
                got,
            });
        }
    }
    if n > 0 && rows > 0 {
        let packed = kernel::Packed {
            rows,
            stride: in_features,
        };
        kernel::project(isa, w, packed, in_features, x, n, out);
    }
    Ok(())
}

/// Runs `task(i)` for every `i < count` on the kernels' thread pool, the calling thread taking
/// part, and returns when all have run. The pieces must be independent; they run in any order.
/// For work of a decode step that is split finer than one projection (the heads of an
/// attention): the pool's threads are already awake between the step's projections, where
/// rayon's would have to be woken. A call made while the pool is busy (from inside one of its
/// tasks, or from another thread) runs the tasks on the calling thread.
///
/// Panics if a task panicked.
pub fn run_tasks(count: usize, task: &(dyn Fn(usize) + Sync)) {
    pool::pool().run(count, task);
}

/// [`run_tasks`] for tasks that return a value or fail: the values in task order, or the error
/// of the first task (by index) that failed.
///
/// Panics if a task panicked.
pub fn try_map_tasks<T: Send, E: Send>(
    count: usize,
    task: &(dyn Fn(usize) -> Result<T, E> + Sync),
) -> Result<Vec<T>, E> {
    let slots: Vec<Mutex<Option<Result<T, E>>>> = (0..count).map(|_| Mutex::new(None)).collect();
    run_tasks(count, &|i| {
        let result = task(i);
        *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
    });
    slots
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| unreachable!("run_tasks runs every task"))
        })
        .collect()
}

/// Our kernels over every pair in one parallel pass; each output is (n, out) f32.
fn forward_kernels(pairs: &[(&Linear, &Tensor)], isa: Isa) -> Result<Vec<Tensor>, KernelError> {
    if !isa.is_supported() {
        return Err(KernelError::IsaUnsupported(isa));
    }
    let mut inputs = Vec::with_capacity(pairs.len());
    for (linear, x) in pairs {
        linear.check_input(x)?;
        inputs.push(x.contiguous()?);
    }
    // Read guards on every storage for the duration of the pass: the slices below borrow them.
    let weight_storages: Vec<_> = pairs
        .iter()
        .map(|(linear, _)| linear.weight.storage_and_layout())
        .collect();
    let input_storages: Vec<_> = inputs.iter().map(Tensor::storage_and_layout).collect();
    // (out, n) per pair: the kernels' layout, transposed below.
    let mut transposed: Vec<Vec<f32>> = pairs
        .iter()
        .zip(&inputs)
        .map(|((linear, _), x)| vec![0.0f32; linear.out_features * x.dims()[0]])
        .collect();

    let mut projections = Vec::with_capacity(pairs.len());
    for (((linear, _), (weight_storage, weight_layout)), ((input_storage, input_layout), out)) in
        pairs
            .iter()
            .zip(&weight_storages)
            .zip(input_storages.iter().zip(transposed.iter_mut()))
    {
        let n = input_layout.dims()[0];
        if n == 0 || linear.out_features == 0 || linear.in_features == 0 {
            // Nothing to read: the output is empty or all zeros, as allocated.
            continue;
        }
        let weights = weight_rows(weight_storage, weight_layout)?;
        let x = match cpu_storage(input_storage)? {
            CpuStorage::F32(x) => contiguous_part(x, input_layout)?,
            other => return Err(KernelError::InputDtype(other.dtype())),
        };
        projections.push(Projection {
            weights,
            in_features: linear.in_features,
            x,
            n,
            out,
        });
    }
    parallel::run(isa, projections);

    pairs
        .iter()
        .zip(&inputs)
        .zip(transposed)
        .map(|(((linear, _), x), transposed)| {
            let n = x.dims()[0];
            let y = rows_from_transposed(transposed, linear.out_features, n);
            Ok(Tensor::from_vec(y, (n, linear.out_features), &Device::Cpu)?)
        })
        .collect()
}

/// The kernels' output (out, n) as rows (n, out); nothing to move for a single row (or none).
fn rows_from_transposed(transposed: Vec<f32>, out_features: usize, n: usize) -> Vec<f32> {
    if n <= 1 {
        return transposed;
    }
    let mut y = vec![0.0f32; n * out_features];
    for (o, column) in transposed.chunks_exact(n).enumerate() {
        for (r, &value) in column.iter().enumerate() {
            y[r * out_features + o] = value;
        }
    }
    y
}

/// A weight's storage as the kernels' rows.
fn weight_rows<'a>(
    storage: &'a Storage,
    layout: &candle_core::Layout,
) -> Result<Rows<'a>, KernelError> {
    match cpu_storage(storage)? {
        CpuStorage::F32(w) => Ok(Rows::F32(contiguous_part(w, layout)?)),
        CpuStorage::F16(w) => Ok(Rows::F16(contiguous_part(w, layout)?)),
        other => Err(KernelError::UnexpectedStorage(other.dtype())),
    }
}

fn cpu_storage(storage: &Storage) -> Result<&CpuStorage, KernelError> {
    match storage {
        Storage::Cpu(cpu) => Ok(cpu),
        _ => Err(KernelError::InputNotCpu),
    }
}

/// The elements a contiguous layout covers.
fn contiguous_part<'a, T>(
    data: &'a [T],
    layout: &candle_core::Layout,
) -> Result<&'a [T], KernelError> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or(KernelError::NotContiguous)?;
    Ok(&data[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_map_tasks_keeps_task_order_and_reports_the_first_failure() {
        let squares = try_map_tasks(37, &|i| Ok::<_, String>(i * i)).unwrap();
        assert_eq!(squares, (0..37).map(|i| i * i).collect::<Vec<_>>());
        let failed = try_map_tasks(37, &|i| if i % 10 == 7 { Err(i) } else { Ok(i) });
        assert_eq!(failed, Err(7));
    }

    #[test]
    fn f16_gemm_in_blocks_matches_one_block() {
        let weight = Tensor::randn(0f32, 1.0, (37, 20), &Device::Cpu).unwrap();
        let linear = Linear::new(&weight, DType::F16).unwrap();
        let x = Tensor::randn(0f32, 1.0, (33, 20), &Device::Cpu).unwrap();
        let whole = linear.forward_gemm_blocks(&x, 1000).unwrap();
        let blocked = linear.forward_gemm_blocks(&x, 7).unwrap();
        assert_eq!(blocked.dims(), &[33, 37]);
        let difference = (whole - blocked)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(difference < 1e-5, "{difference}");
    }
}
