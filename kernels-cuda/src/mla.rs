//! Host side of the split-KV MLA decode kernels (`kernels/mla_decode.cu`): how many splits a
//! step uses, the launch geometry, the scratch it needs, and a CPU model of exactly the
//! kernels' arithmetic order (tiles of positions with an online softmax per split, then the
//! combine), checked against plain softmax attention. The model is what a GPU run is compared
//! with first.

use crate::sources::{MLA_HEADS_PER_BLOCK, MLA_MAX_COLS_PER_THREAD};

/// Threads per split block (8 warps: 8 positions per tile).
pub const THREADS: u32 = 256;
/// No split shorter than this many positions (below it the combine costs more than it saves).
pub const MIN_SPLIT_LEN: usize = 64;
/// Upper bound on splits per sequence.
pub const MAX_SPLITS: usize = 64;

/// The per-layer dimensions the kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeDims {
    pub heads: usize,
    pub kv_lora_rank: usize,
    pub rope_dim: usize,
    pub block_size: usize,
}

impl DecodeDims {
    /// Values per cached row (and per absorbed query): kv_lora_rank + qk_rope_head_dim.
    pub fn latent(&self) -> usize {
        self.kv_lora_rank + self.rope_dim
    }

    pub fn head_groups(&self) -> usize {
        self.heads.div_ceil(MLA_HEADS_PER_BLOCK)
    }
}

/// How the sequence dimension is split for one decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitPlan {
    pub num_splits: usize,
    /// Positions per split; split s covers [s * split_len, (s + 1) * split_len).
    pub split_len: usize,
}

/// Enough splits that `batch * head_groups * splits` blocks fill about two waves of the GPU's
/// `multiprocessors`, but none shorter than [`MIN_SPLIT_LEN`] and at most [`MAX_SPLITS`].
/// `max_seq_len` is the longest sequence of the step (for CUDA graphs: of the bucket's capacity).
pub fn split_plan(
    dims: &DecodeDims,
    batch: usize,
    max_seq_len: usize,
    multiprocessors: usize,
) -> SplitPlan {
    let max_seq_len = max_seq_len.max(1);
    let blocks = (batch.max(1) * dims.head_groups()).max(1);
    let wanted = (2 * multiprocessors.max(1)).div_ceil(blocks);
    let by_length = max_seq_len.div_ceil(MIN_SPLIT_LEN);
    let splits = wanted.min(by_length).clamp(1, MAX_SPLITS);
    let split_len = max_seq_len.div_ceil(splits);
    SplitPlan {
        num_splits: max_seq_len.div_ceil(split_len),
        split_len,
    }
}

/// Grid, block and dynamic shared memory of the two kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub shared_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    #[error(
        "kv_lora_rank {kv_lora_rank} exceeds what the MLA decode kernel holds per block ({max} = {THREADS} threads x {MLA_MAX_COLS_PER_THREAD})"
    )]
    KvLoraTooWide { kv_lora_rank: usize, max: usize },
    #[error("the MLA decode grid ({what} = {value}) exceeds the CUDA limit {limit}")]
    GridTooLarge {
        what: &'static str,
        value: usize,
        limit: usize,
    },
}

/// Launch of `mla_decode_split_*` for `batch` tokens.
pub fn split_launch(
    dims: &DecodeDims,
    batch: usize,
    plan: &SplitPlan,
) -> Result<Launch, LaunchError> {
    let max = THREADS as usize * MLA_MAX_COLS_PER_THREAD;
    if dims.kv_lora_rank > max {
        return Err(LaunchError::KvLoraTooWide {
            kv_lora_rank: dims.kv_lora_rank,
            max,
        });
    }
    let dim = |what, value: usize, limit: usize| {
        if value > limit {
            Err(LaunchError::GridTooLarge { what, value, limit })
        } else {
            Ok(value as u32)
        }
    };
    Ok(Launch {
        grid: (
            dim("batch", batch, i32::MAX as usize)?,
            dim("splits", plan.num_splits, 65_535)?,
            dim("head groups", dims.head_groups(), 65_535)?,
        ),
        block: THREADS,
        shared_bytes: (MLA_HEADS_PER_BLOCK * dims.latent() * 4) as u32,
    })
}

/// Launch of `mla_decode_combine_*`.
pub fn combine_launch(dims: &DecodeDims, batch: usize) -> Launch {
    Launch {
        grid: (batch as u32, dims.heads as u32, 1),
        block: (dims.kv_lora_rank.min(1024) as u32).next_multiple_of(32),
        shared_bytes: 0,
    }
}

/// f32 scratch of one step: o_part, m_part, l_part.
pub fn partial_bytes(dims: &DecodeDims, batch: usize, plan: &SplitPlan) -> usize {
    4 * batch * plan.num_splits * dims.heads * (dims.kv_lora_rank + 2)
}

/// CPU model of the two kernels for one token: `q` (heads, latent), `rows` the sequence's cached
/// latent rows in position order (each `latent` wide). Tiles of `warps` positions, online
/// softmax per split, then the combine, in the kernels' order. Returns (heads, kv_lora_rank).
pub fn reference_decode(
    dims: &DecodeDims,
    q: &[f32],
    rows: &[Vec<f32>],
    scale: f32,
    plan: &SplitPlan,
    warps: usize,
) -> Vec<f32> {
    let (heads, lora, lat) = (dims.heads, dims.kv_lora_rank, dims.latent());
    let seq_len = rows.len();
    let mut parts = Vec::new(); // (m, l, o) per split
    for split in 0..plan.num_splits {
        let start = split * plan.split_len;
        let end = (start + plan.split_len).min(seq_len);
        let mut m = vec![f32::NEG_INFINITY; heads];
        let mut l = vec![0f32; heads];
        let mut o = vec![0f32; heads * lora];
        let mut base = start;
        while base < end {
            let tile: Vec<usize> = (base..(base + warps).min(end)).collect();
            for h in 0..heads {
                let scores: Vec<f32> = tile
                    .iter()
                    .map(|&p| {
                        let dot: f32 = (0..lat).map(|k| q[h * lat + k] * rows[p][k]).sum();
                        dot * scale
                    })
                    .collect();
                let new_m = scores.iter().copied().fold(m[h], f32::max);
                let correction = if m[h] == f32::NEG_INFINITY {
                    0.0
                } else {
                    (m[h] - new_m).exp()
                };
                let weights: Vec<f32> = scores.iter().map(|s| (s - new_m).exp()).collect();
                l[h] = l[h] * correction + weights.iter().sum::<f32>();
                m[h] = new_m;
                for c in 0..lora {
                    o[h * lora + c] *= correction;
                }
                for (w, &p) in weights.iter().zip(&tile) {
                    for c in 0..lora {
                        o[h * lora + c] += w * rows[p][c];
                    }
                }
            }
            base += warps;
        }
        parts.push((m, l, o));
    }
    let mut out = vec![0f32; heads * lora];
    for h in 0..heads {
        let global = parts
            .iter()
            .map(|(m, _, _)| m[h])
            .fold(f32::NEG_INFINITY, f32::max);
        let live = || parts.iter().filter(|(m, _, _)| m[h] != f32::NEG_INFINITY);
        let denominator: f32 = live().map(|(m, l, _)| l[h] * (m[h] - global).exp()).sum();
        for c in 0..lora {
            let sum: f32 = live()
                .map(|(m, _, o)| o[h * lora + c] * (m[h] - global).exp())
                .sum();
            out[h * lora + c] = if denominator > 0.0 {
                sum / denominator
            } else {
                0.0
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3: DecodeDims = DecodeDims {
        heads: 128,
        kv_lora_rank: 512,
        rope_dim: 64,
        block_size: 64,
    };
    const LITE: DecodeDims = DecodeDims {
        heads: 16,
        kv_lora_rank: 512,
        rope_dim: 64,
        block_size: 16,
    };

    #[test]
    fn short_batches_split_long_sequences_and_big_batches_do_not() {
        // H200: 132 SMs. Batch 1 of V2-Lite (2 head groups) at 8k tokens: many splits.
        let p = split_plan(&LITE, 1, 8192, 132);
        assert_eq!(p.num_splits, 64);
        assert!(p.num_splits * p.split_len >= 8192);
        // Short context: never below MIN_SPLIT_LEN positions per split.
        let p = split_plan(&LITE, 1, 100, 132);
        assert_eq!(
            p,
            SplitPlan {
                num_splits: 2,
                split_len: 50
            }
        );
        // Batch 256 of V3 (16 head groups): 4096 blocks already, one split.
        assert_eq!(split_plan(&V3, 256, 4096, 132).num_splits, 1);
        // Every plan covers the sequence and has no empty trailing split.
        for batch in [1, 3, 8, 64] {
            for len in [1, 63, 64, 65, 1000, 32_768] {
                let p = split_plan(&V3, batch, len, 132);
                assert!(p.num_splits * p.split_len >= len);
                assert!((p.num_splits - 1) * p.split_len < len, "{p:?} len={len}");
                assert!((1..=MAX_SPLITS).contains(&p.num_splits));
            }
        }
    }

    #[test]
    fn launches_fit_the_kernels_limits() {
        let plan = split_plan(&V3, 4, 4096, 132);
        let l = split_launch(&V3, 4, &plan).unwrap();
        assert_eq!(l.grid, (4, plan.num_splits as u32, 16));
        assert_eq!(l.block, 256);
        // 8 heads x 576 f32: 18 KiB, under the 48 KiB default.
        assert_eq!(l.shared_bytes, 18_432);
        let wide = DecodeDims {
            kv_lora_rank: 2048,
            ..V3
        };
        assert!(matches!(
            split_launch(&wide, 1, &plan),
            Err(LaunchError::KvLoraTooWide { max: 1024, .. })
        ));
        assert_eq!(combine_launch(&V3, 4).grid, (4, 128, 1));
        assert_eq!(combine_launch(&V3, 4).block, 512);
        assert_eq!(
            partial_bytes(
                &V3,
                1,
                &SplitPlan {
                    num_splits: 2,
                    split_len: 10
                }
            ),
            4 * 2 * 128 * 514
        );
    }

    fn naive(dims: &DecodeDims, q: &[f32], rows: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let (lat, lora) = (dims.latent(), dims.kv_lora_rank);
        let mut out = vec![0f32; dims.heads * lora];
        for h in 0..dims.heads {
            let scores: Vec<f64> = rows
                .iter()
                .map(|r| {
                    (0..lat)
                        .map(|k| (q[h * lat + k] * r[k]) as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for c in 0..lora {
                let v: f64 = e.iter().zip(rows).map(|(w, r)| w * r[c] as f64).sum();
                out[h * lora + c] = (v / total) as f32;
            }
        }
        out
    }

    #[test]
    fn the_split_and_combine_order_equals_plain_softmax_attention() {
        let dims = DecodeDims {
            heads: 3,
            kv_lora_rank: 8,
            rope_dim: 4,
            block_size: 4,
        };
        // Deterministic pseudo-random values in [-1, 1).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let q: Vec<f32> = (0..dims.heads * dims.latent())
            .map(|_| 3.0 * next())
            .collect();
        for seq_len in [1usize, 5, 8, 37, 200] {
            let rows: Vec<Vec<f32>> = (0..seq_len)
                .map(|_| (0..dims.latent()).map(|_| next()).collect())
                .collect();
            let expected = naive(&dims, &q, &rows, 0.3);
            for (splits, warps) in [(1, 8), (3, 8), (7, 4), (64, 8)] {
                let split_len = seq_len.div_ceil(splits).max(1);
                let plan = SplitPlan {
                    num_splits: splits,
                    split_len,
                };
                let got = reference_decode(&dims, &q, &rows, 0.3, &plan, warps);
                for (g, e) in got.iter().zip(&expected) {
                    assert!(
                        (g - e).abs() < 1e-5,
                        "len {seq_len} splits {splits}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
