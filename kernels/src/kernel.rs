//! The single-threaded kernels, one version per instruction set.
//!
//! [`project`]: for weight rows `w` (rows, in) and inputs `x` (n, in), write
//! `out[o * n + r] = sum_i x[r][i] * w[o][i]`, i.e. `out` is (rows, n): the transpose of the
//! result, so that a block of weight rows owns a contiguous part of `out` and callers can split
//! the work over threads by weight rows without sharing output memory. Each weight row is read
//! from memory once per call and applied to all `n` inputs while it is in L1 (the decode path is
//! bound by weight bandwidth, not arithmetic); inputs are re-read from cache.
//!
//! [`accumulate`]: for rows `w` (rows, width) and weights `p` (rows, n), add
//! `sum_i p[i][b] * w[i][k]` to `out[b * width + k]`: the weighted sum of attention values, with
//! the rows read in place from a paged cache.
//!
//! The rows of `w` need not be packed: [`RowStarts`] says where each one begins, so the same
//! kernels read a weight matrix and rows gathered from a paged KV cache. Accumulation is always
//! f32.

use half::f16;

use crate::isa::Isa;

/// A stored element: f32, or f16 widened to f32 as it is loaded.
pub trait Element: sealed::Sealed + Copy + Send + Sync + 'static {
    #[doc(hidden)]
    const IS_F16: bool;
    #[doc(hidden)]
    fn widen(self) -> f32;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
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

/// Where each row a kernel reads begins in its buffer.
pub(crate) trait RowStarts: Copy + Send + Sync {
    /// Whether the rows follow each other in memory, so that reading ahead of a row reads the
    /// rows after it.
    const SEQUENTIAL: bool;
    fn len(&self) -> usize;
    /// Offset of row `row`'s first element.
    fn start(&self, row: usize) -> usize;
    /// Whether every row, `width` elements long, lies inside a buffer of `buffer_len` elements.
    fn fits(&self, width: usize, buffer_len: usize) -> bool;
}

/// Rows one after the other, `stride` elements apart (a weight matrix).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Packed {
    pub(crate) rows: usize,
    pub(crate) stride: usize,
}

impl RowStarts for Packed {
    const SEQUENTIAL: bool = true;
    #[inline(always)]
    fn len(&self) -> usize {
        self.rows
    }
    #[inline(always)]
    fn start(&self, row: usize) -> usize {
        row * self.stride
    }
    fn fits(&self, width: usize, buffer_len: usize) -> bool {
        self.rows == 0 || (self.rows - 1) * self.stride + width <= buffer_len
    }
}

/// Rows anywhere in the buffer (rows of a paged cache): row i begins at `starts[i] + offset`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gathered<'a> {
    pub(crate) starts: &'a [usize],
    pub(crate) offset: usize,
}

impl RowStarts for Gathered<'_> {
    const SEQUENTIAL: bool = false;
    #[inline(always)]
    fn len(&self) -> usize {
        self.starts.len()
    }
    #[inline(always)]
    fn start(&self, row: usize) -> usize {
        self.starts[row] + self.offset
    }
    fn fits(&self, width: usize, buffer_len: usize) -> bool {
        self.starts
            .iter()
            .all(|&start| start + self.offset + width <= buffer_len)
    }
}

/// Calls `$function` of the module compiled for `isa` (the scalar one is `$scalar`).
///
/// Callers first assert that `isa` is supported by this CPU and that every row lies in its
/// buffer, which is what the x86 versions require.
macro_rules! on_isa {
    ($isa:expr, scalar => $scalar:expr, $function:ident($($arg:expr),* $(,)?)) => {
        match $isa {
            Isa::Scalar => $scalar,
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU supports AVX2, FMA and F16C and the rows lie in their buffer
            // (asserted by the caller).
            Isa::Avx2 => unsafe { x86::avx2::$function($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU supports AVX-512F and the rows lie in their buffer (asserted by
            // the caller).
            Isa::Avx512 => unsafe { x86::avx512::$function($($arg),*) },
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => unreachable!("is_supported() is false off x86_64"),
        }
    };
}

/// Runs the projection kernel for `isa`. `w` holds `rows.len()` rows of `in_features` values,
/// `x`: (n, in_features), `out`: (rows, n).
///
/// Panics if the lengths disagree or a row lies outside `w` (a bug in the caller, never user
/// input), or if `isa` is not supported by this CPU (callers check [`Isa::is_supported`] first).
pub(crate) fn project<E: Element, S: RowStarts>(
    isa: Isa,
    w: &[E],
    rows: S,
    in_features: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert!(in_features > 0, "kernels need at least one input feature");
    assert!(
        rows.fits(in_features, w.len()),
        "a weight row lies outside the buffer"
    );
    assert_eq!(x.len(), n * in_features);
    assert_eq!(out.len(), rows.len() * n);
    assert!(isa.is_supported(), "{isa} kernels are not supported here");
    on_isa!(
        isa,
        scalar => scalar::project(w, rows, in_features, x, n, out),
        project(w, rows, in_features, x, n, out)
    )
}

/// Whether [`project_transposed`] has a version for `isa`, element type `E` and `n` inputs:
/// f32 rows, and `n` one or two vector widths of an x86 instruction set.
pub(crate) fn has_transposed<E: Element>(isa: Isa, n: usize) -> bool {
    !E::IS_F16
        && isa != Isa::Scalar
        && n.is_multiple_of(isa.lanes())
        && (1..=2).contains(&(n / isa.lanes()))
}

/// Like [`project`], with the inputs transposed: `xt` is (in_features, n). Every output row is
/// whole vectors: each row element is broadcast against all inputs at once and no dot product
/// needs a horizontal sum, which makes the product bound by arithmetic alone (decode attention,
/// where sixteen heads read the same latent row).
///
/// Panics as [`project`] does, and where [`has_transposed`] is false.
pub(crate) fn project_transposed<E: Element, S: RowStarts>(
    isa: Isa,
    w: &[E],
    rows: S,
    in_features: usize,
    xt: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert!(
        rows.fits(in_features, w.len()),
        "a weight row lies outside the buffer"
    );
    assert_eq!(xt.len(), n * in_features);
    assert_eq!(out.len(), rows.len() * n);
    assert!(isa.is_supported(), "{isa} kernels are not supported here");
    assert!(
        has_transposed::<E>(isa, n),
        "no transposed {isa} kernel for {n} inputs"
    );
    on_isa!(
        isa,
        scalar => unreachable!("has_transposed() is false for scalar"),
        project_transposed(w, rows, in_features, xt, n, out)
    )
}

/// Runs the accumulation kernel for `isa`. `w` holds `rows.len()` rows of `width` values,
/// `p`: (rows, n), `out`: (n, width).
///
/// Panics as [`project`] does.
pub(crate) fn accumulate<E: Element, S: RowStarts>(
    isa: Isa,
    w: &[E],
    rows: S,
    width: usize,
    p: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert!(rows.fits(width, w.len()), "a row lies outside the buffer");
    assert_eq!(p.len(), rows.len() * n);
    assert_eq!(out.len(), n * width);
    assert!(isa.is_supported(), "{isa} kernels are not supported here");
    on_isa!(
        isa,
        scalar => scalar::accumulate(w, rows, width, p, n, out),
        accumulate(w, rows, width, p, n, out)
    )
}

/// Portable version: eight independent partial sums per dot product, which the compiler can keep
/// in one vector register on any target and which shortens the dependency chain.
mod scalar {
    use super::{Element, RowStarts};

    const LANES: usize = 8;

    pub(super) fn project<E: Element, S: RowStarts>(
        w: &[E],
        rows: S,
        in_features: usize,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        for (row, out_row) in out.chunks_exact_mut(n).enumerate() {
            let weight_row = &w[rows.start(row)..][..in_features];
            for (input_row, slot) in x.chunks_exact(in_features).zip(out_row.iter_mut()) {
                *slot = dot(weight_row, input_row);
            }
        }
    }

    pub(super) fn accumulate<E: Element, S: RowStarts>(
        w: &[E],
        rows: S,
        width: usize,
        p: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        for (row, weights) in p.chunks_exact(n).enumerate() {
            let values = &w[rows.start(row)..][..width];
            for (&weight, out_row) in weights.iter().zip(out.chunks_exact_mut(width)) {
                for (o, v) in out_row.iter_mut().zip(values) {
                    *o += weight * v.widen();
                }
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
    /// Generates one x86 version of the kernels. The bodies are the same for every instruction
    /// set; only the vector type, lane count and the intrinsics differ.
    macro_rules! x86_kernel {
        (
            $module:ident,
            features = $features:literal,
            lanes = $lanes:literal,
            vector = $vector:ty,
            zero = $zero:ident,
            splat = $splat:ident,
            load_f32 = $load_f32:ident,
            store_f32 = $store_f32:ident,
            add = $add:ident,
            fma = $fma:ident,
            accumulate_weights = $accumulate_weights:literal,
            broadcast_accumulators = $broadcast_accumulators:literal,
            load_f16 = |$f16_ptr:ident| $load_f16:expr,
            horizontal_sum = |$sum_arg:ident| $horizontal_sum:expr $(,)?
        ) => {
            pub(super) mod $module {
                use std::arch::x86_64::*;

                use crate::kernel::{Element, RowStarts};

                const LANES: usize = $lanes;
                /// Weight rows per block: with `INPUTS` input rows, `ROWS * INPUTS` accumulators
                /// stay in registers, and each weight vector loaded is used `INPUTS` times.
                const ROWS: usize = 4;
                /// Input rows per block.
                const INPUTS: usize = 4;
                /// How far ahead, in elements, an f16 weight row is prefetched (1 KiB).
                const F16_PREFETCH_AHEAD: usize = 512;
                /// `stream_rows`: how far ahead of the element being read memory is prefetched.
                const STREAM_AHEAD_BYTES: usize = 2048;
                const CACHE_LINE_BYTES: usize = 64;
                /// `accumulate`: vectors of columns per block; with `WEIGHTS` weights per row,
                /// `COLUMNS * WEIGHTS` accumulators stay in registers.
                const COLUMNS: usize = 2;
                const WEIGHTS: usize = $accumulate_weights;
                /// `project_transposed`: accumulators in registers, shared out as
                /// (rows per block) x (vectors per output row).
                const BROADCAST: usize = $broadcast_accumulators;

                /// Loads `LANES` elements starting at `ptr`, widened to f32.
                ///
                /// # Safety
                /// `ptr..ptr + LANES` must be readable.
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn load_widened<E: Element>(ptr: *const E) -> $vector {
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
                #[allow(clippy::too_many_arguments)]
                fn block<const R: usize, const B: usize, E: Element, S: RowStarts>(
                    w: &[E],
                    rows: S,
                    in_features: usize,
                    x: &[f32],
                    n: usize,
                    out: &mut [f32],
                    first_row: usize,
                    first_input: usize,
                    next_starts: Option<&[usize; R]>,
                ) {
                    let starts: [usize; R] = std::array::from_fn(|j| rows.start(first_row + j));
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
                        if let Some(next_starts) = next_starts {
                            // The next block's rows, fetched while this block's later inputs
                            // run from cache, so that memory is never idle between blocks.
                            for &start in next_starts {
                                _mm_prefetch::<_MM_HINT_T0>(
                                    w.as_ptr().wrapping_add(start + i).cast::<i8>(),
                                );
                            }
                        }
                        for j in 0..R {
                            if E::IS_F16 {
                                // An f16 row is walked half as fast per step as an f32 one, so
                                // the out-of-order window alone keeps too few of its cache lines
                                // in flight. A prefetch never faults, even past the buffer.
                                _mm_prefetch::<_MM_HINT_T0>(
                                    w.as_ptr()
                                        .wrapping_add(starts[j] + i + F16_PREFETCH_AHEAD)
                                        .cast::<i8>(),
                                );
                            }
                            // SAFETY: the caller checked that every row (in_features long) lies
                            // in `w`, and i + LANES <= in_features.
                            let weights = unsafe { load_widened(w.as_ptr().add(starts[j] + i)) };
                            for b in 0..B {
                                accumulators[j][b] = $fma(weights, inputs[b], accumulators[j][b]);
                            }
                        }
                        i += LANES;
                    }
                    for j in 0..R {
                        let weight_row = &w[starts[j]..][..in_features];
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

                /// `out[row * B + b] = w[row] . x[b]` for `B` inputs, reading every row from start
                /// to end before the next one, with a software prefetch `STREAM_AHEAD_BYTES`
                /// ahead; `V` vectors per step, i.e. `V * B` accumulators.
                ///
                /// Why not the row blocks of [`block`] for so few inputs: on the AMD EPYC we
                /// measure on, one sequential stream per core reads weights at the memory ceiling
                /// while four interleaved row streams do not (2 threads, 1024x1024, one input:
                /// f16 44 against 31 GB/s, f32 44 against 41 GB/s); with more inputs the blocks'
                /// reuse of each loaded input wins (f32 from 2 inputs, f16 from 5). The table is
                /// in kernels/README.md.
                #[inline]
                #[target_feature(enable = $features)]
                fn stream_rows<const B: usize, const V: usize, E: Element, S: RowStarts>(
                    w: &[E],
                    rows: S,
                    in_features: usize,
                    x: &[f32],
                    out: &mut [f32],
                ) {
                    let step = V * LANES;
                    let lines_per_step =
                        (step * std::mem::size_of::<E>()).div_ceil(CACHE_LINE_BYTES);
                    let body = in_features - in_features % step;
                    let vectors_end = in_features - in_features % LANES;
                    for (row, slots) in out.chunks_exact_mut(B).enumerate() {
                        let start = rows.start(row);
                        let row_ptr = w.as_ptr().wrapping_add(start);
                        let mut accumulators = [[$zero(); B]; V];
                        let mut i = 0;
                        while i < body {
                            for line in 0..lines_per_step {
                                // A prefetch never faults, even past the buffer.
                                _mm_prefetch::<_MM_HINT_T0>(
                                    row_ptr
                                        .wrapping_add(i)
                                        .cast::<i8>()
                                        .wrapping_add(STREAM_AHEAD_BYTES + line * CACHE_LINE_BYTES),
                                );
                            }
                            for (v, vector_accumulators) in accumulators.iter_mut().enumerate() {
                                let k = i + v * LANES;
                                // SAFETY: k + LANES <= body <= in_features: inside row `row`
                                // (checked by the caller to lie in `w`).
                                let weights = unsafe { load_widened(row_ptr.add(k)) };
                                for (b, accumulator) in vector_accumulators.iter_mut().enumerate() {
                                    // SAFETY: inside input b, as `x` is (B, in_features).
                                    let input =
                                        unsafe { $load_f32(x.as_ptr().add(b * in_features + k)) };
                                    *accumulator = $fma(weights, input, *accumulator);
                                }
                            }
                            i += step;
                        }
                        while i < vectors_end {
                            // SAFETY: i + LANES <= in_features, as above.
                            let weights = unsafe { load_widened(row_ptr.add(i)) };
                            for (b, accumulator) in accumulators[0].iter_mut().enumerate() {
                                // SAFETY: as above.
                                let input =
                                    unsafe { $load_f32(x.as_ptr().add(b * in_features + i)) };
                                *accumulator = $fma(weights, input, *accumulator);
                            }
                            i += LANES;
                        }
                        let weight_row = &w[start..][..in_features];
                        for (b, slot) in slots.iter_mut().enumerate() {
                            let total = accumulators[1..]
                                .iter()
                                .fold(accumulators[0][b], |sum, part| $add(sum, part[b]));
                            let input = &x[b * in_features..][..in_features];
                            let mut sum = horizontal_sum(total);
                            for k in vectors_end..in_features {
                                sum += weight_row[k].widen() * input[k];
                            }
                            *slot = sum;
                        }
                    }
                }

                /// All inputs against `R` weight rows starting at `first_row`.
                #[inline]
                #[target_feature(enable = $features)]
                fn row_block<const R: usize, E: Element, S: RowStarts>(
                    w: &[E],
                    rows: S,
                    in_features: usize,
                    x: &[f32],
                    n: usize,
                    out: &mut [f32],
                    first_row: usize,
                ) {
                    // With several blocks of inputs, the first streams this block's weight rows
                    // from memory and the others reuse them from cache; those prefetch the next
                    // weight rows (a prefetch never faults, so past the last row is harmless).
                    let next_starts: [usize; R] = std::array::from_fn(|j| {
                        rows.start((first_row + R + j).min(rows.len().saturating_sub(1)))
                    });
                    let mut first_input = 0;
                    while first_input + INPUTS <= n {
                        block::<R, INPUTS, E, S>(
                            w,
                            rows,
                            in_features,
                            x,
                            n,
                            out,
                            first_row,
                            first_input,
                            (first_input > 0).then_some(&next_starts),
                        );
                        first_input += INPUTS;
                    }
                    match n - first_input {
                        0 => {}
                        1 => block::<R, 1, E, S>(
                            w,
                            rows,
                            in_features,
                            x,
                            n,
                            out,
                            first_row,
                            first_input,
                            None,
                        ),
                        2 => block::<R, 2, E, S>(
                            w,
                            rows,
                            in_features,
                            x,
                            n,
                            out,
                            first_row,
                            first_input,
                            None,
                        ),
                        3 => block::<R, 3, E, S>(
                            w,
                            rows,
                            in_features,
                            x,
                            n,
                            out,
                            first_row,
                            first_input,
                            None,
                        ),
                        _ => unreachable!("fewer than INPUTS inputs remain"),
                    }
                }

                /// See [`crate::kernel::project`].
                ///
                /// # Safety
                /// The CPU must support the features this module is compiled for, and every row
                /// (`in_features` long) must lie inside `w`.
                #[target_feature(enable = $features)]
                pub(crate) unsafe fn project<E: Element, S: RowStarts>(
                    w: &[E],
                    rows: S,
                    in_features: usize,
                    x: &[f32],
                    n: usize,
                    out: &mut [f32],
                ) {
                    if S::SEQUENTIAL {
                        match (n, E::IS_F16) {
                            (1, _) => {
                                return stream_rows::<1, 4, E, S>(w, rows, in_features, x, out);
                            }
                            (2, true) => {
                                return stream_rows::<2, 2, E, S>(w, rows, in_features, x, out);
                            }
                            (3, true) => {
                                return stream_rows::<3, 2, E, S>(w, rows, in_features, x, out);
                            }
                            (4, true) => {
                                return stream_rows::<4, 2, E, S>(w, rows, in_features, x, out);
                            }
                            _ => {}
                        }
                    }
                    let count = rows.len();
                    let mut first_row = 0;
                    while first_row + ROWS <= count {
                        row_block::<ROWS, E, S>(w, rows, in_features, x, n, out, first_row);
                        first_row += ROWS;
                    }
                    while first_row < count {
                        row_block::<1, E, S>(w, rows, in_features, x, n, out, first_row);
                        first_row += 1;
                    }
                }

                /// `out[(first_row + j) * n ..][.. Q * LANES]` for `j < R`, from the transposed
                /// inputs `xt` (in_features, n = Q * LANES).
                #[inline]
                #[target_feature(enable = $features)]
                fn transposed_block<const Q: usize, const R: usize, E: Element, S: RowStarts>(
                    w: &[E],
                    rows: S,
                    in_features: usize,
                    xt: &[f32],
                    out: &mut [f32],
                    first_row: usize,
                ) {
                    let n = Q * LANES;
                    let starts: [usize; R] = std::array::from_fn(|j| rows.start(first_row + j));
                    let mut accumulators = [[$zero(); Q]; R];
                    for k in 0..in_features {
                        let mut inputs = [$zero(); Q];
                        for c in 0..Q {
                            // SAFETY: k < in_features and c * LANES + LANES <= n, inside `xt`.
                            inputs[c] = unsafe { $load_f32(xt.as_ptr().add(k * n + c * LANES)) };
                        }
                        for j in 0..R {
                            // SAFETY: the caller checked that row j (in_features long) lies in
                            // `w`, and k < in_features.
                            let value = unsafe { *w.as_ptr().add(starts[j] + k) };
                            let value = $splat(value.widen());
                            for c in 0..Q {
                                accumulators[j][c] = $fma(inputs[c], value, accumulators[j][c]);
                            }
                        }
                    }
                    let out_rows = &mut out[first_row * n..(first_row + R) * n];
                    for j in 0..R {
                        for c in 0..Q {
                            // SAFETY: j * n + c * LANES + LANES <= R * n = out_rows.len().
                            unsafe {
                                $store_f32(
                                    out_rows.as_mut_ptr().add(j * n + c * LANES),
                                    accumulators[j][c],
                                )
                            };
                        }
                    }
                }

                #[inline]
                #[target_feature(enable = $features)]
                fn transposed_rows<const Q: usize, const R: usize, E: Element, S: RowStarts>(
                    w: &[E],
                    rows: S,
                    in_features: usize,
                    xt: &[f32],
                    out: &mut [f32],
                ) {
                    let count = rows.len();
                    let mut first_row = 0;
                    while first_row + R <= count {
                        transposed_block::<Q, R, E, S>(w, rows, in_features, xt, out, first_row);
                        first_row += R;
                    }
                    while first_row < count {
                        transposed_block::<Q, 1, E, S>(w, rows, in_features, xt, out, first_row);
                        first_row += 1;
                    }
                }

                /// See [`crate::kernel::project_transposed`].
                ///
                /// # Safety
                /// As for [`project`].
                #[target_feature(enable = $features)]
                pub(crate) unsafe fn project_transposed<E: Element, S: RowStarts>(
                    w: &[E],
                    rows: S,
                    in_features: usize,
                    xt: &[f32],
                    n: usize,
                    out: &mut [f32],
                ) {
                    if n == LANES {
                        transposed_rows::<1, { BROADCAST }, E, S>(w, rows, in_features, xt, out)
                    } else {
                        debug_assert_eq!(n, 2 * LANES, "checked by has_transposed");
                        transposed_rows::<2, { BROADCAST / 2 }, E, S>(w, rows, in_features, xt, out)
                    }
                }

                /// Adds to `out[(first + b) * width + column ..][.. C * LANES]`, for `b < B`,
                /// the weighted sum over all rows of their columns `column .. column + C * LANES`.
                #[inline]
                #[target_feature(enable = $features)]
                #[allow(clippy::too_many_arguments)]
                fn accumulate_block<const C: usize, const B: usize, E: Element, S: RowStarts>(
                    w: &[E],
                    rows: S,
                    width: usize,
                    p: &[f32],
                    n: usize,
                    out: &mut [f32],
                    column: usize,
                    first: usize,
                ) {
                    let mut accumulators = [[$zero(); C]; B];
                    for row in 0..rows.len() {
                        let start = rows.start(row) + column;
                        let mut values = [$zero(); C];
                        for c in 0..C {
                            // SAFETY: the caller checked that every row (width long) lies in
                            // `w`, and column + C * LANES <= width.
                            values[c] = unsafe { load_widened(w.as_ptr().add(start + c * LANES)) };
                        }
                        let weights = &p[row * n + first..][..B];
                        for b in 0..B {
                            let weight = $splat(weights[b]);
                            for c in 0..C {
                                accumulators[b][c] = $fma(values[c], weight, accumulators[b][c]);
                            }
                        }
                    }
                    for b in 0..B {
                        let out_part = &mut out[(first + b) * width + column..][..C * LANES];
                        for c in 0..C {
                            // SAFETY: c * LANES + LANES <= out_part.len().
                            unsafe {
                                let ptr = out_part.as_mut_ptr().add(c * LANES);
                                $store_f32(ptr, $add($load_f32(ptr), accumulators[b][c]));
                            }
                        }
                    }
                }

                /// Every weight against `C` vectors of columns starting at `column`.
                #[inline]
                #[target_feature(enable = $features)]
                fn accumulate_columns<const C: usize, E: Element, S: RowStarts>(
                    w: &[E],
                    rows: S,
                    width: usize,
                    p: &[f32],
                    n: usize,
                    out: &mut [f32],
                    column: usize,
                ) {
                    let mut first = 0;
                    while first + WEIGHTS <= n {
                        accumulate_block::<C, WEIGHTS, E, S>(
                            w, rows, width, p, n, out, column, first,
                        );
                        first += WEIGHTS;
                    }
                    while first < n {
                        accumulate_block::<C, 1, E, S>(w, rows, width, p, n, out, column, first);
                        first += 1;
                    }
                }

                /// See [`crate::kernel::accumulate`].
                ///
                /// # Safety
                /// The CPU must support the features this module is compiled for, and every row
                /// (`width` long) must lie inside `w`.
                #[target_feature(enable = $features)]
                pub(crate) unsafe fn accumulate<E: Element, S: RowStarts>(
                    w: &[E],
                    rows: S,
                    width: usize,
                    p: &[f32],
                    n: usize,
                    out: &mut [f32],
                ) {
                    let body = width - width % LANES;
                    let mut column = 0;
                    while column + COLUMNS * LANES <= body {
                        accumulate_columns::<COLUMNS, E, S>(w, rows, width, p, n, out, column);
                        column += COLUMNS * LANES;
                    }
                    while column < body {
                        accumulate_columns::<1, E, S>(w, rows, width, p, n, out, column);
                        column += LANES;
                    }
                    if body < width {
                        for row in 0..rows.len() {
                            let values = &w[rows.start(row)..][..width];
                            for b in 0..n {
                                let weight = p[row * n + b];
                                let out_row = &mut out[b * width..][..width];
                                for k in body..width {
                                    out_row[k] += weight * values[k].widen();
                                }
                            }
                        }
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
        splat = _mm256_set1_ps,
        load_f32 = _mm256_loadu_ps,
        store_f32 = _mm256_storeu_ps,
        add = _mm256_add_ps,
        fma = _mm256_fmadd_ps,
        accumulate_weights = 4,
        broadcast_accumulators = 8,
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
        splat = _mm512_set1_ps,
        load_f32 = _mm512_loadu_ps,
        store_f32 = _mm512_storeu_ps,
        add = _mm512_add_ps,
        fma = _mm512_fmadd_ps,
        accumulate_weights = 8,
        broadcast_accumulators = 8,
        load_f16 = |ptr| _mm512_cvtph_ps(_mm256_loadu_si256(ptr.cast::<__m256i>())),
        horizontal_sum = |v| _mm512_reduce_add_ps(v),
    );
}
