//! Bookkeeping of DeepSeek-V3's block-quantized FP8 weights as they would stay resident on the
//! GPU: a weight (N, K) in E4M3 (one byte per value) with `weight_scale_inv` (ceil(N/128),
//! ceil(K/128)) f32, one scale per 128x128 tile (the last tiles of a row or column may be
//! partial). The CPU loader (worker/src/model/loader.rs) multiplies the scales in at load time;
//! on the GPU the bytes stay FP8 and the scale of a tile is applied inside the matmul, so a rank
//! holds FP8 bytes + scales, not a bf16 copy.

/// Tile edge of DeepSeek-V3's weight quantization (`weight_block_size: [128, 128]`).
pub const BLOCK: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fp8Error {
    #[error("FP8 weight {name} must be 2-D (N, K) for block scales, got shape {shape:?}")]
    WeightRank { name: String, shape: Vec<usize> },
    #[error("FP8 weight {name} has an empty dimension: shape {shape:?}")]
    Empty { name: String, shape: Vec<usize> },
    #[error(
        "{scale_name} has shape {got:?} but FP8 weight {name} {weight:?} needs (ceil(N/128), ceil(K/128)) = {expected:?}"
    )]
    ScaleShape {
        name: String,
        scale_name: String,
        weight: [usize; 2],
        expected: [usize; 2],
        got: Vec<usize>,
    },
    #[error("{name} holds {got} bytes but its FP8 shape {weight:?} needs {expected}")]
    ByteLength {
        name: String,
        weight: [usize; 2],
        expected: usize,
        got: usize,
    },
    #[error("element ({row}, {col}) is outside FP8 weight {name} {weight:?}")]
    OutOfBounds {
        name: String,
        weight: [usize; 2],
        row: usize,
        col: usize,
    },
}

/// The name of the scale tensor of a weight, as the checkpoint spells it
/// (`x.weight` -> `x.weight_scale_inv`), like the CPU loader.
pub fn scale_name(weight_name: &str) -> String {
    match weight_name.strip_suffix(".weight") {
        Some(prefix) => format!("{prefix}.weight_scale_inv"),
        None => format!("{weight_name}_scale_inv"),
    }
}

/// One validated FP8 weight: its shape and that of its scales.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fp8Weight {
    pub name: String,
    /// (N, K): output rows, input columns.
    pub shape: [usize; 2],
    /// (ceil(N/128), ceil(K/128)).
    pub scale_shape: [usize; 2],
}

impl Fp8Weight {
    /// Checks a weight's shape and its scale tensor's shape (errors name the tensors).
    pub fn new(
        name: &str,
        weight_shape: &[usize],
        scale_shape: &[usize],
    ) -> Result<Self, Fp8Error> {
        let &[n, k] = weight_shape else {
            return Err(Fp8Error::WeightRank {
                name: name.into(),
                shape: weight_shape.to_vec(),
            });
        };
        if n == 0 || k == 0 {
            return Err(Fp8Error::Empty {
                name: name.into(),
                shape: weight_shape.to_vec(),
            });
        }
        let expected = [n.div_ceil(BLOCK), k.div_ceil(BLOCK)];
        if scale_shape != expected {
            return Err(Fp8Error::ScaleShape {
                name: name.into(),
                scale_name: scale_name(name),
                weight: [n, k],
                expected,
                got: scale_shape.to_vec(),
            });
        }
        Ok(Self {
            name: name.into(),
            shape: [n, k],
            scale_shape: expected,
        })
    }

    /// Checks that a byte buffer is exactly this weight's E4M3 values.
    pub fn check_bytes(&self, len: usize) -> Result<(), Fp8Error> {
        let expected = self.weight_bytes();
        if len != expected {
            return Err(Fp8Error::ByteLength {
                name: self.name.clone(),
                weight: self.shape,
                expected,
                got: len,
            });
        }
        Ok(())
    }

    /// The tile (row block, column block) an element belongs to.
    pub fn tile_of(&self, row: usize, col: usize) -> Result<(usize, usize), Fp8Error> {
        if row >= self.shape[0] || col >= self.shape[1] {
            return Err(Fp8Error::OutOfBounds {
                name: self.name.clone(),
                weight: self.shape,
                row,
                col,
            });
        }
        Ok((row / BLOCK, col / BLOCK))
    }

    /// Index into the row-major scale tensor of the tile holding (row, col).
    pub fn scale_index(&self, row: usize, col: usize) -> Result<usize, Fp8Error> {
        let (tr, tc) = self.tile_of(row, col)?;
        Ok(tr * self.scale_shape[1] + tc)
    }

    /// The (rows, cols) extent of tile (tr, tc): 128 x 128 except at the right and bottom edges.
    pub fn tile_extent(&self, tr: usize, tc: usize) -> (usize, usize) {
        let rows = (self.shape[0] - (tr * BLOCK).min(self.shape[0])).min(BLOCK);
        let cols = (self.shape[1] - (tc * BLOCK).min(self.shape[1])).min(BLOCK);
        (rows, cols)
    }

    /// E4M3 bytes: N * K.
    pub fn weight_bytes(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// f32 scales: 4 * ceil(N/128) * ceil(K/128).
    pub fn scale_bytes(&self) -> usize {
        4 * self.scale_shape[0] * self.scale_shape[1]
    }

    /// What this weight keeps resident on the GPU.
    pub fn resident_bytes(&self) -> usize {
        self.weight_bytes() + self.scale_bytes()
    }

    /// What the same weight would take dequantized to bf16 (the footprint FP8 avoids).
    pub fn bf16_bytes(&self) -> usize {
        2 * self.weight_bytes()
    }
}

/// The resident bytes of a rank's FP8 weights plus whatever it keeps in other dtypes (norms,
/// embeddings, gates): what `bench`/`serve` should report and the target (within 10 %
/// of FP8 bytes + cache) is measured against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResidentBytes {
    pub fp8_weights: usize,
    pub fp8_scales: usize,
    pub other: usize,
}

impl ResidentBytes {
    pub fn add_fp8(&mut self, w: &Fp8Weight) {
        self.fp8_weights += w.weight_bytes();
        self.fp8_scales += w.scale_bytes();
    }

    pub fn add_other(&mut self, bytes: usize) {
        self.other += bytes;
    }

    pub fn total(&self) -> usize {
        self.fp8_weights + self.fp8_scales + self.other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_shape_is_validated_and_errors_name_both_tensors() {
        let w = Fp8Weight::new(
            "model.layers.3.mlp.experts.0.up_proj.weight",
            &[2048, 7168],
            &[16, 56],
        )
        .unwrap();
        assert_eq!(w.scale_shape, [16, 56]);
        let err = Fp8Weight::new(
            "layers.0.self_attn.kv_a_proj_with_mqa.weight",
            &[576, 7168],
            &[4, 56],
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"),
            "{text}"
        );
        assert!(text.contains("[5, 56]"), "ceil(576/128) = 5: {text}");
        assert!(matches!(
            Fp8Weight::new("x.weight", &[3, 4, 5], &[1, 1]),
            Err(Fp8Error::WeightRank { .. })
        ));
        assert!(matches!(
            Fp8Weight::new("x.weight", &[0, 4], &[0, 1]),
            Err(Fp8Error::Empty { .. })
        ));
    }

    #[test]
    fn tiles_map_to_scale_indices_including_partial_edges() {
        // 300 x 200: tiles 3 x 2, the last row of tiles 44 rows, the last column 72.
        let w = Fp8Weight::new("w.weight", &[300, 200], &[3, 2]).unwrap();
        assert_eq!(w.scale_index(0, 0).unwrap(), 0);
        assert_eq!(w.scale_index(0, 127).unwrap(), 0);
        assert_eq!(w.scale_index(0, 128).unwrap(), 1);
        assert_eq!(w.scale_index(127, 199).unwrap(), 1);
        assert_eq!(w.scale_index(128, 0).unwrap(), 2);
        assert_eq!(w.scale_index(299, 199).unwrap(), 5);
        assert_eq!(w.tile_extent(0, 0), (128, 128));
        assert_eq!(w.tile_extent(2, 1), (44, 72));
        let err = w.scale_index(300, 0).unwrap_err().to_string();
        assert!(
            err.contains("w.weight") && err.contains("(300, 0)"),
            "{err}"
        );
        // Every element is covered by exactly its tile's extent.
        let covered: usize = (0..3)
            .flat_map(|tr| (0..2).map(move |tc| (tr, tc)))
            .map(|(tr, tc)| {
                let (r, c) = w.tile_extent(tr, tc);
                r * c
            })
            .sum();
        assert_eq!(covered, 300 * 200);
    }

    #[test]
    fn resident_bytes_are_fp8_bytes_plus_scales() {
        // DeepSeek-V3 routed expert: gate/up (2048, 7168), down (7168, 2048).
        let up = Fp8Weight::new("up.weight", &[2048, 7168], &[16, 56]).unwrap();
        assert_eq!(up.weight_bytes(), 2048 * 7168);
        assert_eq!(up.scale_bytes(), 4 * 16 * 56);
        assert_eq!(up.resident_bytes(), 14_680_064 + 3_584);
        assert_eq!(up.bf16_bytes(), 2 * 14_680_064);
        up.check_bytes(2048 * 7168).unwrap();
        let err = up.check_bytes(10).unwrap_err().to_string();
        assert!(
            err.contains("up.weight") && err.contains("14680064"),
            "{err}"
        );

        let down = Fp8Weight::new("down.weight", &[7168, 2048], &[56, 16]).unwrap();
        let mut rank = ResidentBytes::default();
        rank.add_fp8(&up);
        rank.add_fp8(&down);
        rank.add_other(7168 * 4);
        assert_eq!(rank.total(), 2 * (14_680_064 + 3_584) + 28_672);
        // The scales are a rounding error next to the bytes: < 0.1 %.
        assert!(rank.fp8_scales * 1000 < rank.fp8_weights);
    }

    #[test]
    fn scale_names_follow_the_checkpoint() {
        assert_eq!(scale_name("a.b.weight"), "a.b.weight_scale_inv");
        assert_eq!(scale_name("odd"), "odd_scale_inv");
    }
}
