//! Prefill products (n >= [`crate::GEMM_MIN_ROWS`] rows) through the `gemm` crate, with the
//! operands laid out the way its kernels read them.
//!
//! `gemm` computes a column-major destination from a column-major left operand and a right
//! operand whose columns are contiguous. Our weights `W` are row-major `(out, in)`, which is
//! exactly a right operand `W^T (in, out)` with contiguous columns, so it is passed in place. The
//! activations `x (n, in)` are transposed once into a column-major left operand and the product
//! comes back column-major `(n, out)`, which one more transpose turns into rows. Going through
//! candle's matmul instead (`x.matmul(W.t())`) made `gemm` repack every element of `W` from rows
//! into its panels in every call. `cargo run --release -p latentserve-kernels --example
//! gemm_layouts` (2 threads, AVX-512, transposes included): 157-169 against 39-77 GFLOP/s for the
//! 32-64 rows of an expert; see the crate's README for 512 rows.

use gemm::Parallelism;

use crate::KernelError;
use rayon::prelude::*;

/// Rows x columns tile of the transposes: 16 x 16 f32 is 1 KiB read and written per tile, well
/// inside L1, with whole cache lines on both sides.
const TILE: usize = 16;

/// Below this many elements a transpose stays on the calling thread.
const PARALLEL_TRANSPOSE_ELEMENTS: usize = 1 << 16;

/// `src (rows, cols)` row-major -> `dst (cols, rows)` row-major. Split over rayon's threads by
/// bands of TILE destination rows when large.
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert_eq!(src.len(), rows * cols, "src must be (rows, cols)");
    assert_eq!(dst.len(), rows * cols, "dst must be (cols, rows)");
    if rows == 0 || cols == 0 {
        return;
    }
    let band = |(index, dst_band): (usize, &mut [f32])| {
        let c0 = index * TILE;
        let band_cols = dst_band.len() / rows;
        for r0 in (0..rows).step_by(TILE) {
            let r1 = (r0 + TILE).min(rows);
            if band_cols == TILE && r1 - r0 == TILE {
                // A whole tile through a fixed-size array: row loads and column stores the
                // compiler vectorizes, with no bounds checks per element.
                let mut tile = [[0f32; TILE]; TILE];
                for (r, tile_row) in tile.iter_mut().enumerate() {
                    tile_row.copy_from_slice(&src[(r0 + r) * cols + c0..][..TILE]);
                }
                for c in 0..TILE {
                    let dst_row: &mut [f32; TILE] = (&mut dst_band[c * rows + r0..][..TILE])
                        .try_into()
                        .expect("a tile row");
                    for (r, value) in dst_row.iter_mut().enumerate() {
                        *value = tile[r][c];
                    }
                }
                continue;
            }
            for c in 0..band_cols {
                let dst_row = &mut dst_band[c * rows + r0..c * rows + r1];
                for (r, value) in (r0..r1).zip(dst_row) {
                    *value = src[r * cols + c0 + c];
                }
            }
        }
    };
    if rows * cols >= PARALLEL_TRANSPOSE_ELEMENTS {
        dst.par_chunks_mut(TILE * rows).enumerate().for_each(band);
    } else {
        dst.chunks_mut(TILE * rows).enumerate().for_each(band);
    }
}

/// `yt (rows_w, n) = W x^T` for `xt = x^T (in, n)` and `weights = W (rows_w, in)` row-major, f32,
/// over rayon's threads. `yt` is the column-major `(n, rows_w)` product `x W^T`.
pub(crate) fn gemm_rows(
    xt: &[f32],
    n: usize,
    in_features: usize,
    weights: &[f32],
    yt: &mut [f32],
) -> Result<(), KernelError> {
    let rows_w = weights.len() / in_features.max(1);
    product(
        // (n, rows_w), column-major
        StridedMut {
            data: yt,
            rows: n,
            cols: rows_w,
            row_stride: 1,
            col_stride: n,
        },
        // (n, in), column-major
        Strided::rows(xt, in_features, n, n).t(),
        // (in, rows_w): the rows of W as columns
        Strided::rows(weights, rows_w, in_features, in_features).t(),
        Parallelism::Rayon(rayon::current_num_threads()),
    )
}

/// A read-only f32 matrix view: element `(r, c)` is `data[r * row_stride + c * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// A writable f32 matrix view, addressed as [`Strided`].
#[derive(Debug)]
pub struct StridedMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Strided<'a> {
    /// A row-major `(rows, cols)` matrix whose rows are `row_stride` apart.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose, with no copy.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element of the view lies inside its buffer (and its offsets fit isize).
    fn check(&self, what: &'static str) -> Result<(), KernelError> {
        let Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        } = *self;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let last = (rows - 1).checked_mul(row_stride).and_then(|r| {
            (cols - 1)
                .checked_mul(col_stride)
                .and_then(|c| r.checked_add(c))
        });
        match last {
            Some(last) if last < data.len() && last <= isize::MAX as usize => Ok(()),
            _ => Err(KernelError::ViewOutOfBounds {
                what,
                rows,
                cols,
                row_stride,
                col_stride,
                len: data.len(),
            }),
        }
    }
}

impl<'a> StridedMut<'a> {
    /// A row-major `(rows, cols)` matrix whose rows are `row_stride` apart.
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The same elements, read-only.
    fn view(&self) -> Strided<'_> {
        Strided {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }
}

/// `dst = lhs rhs` on the calling thread (callers run many small products in parallel, such as
/// one attention head each). Any strides: `gemm` picks its own packing; it is fastest when `dst`
/// and `lhs` have unit row stride or, both, unit column stride (it transposes the problem).
pub fn matmul(dst: StridedMut, lhs: Strided, rhs: Strided) -> Result<(), KernelError> {
    product(dst, lhs, rhs, Parallelism::None)
}

/// `dst = lhs rhs` through `gemm` with `parallelism`, every view checked against its buffer.
fn product(
    dst: StridedMut,
    lhs: Strided,
    rhs: Strided,
    parallelism: Parallelism,
) -> Result<(), KernelError> {
    let shape_error = || KernelError::MatmulShape {
        dst: (dst.rows, dst.cols),
        lhs: (lhs.rows, lhs.cols),
        rhs: (rhs.rows, rhs.cols),
    };
    if lhs.rows != dst.rows || rhs.cols != dst.cols || lhs.cols != rhs.rows {
        return Err(shape_error());
    }
    dst.view().check("dst")?;
    lhs.check("lhs")?;
    rhs.check("rhs")?;
    // Distinct destination elements must not share memory (gemm writes them independently).
    if dst.rows > 1 && dst.cols > 1 && (dst.row_stride == 0 || dst.col_stride == 0) {
        return Err(shape_error());
    }
    if dst.rows == 0 || dst.cols == 0 {
        return Ok(());
    }
    if lhs.cols == 0 {
        for r in 0..dst.rows {
            for c in 0..dst.cols {
                dst.data[r * dst.row_stride + c * dst.col_stride] = 0.0;
            }
        }
        return Ok(());
    }
    // SAFETY: `check` bounds every element of the three views inside their slices, strides
    // are non-negative and fit isize, and dst is borrowed mutably so it aliases neither input.
    // `read_dst` is false: dst's old contents are never read.
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            lhs.cols,
            dst.data.as_mut_ptr(),
            dst.col_stride as isize,
            dst.row_stride as isize,
            false,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_of_views_matches_the_definition() {
        // lhs: (3, 4) taken as the transpose of a (4, 3) row-major block inside a wider buffer;
        // rhs: (4, 2) row-major with padding; dst: (3, 2) with padding.
        let a: Vec<f32> = (0..4 * 5).map(|i| i as f32 * 0.25 - 2.0).collect();
        let b: Vec<f32> = (0..4 * 3).map(|i| (i % 7) as f32 - 3.0).collect();
        let lhs = Strided::rows(&a, 4, 3, 5).t();
        let rhs = Strided::rows(&b, 4, 2, 3);
        let mut d = vec![f32::NAN; 3 * 4];
        matmul(StridedMut::rows(&mut d, 3, 2, 4), lhs, rhs).unwrap();
        for r in 0..3 {
            for c in 0..2 {
                let expected: f32 = (0..4).map(|k| a[k * 5 + r] * b[k * 3 + c]).sum();
                assert_eq!(d[r * 4 + c], expected);
            }
            assert!(
                d[r * 4 + 2].is_nan() && d[r * 4 + 3].is_nan(),
                "padding untouched"
            );
        }
    }

    #[test]
    fn matmul_rejects_views_outside_their_buffers_and_mismatched_shapes() {
        let a = vec![0f32; 6];
        let mut d = vec![0f32; 4];
        let err = matmul(
            StridedMut::rows(&mut d, 2, 2, 2),
            Strided::rows(&a, 2, 3, 4),
            Strided::rows(&a, 3, 2, 2),
        )
        .unwrap_err();
        assert!(err.to_string().contains("lhs"), "{err}");
        let err = matmul(
            StridedMut::rows(&mut d, 2, 2, 2),
            Strided::rows(&a, 2, 3, 3),
            Strided::rows(&a, 2, 2, 2),
        )
        .unwrap_err();
        assert!(err.to_string().contains("(2, 3)"), "{err}");
    }

    #[test]
    fn transpose_moves_every_element_for_ragged_tiles() {
        transpose_case(19, 37);
        transpose_case(48, 32);
        transpose_case(300, 260);
    }

    fn transpose_case(rows: usize, cols: usize) {
        let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let mut dst = vec![0.0; rows * cols];
        transpose(&src, rows, cols, &mut dst);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(dst[c * rows + r], src[r * cols + c]);
            }
        }
    }

    #[test]
    fn gemm_rows_matches_the_definition() {
        let (n, k, rows_w) = (5, 7, 3);
        let x: Vec<f32> = (0..n * k).map(|i| (i % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..rows_w * k)
            .map(|i| (i % 13) as f32 * 0.5 - 3.0)
            .collect();
        let mut xt = vec![0.0; n * k];
        transpose(&x, n, k, &mut xt);
        let mut yt = vec![f32::NAN; rows_w * n];
        gemm_rows(&xt, n, k, &w, &mut yt).unwrap();
        for t in 0..n {
            for o in 0..rows_w {
                let expected: f32 = (0..k).map(|i| x[t * k + i] * w[o * k + i]).sum();
                assert_eq!(yt[o * n + t], expected, "row {t}, output {o}");
            }
        }
    }
}
