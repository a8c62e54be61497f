//! What the engine needs from a tokenizer, and its implementation for the model's tokenizer.

use crate::model::{ModelError, Tokenizer};

/// A tokenizer failed to encode or decode; the source says why.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct CodecError(#[from] Box<dyn std::error::Error + Send + Sync>);

impl From<ModelError> for CodecError {
    fn from(error: ModelError) -> Self {
        Self(Box::new(error))
    }
}

/// Text <-> token ids, and the ids that end a generation.
pub trait TokenCodec: Send + Sync {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, CodecError>;
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, CodecError>;
    /// Token ids that end a generation unless the request ignores EOS.
    fn eos_token_ids(&self) -> Vec<u32>;
}

impl TokenCodec for Tokenizer {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, CodecError> {
        Ok(Tokenizer::encode(self, text, add_special_tokens)?)
    }

    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, CodecError> {
        Ok(Tokenizer::decode(self, ids, skip_special_tokens)?)
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_ids().to_vec()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A byte-level codec for tests: token id = byte value (ids >= 256 are special and skipped).
    pub(crate) struct ByteCodec;

    impl TokenCodec for ByteCodec {
        fn encode(&self, text: &str, _: bool) -> Result<Vec<u32>, CodecError> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn decode(&self, ids: &[u32], _: bool) -> Result<String, CodecError> {
            let bytes: Vec<u8> = ids
                .iter()
                .filter(|&&id| id < 256)
                .map(|&id| id as u8)
                .collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        fn eos_token_ids(&self) -> Vec<u32> {
            vec![256]
        }
    }
}
