//! What a client asks the engine for, and what the engine streams back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::executor::StepError;
use super::sampler::SamplingParams;

/// One validated generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The client's id, for logs.
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// New tokens at most; the server fills in the context limit when the client sets none.
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Alternatives to report per token (0 = no logprobs at all).
    pub logprobs: usize,
    /// Shares cached prefixes only with requests of the same salt (`None`: every unsalted one).
    pub cache_salt: Option<String>,
    /// Past this instant the request fails with [`GenerationError::DeadlineExceeded`].
    pub deadline: Option<Instant>,
    /// When the request reached the server (queue time counts from here).
    pub arrival: Instant,
}

impl GenerationRequest {
    /// A request for tests: the prompt's bytes as token ids, nothing but `max_tokens` limiting it.
    #[cfg(test)]
    pub(crate) fn of_bytes(prompt: &[u8], max_tokens: usize, sampling: SamplingParams) -> Self {
        Self {
            request_id: String::new(),
            prompt: prompt.iter().map(|&b| u32::from(b)).collect(),
            sampling,
            max_tokens,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: 0,
            cache_salt: None,
            deadline: None,
            arrival: Instant::now(),
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// `max_tokens` reached (or the context limit).
    Length,
    /// A stop string or stop token id matched.
    Stop,
    /// The model produced an end-of-sequence token.
    Eos,
    /// The server ended it (draining past its timeout).
    Cancelled,
}

impl FinishReason {
    /// The label value of `request_success_total{finish_reason}`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Eos => "eos",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose latents came from the prefix cache when the request was first admitted.
    pub cached_prompt_tokens: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Arrival to the first step that ran the request.
    pub queue: Duration,
    /// Arrival to the first generated token.
    pub time_to_first_token: Duration,
    /// Arrival to the end.
    pub total: Duration,
}

/// Log-probability of a generated token and its most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The end of a generation: sent with the last output.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
}

/// One streamed piece: the tokens made since the previous piece and the text they complete.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationOutput {
    pub token_ids: Vec<u32>,
    /// Whole UTF-8 characters; never any part of a stop string.
    pub text: String,
    /// One entry per token in `token_ids` when logprobs were asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// Set on the last piece only.
    pub finished: Option<Finished>,
}

/// A generation that ended without a finish reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GenerationError {
    #[error("deadline exceeded after {generated} generated tokens")]
    DeadlineExceeded { generated: usize },
    #[error("the prompt and its output need {needed} cache blocks but the whole pool has {pool}")]
    TooLongForCache { needed: usize, pool: usize },
    /// The batched step this request was part of failed; every request of that step gets the
    /// same error, hence the shared source.
    #[error("model step failed: {0}")]
    Model(#[source] Arc<StepError>),
    /// A shard holding some of the step's experts is unreachable.
    #[error("{0}")]
    Unavailable(#[source] Arc<StepError>),
}

impl GenerationError {
    /// The error every request of a failed step ends with.
    pub fn from_step(error: StepError) -> Self {
        match error {
            StepError::Unavailable(_) => GenerationError::Unavailable(Arc::new(error)),
            other => GenerationError::Model(Arc::new(other)),
        }
    }
}

/// The stream of one request's outputs, as the engine sends them.
pub type OutputSender =
    tokio::sync::mpsc::UnboundedSender<Result<GenerationOutput, GenerationError>>;
pub type OutputReceiver =
    tokio::sync::mpsc::UnboundedReceiver<Result<GenerationOutput, GenerationError>>;
