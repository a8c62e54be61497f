//! Dense projections `y = x W^T` for the decode path of the latentserve worker.
//!
//! Decoding a DeepSeek-style model is a sequence of matrix-vector and few-row products whose cost
//! is reading the weights once from memory. [`Linear`] owns the weights (f32 or f16, always
//! accumulating in f32) and exposes one `forward` that the model calls for every projection.

mod error;
mod isa;

pub use error::KernelError;
pub use isa::Isa;

use candle_core::{DType, Device, Tensor};

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
    /// F16). The weight is converted (and copied) once here.
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

    /// x: (n, in) f32 -> (n, out) f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, KernelError> {
        self.check_input(x)?;
        let weight = match self.weight.dtype() {
            DType::F32 => self.weight.clone(),
            _ => self.weight.to_dtype(DType::F32)?,
        };
        // (n, in) x (in, out) -> (n, out)
        Ok(x.contiguous()?.matmul(&weight.t()?)?)
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
