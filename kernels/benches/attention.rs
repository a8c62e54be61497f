//! Decode attention kernels on the standard model's shapes at depth 4000, one thread: the
//! latent layout (16 heads share each 288-value row; arithmetic-bound) and the decompressed
//! per-head layout (each head reads its own 96 + 64 values of a 2560-value row; bandwidth-bound).
//! Run with `cargo bench -p latentserve-kernels --bench attention`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use latentserve_kernels::{GatheredRows, Isa};

const DEPTH: usize = 4000;
const PART: usize = 256;
const HEADS: usize = 16;
/// kv_lora_rank + qk_rope_head_dim, and kv_lora_rank.
const LATENT: (usize, usize) = (288, 256);
/// qk_head_dim and v_head_dim of one head.
const PER_HEAD: (usize, usize) = (96, 64);
const BATCHES: usize = 7;
const BATCH_TIME: Duration = Duration::from_millis(100);

fn main() {
    let isa = Isa::detect();
    println!("latentserve-kernels attention bench: isa {isa}, one thread, depth {DEPTH}");
    for isa in Isa::supported() {
        let (lat, val) = LATENT;
        let latent = Layout {
            row_width: lat,
            groups: vec![(HEADS, 0, 0)],
            key_dim: lat,
            value_dim: val,
        };
        let (qk, v) = PER_HEAD;
        let per_head = Layout {
            row_width: HEADS * (qk + v),
            groups: (0..HEADS)
                .map(|h| (1, h * qk, HEADS * qk + h * v))
                .collect(),
            key_dim: qk,
            value_dim: v,
        };
        for (name, layout) in [("latent", latent), ("per-head", per_head)] {
            let time = layout.time(isa);
            let flops = layout.flops() as f64;
            let bytes = layout.bytes_read() as f64;
            println!(
                "{:<7} {:<8} {:>8.0} us per layer | {:>6.1} GFLOP/s | {:>6.1} GB/s of cache",
                isa.to_string(),
                name,
                time.as_secs_f64() * 1e6,
                flops / time.as_secs_f64() / 1e9,
                bytes / time.as_secs_f64() / 1e9,
            );
        }
    }
}

/// One cache layout: its row width and which (queries, key offset, value offset) read it.
struct Layout {
    row_width: usize,
    groups: Vec<(usize, usize, usize)>,
    key_dim: usize,
    value_dim: usize,
}

impl Layout {
    fn flops(&self) -> usize {
        let queries: usize = self.groups.iter().map(|g| g.0).sum();
        2 * DEPTH * queries * (self.key_dim + self.value_dim)
    }

    fn bytes_read(&self) -> usize {
        let queries = if self.groups.len() == 1 { 1 } else { HEADS };
        DEPTH * queries * (self.key_dim + self.value_dim) * 4
    }

    /// Median time for one layer's attention over all `DEPTH` rows (scores and weighted sums; no
    /// softmax), rows in a scrambled block order as a block table makes them.
    fn time(&self, isa: Isa) -> Duration {
        let buffer: Vec<f32> = (0..DEPTH * self.row_width)
            .map(|i| (i % 97) as f32 * 1e-3)
            .collect();
        let starts: Vec<usize> = (0..DEPTH)
            .map(|i| (i * 7 % DEPTH) * self.row_width)
            .collect();
        let queries: Vec<f32> = (0..HEADS * self.key_dim).map(|i| (i % 13) as f32).collect();
        let mut scores = vec![0f32; PART * HEADS];
        let mut out = vec![0f32; HEADS * self.value_dim];
        let mut layer = || {
            for part in starts.chunks(PART) {
                for &(n, key_offset, value_offset) in &self.groups {
                    let scores = &mut scores[..part.len() * n];
                    let keys = GatheredRows::new(&buffer, part, key_offset, self.key_dim).unwrap();
                    keys.scores(isa, &queries[..n * self.key_dim], n, scores)
                        .unwrap();
                    let values =
                        GatheredRows::new(&buffer, part, value_offset, self.value_dim).unwrap();
                    values
                        .accumulate(isa, scores, n, &mut out[..n * self.value_dim])
                        .unwrap();
                }
            }
            black_box(&out);
        };
        layer();
        let mut per_call = Vec::with_capacity(BATCHES);
        for _ in 0..BATCHES {
            let start = Instant::now();
            let mut calls = 0u32;
            while start.elapsed() < BATCH_TIME {
                layer();
                calls += 1;
            }
            per_call.push(start.elapsed() / calls);
        }
        per_call.sort();
        per_call[BATCHES / 2]
    }
}
