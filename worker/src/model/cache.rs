//! Paged KV storage. The normal layout keeps, per token and layer, only the MLA latent:
//! normalized `c_kv` (kv_lora_rank) ++ rotated `k_pe` (qk_rope_head_dim). A second layout keeps
//! decompressed per-head K and V instead; it exists only so the benchmark can measure what the
//! latent cache saves.

use candle_core::{DType, Device};
use half::f16;

use super::{ModelConfig, ModelError};

/// What a cache row holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLayout {
    /// kv_lora_rank + qk_rope_head_dim values per token per layer (the MLA latent).
    Latent,
    /// heads x (qk_head_dim + v_head_dim) values per token per layer: per-head K then V.
    DecompressedHeads,
}

/// A cache element type: f32 or f16, read back as f32 (by the kernels crate, for attention).
pub trait CacheValue: latentserve_kernels::Element {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl CacheValue for f32 {
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
}

impl CacheValue for f16 {
    #[inline]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// One buffer per layer of shape (num_blocks * block_size, row_width).
#[derive(Debug)]
pub(crate) enum CacheBuffers {
    F32(Vec<Vec<f32>>),
    F16(Vec<Vec<f16>>),
}

/// Paged per-layer storage addressed by block tables.
#[derive(Debug)]
pub struct LatentCache {
    block_size: usize,
    num_blocks: usize,
    dtype: DType,
    layout: CacheLayout,
    row_width: usize,
    num_layers: usize,
    pub(crate) buffers: CacheBuffers,
}

fn row_width(config: &ModelConfig, layout: CacheLayout) -> usize {
    match layout {
        CacheLayout::Latent => config.latent_dim(),
        CacheLayout::DecompressedHeads => {
            config.num_attention_heads * (config.qk_head_dim() + config.v_head_dim)
        }
    }
}

impl LatentCache {
    /// A latent cache of `num_blocks` blocks of `block_size` tokens, in F32 or F16.
    pub fn new(
        config: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::with_layout(
            config,
            num_blocks,
            block_size,
            dtype,
            device,
            CacheLayout::Latent,
        )
    }

    /// A cache with an explicit layout (the decompressed one is for measurements only).
    pub fn with_layout(
        config: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
        layout: CacheLayout,
    ) -> Result<Self, ModelError> {
        if !device.is_cpu() {
            return Err(ModelError::Input("the KV cache lives on the CPU".into()));
        }
        if block_size == 0 || num_blocks == 0 {
            return Err(ModelError::Input(format!(
                "cache needs num_blocks > 0 and block_size > 0 (got {num_blocks} x {block_size})"
            )));
        }
        let width = row_width(config, layout);
        let len = num_blocks * block_size * width;
        let layers = config.num_hidden_layers;
        let buffers = match dtype {
            DType::F32 => CacheBuffers::F32((0..layers).map(|_| vec![0f32; len]).collect()),
            DType::F16 => CacheBuffers::F16((0..layers).map(|_| vec![f16::ZERO; len]).collect()),
            other => {
                return Err(ModelError::Input(format!(
                    "unsupported cache dtype {other:?} (F32 or F16)"
                )));
            }
        };
        Ok(Self {
            block_size,
            num_blocks,
            dtype,
            layout,
            row_width: width,
            num_layers: layers,
            buffers,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn layout(&self) -> CacheLayout {
        self.layout
    }

    /// Values per token per layer.
    pub fn row_width(&self) -> usize {
        self.row_width
    }

    /// Bytes one token occupies over all layers: for the latent layout
    /// (kv_lora_rank + qk_rope_head_dim) * layers * dtype size, exactly.
    pub fn bytes_per_token(&self) -> usize {
        self.row_width * self.num_layers * self.dtype.size_in_bytes()
    }

    /// Bytes a latent pool of `num_blocks` blocks would take.
    pub fn bytes_for_blocks(
        config: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
    ) -> usize {
        config.latent_dim()
            * config.num_hidden_layers
            * dtype.size_in_bytes()
            * num_blocks
            * block_size
    }

    /// Row index of token `position` of a sequence with `block_table`.
    #[inline]
    pub(crate) fn slot(&self, block_table: &[u32], position: usize) -> usize {
        block_table[position / self.block_size] as usize * self.block_size
            + position % self.block_size
    }

    /// Writes one row of layer `layer` at `slot`.
    pub(crate) fn write_row(&mut self, layer: usize, slot: usize, values: &[f32]) {
        let w = self.row_width;
        match &mut self.buffers {
            CacheBuffers::F32(layers) => {
                layers[layer][slot * w..(slot + 1) * w].copy_from_slice(values)
            }
            CacheBuffers::F16(layers) => {
                for (dst, &v) in layers[layer][slot * w..(slot + 1) * w]
                    .iter_mut()
                    .zip(values)
                {
                    *dst = f16::from_f32(v);
                }
            }
        }
    }

    /// Copies rows for positions `0..len` of a sequence into a dense (len, row_width) f32 buffer.
    pub(crate) fn gather(&self, layer: usize, block_table: &[u32], len: usize) -> Vec<f32> {
        let w = self.row_width;
        let mut out = Vec::with_capacity(len * w);
        for pos in 0..len {
            let slot = self.slot(block_table, pos);
            match &self.buffers {
                CacheBuffers::F32(layers) => {
                    out.extend_from_slice(&layers[layer][slot * w..(slot + 1) * w])
                }
                CacheBuffers::F16(layers) => out.extend(
                    layers[layer][slot * w..(slot + 1) * w]
                        .iter()
                        .map(|v| v.to_f32()),
                ),
            }
        }
        out
    }

    /// Fills positions `0..len` of every layer with deterministic pseudo-random values in
    /// [-1, 1), standing in for a prefill when only the cost of attending to them matters
    /// (benchmarks of deep decode).
    pub fn fill_synthetic(&mut self, block_table: &[u32], len: usize, seed: u64) {
        let w = self.row_width;
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut row = vec![0f32; w];
        for layer in 0..self.num_layers {
            for pos in 0..len {
                for v in row.iter_mut() {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    *v = ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                }
                let slot = self.slot(block_table, pos);
                self.write_row(layer, slot, &row);
            }
        }
    }

    /// Checks that a block table can address `len` positions.
    pub(crate) fn check_block_table(
        &self,
        block_table: &[u32],
        len: usize,
    ) -> Result<(), ModelError> {
        let needed = len.div_ceil(self.block_size);
        if block_table.len() < needed {
            return Err(ModelError::Input(format!(
                "block table has {} blocks of {} tokens, {len} positions need {needed}",
                block_table.len(),
                self.block_size
            )));
        }
        if let Some(&bad) = block_table[..needed]
            .iter()
            .find(|&&b| b as usize >= self.num_blocks)
        {
            return Err(ModelError::Input(format!(
                "block id {bad} out of range (cache has {} blocks)",
                self.num_blocks
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        ModelConfig::from_json(
            &serde_json::json!({
                "model_type": "deepseek_v2", "vocab_size": 10, "hidden_size": 8,
                "intermediate_size": 8, "num_hidden_layers": 27, "num_attention_heads": 16,
                "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                "v_head_dim": 128, "max_position_embeddings": 512
            })
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn bytes_per_token_is_exact_and_decompressed_is_8_9x_for_v2_lite() {
        let c = config();
        let latent = LatentCache::new(&c, 2, 16, DType::F16, &Device::Cpu).unwrap();
        assert_eq!(latent.bytes_per_token(), 576 * 27 * 2);
        assert_eq!(
            LatentCache::bytes_for_blocks(&c, 2, 16, DType::F16),
            576 * 27 * 2 * 32
        );
        let heads = LatentCache::with_layout(
            &c,
            2,
            16,
            DType::F16,
            &Device::Cpu,
            CacheLayout::DecompressedHeads,
        )
        .unwrap();
        let ratio = heads.bytes_per_token() as f64 / latent.bytes_per_token() as f64;
        assert!((ratio - 5120.0 / 576.0).abs() < 1e-9 && ratio > 8.8);
    }

    #[test]
    fn paged_rows_round_trip_through_block_table() {
        let c = config();
        let mut cache = LatentCache::new(&c, 4, 2, DType::F32, &Device::Cpu).unwrap();
        let table = [3u32, 1];
        for pos in 0..3 {
            let slot = cache.slot(&table, pos);
            cache.write_row(0, slot, &vec![pos as f32; 576]);
        }
        let rows = cache.gather(0, &table, 3);
        assert_eq!(rows[0], 0.0);
        assert_eq!(rows[576], 1.0);
        assert_eq!(rows[2 * 576], 2.0);
        assert!(cache.check_block_table(&table, 5).is_err());
        assert!(cache.check_block_table(&[7], 1).is_err());
    }
}
