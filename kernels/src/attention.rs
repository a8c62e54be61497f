//! Products over rows read in place wherever they start in a buffer: the scores of a few queries
//! against every row, and the weighted sum of the rows. Decode attention reads the rows of a
//! paged KV cache this way (f32 or f16), and the absorbed MLA products the per-head rows of
//! `kv_b`; nothing is gathered or copied, and both products run on the projection kernels'
//! instruction sets.

use crate::KernelError;
use crate::isa::Isa;
use crate::kernel::{self, Element, Gathered};

/// Rows of a buffer: row `i` is `data[starts[i] + offset..][..width]`.
#[derive(Debug, Clone, Copy)]
pub struct GatheredRows<'a, E> {
    data: &'a [E],
    starts: &'a [usize],
    offset: usize,
    width: usize,
}

impl<'a, E: Element> GatheredRows<'a, E> {
    /// Checks once that every row lies inside `data`, so that the kernels need not.
    pub fn new(
        data: &'a [E],
        starts: &'a [usize],
        offset: usize,
        width: usize,
    ) -> Result<Self, KernelError> {
        let rows = Self {
            data,
            starts,
            offset,
            width,
        };
        if let Some((row, &start)) = starts
            .iter()
            .enumerate()
            .find(|&(_, &start)| start + offset + width > data.len())
        {
            return Err(KernelError::RowOutOfBounds {
                row,
                start: start + offset,
                width,
                len: data.len(),
            });
        }
        Ok(rows)
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    fn gathered(&self) -> Gathered<'a> {
        Gathered {
            starts: self.starts,
            offset: self.offset,
        }
    }

    /// Scores of `n` queries (n, width) against every row: `out` (rows, n),
    /// `out[i * n + b] = row_i . query_b`.
    pub fn scores(
        &self,
        isa: Isa,
        queries: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_isa(isa)?;
        check_len("queries", n * self.width, queries.len())?;
        check_len("scores", self.len() * n, out.len())?;
        if self.width == 0 {
            out.fill(0.0);
            return Ok(());
        }
        if kernel::has_transposed::<E>(isa, n) {
            // (width, n): one query per column, so that whole rows of scores are vectors.
            let mut transposed = vec![0f32; self.width * n];
            for (b, query) in queries.chunks_exact(self.width).enumerate() {
                for (k, &value) in query.iter().enumerate() {
                    transposed[k * n + b] = value;
                }
            }
            let rows = self.gathered();
            kernel::project_transposed(isa, self.data, rows, self.width, &transposed, n, out);
            return Ok(());
        }
        kernel::project(isa, self.data, self.gathered(), self.width, queries, n, out);
        Ok(())
    }

    /// Adds the weighted sum of the rows for each of `n` weightings `p` (rows, n) to `out`
    /// (n, width): `out[b][k] += sum_i p[i * n + b] * row_i[k]`.
    pub fn accumulate(
        &self,
        isa: Isa,
        p: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_isa(isa)?;
        check_len("weights", self.len() * n, p.len())?;
        check_len("output", n * self.width, out.len())?;
        kernel::accumulate(isa, self.data, self.gathered(), self.width, p, n, out);
        Ok(())
    }
}

fn check_isa(isa: Isa) -> Result<(), KernelError> {
    if isa.is_supported() {
        Ok(())
    } else {
        Err(KernelError::IsaUnsupported(isa))
    }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), KernelError> {
    if expected != got {
        return Err(KernelError::Length {
            what,
            expected,
            got,
        });
    }
    Ok(())
}
