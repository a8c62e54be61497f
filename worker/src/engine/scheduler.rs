//! Continuous batching: each step admits requests under a token budget, runs prefill chunks and
//! one decode token per running request in one batched forward, samples, and streams the results.
//!
//! A step is three stages, as in vLLM's engine: [`Scheduler::schedule`] makes a [`StepPlan`]
//! (preempting and admitting as the cache pool allows), `execute` runs it through the model, and
//! `apply_outputs` samples and applies the finish rules (see [`super::output`]). What the step did
//! comes back as [`StepStats`] and what it made for the clients as an [`Outbox`]: the caller
//! records the stats into metrics first, then delivers the outputs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::blocks::{BlockManager, BlockTable, OutOfBlocks};
use super::codec::TokenCodec;
use super::executor::{ModelExecutor, StepError};
use super::output::OutputProcessor;
use super::request::{
    FinishReason, Finished, GenerationError, GenerationOutput, GenerationRequest, OutputSender,
    Timings, TokenLogprob, Usage,
};
use super::sampler::Sampler;
use super::stats::{Admission, Completion, FirstToken, Occupancy, StepStats};
use crate::model::SequenceChunk;

/// Limits of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Requests running at once (prefilling or decoding).
    pub max_batch_size: usize,
    /// Tokens one step runs over all requests; long prompts are split into chunks of this budget
    /// minus the running requests' decode tokens.
    pub max_tokens_per_step: usize,
    /// Context limit: prompt plus generated tokens.
    pub max_seq_len: usize,
}

/// Counts shared with the request handles: how many requests wait for their first admission and
/// how many are not finished yet.
#[derive(Debug, Default)]
pub struct RequestCounts {
    pub queued: AtomicUsize,
    pub in_flight: AtomicUsize,
}

/// Why the warm-up step failed.
#[derive(Debug, thiserror::Error)]
pub enum WarmUpError {
    #[error("the latent cache has no block for the warm-up token")]
    NoBlock(#[source] OutOfBlocks),
    #[error("the warm-up forward failed")]
    Step(#[source] StepError),
}

struct Sequence {
    request: GenerationRequest,
    sender: OutputSender,
    /// Prompt followed by the generated tokens.
    tokens: Vec<u32>,
    /// Positions whose latents are in the cache.
    num_computed: usize,
    table: BlockTable,
    sampler: Sampler,
    output: OutputProcessor,
    cached_prompt_tokens: Option<usize>,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl Sequence {
    fn prompt_len(&self) -> usize {
        self.request.prompt.len()
    }

    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len()
    }

    fn pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    fn is_decode(&self) -> bool {
        self.pending() == 1
    }

    /// Tokens its prefill still has to run: all pending ones, except the single newest token of
    /// a request that is decoding (a preempted request recomputes what it had generated, too).
    fn prefill_left(&self) -> usize {
        if self.generated() > 0 && self.is_decode() {
            0
        } else {
            self.pending()
        }
    }
}

/// One running request's share of a step: its next `tokens` positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledChunk {
    /// Index in the running list.
    pub seq: usize,
    pub tokens: usize,
}

/// What one step runs: decode tokens before prefill chunks, within the token budget.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub chunks: Vec<ScheduledChunk>,
    /// Running requests sent back to the queue to make room in the cache pool.
    pub preempted: usize,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn tokens(&self) -> usize {
        self.chunks.iter().map(|chunk| chunk.tokens).sum()
    }
}

/// The pieces a step sends to request streams. They are delivered after the step's stats are
/// recorded, so a client that sees its request finish finds it counted in /metrics.
#[derive(Default)]
#[must_use = "a step's outputs reach their clients only through deliver()"]
pub struct Outbox(Vec<(OutputSender, Result<GenerationOutput, GenerationError>)>);

impl Outbox {
    fn push(&mut self, sender: &OutputSender, item: Result<GenerationOutput, GenerationError>) {
        self.0.push((sender.clone(), item));
    }

    fn take(&mut self) -> Self {
        Self(std::mem::take(&mut self.0))
    }

    /// Sends every piece to its stream; a closed stream is reaped at the next step.
    pub fn deliver(self) {
        for (sender, item) in self.0 {
            let _ = sender.send(item);
        }
    }
}

/// The engine proper: one owner of the model, the block manager and every request's state.
pub struct Scheduler<E: ModelExecutor> {
    config: SchedulerConfig,
    executor: E,
    codec: Arc<dyn TokenCodec>,
    eos_token_ids: Vec<u32>,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    /// Oldest admission first: the newest is preempted first.
    running: Vec<Sequence>,
    counts: Arc<RequestCounts>,
    /// What this step sends to the request streams.
    outbox: Outbox,
}

impl<E: ModelExecutor> Scheduler<E> {
    pub fn new(
        config: SchedulerConfig,
        executor: E,
        codec: Arc<dyn TokenCodec>,
        blocks: BlockManager,
        counts: Arc<RequestCounts>,
    ) -> Self {
        Self {
            config,
            executor,
            eos_token_ids: codec.eos_token_ids(),
            codec,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            counts,
            outbox: Outbox::default(),
        }
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn blocks_mut(&mut self) -> &mut BlockManager {
        &mut self.blocks
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Requests running and waiting, and the cache pool in use.
    pub fn occupancy(&self) -> Occupancy {
        Occupancy {
            running: self.running.len(),
            waiting: self.waiting.len(),
            queued_prompt_tokens: self
                .running
                .iter()
                .chain(&self.waiting)
                .map(Sequence::prefill_left)
                .sum(),
            cache_usage_ratio: self.blocks.usage_ratio(),
        }
    }

    /// Queues a request. The caller has counted it in [`RequestCounts`] already.
    pub fn add_request(&mut self, request: GenerationRequest, sender: OutputSender) {
        let tokens = request.prompt.clone();
        let sampler = Sampler::new(request.sampling.clone());
        let output = OutputProcessor::new(tokens.len(), request.stop.clone());
        let table = BlockTable::salted(request.cache_salt.as_deref());
        self.waiting.push_back(Sequence {
            request,
            sender,
            tokens,
            num_computed: 0,
            table,
            sampler,
            output,
            cached_prompt_tokens: None,
            first_scheduled: None,
            first_token: None,
            last_token: None,
        });
    }

    /// Runs one token through the model (and frees its block), so the first real request does
    /// not pay for lazy initialisation.
    pub fn warm_up(&mut self) -> Result<(), WarmUpError> {
        let mut table = BlockTable::default();
        self.blocks
            .ensure_capacity(&mut table, 1)
            .map_err(WarmUpError::NoBlock)?;
        let token = self.eos_token_ids.first().copied().unwrap_or(0);
        let result = self.executor.forward(&[SequenceChunk {
            tokens: &[token],
            start_pos: 0,
            block_table: table.blocks(),
        }]);
        self.blocks.free(&mut table);
        result.map(|_| ()).map_err(WarmUpError::Step)
    }

    /// Ends every request with finish reason `cancelled` (draining past its timeout).
    pub fn cancel_all(&mut self) -> (StepStats, Outbox) {
        let now = Instant::now();
        let mut stats = StepStats::default();
        for mut seq in self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect::<Vec<_>>()
        {
            let output = self.finish(
                &mut seq,
                FinishReason::Cancelled,
                now,
                String::new(),
                &mut stats,
            );
            self.outbox.push(&seq.sender, Ok(output));
            self.release(&mut seq);
        }
        stats.occupancy = self.occupancy();
        (stats, self.outbox.take())
    }

    /// One engine step: drop cancelled requests, plan, run the batch and sample. Returns what it
    /// did and the outputs it made, for the caller to record and then deliver.
    pub fn step(&mut self) -> (StepStats, Outbox) {
        let started = Instant::now();
        self.reap_cancelled(started);
        let mut stats = StepStats::default();
        let plan = self.schedule(&mut stats);
        stats.preempted = plan.preempted;
        if !plan.is_empty() {
            stats.batch_size = plan.chunks.len();
            stats.tokens = plan.tokens();
            match self.execute(&plan.chunks) {
                Ok(logits) => self.apply_outputs(&plan, &logits, &mut stats),
                Err(error) => self.isolate_failure(plan, error, &mut stats),
            }
            stats.duration = Some(started.elapsed());
        }
        stats.expert_tokens = self.executor.take_expert_counts();
        stats.occupancy = self.occupancy();
        (stats, self.outbox.take())
    }

    /// A dropped stream is a cancellation; a passed deadline fails the request.
    fn reap_cancelled(&mut self, now: Instant) {
        let expired = |seq: &Sequence| seq.request.deadline.is_some_and(|d| now >= d);
        let mut index = 0;
        while index < self.running.len() {
            let seq = &self.running[index];
            if seq.sender.is_closed() || expired(seq) {
                let mut seq = self.running.remove(index);
                self.end_without_finish(&mut seq);
            } else {
                index += 1;
            }
        }
        let mut index = 0;
        while index < self.waiting.len() {
            let seq = &self.waiting[index];
            if seq.sender.is_closed() || expired(seq) {
                let Some(mut seq) = self.waiting.remove(index) else {
                    break;
                };
                self.end_without_finish(&mut seq);
            } else {
                index += 1;
            }
        }
    }

    fn end_without_finish(&mut self, seq: &mut Sequence) {
        if !seq.sender.is_closed() {
            tracing::info!(request_id = %seq.request.request_id, "deadline exceeded");
            let error = GenerationError::DeadlineExceeded {
                generated: seq.generated(),
            };
            self.outbox.push(&seq.sender, Err(error));
        } else {
            tracing::debug!(request_id = %seq.request.request_id, "stream dropped, cancelling");
        }
        self.release(seq);
    }

    /// Frees the request's blocks and counts it out.
    fn release(&mut self, seq: &mut Sequence) {
        self.blocks.free(&mut seq.table);
        if seq.first_scheduled.is_none() {
            self.counts.queued.fetch_sub(1, Ordering::Relaxed);
        }
        self.counts.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Plans this step: running requests first (preempting the newest when the pool runs out),
    /// then waiting requests while the budget and the pool allow. First admissions are noted in
    /// `stats`.
    fn schedule(&mut self, stats: &mut StepStats) -> StepPlan {
        let mut budget = self.config.max_tokens_per_step;
        let mut plan = StepPlan::default();
        // Decode tokens come before prefill chunks: a long prompt never stalls running requests.
        let mut decodes_left = self.running.iter().filter(|seq| seq.is_decode()).count();
        let mut index = 0;
        while index < self.running.len() && budget > 0 {
            let decode = self.running[index].is_decode();
            let n = if decode {
                decodes_left -= 1;
                1
            } else {
                self.running[index]
                    .pending()
                    .min(budget.saturating_sub(decodes_left))
            };
            if n == 0 {
                index += 1;
                continue;
            }
            let target = self.running[index].num_computed + n;
            let mut scheduled = true;
            while self
                .blocks
                .ensure_capacity(&mut self.running[index].table, target)
                .is_err()
            {
                let victim = self.running.len() - 1;
                if victim != index && self.running[victim].is_decode() {
                    decodes_left -= 1;
                }
                self.preempt(victim);
                plan.preempted += 1;
                if victim == index {
                    scheduled = false;
                    break;
                }
            }
            if !scheduled {
                break;
            }
            plan.chunks.push(ScheduledChunk {
                seq: index,
                tokens: n,
            });
            budget -= n;
            index += 1;
        }

        let now = Instant::now();
        while budget > 0
            && self.running.len() < self.config.max_batch_size
            && let Some(seq) = self.waiting.front_mut()
        {
            let pool = self.blocks.num_blocks();
            let needed = self
                .blocks
                .blocks_for(seq.prompt_len() + seq.request.max_tokens);
            if needed > pool {
                let mut seq = self.waiting.pop_front().expect("front exists");
                let error = GenerationError::TooLongForCache { needed, pool };
                self.outbox.push(&seq.sender, Err(error));
                self.release(&mut seq);
                continue;
            }
            if seq.table.is_empty() {
                seq.num_computed = self.blocks.acquire_prefix(&mut seq.table, &seq.tokens);
            }
            let n = seq.pending().min(budget);
            if self
                .blocks
                .ensure_capacity(&mut seq.table, seq.num_computed + n)
                .is_err()
            {
                // Not enough room: give the shared prefix back and wait for running requests.
                self.blocks.free(&mut seq.table);
                seq.num_computed = 0;
                break;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            if seq.first_scheduled.is_none() {
                seq.first_scheduled = Some(now);
                self.counts.queued.fetch_sub(1, Ordering::Relaxed);
            }
            if seq.cached_prompt_tokens.is_none() {
                let cached = seq.num_computed.min(seq.prompt_len());
                seq.cached_prompt_tokens = Some(cached);
                stats.admissions.push(Admission {
                    queue: now.duration_since(seq.request.arrival),
                    prompt_tokens: seq.prompt_len(),
                    cached_prompt_tokens: cached,
                });
            }
            plan.chunks.push(ScheduledChunk {
                seq: self.running.len(),
                tokens: n,
            });
            self.running.push(seq);
            budget -= n;
        }
        plan
    }

    /// Frees a running request's blocks and puts it back at the head of the queue; it is
    /// recomputed (its prompt and the tokens it made so far) when admitted again.
    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        tracing::debug!(request_id = %seq.request.request_id, generated = seq.generated(), "preempting");
        self.blocks.free(&mut seq.table);
        seq.num_computed = 0;
        self.waiting.push_front(seq);
    }

    /// Runs `planned` chunks in one batched forward: the logits of each chunk's last token.
    fn execute(&mut self, planned: &[ScheduledChunk]) -> Result<Vec<f32>, StepError> {
        let chunks: Vec<SequenceChunk<'_>> = planned
            .iter()
            .map(|chunk| {
                let seq = &self.running[chunk.seq];
                SequenceChunk {
                    tokens: &seq.tokens[seq.num_computed..seq.num_computed + chunk.tokens],
                    start_pos: seq.num_computed,
                    block_table: seq.table.blocks(),
                }
            })
            .collect();
        let logits = self.executor.forward(&chunks)?;
        let vocab = self.executor.vocab_size();
        if logits.len() != chunks.len() * vocab {
            return Err(StepError::LogitsShape {
                got: logits.len(),
                chunks: chunks.len(),
                vocab,
            });
        }
        Ok(logits)
    }

    /// Advances every planned sequence; those that reached their end sample a token, stream it
    /// and finish when a finish rule says so.
    fn apply_outputs(&mut self, plan: &StepPlan, logits: &[f32], stats: &mut StepStats) {
        let vocab = self.executor.vocab_size();
        let now = Instant::now();
        let mut finished = Vec::new();
        for (row, chunk) in plan.chunks.iter().enumerate() {
            let seq = &mut self.running[chunk.seq];
            seq.num_computed += chunk.tokens;
            self.blocks
                .register_full_blocks(&mut seq.table, &seq.tokens, seq.num_computed);
            if seq.num_computed < seq.tokens.len() {
                continue; // a prefill chunk that does not reach the end of the prompt yet
            }
            let mut row_logits = logits[row * vocab..(row + 1) * vocab].to_vec();
            let sampled = seq
                .sampler
                .sample(&mut row_logits, &seq.tokens, seq.request.logprobs);
            seq.tokens.push(sampled.token);
            stats.generated_tokens += 1;
            match seq.last_token {
                None => {
                    seq.first_token = Some(now);
                    stats.first_tokens.push(FirstToken {
                        time_to_first_token: now.duration_since(seq.request.arrival),
                        prefill: seq.first_scheduled.map(|t| now.duration_since(t)),
                    });
                }
                Some(last) => stats.inter_token.push(now.duration_since(last)),
            }
            seq.last_token = Some(now);

            let token = sampled.token;
            let step = seq.output.push_token(
                self.codec.as_ref(),
                &seq.request,
                &self.eos_token_ids,
                &seq.tokens,
                self.config.max_seq_len,
            );
            let output = GenerationOutput {
                token_ids: vec![token],
                text: step.text,
                logprobs: if seq.request.logprobs > 0 {
                    vec![TokenLogprob {
                        token,
                        logprob: sampled.logprob,
                        top: sampled.top,
                    }]
                } else {
                    Vec::new()
                },
                finished: None,
            };
            match step.finish {
                Some(reason) => {
                    let tail = seq.output.flush(self.codec.as_ref(), &seq.tokens, reason);
                    finished.push((chunk.seq, reason, output, tail));
                }
                None => self.outbox.push(&seq.sender, Ok(output)),
            }
        }

        // Remove finished requests from the back so earlier indices stay valid.
        finished.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        for (index, reason, output, tail) in finished {
            let mut seq = self.running.remove(index);
            let mut last = self.finish(&mut seq, reason, now, tail, stats);
            last.token_ids = output.token_ids;
            last.logprobs = output.logprobs;
            last.text.insert_str(0, &output.text);
            self.outbox.push(&seq.sender, Ok(last));
            self.release(&mut seq);
        }
    }

    /// The last output of a request (without its final token's pieces); its completion goes
    /// into `stats`.
    fn finish(
        &self,
        seq: &mut Sequence,
        reason: FinishReason,
        now: Instant,
        text: String,
        stats: &mut StepStats,
    ) -> GenerationOutput {
        let arrival = seq.request.arrival;
        let timings = Timings {
            queue: seq
                .first_scheduled
                .map_or(now - arrival, |t| t.duration_since(arrival)),
            time_to_first_token: seq
                .first_token
                .map_or(std::time::Duration::ZERO, |t| t.duration_since(arrival)),
            total: now.duration_since(arrival),
        };
        stats.completions.push(Completion {
            reason,
            total: timings.total,
            decode: seq.first_token.map(|first| now.duration_since(first)),
        });
        GenerationOutput {
            text,
            finished: Some(Finished {
                reason,
                usage: Usage {
                    prompt_tokens: seq.prompt_len(),
                    completion_tokens: seq.generated(),
                    cached_prompt_tokens: seq.cached_prompt_tokens.unwrap_or(0),
                },
                timings,
            }),
            ..GenerationOutput::default()
        }
    }

    /// A failed forward fails the requests of that batch only; the engine keeps serving.
    /// A batch failed: which of its requests cannot run? Each chunk runs again alone (writing the
    /// same cache slots with the same values, and sampling nothing yet); the chunks that fail alone
    /// end their requests with their own error, the others go on as if the batch had run. A lost
    /// expert shard fails every request at once: alone they would fail the same way.
    fn isolate_failure(&mut self, plan: StepPlan, error: StepError, stats: &mut StepStats) {
        if plan.chunks.len() == 1 || matches!(error, StepError::Unavailable(_)) {
            self.fail_planned(&plan, GenerationError::from_step(error));
            return;
        }
        tracing::warn!(%error, chunks = plan.chunks.len(), "batched step failed; running its requests one by one");
        let mut survivors = StepPlan {
            chunks: Vec::new(),
            preempted: plan.preempted,
        };
        let mut logits = Vec::new();
        let mut failed = Vec::new();
        for chunk in plan.chunks {
            match self.execute(std::slice::from_ref(&chunk)) {
                Ok(row) => {
                    logits.extend(row);
                    survivors.chunks.push(chunk);
                }
                Err(error) => failed.push((chunk, error)),
            }
        }
        // Remove the failed requests first (highest index first), then renumber the survivors'
        // places in the running list before their outputs are applied.
        failed.sort_unstable_by_key(|(chunk, _)| std::cmp::Reverse(chunk.seq));
        let removed: Vec<usize> = failed.iter().map(|(chunk, _)| chunk.seq).collect();
        for (chunk, error) in failed {
            let mut seq = self.running.remove(chunk.seq);
            let error = GenerationError::from_step(error);
            tracing::error!(request_id = %seq.request.request_id, %error, "request failed alone");
            self.outbox.push(&seq.sender, Err(error));
            self.release(&mut seq);
        }
        for chunk in &mut survivors.chunks {
            chunk.seq -= removed.iter().filter(|&&index| index < chunk.seq).count();
        }
        if !survivors.is_empty() {
            self.apply_outputs(&survivors, &logits, stats);
        }
    }

    fn fail_planned(&mut self, plan: &StepPlan, error: GenerationError) {
        tracing::error!(error = %error, "model step failed");
        let mut indices: Vec<usize> = plan.chunks.iter().map(|chunk| chunk.seq).collect();
        indices.sort_unstable_by(|a, b| b.cmp(a));
        for index in indices {
            let mut seq = self.running.remove(index);
            self.outbox.push(&seq.sender, Err(error.clone()));
            self.release(&mut seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ops::{Deref, DerefMut};
    use std::time::Duration;

    use super::*;
    use crate::engine::codec::tests::ByteCodec;
    use crate::engine::request::{GenerationOutput, OutputReceiver};
    use crate::engine::sampler::SamplingParams;
    use crate::metrics::Metrics;
    use crate::model::ModelError;

    const VOCAB: usize = 300;
    const EOS: u32 = 256;

    /// A test double with a real paged cache: it stores each token in the slot its block table
    /// names and derives the logits from everything the cache holds for the sequence, so a wrong
    /// block table, a bad shared prefix or a lost position changes the generated tokens.
    struct PagedEchoModel {
        slots: Vec<Option<u32>>,
        block_size: usize,
        /// Tokens to never produce, so tests control EOS themselves.
        banned: Vec<u32>,
        /// A token the model cannot run: a batch with it in any chunk fails.
        poison: Option<u32>,
    }

    impl PagedEchoModel {
        fn new(num_blocks: usize, block_size: usize) -> Self {
            Self {
                slots: vec![None; num_blocks * block_size],
                block_size,
                banned: vec![EOS],
                poison: None,
            }
        }

        fn slot(&self, table: &[u32], pos: usize) -> usize {
            table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
        }
    }

    impl ModelExecutor for PagedEchoModel {
        fn vocab_size(&self) -> usize {
            VOCAB
        }

        fn forward(&mut self, chunks: &[SequenceChunk<'_>]) -> Result<Vec<f32>, StepError> {
            if let Some(poison) = self.poison
                && chunks.iter().any(|chunk| chunk.tokens.contains(&poison))
            {
                return Err(StepError::Model(ModelError::Input(format!(
                    "token {poison} cannot be run"
                ))));
            }
            let mut logits = Vec::with_capacity(chunks.len() * VOCAB);
            for chunk in chunks {
                for (offset, &token) in chunk.tokens.iter().enumerate() {
                    let slot = self.slot(chunk.block_table, chunk.start_pos + offset);
                    self.slots[slot] = Some(token);
                }
                let end = chunk.start_pos + chunk.tokens.len();
                let mut state: u64 = 17;
                for pos in 0..end {
                    let token = self.slots[self.slot(chunk.block_table, pos)].ok_or_else(|| {
                        StepError::Model(ModelError::Input(format!(
                            "position {pos} read before it was written"
                        )))
                    })?;
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(token as u64 + 1);
                }
                for j in 0..VOCAB as u64 {
                    let mixed = (state ^ j.wrapping_mul(0x9E3779B97F4A7C15))
                        .wrapping_mul(0xff51afd7ed558ccd);
                    let banned = self.banned.contains(&(j as u32));
                    logits.push(if banned {
                        -1e9
                    } else {
                        (mixed >> 40) as f32 / (1u64 << 24) as f32 * 8.0
                    });
                }
            }
            Ok(logits)
        }
    }

    /// A scheduler whose steps are recorded into metrics, as the engine loop records them.
    struct Harness {
        scheduler: Scheduler<PagedEchoModel>,
        metrics: Metrics,
    }

    impl Harness {
        fn step(&mut self) -> StepStats {
            let (stats, outputs) = self.scheduler.step();
            stats.record(&self.metrics);
            outputs.deliver();
            stats
        }
    }

    impl Deref for Harness {
        type Target = Scheduler<PagedEchoModel>;
        fn deref(&self) -> &Self::Target {
            &self.scheduler
        }
    }

    impl DerefMut for Harness {
        fn deref_mut(&mut self) -> &mut Self::Target {
            &mut self.scheduler
        }
    }

    fn scheduler(
        num_blocks: usize,
        block_size: usize,
        step_tokens: usize,
        prefix: bool,
    ) -> Harness {
        Harness {
            scheduler: Scheduler::new(
                SchedulerConfig {
                    max_batch_size: 32,
                    max_tokens_per_step: step_tokens,
                    max_seq_len: 512,
                },
                PagedEchoModel::new(num_blocks, block_size),
                Arc::new(ByteCodec),
                BlockManager::new(num_blocks, block_size, prefix),
                Arc::new(RequestCounts::default()),
            ),
            metrics: Metrics::new("test").unwrap(),
        }
    }

    fn request(prompt: &[u8], max_tokens: usize, sampling: SamplingParams) -> GenerationRequest {
        GenerationRequest::of_bytes(prompt, max_tokens, sampling)
    }

    fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    fn seeded(seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    fn submit(
        scheduler: &mut Scheduler<PagedEchoModel>,
        request: GenerationRequest,
    ) -> OutputReceiver {
        scheduler.counts.queued.fetch_add(1, Ordering::SeqCst);
        scheduler.counts.in_flight.fetch_add(1, Ordering::SeqCst);
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        scheduler.add_request(request, sender);
        receiver
    }

    fn run_to_end(scheduler: &mut Harness) -> StepStats {
        let mut total = StepStats::default();
        for _ in 0..10_000 {
            if !scheduler.has_work() {
                return total;
            }
            let report = scheduler.step();
            total.preempted += report.preempted;
            total.batch_size = total.batch_size.max(report.batch_size);
        }
        panic!("scheduler did not finish");
    }

    fn collect(receiver: &mut OutputReceiver) -> (Vec<u32>, String, Finished) {
        let mut tokens = Vec::new();
        let mut text = String::new();
        while let Ok(output) = receiver.try_recv() {
            let GenerationOutput {
                token_ids,
                text: delta,
                finished,
                ..
            } = output.expect("no error");
            tokens.extend(token_ids);
            text.push_str(&delta);
            if let Some(finished) = finished {
                return (tokens, text, finished);
            }
        }
        panic!("stream ended without a finish");
    }

    fn prompts() -> Vec<Vec<u8>> {
        (0..16u8)
            .map(|i| format!("prompt number {i} says {}", "x".repeat(i as usize)).into_bytes())
            .collect()
    }

    fn sampling_for(i: usize) -> SamplingParams {
        if i.is_multiple_of(2) {
            greedy()
        } else {
            seeded(i as u64)
        }
    }

    fn alone(prompt: &[u8], sampling: SamplingParams, max_tokens: usize) -> Vec<u32> {
        let mut scheduler = scheduler(64, 4, 64, false);
        let mut receiver = submit(&mut scheduler, request(prompt, max_tokens, sampling));
        run_to_end(&mut scheduler);
        collect(&mut receiver).0
    }

    #[test]
    fn a_batch_of_16_gives_the_same_tokens_as_each_request_alone() {
        let mut batched = scheduler(256, 4, 512, true);
        let mut receivers: Vec<_> = prompts()
            .iter()
            .enumerate()
            .map(|(i, p)| submit(&mut batched, request(p, 12, sampling_for(i))))
            .collect();
        let report = run_to_end(&mut batched);
        assert_eq!(report.batch_size, 16);
        for (i, prompt) in prompts().iter().enumerate() {
            let (tokens, _, finished) = collect(&mut receivers[i]);
            assert_eq!(finished.reason, FinishReason::Length);
            assert_eq!(tokens, alone(prompt, sampling_for(i), 12), "request {i}");
        }
        assert_eq!(batched.blocks().num_used_blocks(), 0);
        assert_eq!(batched.counts.in_flight.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_request_the_model_cannot_run_fails_alone_and_its_batch_goes_on() {
        let mut batched = scheduler(256, 4, 512, true);
        batched.executor.poison = Some(u32::from(b'!'));
        let prompts = prompts();
        let mut receivers: Vec<_> = prompts[..4]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let prompt = if i == 2 { b"poisoned!".as_slice() } else { p };
                submit(&mut batched, request(prompt, 12, sampling_for(i)))
            })
            .collect();
        let report = run_to_end(&mut batched);
        assert_eq!(report.batch_size, 4, "the four ran as one batch first");
        for (i, prompt) in prompts[..4].iter().enumerate() {
            if i == 2 {
                let error = receivers[i].try_recv().expect("an outcome").unwrap_err();
                assert!(
                    error.to_string().contains("token 33 cannot be run"),
                    "{error}"
                );
                continue;
            }
            let (tokens, _, finished) = collect(&mut receivers[i]);
            assert_eq!(finished.reason, FinishReason::Length);
            assert_eq!(tokens, alone(prompt, sampling_for(i), 12), "request {i}");
        }
        assert_eq!(batched.blocks().num_used_blocks(), 0);
        assert_eq!(batched.counts.in_flight.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn preemption_under_a_tiny_pool_still_completes_every_request_correctly() {
        // 10 blocks of 4 tokens; each request needs up to 7 blocks, so they cannot all run.
        let mut tight = scheduler(10, 4, 64, true);
        let mut receivers: Vec<_> = prompts()[..6]
            .iter()
            .enumerate()
            .map(|(i, p)| submit(&mut tight, request(&p[..10], 16, sampling_for(i))))
            .collect();
        let report = run_to_end(&mut tight);
        assert!(report.preempted > 0, "expected preemptions");
        for (i, prompt) in prompts()[..6].iter().enumerate() {
            let (tokens, _, finished) = collect(&mut receivers[i]);
            assert_eq!(finished.usage.completion_tokens, 16);
            assert_eq!(
                tokens,
                alone(&prompt[..10], sampling_for(i), 16),
                "request {i}"
            );
        }
        assert!(tight.metrics.preemptions_total.get() > 0);
    }

    #[test]
    fn a_shared_prefix_is_served_from_the_cache_with_the_same_tokens() {
        let mut cached = scheduler(64, 4, 64, true);
        let prefix = b"a long shared system prompt, ".to_vec();
        let mut first = submit(
            &mut cached,
            request(&[prefix.clone(), b"first".to_vec()].concat(), 4, greedy()),
        );
        run_to_end(&mut cached);
        assert_eq!(collect(&mut first).2.usage.cached_prompt_tokens, 0);
        let second_prompt = [prefix.clone(), b"second".to_vec()].concat();
        let mut second = submit(&mut cached, request(&second_prompt, 4, greedy()));
        run_to_end(&mut cached);
        let (tokens, _, finished) = collect(&mut second);
        assert_eq!(finished.usage.cached_prompt_tokens, prefix.len() / 4 * 4);
        assert_eq!(tokens, alone(&second_prompt, greedy(), 4));
        assert_eq!(
            cached.metrics.prefix_cache_hits_total.get(),
            (prefix.len() / 4 * 4) as u64
        );
    }

    #[test]
    fn long_prompts_are_chunked_while_running_requests_keep_decoding() {
        let mut chunked = scheduler(64, 4, 8, true);
        let mut short = submit(&mut chunked, request(b"hi", 20, greedy()));
        chunked.step();
        let long_prompt = b"a prompt much longer than the step budget of eight tokens".to_vec();
        let mut long = submit(&mut chunked, request(&long_prompt, 3, greedy()));
        let mut decoded_while_prefilling = 0;
        while chunked
            .running
            .iter()
            .chain(&chunked.waiting)
            .any(|s| s.request.prompt.len() > 10 && s.first_token.is_none())
        {
            let before = chunked.running.first().map(|s| s.tokens.len());
            let report = chunked.step();
            assert!(report.tokens <= 8);
            if chunked.running.first().map(|s| s.tokens.len()) > before {
                decoded_while_prefilling += 1;
            }
        }
        assert!(decoded_while_prefilling >= long_prompt.len() / 8 - 1);
        run_to_end(&mut chunked);
        assert_eq!(collect(&mut short).0, alone(b"hi", greedy(), 20));
        assert_eq!(collect(&mut long).0, alone(&long_prompt, greedy(), 3));
    }

    #[test]
    fn queued_prompt_tokens_are_what_chunked_prefill_still_has_to_run() {
        let mut chunked = scheduler(64, 4, 8, false);
        assert_eq!(chunked.occupancy().queued_prompt_tokens, 0);
        let mut short = submit(&mut chunked, request(b"hi", 4, greedy()));
        let long_prompt = b"a prompt of thirty-two bytes....".to_vec();
        assert_eq!(long_prompt.len(), 32);
        let mut long = submit(&mut chunked, request(&long_prompt, 2, greedy()));
        assert_eq!(chunked.occupancy().queued_prompt_tokens, 2 + 32);
        // Each step runs 8 tokens: the short prompt and 6 of the long one, then 1 decode token
        // and 7 more of it, and so on; decoding requests owe nothing.
        let mut seen = vec![chunked.occupancy().queued_prompt_tokens];
        while chunked.has_work() {
            chunked.step();
            seen.push(chunked.occupancy().queued_prompt_tokens);
        }
        assert_eq!(seen[1], 32 - 6);
        assert!(seen.windows(2).all(|w| w[1] <= w[0]), "{seen:?}");
        assert_eq!(seen.last(), Some(&0));
        collect(&mut short);
        collect(&mut long);
    }

    #[test]
    fn a_dropped_stream_frees_its_blocks_at_the_next_step() {
        let mut engine = scheduler(64, 4, 64, false);
        let receiver = submit(&mut engine, request(b"some prompt text", 100, greedy()));
        engine.step();
        engine.step();
        assert!(engine.blocks().num_used_blocks() > 0);
        drop(receiver);
        engine.step();
        assert_eq!(engine.blocks().num_used_blocks(), 0);
        assert!(!engine.has_work());
        assert_eq!(engine.metrics.kv_cache_usage_ratio.get(), 0.0);
    }

    #[test]
    fn a_passed_deadline_fails_the_request() {
        let mut engine = scheduler(64, 4, 64, false);
        let mut req = request(b"prompt", 100, greedy());
        req.deadline = Some(Instant::now() - Duration::from_millis(1));
        let mut receiver = submit(&mut engine, req);
        engine.step();
        assert!(matches!(
            receiver.try_recv(),
            Ok(Err(GenerationError::DeadlineExceeded { .. }))
        ));
        assert!(!engine.has_work());
    }

    #[test]
    fn stop_strings_stop_tokens_and_eos_end_the_generation() {
        // Find what the model says greedily (ASCII only, so every byte is a whole character),
        // then stop on a piece of it.
        let mut engine = scheduler(64, 4, 64, false);
        engine.executor.banned = (128..VOCAB as u32).collect();
        let mut receiver = submit(&mut engine, request(b"stop test", 12, greedy()));
        run_to_end(&mut engine);
        let (reference, text, _) = collect(&mut receiver);
        let stop: String = text.chars().skip(4).take(2).collect();
        let mut with_stop = request(b"stop test", 12, greedy());
        with_stop.stop = vec![stop.clone()];
        let mut receiver = submit(&mut engine, with_stop);
        run_to_end(&mut engine);
        let (_, emitted, finished) = collect(&mut receiver);
        assert_eq!(finished.reason, FinishReason::Stop);
        assert_eq!(emitted, text[..text.find(&stop).unwrap()]);

        let mut with_stop_id = request(b"stop test", 12, greedy());
        with_stop_id.stop_token_ids = vec![reference[3]];
        let mut receiver = submit(&mut engine, with_stop_id);
        run_to_end(&mut engine);
        let (tokens, _, finished) = collect(&mut receiver);
        assert_eq!(finished.reason, FinishReason::Stop);
        assert_eq!(tokens.last(), Some(&reference[3]));

        let eos_model_req = request(b"stop test", 10, greedy());
        engine.executor.banned = (0..VOCAB as u32).filter(|&t| t != EOS).collect();
        let mut receiver = submit(&mut engine, eos_model_req);
        run_to_end(&mut engine);
        let (tokens, text, finished) = collect(&mut receiver);
        assert_eq!(
            (finished.reason, tokens, text),
            (FinishReason::Eos, vec![EOS], String::new())
        );
    }

    #[test]
    fn a_request_larger_than_the_whole_pool_fails_alone() {
        let mut engine = scheduler(4, 4, 64, false);
        let mut too_big = submit(&mut engine, request(b"0123456789", 100, greedy()));
        let mut fits = submit(&mut engine, request(b"ok", 4, greedy()));
        run_to_end(&mut engine);
        assert!(matches!(
            too_big.try_recv(),
            Ok(Err(GenerationError::TooLongForCache { .. }))
        ));
        assert_eq!(collect(&mut fits).2.reason, FinishReason::Length);
    }
}
