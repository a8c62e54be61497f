//! What the fuzz targets share: a byte-level token codec (the real tokenizer is not what these
//! targets exercise) and the limits a small model would have.

use latentserve_worker::engine::codec::{CodecError, TokenCodec};
use latentserve_worker::server::validate::RequestLimits;

/// Token id = byte value; ids of 256 and more are special and decode to nothing.
pub struct ByteCodec;

impl TokenCodec for ByteCodec {
    fn encode(&self, text: &str, _add_special_tokens: bool) -> Result<Vec<u32>, CodecError> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn decode(&self, ids: &[u32], _skip_special_tokens: bool) -> Result<String, CodecError> {
        let bytes: Vec<u8> = ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        vec![257]
    }
}

pub const LIMITS: RequestLimits = RequestLimits {
    max_seq_len: 2048,
    vocab_size: 300,
    cache_capacity_tokens: 4096,
};
