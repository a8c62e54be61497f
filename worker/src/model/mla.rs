//! Multi-head latent attention.
//!
//! Every new token's latent (normalized `c_kv` ++ rotated `k_pe`) is written to the paged cache.
//! Prefill chunks decompress the latents of all their positions (cached ones included) into
//! per-head K/V with `kv_b_proj` and run causal attention. Decode tokens use the absorbed form:
//! `W_UK` is folded into the query, attention runs directly over the latent rows, and `W_UV` is
//! applied to the attended latent; nothing per head outlives the step.

use latentserve_kernels::{GatheredRows, Isa, Linear, Strided, StridedMut, matmul, try_map_tasks};
use rayon::prelude::*;

use super::ModelError;
use super::absorbed::{AbsorbedDims, AbsorbedKvB};
use super::cache::{CacheBuffers, CacheLayout, CacheValue, LatentCache};
use super::config::ModelConfig;
use super::ops::{axpy, project, rms_norm, rms_norm_rows};
use super::rope::RopeTable;

/// Queries of one head scored together in a prefill: large enough for gemm's blocking, small
/// enough that a block computes little of the masked part of the causal square (on average half
/// a block's width of its rows).
const PREFILL_QUERY_BLOCK: usize = 64;

/// Where the tokens of one chunk sit in the flattened batch and in their sequence.
#[derive(Debug, Clone, Copy)]
pub struct ChunkSpan<'a> {
    /// First row of this chunk in the batch.
    pub first_row: usize,
    pub len: usize,
    pub start_pos: usize,
    pub block_table: &'a [u32],
}

impl ChunkSpan<'_> {
    /// A single token continuing a sequence: runs the absorbed decode path.
    pub fn is_decode(&self) -> bool {
        self.len == 1 && self.start_pos > 0
    }
}

/// Dimensions of the attention block.
#[derive(Debug, Clone, Copy)]
struct Dims {
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
    kv_lora: usize,
    /// Width of the query part of the fused input projection: q_lora_rank or heads * qk.
    q_in: usize,
}

impl Dims {
    fn qk(&self) -> usize {
        self.nope + self.rope
    }
    fn latent(&self) -> usize {
        self.kv_lora + self.rope
    }
}

/// One layer's `self_attn`.
#[derive(Debug)]
pub struct MlaAttention {
    dims: Dims,
    /// (q_in + kv_lora + rope, hidden): `q_a_proj` (or `q_proj`) and `kv_a_proj_with_mqa` fused,
    /// because both read the same normalized hidden state.
    input_proj: Linear,
    /// `q_a_layernorm` weight when q_lora_rank is set.
    q_a_norm: Option<Vec<f32>>,
    /// `q_b_proj`: (heads * qk, q_lora_rank) when q_lora_rank is set.
    q_b_proj: Option<Linear>,
    kv_a_norm: Vec<f32>,
    /// `kv_b_proj`: (heads * (nope + v), kv_lora) for the decompressed prefill path.
    kv_b_proj: Linear,
    /// The same weight laid out for the absorbed decode path (W_UK[h] and W_UV[h] per head).
    absorbed: AbsorbedKvB,
    /// `o_proj`: (hidden, heads * v)
    o_proj: Linear,
    eps: f64,
    softmax_scale: f32,
}

/// Weights of one attention block as loaded.
pub struct MlaWeights {
    pub input_proj: Linear,
    pub q_a_norm: Option<Vec<f32>>,
    pub q_b_proj: Option<Linear>,
    pub kv_a_norm: Vec<f32>,
    pub kv_b_proj: Linear,
    /// The values of `kv_b_proj`'s weight, row-major, for the absorbed layout.
    pub kv_b_f32: Vec<f32>,
    pub o_proj: Linear,
}

impl MlaAttention {
    pub fn new(config: &ModelConfig, w: MlaWeights) -> Result<Self, ModelError> {
        let heads = config.num_attention_heads;
        let dims = Dims {
            heads,
            nope: config.qk_nope_head_dim,
            rope: config.qk_rope_head_dim,
            v: config.v_head_dim,
            kv_lora: config.kv_lora_rank,
            q_in: config.q_lora_rank.unwrap_or(heads * config.qk_head_dim()),
        };
        let absorbed = AbsorbedKvB::new(
            &w.kv_b_f32,
            AbsorbedDims {
                heads,
                nope: dims.nope,
                v: dims.v,
                kv_lora: dims.kv_lora,
            },
            w.kv_b_proj.dtype(),
        )?;
        Ok(Self {
            dims,
            absorbed,
            input_proj: w.input_proj,
            q_a_norm: w.q_a_norm,
            q_b_proj: w.q_b_proj,
            kv_a_norm: w.kv_a_norm,
            kv_b_proj: w.kv_b_proj,
            o_proj: w.o_proj,
            eps: config.rms_norm_eps,
            softmax_scale: config.softmax_scale() as f32,
        })
    }

    /// Weight bytes one decoded token reads (projections; kv_b in its absorbed form).
    pub fn decode_weight_bytes(&self) -> usize {
        self.input_proj.weight_bytes()
            + self.q_b_proj.as_ref().map_or(0, Linear::weight_bytes)
            + self.absorbed.weight_bytes()
            + self.o_proj.weight_bytes()
    }

    /// x: (rows, hidden) normalized hidden states of all chunks -> (rows, hidden).
    pub fn forward(
        &self,
        x: &[f32],
        rows: usize,
        spans: &[ChunkSpan],
        table: &RopeTable,
        cache: &mut LatentCache,
        layer: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let d = self.dims;
        let qk = d.qk();
        // (rows, q_in + kv_lora + rope)
        let fused = project(&self.input_proj, x, rows)?;
        let fused_w = d.q_in + d.latent();
        // (rows, heads * qk)
        let mut q = match (&self.q_b_proj, &self.q_a_norm) {
            (Some(q_b), Some(norm)) => {
                let mut q_a = columns(&fused, fused_w, 0..d.q_in);
                rms_norm_rows(&mut q_a, norm, self.eps);
                project(q_b, &q_a, rows)?
            }
            _ => columns(&fused, fused_w, 0..d.q_in),
        };
        // (rows, latent): normalized c_kv ++ rotated k_pe
        let mut latents = columns(&fused, fused_w, d.q_in..fused_w);
        for (row, latent) in latents.chunks_exact_mut(d.latent()).enumerate() {
            let (c_kv, k_pe) = latent.split_at_mut(d.kv_lora);
            rms_norm(c_kv, &self.kv_a_norm, self.eps);
            table.apply(row, k_pe);
        }
        for (row, q_row) in q.chunks_exact_mut(d.heads * qk).enumerate() {
            for head in q_row.chunks_exact_mut(qk) {
                table.apply(row, &mut head[d.nope..]);
            }
        }
        self.write_cache(&latents, rows, spans, cache, layer)?;

        // (rows, heads * v). Sequences attend independently, so they run in parallel: with many
        // short decode steps in a batch, a serial loop here left the second core idle. A lone
        // sequence splits its own pieces instead (see `Fanout`).
        let out_width = d.heads * d.v;
        let mut attn = vec![0f32; rows * out_width];
        let cache: &LatentCache = cache;
        let fanout = if spans.len() == 1 {
            Fanout::Pool
        } else {
            Fanout::Rayon
        };
        let attend = |(span, out): (&ChunkSpan, &mut [f32])| {
            let q_span = &q[span.first_row * d.heads * qk..][..span.len * d.heads * qk];
            if span.is_decode() {
                match cache.layout() {
                    CacheLayout::Latent => {
                        self.decode_absorbed(q_span, span, cache, layer, out, fanout)
                    }
                    CacheLayout::DecompressedHeads => {
                        self.decode_decompressed(q_span, span, cache, layer, out, fanout)
                    }
                }
            } else {
                self.prefill(q_span, span, cache, layer, out)
            }
        };
        let parts = split_rows(&mut attn, out_width, spans);
        match fanout {
            Fanout::Pool => parts.into_iter().try_for_each(attend)?,
            Fanout::Rayon => parts.into_par_iter().try_for_each(attend)?,
        }
        project(&self.o_proj, &attn, rows)
    }

    /// latents: (n, kv_lora + rope) -> per-head K_nope and V: (n, heads * (nope + v)).
    fn decompress(&self, latents: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
        let d = self.dims;
        let c_kv = columns(latents, d.latent(), 0..d.kv_lora);
        project(&self.kv_b_proj, &c_kv, n)
    }

    fn write_cache(
        &self,
        latents: &[f32],
        rows: usize,
        spans: &[ChunkSpan],
        cache: &mut LatentCache,
        layer: usize,
    ) -> Result<(), ModelError> {
        let d = self.dims;
        match cache.layout() {
            CacheLayout::Latent => {
                for span in spans {
                    for i in 0..span.len {
                        let slot = cache.slot(span.block_table, span.start_pos + i);
                        let row = span.first_row + i;
                        cache.write_row(layer, slot, &latents[row * d.latent()..][..d.latent()]);
                    }
                }
            }
            CacheLayout::DecompressedHeads => {
                let kv = self.decompress(latents, rows)?;
                let mut row_buf = Vec::with_capacity(d.heads * (d.qk() + d.v));
                for span in spans {
                    for i in 0..span.len {
                        let row = span.first_row + i;
                        let kv_row =
                            &kv[row * d.heads * (d.nope + d.v)..][..d.heads * (d.nope + d.v)];
                        let k_pe = &latents[row * d.latent() + d.kv_lora..][..d.rope];
                        row_buf.clear();
                        for h in 0..d.heads {
                            row_buf.extend_from_slice(&kv_row[h * (d.nope + d.v)..][..d.nope]);
                            row_buf.extend_from_slice(k_pe);
                        }
                        for h in 0..d.heads {
                            row_buf
                                .extend_from_slice(&kv_row[h * (d.nope + d.v) + d.nope..][..d.v]);
                        }
                        let slot = cache.slot(span.block_table, span.start_pos + i);
                        cache.write_row(layer, slot, &row_buf);
                    }
                }
            }
        }
        Ok(())
    }

    /// Decompressed causal attention for a prefill chunk over positions 0..start_pos + len.
    /// q: (len, heads * qk) -> out (len, heads * v). Heads run in parallel; each scores its
    /// queries in blocks of [`PREFILL_QUERY_BLOCK`] against only the positions the block can
    /// see, so the masked half of the causal square is mostly never computed.
    fn prefill(
        &self,
        q: &[f32],
        span: &ChunkSpan,
        cache: &LatentCache,
        layer: usize,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let d = self.dims;
        let (qk, n) = (d.qk(), span.len);
        let total = span.start_pos + span.len;
        let rows = cache.gather(layer, span.block_table, total);
        // (total, kv_width) rows holding every head's V (and, decompressed, K); V of head h at
        // column v_at(h). The latent layout keeps its rows for k_pe.
        let (kv, latents, kv_width) = match cache.layout() {
            CacheLayout::Latent => (
                self.decompress(&rows, total)?,
                rows,
                d.heads * (d.nope + d.v),
            ),
            CacheLayout::DecompressedHeads => (rows, Vec::new(), d.heads * (qk + d.v)),
        };
        let v_at = |h: usize| match cache.layout() {
            CacheLayout::Latent => h * (d.nope + d.v) + d.nope,
            CacheLayout::DecompressedHeads => d.heads * qk + h * d.v,
        };
        // K^T of head h, (qk, total): the layout gemm packs fastest as the scores' left side.
        let k_transposed = |h: usize| {
            let mut kt = vec![0f32; qk * total];
            for t in 0..total {
                let (nope, pe) = match cache.layout() {
                    CacheLayout::Latent => (
                        &kv[t * kv_width + h * (d.nope + d.v)..][..d.nope],
                        &latents[t * d.latent() + d.kv_lora..][..d.rope],
                    ),
                    CacheLayout::DecompressedHeads => {
                        let k = &kv[t * kv_width + h * qk..][..qk];
                        (&k[..d.nope], &k[d.nope..])
                    }
                };
                for (i, &value) in nope.iter().chain(pe).enumerate() {
                    kt[i * total + t] = value;
                }
            }
            kt
        };
        let q_width = d.heads * qk;
        // (heads) x (n, v)
        let per_head = (0..d.heads)
            .into_par_iter()
            .map(|h| -> Result<Vec<f32>, ModelError> {
                let kt = k_transposed(h);
                let mut scores = vec![0f32; PREFILL_QUERY_BLOCK.min(n) * total];
                let mut o = vec![0f32; n * d.v];
                for first in (0..n).step_by(PREFILL_QUERY_BLOCK) {
                    let block = PREFILL_QUERY_BLOCK.min(n - first);
                    // Positions the block's last query sees; earlier queries mask their tail.
                    let seen = span.start_pos + first + block;
                    // (block, seen) = q (block, qk) K^T (qk, seen)
                    matmul(
                        StridedMut::rows(&mut scores, block, seen, seen),
                        Strided::rows(&q[first * q_width + h * qk..], block, qk, q_width),
                        Strided::rows(&kt, qk, seen, total),
                    )?;
                    for (r, row) in scores[..block * seen].chunks_exact_mut(seen).enumerate() {
                        // query first + r sits at start_pos + first + r and sees up to there
                        let (visible, masked) = row.split_at_mut(span.start_pos + first + r + 1);
                        for s in visible.iter_mut() {
                            *s *= self.softmax_scale;
                        }
                        super::ops::softmax(visible);
                        masked.fill(0.0);
                    }
                    // (block, v) = probs (block, seen) V (seen, v)
                    matmul(
                        StridedMut::rows(&mut o[first * d.v..], block, d.v, d.v),
                        Strided::rows(&scores, block, seen, seen),
                        Strided::rows(&kv[v_at(h)..], seen, d.v, kv_width),
                    )?;
                }
                Ok(o)
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (h, o) in per_head.iter().enumerate() {
            for (i, o_row) in o.chunks_exact(d.v).enumerate() {
                out[(i * d.heads + h) * d.v..][..d.v].copy_from_slice(o_row);
            }
        }
        Ok(())
    }

    /// Absorbed decode of one token over its sequence's latent rows. q: (heads * qk) -> out
    /// (heads * v).
    fn decode_absorbed(
        &self,
        q: &[f32],
        span: &ChunkSpan,
        cache: &LatentCache,
        layer: usize,
        out: &mut [f32],
        fanout: Fanout,
    ) -> Result<(), ModelError> {
        let heads_in_parallel = fanout == Fanout::Pool;
        let d = self.dims;
        let (qk, lat) = (d.qk(), d.latent());
        // (heads, latent): q_nope W_UK ++ q_pe, so that a score is one dot with a latent row.
        let mut q_lat = vec![0f32; d.heads * lat];
        self.absorbed
            .absorb_queries(q, qk, &mut q_lat, lat, heads_in_parallel)?;
        for (q_h, q_lat_h) in q.chunks_exact(qk).zip(q_lat.chunks_exact_mut(lat)) {
            q_lat_h[d.kv_lora..].copy_from_slice(&q_h[d.nope..]);
        }
        let total = span.start_pos + 1;
        // (heads, kv_lora): attention-weighted c_kv per head
        let o_lat = attend_cached(
            cache,
            layer,
            span.block_table,
            total,
            RowAttention {
                q: &q_lat,
                heads: d.heads,
                key_dim: lat,
                row_width: lat,
                value_dim: d.kv_lora,
                values: RowValues::Shared,
                scale: self.softmax_scale,
                fanout,
            },
        )?;
        // W_UV: (heads, v)
        self.absorbed.expand_values(&o_lat, out, heads_in_parallel)
    }

    /// Decode over a per-head K/V cache (for measuring what the latent cache saves).
    fn decode_decompressed(
        &self,
        q: &[f32],
        span: &ChunkSpan,
        cache: &LatentCache,
        layer: usize,
        out: &mut [f32],
        fanout: Fanout,
    ) -> Result<(), ModelError> {
        let d = self.dims;
        let total = span.start_pos + 1;
        let width = d.heads * (d.qk() + d.v);
        let o = attend_cached(
            cache,
            layer,
            span.block_table,
            total,
            RowAttention {
                q,
                heads: d.heads,
                key_dim: d.qk(),
                row_width: width,
                value_dim: d.v,
                values: RowValues::PerHead {
                    offset: d.heads * d.qk(),
                },
                scale: self.softmax_scale,
                fanout,
            },
        )?;
        out.copy_from_slice(&o);
        Ok(())
    }
}

/// Where a cache row keeps the values a head attends to.
#[derive(Debug, Clone, Copy)]
enum RowValues {
    /// Every head reads the first `value_dim` values of the row (the latent c_kv); keys are the
    /// first `key_dim` values.
    Shared,
    /// Head h's key is row[h * key_dim..], its value row[offset + h * value_dim..].
    PerHead { offset: usize },
}

/// One decode query's attention over cached rows, apart from the rows themselves.
#[derive(Debug, Clone, Copy)]
struct RowAttention<'q> {
    /// (heads, key_dim)
    q: &'q [f32],
    heads: usize,
    key_dim: usize,
    row_width: usize,
    value_dim: usize,
    values: RowValues,
    scale: f32,
    fanout: Fanout,
}

/// Where the independent pieces of one sequence's attention (its heads' absorbed products, the
/// parts of its cache) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fanout {
    /// The step's only sequence (batch-1 decode, a lone prompt): on the kernels' pool, whose
    /// threads are awake between the step's projections. Handing rayon one sequence and then
    /// one part of a short cache blocked this thread on a rayon wake-up twice per layer.
    Pool,
    /// One of several sequences, which already run in parallel on rayon: nested in rayon.
    Rayon,
}

/// Heads that read the same columns of a row: all of them for the latent layout, one at a time
/// for the per-head layout.
#[derive(Debug, Clone, Copy)]
struct HeadGroup {
    first_head: usize,
    heads: usize,
    key_offset: usize,
    value_offset: usize,
}

impl RowAttention<'_> {
    fn head_groups(&self) -> Vec<HeadGroup> {
        match self.values {
            RowValues::Shared => vec![HeadGroup {
                first_head: 0,
                heads: self.heads,
                key_offset: 0,
                value_offset: 0,
            }],
            RowValues::PerHead { offset } => (0..self.heads)
                .map(|h| HeadGroup {
                    first_head: h,
                    heads: 1,
                    key_offset: h * self.key_dim,
                    value_offset: offset + h * self.value_dim,
                })
                .collect(),
        }
    }
}

/// [`attend_rows`] over `layer` of the cache, whatever dtype the cache stores.
fn attend_cached(
    cache: &LatentCache,
    layer: usize,
    block_table: &[u32],
    total: usize,
    attention: RowAttention,
) -> Result<Vec<f32>, ModelError> {
    match &cache.buffers {
        CacheBuffers::F32(layers) => {
            attend_rows(&layers[layer], cache, block_table, total, attention)
        }
        CacheBuffers::F16(layers) => {
            attend_rows(&layers[layer], cache, block_table, total, attention)
        }
    }
}

/// Each span's rows of `buffer` ((rows, width) row-major) as its own mutable slice, so that spans
/// can be processed in parallel. Spans cover disjoint row ranges, in any order.
fn split_rows<'b, 's, 'a>(
    mut buffer: &'b mut [f32],
    width: usize,
    spans: &'s [ChunkSpan<'a>],
) -> Vec<(&'s ChunkSpan<'a>, &'b mut [f32])> {
    let mut order: Vec<&ChunkSpan> = spans.iter().collect();
    order.sort_by_key(|span| span.first_row);
    let mut consumed = 0;
    let mut parts = Vec::with_capacity(spans.len());
    for span in order {
        let rest = std::mem::take(&mut buffer);
        let (_gap, rest) = rest.split_at_mut((span.first_row - consumed) * width);
        let (rows, rest) = rest.split_at_mut(span.len * width);
        parts.push((span, rows));
        buffer = rest;
        consumed = span.first_row + span.len;
    }
    parts
}

/// Positions per parallel part of a decode attention.
const PART: usize = 256;

/// Softmax attention of `heads` queries (heads, key_dim) over positions 0..total of one
/// sequence, read from a paged buffer with rows of `row_width`. Positions are split into parts
/// processed in parallel (each with its own running max), then merged. Returns
/// (heads, value_dim).
fn attend_rows<T: CacheValue>(
    buffer: &[T],
    cache: &LatentCache,
    block_table: &[u32],
    total: usize,
    attention: RowAttention,
) -> Result<Vec<f32>, ModelError> {
    let RowAttention {
        heads, value_dim, ..
    } = attention;
    let parts = total.div_ceil(PART);
    let part = |p: usize| {
        let range = p * PART..((p + 1) * PART).min(total);
        attend_part(buffer, cache, block_table, range, attention)
    };
    let partials: Vec<Partial> = match attention.fanout {
        Fanout::Pool => try_map_tasks(parts, &part)?,
        Fanout::Rayon => (0..parts)
            .into_par_iter()
            .map(part)
            .collect::<Result<_, ModelError>>()?,
    };
    let mut out = vec![0f32; heads * value_dim];
    for h in 0..heads {
        let global = partials
            .iter()
            .map(|(m, _, _)| m[h])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut denominator = 0.0;
        let dst = &mut out[h * value_dim..][..value_dim];
        for (m, s, acc) in &partials {
            let w = (m[h] - global).exp();
            denominator += w * s[h];
            axpy(dst, w, &acc[h * value_dim..][..value_dim]);
        }
        dst.iter_mut().for_each(|v| *v /= denominator);
    }
    Ok(out)
}

/// Columns `range` of each row of a row-major (rows, width) buffer: (rows, range.len()).
fn columns(buffer: &[f32], width: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    buffer
        .chunks_exact(width)
        .flat_map(|row| &row[range.clone()])
        .copied()
        .collect()
}

/// Softmax pieces of one part of the rows: max per head, sum of exp per head, and the
/// exp-weighted values (heads, value_dim), combined across parts by [`attend_rows`].
type Partial = (Vec<f32>, Vec<f32>, Vec<f32>);

/// One part of the rows, read in place from the paged buffer by the kernels crate: per head
/// group, the scores of its queries against every row, then the exp-weighted sum of the rows.
/// In the latent layout every head reads the same row, so the sixteen queries share each load.
fn attend_part<T: CacheValue>(
    buffer: &[T],
    cache: &LatentCache,
    block_table: &[u32],
    range: std::ops::Range<usize>,
    attention: RowAttention,
) -> Result<Partial, ModelError> {
    let RowAttention {
        q,
        heads,
        key_dim,
        row_width,
        value_dim,
        scale,
        ..
    } = attention;
    let isa = Isa::detect();
    let len = range.len();
    let starts: Vec<usize> = range
        .map(|pos| cache.slot(block_table, pos) * row_width)
        .collect();
    let mut max = vec![f32::NEG_INFINITY; heads];
    let mut sum = vec![0f32; heads];
    let mut acc = vec![0f32; heads * value_dim];
    let mut scores = Vec::new();
    for group in attention.head_groups() {
        let n = group.heads;
        let heads_of_group = group.first_head..group.first_head + n;
        // (len, n)
        scores.resize(len * n, 0.0);
        GatheredRows::new(buffer, &starts, group.key_offset, key_dim)?.scores(
            isa,
            &q[heads_of_group.start * key_dim..heads_of_group.end * key_dim],
            n,
            &mut scores,
        )?;
        let (max, sum) = (
            &mut max[heads_of_group.clone()],
            &mut sum[heads_of_group.clone()],
        );
        for row in scores.chunks_exact_mut(n) {
            for (s, m) in row.iter_mut().zip(max.iter_mut()) {
                *s *= scale;
                *m = m.max(*s);
            }
        }
        for row in scores.chunks_exact_mut(n) {
            for ((s, m), total) in row.iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
                *s = (*s - m).exp();
                *total += *s;
            }
        }
        GatheredRows::new(buffer, &starts, group.value_offset, value_dim)?.accumulate(
            isa,
            &scores,
            n,
            &mut acc[heads_of_group.start * value_dim..heads_of_group.end * value_dim],
        )?;
    }
    Ok((max, sum, acc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(first_row: usize, len: usize) -> ChunkSpan<'static> {
        ChunkSpan {
            first_row,
            len,
            start_pos: 0,
            block_table: &[],
        }
    }

    #[test]
    fn split_rows_gives_each_span_its_own_rows_in_any_order() {
        // Rows 0..6, width 2; spans out of order, with row 2 in no span.
        let spans = [span(3, 3), span(0, 2)];
        let mut buffer: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let parts = split_rows(&mut buffer, 2, &spans);
        let seen: Vec<(usize, Vec<f32>)> = parts
            .iter()
            .map(|(span, rows)| (span.first_row, rows.to_vec()))
            .collect();
        assert_eq!(
            seen,
            vec![
                (0, vec![0.0, 1.0, 2.0, 3.0]),
                (3, vec![6.0, 7.0, 8.0, 9.0, 10.0, 11.0]),
            ]
        );
    }
}
