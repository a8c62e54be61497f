//! `GatheredRows::scores` and `GatheredRows::accumulate` against a plain f64 reference, for every
//! instruction set, both element types, and the shapes decode attention uses (one query per head
//! over per-head rows, sixteen queries over shared latent rows) plus widths with a scalar tail.

use half::f16;
use latentserve_kernels::{Element, GatheredRows, Isa, KernelError};

mod common;
use common::values;

/// A paged buffer of `slots` rows of `stride` values, and the slots of `rows` rows in a
/// scrambled order (as a block table makes them).
struct Paged {
    buffer: Vec<f32>,
    starts: Vec<usize>,
}

fn paged(seed: u64, slots: usize, stride: usize, rows: usize) -> Paged {
    assert!(rows <= slots);
    let buffer = values(seed, slots * stride);
    // Every 7th slot, wrapping: distinct as long as 7 and `slots` are coprime.
    let starts = (0..rows).map(|i| (i * 7 % slots) * stride).collect();
    Paged { buffer, starts }
}

/// The buffer as stored, and the values the kernels see (f16-rounded for f16).
fn stored<E: Element + WidenForTest>(buffer: &[f32], convert: fn(f32) -> E) -> (Vec<E>, Vec<f64>) {
    let data: Vec<E> = buffer.iter().map(|&v| convert(v)).collect();
    let seen = data.iter().map(|&v| v.widen_for_test()).collect();
    (data, seen)
}

trait WidenForTest {
    fn widen_for_test(self) -> f64;
}
impl WidenForTest for f32 {
    fn widen_for_test(self) -> f64 {
        self as f64
    }
}
impl WidenForTest for f16 {
    fn widen_for_test(self) -> f64 {
        self.to_f64()
    }
}

/// |got - want| within a few f32 roundings of the sum of the absolute terms.
fn assert_close(got: f32, want: f64, scale: f64, what: &str) {
    let tolerance = 1e-5 * scale.max(1.0);
    assert!(
        (got as f64 - want).abs() <= tolerance,
        "{what}: got {got}, want {want} (tolerance {tolerance})"
    );
}

const SHAPES: [(usize, usize, usize, usize); 8] = [
    // (rows, offset, width, n)
    (256, 0, 288, 16), // latent rows, all heads at once (whole vectors of queries)
    (256, 96, 96, 1),  // one head's key in a per-head row
    (37, 1536, 64, 1), // one head's value, rows not a multiple of the blocking
    (19, 5, 37, 3),    // widths and counts with tails everywhere
    (37, 5, 40, 16),   // whole vectors of queries, rows with a tail
    (21, 3, 24, 8),    // one AVX2 vector of queries
    (21, 3, 24, 32),   // two AVX-512 vectors of queries
    (0, 0, 64, 16),    // no rows
];
const STRIDE: usize = 2560;
const SLOTS: usize = 300;

fn check_isa<E: Element + WidenForTest>(isa: Isa, convert: fn(f32) -> E, seed: u64) {
    for (rows, offset, width, n) in SHAPES {
        let page = paged(seed, SLOTS, STRIDE, rows);
        let (data, seen) = stored(&page.buffer, convert);
        let cache = GatheredRows::new(&data, &page.starts, offset, width).unwrap();
        let what = format!("{isa} {rows}x{width} n={n} offset={offset}");

        // scores (rows, n)
        let queries = values(seed + 1, n * width);
        let mut scores = vec![f32::NAN; rows * n];
        cache.scores(isa, &queries, n, &mut scores).unwrap();
        for i in 0..rows {
            let row = &seen[page.starts[i] + offset..][..width];
            for b in 0..n {
                let terms = row.iter().zip(&queries[b * width..][..width]);
                let want: f64 = terms.clone().map(|(r, &q)| r * q as f64).sum();
                let scale: f64 = terms.map(|(r, &q)| (r * q as f64).abs()).sum();
                assert_close(scores[i * n + b], want, scale, &format!("{what} score"));
            }
        }

        // accumulate onto a non-zero output (n, width)
        let p = values(seed + 2, rows * n);
        let initial = values(seed + 3, n * width);
        let mut out = initial.clone();
        cache.accumulate(isa, &p, n, &mut out).unwrap();
        for b in 0..n {
            for k in 0..width {
                let terms: Vec<f64> = (0..rows)
                    .map(|i| p[i * n + b] as f64 * seen[page.starts[i] + offset + k])
                    .collect();
                let want = initial[b * width + k] as f64 + terms.iter().sum::<f64>();
                let scale = terms.iter().map(|t| t.abs()).sum::<f64>();
                assert_close(out[b * width + k], want, scale, &format!("{what} sum"));
            }
        }
    }
}

#[test]
fn every_isa_matches_the_reference_for_f32_and_f16_rows() {
    for isa in Isa::ALL.into_iter().filter(|isa| isa.is_supported()) {
        check_isa::<f32>(isa, |v| v, 11);
        check_isa::<f16>(isa, f16::from_f32, 12);
    }
}

#[test]
fn a_row_outside_the_buffer_is_an_error_that_names_it() {
    let data = vec![0f32; 100];
    let error = GatheredRows::new(&data, &[0, 40, 90], 0, 16).unwrap_err();
    assert!(matches!(
        error,
        KernelError::RowOutOfBounds {
            row: 2,
            start: 90,
            width: 16,
            len: 100
        }
    ));
    assert!(error.to_string().contains("cache row 2"));
}

#[test]
fn lengths_that_disagree_are_errors() {
    let data = vec![0f32; 64];
    let cache = GatheredRows::new(&data, &[0, 32], 0, 32).unwrap();
    let mut scores = vec![0f32; 2];
    let error = cache
        .scores(Isa::Scalar, &[0.0; 31], 1, &mut scores)
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("queries has 31 values: expected 32")
    );
    let mut out = vec![0f32; 32];
    let error = cache
        .accumulate(Isa::Scalar, &[0.0; 3], 1, &mut out)
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("weights has 3 values: expected 2")
    );
}
