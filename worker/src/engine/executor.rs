//! The engine's view of the model: one batched forward over a paged latent cache, and its
//! implementation for a loaded [`DeepSeekModel`] (optionally with experts on other shards).

use std::sync::{Arc, Mutex};

use candle_core::DType;

use crate::experts::remote::ShardedExperts;
use crate::model::{
    DeepSeekModel, DispatchPlan, ExpertExecutor, LatentCache, LogitsFor, ModelError, SequenceChunk,
};

/// Why a batched forward failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The model itself failed; the requests of the step end with INTERNAL.
    #[error(transparent)]
    Model(ModelError),
    /// Something the step needs is unreachable (an expert shard); the requests of the step end
    /// with UNAVAILABLE and may be retried.
    #[error(transparent)]
    Unavailable(ModelError),
    /// The model answered with a logits buffer that does not fit the batch.
    #[error("model returned {got} logits for {chunks} chunks of vocabulary {vocab}")]
    LogitsShape {
        got: usize,
        chunks: usize,
        vocab: usize,
    },
}

impl StepError {
    /// Sorts a model error: an unreachable expert shard is retryable, anything else is not.
    pub fn from_model(error: ModelError) -> Self {
        match error {
            ModelError::ExpertsUnavailable(_) => StepError::Unavailable(error),
            other => StepError::Model(other),
        }
    }
}

/// A model with its latent cache, as the engine drives it. The engine thread is its only user.
pub trait ModelExecutor: Send {
    fn vocab_size(&self) -> usize;

    /// Runs every chunk in one batched forward, writing their latents into the cache. Returns the
    /// logits of each chunk's last token: `chunks.len()` rows of `vocab_size()` values.
    fn forward(&mut self, chunks: &[SequenceChunk<'_>]) -> Result<Vec<f32>, StepError>;

    /// Tokens routed to each expert since the previous call, as `(layer, expert, tokens)`;
    /// models without routing statistics report none.
    fn take_expert_counts(&mut self) -> Vec<(usize, usize, u64)> {
        Vec::new()
    }
}

/// A model and the latent cache pool whose block ids the engine's block manager hands out.
pub struct DeepSeekExecutor {
    model: Arc<DeepSeekModel>,
    cache: LatentCache,
    /// Tokens routed to each (layer, expert) since the last report.
    expert_counts: Mutex<Vec<Vec<u64>>>,
    /// Expert parallelism: peers run the routed experts this worker does not hold.
    sharded: Option<Arc<ShardedExperts>>,
}

impl DeepSeekExecutor {
    pub fn new(model: Arc<DeepSeekModel>, cache: LatentCache) -> Self {
        let config = model.config();
        let experts = config.moe.map_or(0, |moe| moe.n_routed_experts);
        let counts = vec![vec![0; experts]; config.num_hidden_layers];
        Self {
            model,
            cache,
            expert_counts: Mutex::new(counts),
            sharded: None,
        }
    }

    /// Runs the routed experts other shards hold on those shards.
    pub fn with_sharded_experts(mut self, sharded: Option<Arc<ShardedExperts>>) -> Self {
        self.sharded = sharded;
        self
    }

    pub fn model(&self) -> &DeepSeekModel {
        &self.model
    }

    pub fn cache(&self) -> &LatentCache {
        &self.cache
    }
}

/// Runs the model's own experts and counts the tokens each one gets (the expert-load metric).
struct CountingExperts<'a> {
    inner: &'a dyn ExpertExecutor,
    counts: &'a Mutex<Vec<Vec<u64>>>,
}

impl ExpertExecutor for CountingExperts<'_> {
    fn run_experts(
        &self,
        layer: usize,
        hidden: &[f32],
        hidden_size: usize,
        plan: &DispatchPlan,
    ) -> Result<Vec<f32>, ModelError> {
        if let Ok(mut counts) = self.counts.lock()
            && let Some(layer_counts) = counts.get_mut(layer)
        {
            for work in &plan.works {
                if let Some(count) = layer_counts.get_mut(work.expert) {
                    *count += work.rows.len() as u64;
                }
            }
        }
        self.inner.run_experts(layer, hidden, hidden_size, plan)
    }
}

impl ModelExecutor for DeepSeekExecutor {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn forward(&mut self, chunks: &[SequenceChunk<'_>]) -> Result<Vec<f32>, StepError> {
        let experts = CountingExperts {
            inner: self.model.local_experts(),
            counts: &self.expert_counts,
        };
        // (chunks, vocab) f32
        // Only this shard's experts are counted (expert_tokens_total counts local expert work).
        let result = match &self.sharded {
            Some(sharded) => self.model.forward_with_experts(
                chunks,
                &mut self.cache,
                LogitsFor::LastToken,
                &sharded.with_local(&experts),
            ),
            None => self.model.forward_with_experts(
                chunks,
                &mut self.cache,
                LogitsFor::LastToken,
                &experts,
            ),
        };
        let logits = result.map_err(StepError::from_model)?;
        logits
            .to_dtype(DType::F32)
            .and_then(|l| l.flatten_all())
            .and_then(|l| l.to_vec1::<f32>())
            .map_err(|e| StepError::Model(e.into()))
    }

    fn take_expert_counts(&mut self) -> Vec<(usize, usize, u64)> {
        let Ok(mut counts) = self.expert_counts.lock() else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        for (layer, layer_counts) in counts.iter_mut().enumerate() {
            for (expert, count) in layer_counts.iter_mut().enumerate() {
                if *count > 0 {
                    taken.push((layer, expert, std::mem::take(count)));
                }
            }
        }
        taken
    }
}
