//! The engine's view of the model: one batched forward over a paged latent cache.

/// One sequence's share of a batched step: a prefill chunk or a single decode token.
#[derive(Debug, Clone, Copy)]
pub struct BatchChunk<'a> {
    /// New tokens to run.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; the cache already holds positions `[0, start_pos)`.
    pub start_pos: usize,
    /// Cache blocks of the sequence in order, covering `start_pos + tokens.len()` positions.
    pub block_table: &'a [u32],
}

/// Why a batched forward failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The model itself failed; the requests of the step end with INTERNAL.
    #[error("{0}")]
    Failed(String),
    /// Something the step needs is unreachable (an expert shard); the requests of the step end
    /// with UNAVAILABLE and may be retried.
    #[error("{0}")]
    Unavailable(String),
}

impl From<String> for StepError {
    fn from(message: String) -> Self {
        StepError::Failed(message)
    }
}

/// A model with its latent cache, as the engine drives it. The engine thread is its only user.
pub trait ModelExecutor: Send {
    fn vocab_size(&self) -> usize;

    /// Runs every chunk in one batched forward, writing their latents into the cache. Returns the
    /// logits of each chunk's last token: `chunks.len()` rows of `vocab_size()` values.
    fn forward(&mut self, chunks: &[BatchChunk<'_>]) -> Result<Vec<f32>, StepError>;

    /// Tokens routed to each expert since the previous call, as `(layer, expert, tokens)`;
    /// models without routing statistics report none.
    fn take_expert_counts(&mut self) -> Vec<(usize, usize, u64)> {
        Vec::new()
    }
}
