//! `kv_b_proj` laid out for the absorbed decode of multi-head latent attention.
//!
//! A decode token never decompresses the cache: `W_UK[h]` is folded into the query
//! (`q_lat[h] = W_UK[h]^T q_nope[h]`, so that a score is one dot product with a latent row) and
//! `W_UV[h]` is applied once to the attended latent (`out[h] = W_UV[h] o_lat[h]`). Both are
//! per-head matrix-vector products; this file keeps their weights as packed rows in the storage
//! dtype of the model's projections, so that each head's product streams its rows with the
//! projection kernels, and runs the heads as tasks of the kernels' pool.

use std::sync::Mutex;

use candle_core::DType;
use half::f16;
use latentserve_kernels::{Element, Isa, KernelError, project_packed, try_map_tasks};

use super::ModelError;

/// Per-head shapes of the absorbed products.
#[derive(Debug, Clone, Copy)]
pub struct AbsorbedDims {
    pub heads: usize,
    pub nope: usize,
    pub v: usize,
    pub kv_lora: usize,
}

/// The absorbed weights in one storage dtype.
#[derive(Debug)]
struct Rows<E> {
    /// `W_UK[h]^T` head after head: (heads, kv_lora, nope), one row per latent channel.
    uk_t: Vec<E>,
    /// `W_UV[h]` head after head: (heads, v, kv_lora), as in `kv_b_proj`.
    uv: Vec<E>,
}

#[derive(Debug)]
enum Stored {
    F32(Rows<f32>),
    F16(Rows<f16>),
}

/// One of the two per-head matrices.
#[derive(Debug, Clone, Copy)]
enum Matrix {
    /// `W_UK[h]^T`: (kv_lora, nope).
    UkTransposed,
    /// `W_UV[h]`: (v, kv_lora).
    Uv,
}

/// `kv_b_proj` rearranged for the absorbed decode; f16 when the projections are (half the bytes
/// a decode token reads here), f32 otherwise.
#[derive(Debug)]
pub struct AbsorbedKvB {
    dims: AbsorbedDims,
    stored: Stored,
}

impl AbsorbedKvB {
    /// `kv_b`: the values of `kv_b_proj.weight` (heads * (nope + v), kv_lora), row-major: rows
    /// h*(nope+v) .. +nope are `W_UK[h]`, the next v rows `W_UV[h]`. `dtype`: the storage dtype
    /// of the projections (F16 keeps f16, anything else f32).
    pub fn new(kv_b: &[f32], dims: AbsorbedDims, dtype: DType) -> Result<Self, ModelError> {
        let AbsorbedDims {
            heads,
            nope,
            v,
            kv_lora,
        } = dims;
        let expected = heads * (nope + v) * kv_lora;
        if kv_b.len() != expected {
            return Err(KernelError::Length {
                what: "kv_b_proj weight",
                expected,
                got: kv_b.len(),
            }
            .into());
        }
        let head = |h: usize| &kv_b[h * (nope + v) * kv_lora..][..(nope + v) * kv_lora];
        let mut uk_t = Vec::with_capacity(heads * kv_lora * nope);
        let mut uv = Vec::with_capacity(heads * v * kv_lora);
        for h in 0..heads {
            let (w_uk, w_uv) = head(h).split_at(nope * kv_lora);
            for channel in 0..kv_lora {
                uk_t.extend((0..nope).map(|j| w_uk[j * kv_lora + channel]));
            }
            uv.extend_from_slice(w_uv);
        }
        let stored = if dtype == DType::F16 {
            let narrow = |values: Vec<f32>| values.into_iter().map(f16::from_f32).collect();
            Stored::F16(Rows {
                uk_t: narrow(uk_t),
                uv: narrow(uv),
            })
        } else {
            Stored::F32(Rows { uk_t, uv })
        };
        Ok(Self { dims, stored })
    }

    /// Bytes one decode token reads here (all of it, every head).
    pub fn weight_bytes(&self) -> usize {
        match &self.stored {
            Stored::F32(rows) => rows.bytes(),
            Stored::F16(rows) => rows.bytes(),
        }
    }

    /// `q_nope` of head h at `q[h * q_stride..][..nope]` -> `q_lat[h * q_lat_stride..][..kv_lora]`
    /// (the rest of each stride is left alone). `parallel`: run the heads on the kernels' pool
    /// (a single decode token in the step; with several, the tokens already run in parallel).
    pub fn absorb_queries(
        &self,
        q: &[f32],
        q_stride: usize,
        q_lat: &mut [f32],
        q_lat_stride: usize,
        parallel: bool,
    ) -> Result<(), ModelError> {
        let AbsorbedDims {
            heads,
            nope,
            kv_lora,
            ..
        } = self.dims;
        if nope > q_stride || q.len() < heads * q_stride {
            return Err(KernelError::Length {
                what: "decode query",
                expected: heads * q_stride,
                got: q.len(),
            }
            .into());
        }
        self.per_head(q_lat, q_lat_stride, kv_lora, parallel, |h, out| {
            self.head_product(Matrix::UkTransposed, h, &q[h * q_stride..][..nope], out)
        })
    }

    /// `o_lat`: (heads, kv_lora) -> `out`: (heads, v).
    pub fn expand_values(
        &self,
        o_lat: &[f32],
        out: &mut [f32],
        parallel: bool,
    ) -> Result<(), ModelError> {
        let AbsorbedDims {
            heads, v, kv_lora, ..
        } = self.dims;
        if o_lat.len() != heads * kv_lora {
            return Err(KernelError::Length {
                what: "attended latent",
                expected: heads * kv_lora,
                got: o_lat.len(),
            }
            .into());
        }
        self.per_head(out, v, v, parallel, |h, out| {
            self.head_product(Matrix::Uv, h, &o_lat[h * kv_lora..][..kv_lora], out)
        })
    }

    /// `out = M[h] x` for head h's matrix M of `which`.
    fn head_product(
        &self,
        which: Matrix,
        h: usize,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let AbsorbedDims {
            nope, v, kv_lora, ..
        } = self.dims;
        // (rows, in_features) of one head's matrix
        let (rows, in_features) = match which {
            Matrix::UkTransposed => (kv_lora, nope),
            Matrix::Uv => (v, kv_lora),
        };
        match &self.stored {
            Stored::F32(stored) => stored.head_product(which, h, rows, in_features, x, out),
            Stored::F16(stored) => stored.head_product(which, h, rows, in_features, x, out),
        }
    }

    /// Runs `task(h, out_h)` for every head h, `out_h` being its `width` values of `buffer`,
    /// `stride` apart; on the kernels' pool when `parallel`. Each head's values sit behind their
    /// own lock (uncontended: one task per head), so that the pool's threads can write them.
    fn per_head(
        &self,
        buffer: &mut [f32],
        stride: usize,
        width: usize,
        parallel: bool,
        task: impl Fn(usize, &mut [f32]) -> Result<(), KernelError> + Sync,
    ) -> Result<(), ModelError> {
        let heads = self.dims.heads;
        if buffer.len() < heads * stride || width > stride {
            return Err(KernelError::Length {
                what: "per-head output",
                expected: heads * stride,
                got: buffer.len(),
            }
            .into());
        }
        let outputs: Vec<Mutex<&mut [f32]>> = buffer
            .chunks_exact_mut(stride)
            .take(heads)
            .map(|head| Mutex::new(&mut head[..width]))
            .collect();
        let run = |h: usize| task(h, &mut outputs[h].lock().unwrap_or_else(|e| e.into_inner()));
        if parallel {
            try_map_tasks(heads, &run)?;
        } else {
            (0..heads).try_for_each(run)?;
        }
        Ok(())
    }
}

impl<E: Element> Rows<E> {
    fn bytes(&self) -> usize {
        (self.uk_t.len() + self.uv.len()) * std::mem::size_of::<E>()
    }

    /// `out (rows) = M[h] x (in_features)` for head h's packed `(rows, in_features)` matrix.
    fn head_product(
        &self,
        which: Matrix,
        h: usize,
        rows: usize,
        in_features: usize,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let matrix = match which {
            Matrix::UkTransposed => &self.uk_t,
            Matrix::Uv => &self.uv,
        };
        let size = rows * in_features;
        project_packed(
            Isa::detect(),
            &matrix[h * size..][..size],
            in_features,
            x,
            1,
            out,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The absorbed products against the same sums written out from `kv_b`, in f32 and f16,
    /// serial and on the pool.
    #[test]
    fn absorbed_products_match_kv_b_rows() {
        let dims = AbsorbedDims {
            heads: 3,
            nope: 5,
            v: 4,
            kv_lora: 7,
        };
        let AbsorbedDims {
            heads,
            nope,
            v,
            kv_lora,
        } = dims;
        let kv_b: Vec<f32> = (0..heads * (nope + v) * kv_lora)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let q: Vec<f32> = (0..heads * nope).map(|i| (i as f32 * 0.3).sin()).collect();
        let o_lat: Vec<f32> = (0..heads * kv_lora)
            .map(|i| (i as f32 * 0.7).cos())
            .collect();
        let w = |h: usize, row: usize, c: usize| kv_b[(h * (nope + v) + row) * kv_lora + c];
        for dtype in [DType::F32, DType::F16] {
            // f16 rounds every weight (relative 2^-11); the sums have at most 7 terms below 1.
            let tolerance = if dtype == DType::F16 { 5e-3 } else { 1e-5 };
            let absorbed = AbsorbedKvB::new(&kv_b, dims, dtype).unwrap();
            let bytes = if dtype == DType::F16 { 2 } else { 4 };
            assert_eq!(absorbed.weight_bytes(), kv_b.len() * bytes);
            for parallel in [false, true] {
                let stride = kv_lora + 2;
                let mut q_lat = vec![9.0f32; heads * stride];
                absorbed
                    .absorb_queries(&q, nope, &mut q_lat, stride, parallel)
                    .unwrap();
                let mut out = vec![0f32; heads * v];
                absorbed.expand_values(&o_lat, &mut out, parallel).unwrap();
                for h in 0..heads {
                    for c in 0..kv_lora {
                        let want: f32 = (0..nope).map(|j| q[h * nope + j] * w(h, j, c)).sum();
                        let got = q_lat[h * stride + c];
                        assert!((got - want).abs() < tolerance, "{dtype:?} uk {h} {c}");
                    }
                    // Past kv_lora the caller's values (the rope part) are left alone.
                    assert_eq!(&q_lat[h * stride + kv_lora..][..2], &[9.0, 9.0]);
                    for i in 0..v {
                        let want: f32 = (0..kv_lora)
                            .map(|c| o_lat[h * kv_lora + c] * w(h, nope + i, c))
                            .sum();
                        let got = out[h * v + i];
                        assert!((got - want).abs() < tolerance, "{dtype:?} uv {h} {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_kv_b_of_the_wrong_size_is_an_error_that_names_it() {
        let dims = AbsorbedDims {
            heads: 2,
            nope: 3,
            v: 3,
            kv_lora: 4,
        };
        let error = AbsorbedKvB::new(&[0.0; 10], dims, DType::F32).unwrap_err();
        assert!(error.to_string().contains("kv_b_proj"), "{error}");
    }
}
