//! `tokenizer.json` (via the `tokenizers` crate) plus the EOS/BOS ids of
//! `generation_config.json` (falling back to `config.json`).

use std::path::Path;

use super::{ModelConfig, ModelError};

/// A model directory's tokenizer and its special ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_ids: Vec<u32>,
    bos_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("eos_ids", &self.eos_ids)
            .field("bos_id", &self.bos_id)
            .finish()
    }
}

/// EOS ids and BOS id from `generation_config.json` if present, else from the model config.
pub fn special_ids(
    dir: &Path,
    config: &ModelConfig,
) -> Result<(Vec<u32>, Option<u32>), ModelError> {
    let path = dir.join("generation_config.json");
    if !path.exists() {
        return Ok((config.eos_token_ids.clone(), config.bos_token_id));
    }
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|err| ModelError::Config(format!("{}: {err}", path.display())))?;
    let as_id = |v: &serde_json::Value| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| ModelError::Config(format!("{}: bad token id {v}", path.display())))
    };
    let eos = match value.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => config.eos_token_ids.clone(),
        Some(serde_json::Value::Array(items)) => {
            items.iter().map(as_id).collect::<Result<_, _>>()?
        }
        Some(v) => vec![as_id(v)?],
    };
    let bos = match value.get("bos_token_id") {
        None | Some(serde_json::Value::Null) => config.bos_token_id,
        Some(v) => Some(as_id(v)?),
    };
    Ok((eos, bos))
}

impl Tokenizer {
    /// Loads `tokenizer.json` of a model directory.
    pub fn load(dir: &Path, config: &ModelConfig) -> Result<Self, ModelError> {
        let mut tokenizer = Self::from_file(&dir.join("tokenizer.json"), Vec::new(), None)?;
        (tokenizer.eos_ids, tokenizer.bos_id) = special_ids(dir, config)?;
        Ok(tokenizer)
    }

    /// Loads a `tokenizer.json` with the special ids given, for a tokenizer that comes without
    /// the rest of a model directory (e.g. a published tokenizer used in tests).
    pub fn from_file(
        path: &Path,
        eos_ids: Vec<u32>,
        bos_id: Option<u32>,
    ) -> Result<Self, ModelError> {
        if !path.exists() {
            return Err(ModelError::Tokenizer(format!(
                "{} not found",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|err| ModelError::Tokenizer(format!("{}: {err}", path.display())))?;
        Ok(Self {
            inner,
            eos_ids,
            bos_id,
        })
    }

    /// A tokenizer from the bytes of a `tokenizer.json` (e.g. received from a worker by the
    /// request router), with the special ids given.
    pub fn from_bytes(
        json: &[u8],
        eos_ids: Vec<u32>,
        bos_id: Option<u32>,
    ) -> Result<Self, ModelError> {
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|err| ModelError::Tokenizer(format!("tokenizer.json: {err}")))?;
        Ok(Self {
            inner,
            eos_ids,
            bos_id,
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|err| ModelError::Tokenizer(format!("encoding failed: {err}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|err| ModelError::Tokenizer(format!("decoding failed: {err}")))
    }

    /// The token string of an id (e.g. `<s>` for a BOS id), as the vocabulary spells it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
