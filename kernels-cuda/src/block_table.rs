//! The device layout of block tables: one padded i32 row per sequence, `max_blocks` wide, so a
//! kernel finds the block of position p of sequence b at `tables[b * max_blocks + p / block_size]`
//! (the `paged_slot` rule of the kernels' prelude, the same as the CPU cache's `slot`).
//! Padding entries hold [`PAD`]; kernels never read them for positions below the sequence length.

/// The value of unused entries (a real block id is never negative).
pub const PAD: i32 = -1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockTableError {
    #[error(
        "sequence {seq} has {blocks} blocks but the device block table holds {max_blocks} per row"
    )]
    TooManyBlocks {
        seq: usize,
        blocks: usize,
        max_blocks: usize,
    },
    #[error("block id {id} of sequence {seq} does not fit an i32 block table")]
    BlockId { seq: usize, id: u32 },
    #[error(
        "sequence {seq} of {len} tokens needs {needed} blocks of {block_size} but has {blocks}"
    )]
    ShortTable {
        seq: usize,
        len: usize,
        needed: usize,
        block_size: usize,
        blocks: usize,
    },
}

/// Padded rows of block ids, ready to copy to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBlockTables {
    pub rows: usize,
    pub max_blocks: usize,
    /// (rows, max_blocks) row-major.
    pub data: Vec<i32>,
}

impl DeviceBlockTables {
    /// Packs `tables` (each a sequence's block ids in position order) into `rows` padded rows
    /// (rows >= tables.len(): the extra rows of a CUDA-graph bucket are all padding).
    pub fn pack(
        tables: &[&[u32]],
        rows: usize,
        max_blocks: usize,
    ) -> Result<Self, BlockTableError> {
        let rows = rows.max(tables.len());
        let mut data = vec![PAD; rows * max_blocks];
        for (seq, table) in tables.iter().enumerate() {
            if table.len() > max_blocks {
                return Err(BlockTableError::TooManyBlocks {
                    seq,
                    blocks: table.len(),
                    max_blocks,
                });
            }
            for (i, &id) in table.iter().enumerate() {
                data[seq * max_blocks + i] =
                    i32::try_from(id).map_err(|_| BlockTableError::BlockId { seq, id })?;
            }
        }
        Ok(Self {
            rows,
            max_blocks,
            data,
        })
    }

    /// Blocks a row must hold for a context of `max_seq_len` tokens.
    pub fn max_blocks_for(max_seq_len: usize, block_size: usize) -> usize {
        max_seq_len.div_ceil(block_size.max(1))
    }

    /// Checks that every sequence's row covers its length (what the kernels assume).
    pub fn check_lengths(&self, lens: &[usize], block_size: usize) -> Result<(), BlockTableError> {
        for (seq, &len) in lens.iter().enumerate() {
            let row = &self.data[seq * self.max_blocks..][..self.max_blocks];
            let blocks = row.iter().take_while(|&&id| id != PAD).count();
            let needed = len.div_ceil(block_size.max(1));
            if blocks < needed {
                return Err(BlockTableError::ShortTable {
                    seq,
                    len,
                    needed,
                    block_size,
                    blocks,
                });
            }
        }
        Ok(())
    }

    /// The cache slot of `position` in sequence `seq` (the kernels' rule, for host-side checks).
    pub fn slot(&self, seq: usize, position: usize, block_size: usize) -> Option<usize> {
        let id = *self
            .data
            .get(seq * self.max_blocks + position / block_size)?;
        (id >= 0).then(|| id as usize * block_size + position % block_size)
    }

    /// Bytes of the device copy.
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<i32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_padded_and_extra_bucket_rows_are_all_padding() {
        let a: &[u32] = &[7, 2];
        let b: &[u32] = &[5];
        let t = DeviceBlockTables::pack(&[a, b], 4, 3).unwrap();
        assert_eq!(t.rows, 4);
        assert_eq!(
            t.data,
            [7, 2, PAD, 5, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD]
        );
        assert_eq!(t.bytes(), 48);
        // Fewer rows than tables: rows grow to fit.
        assert_eq!(DeviceBlockTables::pack(&[a, b], 1, 2).unwrap().rows, 2);
    }

    #[test]
    fn slots_follow_the_cpu_cache_rule() {
        let a: &[u32] = &[7, 2];
        let t = DeviceBlockTables::pack(&[a], 1, 4).unwrap();
        // block_table[p / 16] * 16 + p % 16
        assert_eq!(t.slot(0, 0, 16), Some(112));
        assert_eq!(t.slot(0, 15, 16), Some(127));
        assert_eq!(t.slot(0, 16, 16), Some(32));
        assert_eq!(t.slot(0, 40, 16), None, "padding");
        assert_eq!(t.slot(3, 0, 16), None, "no such row");
    }

    #[test]
    fn errors_name_the_sequence() {
        let long: &[u32] = &[1, 2, 3];
        let err = DeviceBlockTables::pack(&[long], 1, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sequence 0 has 3 blocks but the device block table holds 2 per row"
        );
        let big: &[u32] = &[u32::MAX];
        assert!(matches!(
            DeviceBlockTables::pack(&[big], 1, 2),
            Err(BlockTableError::BlockId { seq: 0, .. })
        ));
        let a: &[u32] = &[4];
        let t = DeviceBlockTables::pack(&[a], 1, 2).unwrap();
        t.check_lengths(&[16], 16).unwrap();
        let err = t.check_lengths(&[17], 16).unwrap_err().to_string();
        assert!(err.contains("needs 2 blocks of 16 but has 1"), "{err}");
        assert_eq!(DeviceBlockTables::max_blocks_for(8192, 16), 512);
        assert_eq!(DeviceBlockTables::max_blocks_for(8193, 16), 513);
    }
}
