//! Small f32 building blocks shared by the layers: row-major activations are plain `Vec<f32>`
//! slices of `(rows, width)`; projections go through `latentserve_kernels::Linear`.

use candle_core::{DType, Tensor};
use latentserve_kernels::Linear;

use super::ModelError;

/// y = x W^T for `rows` rows of x (rows, in) -> (rows, out).
pub fn project(linear: &Linear, x: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
    Ok(linear.forward_rows(x, rows)?)
}

/// Builds a projection from a weight tensor (out, in) in the storage dtype.
pub fn linear(weight: &Tensor, dtype: DType) -> Result<Linear, ModelError> {
    Ok(Linear::new(weight, dtype)?)
}

/// RMSNorm of every `weight.len()`-wide row of `x`, in place: x * rsqrt(mean(x^2) + eps) * w.
pub fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f64) {
    for row in x.chunks_exact_mut(weight.len()) {
        rms_norm(row, weight, eps);
    }
}

/// RMSNorm of one row in place.
pub fn rms_norm(row: &mut [f32], weight: &[f32], eps: f64) {
    let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    let inv = 1.0 / (mean_sq + eps as f32).sqrt();
    for (v, w) in row.iter_mut().zip(weight) {
        *v = w * (*v * inv);
    }
}

/// silu(gate) * up, where each row of `gate_up` is `gate (width) ++ up (width)`:
/// (rows, 2 * width) -> (rows, width).
pub fn silu_mul(gate_up: &[f32], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks_exact(2 * width) {
        let (gate, up) = row.split_at(width);
        out.extend(
            gate.iter()
                .zip(up)
                .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u),
        );
    }
    out
}

/// In-place softmax of a row.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// y += alpha * x.
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_definition() {
        let mut row = vec![1.0, 2.0, 3.0, 4.0];
        let weight = vec![1.0, 0.5, 2.0, 1.0];
        rms_norm(&mut row, &weight, 1e-6);
        let rms = ((1.0 + 4.0 + 9.0 + 16.0) / 4.0f32 + 1e-6).sqrt();
        let expected = [1.0 / rms, 1.0 / rms, 6.0 / rms, 4.0 / rms];
        for (a, b) in row.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn softmax_normalizes() {
        let mut row = vec![0.0, (2.0f32).ln()];
        softmax(&mut row);
        assert!((row[0] - 1.0 / 3.0).abs() < 1e-6 && (row[1] - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn silu_mul_splits_gate_and_up() {
        let out = silu_mul(&[0.0, 1.0, 2.0, 3.0], 2);
        let silu1 = 1.0 / (1.0 + (-1.0f32).exp());
        assert_eq!(out[0], 0.0);
        assert!((out[1] - silu1 * 3.0).abs() < 1e-6);
    }
}
