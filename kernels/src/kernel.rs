//! The single-threaded projection kernel, one version per instruction set.
//!
//! Contract shared by every version: for a block of weight rows `w` (rows, in) and inputs `x`
//! (n, in), write `out[o * n + r] = sum_i x[r][i] * w[o][i]`, i.e. `out` is (rows, n): the
//! transpose of the result, so that a block of weight rows owns a contiguous part of `out` and
//! callers can split the work over threads by weight rows without sharing output memory.
//!
//! Each weight row is read from memory once per call and applied to all `n` inputs while it is
//! in L1 (the decode path is bound by weight bandwidth, not arithmetic); inputs are re-read from
//! cache. Accumulation is always f32.

use half::f16;

use crate::isa::Isa;

/// A weight element as stored: f32, or f16 widened to f32 as it is loaded.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    const IS_F16: bool;
    fn widen(self) -> f32;
}

impl Element for f32 {
    const IS_F16: bool = false;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Element for f16 {
    const IS_F16: bool = true;
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Runs the kernel for `isa`. `w`: (rows, in_features), `x`: (n, in_features), `out`: (rows, n).
///
/// Panics if the slice lengths disagree (a bug in the caller, never user input) or if `isa` is
/// not supported by this CPU (callers check [`Isa::is_supported`] first).
pub(crate) fn project<E: Element>(
    isa: Isa,
    w: &[E],
    in_features: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert!(in_features > 0, "kernels need at least one input feature");
    assert_eq!(w.len() % in_features, 0);
    assert_eq!(x.len(), n * in_features);
    assert_eq!(out.len(), w.len() / in_features * n);
    assert!(isa.is_supported(), "{isa} kernels are not supported here");
    match isa {
        Isa::Scalar => scalar::project(w, in_features, x, n, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2, FMA and F16C (asserted above) and the lengths match.
        Isa::Avx2 => unsafe { x86::avx2::project(w, in_features, x, n, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F (asserted above) and the lengths match.
        Isa::Avx512 => unsafe { x86::avx512::project(w, in_features, x, n, out) },
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 | Isa::Avx512 => unreachable!("is_supported() is false off x86_64"),
    }
}

/// Portable version: eight independent partial sums per dot product, which the compiler can keep
/// in one vector register on any target and which shortens the dependency chain.
mod scalar {
    use super::Element;

    const LANES: usize = 8;

    pub(super) fn project<E: Element>(
        w: &[E],
        in_features: usize,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        for (weight_row, out_row) in w.chunks_exact(in_features).zip(out.chunks_exact_mut(n)) {
            for (input_row, slot) in x.chunks_exact(in_features).zip(out_row.iter_mut()) {
                *slot = dot(weight_row, input_row);
            }
        }
    }

    fn dot<E: Element>(weight_row: &[E], input_row: &[f32]) -> f32 {
        let mut partial = [0.0f32; LANES];
        let weight_chunks = weight_row.chunks_exact(LANES);
        let input_chunks = input_row.chunks_exact(LANES);
        let tail: f32 = weight_chunks
            .remainder()
            .iter()
            .zip(input_chunks.remainder())
            .map(|(w, x)| w.widen() * x)
            .sum();
        for (ws, xs) in weight_chunks.zip(input_chunks) {
            for lane in 0..LANES {
                partial[lane] += ws[lane].widen() * xs[lane];
            }
        }
        partial.iter().sum::<f32>() + tail
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// Generates one x86 version of the kernel. The body is the same for every instruction set;
    /// only the vector type, lane count and the load / fma / horizontal-sum intrinsics differ.
    macro_rules! x86_kernel {
        (
            $module:ident,
            features = $features:literal,
            lanes = $lanes:literal,
            vector = $vector:ty,
            zero = $zero:ident,
            load_f32 = $load_f32:ident,
            fma = $fma:ident,
            load_f16 = |$f16_ptr:ident| $load_f16:expr,
            horizontal_sum = |$sum_arg:ident| $horizontal_sum:expr $(,)?
        ) => {
            pub(super) mod $module {
                use std::arch::x86_64::*;

                use crate::kernel::Element;

                const LANES: usize = $lanes;
                /// Weight rows per block: with `INPUTS` input rows, `ROWS * INPUTS` accumulators
                /// stay in registers, and each weight vector loaded is used `INPUTS` times.
                const ROWS: usize = 4;
                /// Input rows per block.
                const INPUTS: usize = 4;

                /// Loads `LANES` weights starting at `ptr`, widened to f32.
                ///
                /// # Safety
                /// `ptr..ptr + LANES` must be readable.
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn load_weights<E: Element>(ptr: *const E) -> $vector {
                    if E::IS_F16 {
                        let $f16_ptr = ptr.cast::<u16>();
                        // SAFETY: forwarded from the caller; f16 is 16 bits, loads are unaligned.
                        unsafe { $load_f16 }
                    } else {
                        // SAFETY: forwarded from the caller; E is f32, loads are unaligned.
                        unsafe { $load_f32(ptr.cast::<f32>()) }
                    }
                }

                #[inline]
                #[target_feature(enable = $features)]
                fn horizontal_sum($sum_arg: $vector) -> f32 {
                    $horizontal_sum
                }

                /// `out[(first_row + j) * n + first_input + b]` for `j < R`, `b < B`.
                #[inline]
                #[target_feature(enable = $features)]
                fn block<const R: usize, const B: usize, E: Element>(
                    w: &[E],
                    in_features: usize,
                    x: &[f32],
                    n: usize,
                    out: &mut [f32],
                    first_row: usize,
                    first_input: usize,
                ) {
                    let weight_rows = &w[first_row * in_features..(first_row + R) * in_features];
                    let input_rows = &x[first_input * in_features..(first_input + B) * in_features];
                    let body = in_features - in_features % LANES;
                    let mut accumulators = [[$zero(); B]; R];
                    let mut inputs = [$zero(); B];
                    let mut i = 0;
                    while i < body {
                        for b in 0..B {
                            // SAFETY: i + LANES <= body <= in_features, so the load stays inside
                            // input row b of `input_rows` (length B * in_features).
                            inputs[b] =
                                unsafe { $load_f32(input_rows.as_ptr().add(b * in_features + i)) };
                        }
                        for j in 0..R {
                            // SAFETY: as above, inside weight row j of `weight_rows`.
                            let weights = unsafe {
                                load_weights(weight_rows.as_ptr().add(j * in_features + i))
                            };
                            for b in 0..B {
                                accumulators[j][b] = $fma(weights, inputs[b], accumulators[j][b]);
                            }
                        }
                        i += LANES;
                    }
                    for j in 0..R {
                        let weight_row = &weight_rows[j * in_features..(j + 1) * in_features];
                        for b in 0..B {
                            let input_row = &input_rows[b * in_features..(b + 1) * in_features];
                            let mut sum = horizontal_sum(accumulators[j][b]);
                            for k in body..in_features {
                                sum += weight_row[k].widen() * input_row[k];
                            }
                            out[(first_row + j) * n + first_input + b] = sum;
                        }
                    }
                }

                /// All inputs against `R` weight rows starting at `first_row`.
                #[inline]
                #[target_feature(enable = $features)]
                fn row_block<const R: usize, E: Element>(
                    w: &[E],
                    in_features: usize,
                    x: &[f32],
                    n: usize,
                    out: &mut [f32],
                    first_row: usize,
                ) {
                    let mut first_input = 0;
                    while first_input + INPUTS <= n {
                        block::<R, INPUTS, E>(w, in_features, x, n, out, first_row, first_input);
                        first_input += INPUTS;
                    }
                    match n - first_input {
                        0 => {}
                        1 => block::<R, 1, E>(w, in_features, x, n, out, first_row, first_input),
                        2 => block::<R, 2, E>(w, in_features, x, n, out, first_row, first_input),
                        3 => block::<R, 3, E>(w, in_features, x, n, out, first_row, first_input),
                        _ => unreachable!("fewer than INPUTS inputs remain"),
                    }
                }

                /// See [`crate::kernel::project`].
                ///
                /// # Safety
                /// The CPU must support the features this module is compiled for.
                #[target_feature(enable = $features)]
                pub(crate) unsafe fn project<E: Element>(
                    w: &[E],
                    in_features: usize,
                    x: &[f32],
                    n: usize,
                    out: &mut [f32],
                ) {
                    let rows = w.len() / in_features;
                    let mut first_row = 0;
                    while first_row + ROWS <= rows {
                        row_block::<ROWS, E>(w, in_features, x, n, out, first_row);
                        first_row += ROWS;
                    }
                    while first_row < rows {
                        row_block::<1, E>(w, in_features, x, n, out, first_row);
                        first_row += 1;
                    }
                }
            }
        };
    }

    x86_kernel!(
        avx2,
        features = "avx2,fma,f16c",
        lanes = 8,
        vector = __m256,
        zero = _mm256_setzero_ps,
        load_f32 = _mm256_loadu_ps,
        fma = _mm256_fmadd_ps,
        load_f16 = |ptr| _mm256_cvtph_ps(_mm_loadu_si128(ptr.cast::<__m128i>())),
        horizontal_sum = |v| {
            let halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
            _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps::<0b01>(pairs, pairs)))
        },
    );

    x86_kernel!(
        avx512,
        features = "avx512f",
        lanes = 16,
        vector = __m512,
        zero = _mm512_setzero_ps,
        load_f32 = _mm512_loadu_ps,
        fma = _mm512_fmadd_ps,
        load_f16 = |ptr| _mm512_cvtph_ps(_mm256_loadu_si256(ptr.cast::<__m256i>())),
        horizontal_sum = |v| _mm512_reduce_add_ps(v),
    );
}
