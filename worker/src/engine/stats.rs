//! What the scheduler's steps did, as plain numbers; [`StepStats::record`] turns them into the
//! Prometheus metrics. The scheduler itself never touches a metric, so it can be tested (and
//! reused) without a registry.

use std::time::Duration;

use super::request::FinishReason;
use crate::metrics::Metrics;

/// A request's first admission to a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admission {
    /// Arrival to admission.
    pub queue: Duration,
    pub prompt_tokens: usize,
    /// Prompt tokens found in the prefix cache.
    pub cached_prompt_tokens: usize,
}

/// A request's first generated token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FirstToken {
    /// Arrival to the first token.
    pub time_to_first_token: Duration,
    /// First admission to the first token (the prefill, chunks and preemptions included).
    pub prefill: Option<Duration>,
}

/// A request that ended with a finish reason.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Completion {
    pub reason: FinishReason,
    /// Arrival to the end.
    pub total: Duration,
    /// First token to the end; `None` when no token was generated.
    pub decode: Option<Duration>,
}

/// The occupancy after a step (or after requests arrived or were cancelled).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Occupancy {
    pub running: usize,
    pub waiting: usize,
    /// Prompt tokens the running and waiting requests still have to prefill.
    pub queued_prompt_tokens: usize,
    /// Share of the latent cache pool in use, 0..=1.
    pub cache_usage_ratio: f64,
}

/// Everything one step (or one `cancel_all`) did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepStats {
    /// Chunks in the batched forward (0 when no forward ran).
    pub batch_size: usize,
    /// Tokens in the batched forward.
    pub tokens: usize,
    /// Requests preempted to make room.
    pub preempted: usize,
    /// How long the step took, when a forward ran.
    pub duration: Option<Duration>,
    pub admissions: Vec<Admission>,
    /// Tokens generated (sampled) in this step.
    pub generated_tokens: usize,
    pub first_tokens: Vec<FirstToken>,
    /// Gaps between a request's previous token and the one of this step.
    pub inter_token: Vec<Duration>,
    pub completions: Vec<Completion>,
    /// Tokens routed to each `(layer, expert, tokens)` since the previous step.
    pub expert_tokens: Vec<(usize, usize, u64)>,
    pub occupancy: Occupancy,
}

impl StepStats {
    /// Adds this step to the worker's metrics.
    pub fn record(&self, metrics: &Metrics) {
        if let Some(duration) = self.duration {
            metrics.batch_size.observe(self.batch_size as f64);
            metrics
                .step_duration_seconds
                .observe(duration.as_secs_f64());
        }
        metrics.preemptions_total.inc_by(self.preempted as u64);
        for admission in &self.admissions {
            metrics
                .request_queue_time_seconds
                .observe(admission.queue.as_secs_f64());
            metrics
                .prompt_tokens_total
                .inc_by(admission.prompt_tokens as u64);
            metrics
                .prefix_cache_queries_total
                .inc_by(admission.prompt_tokens as u64);
            metrics
                .prefix_cache_hits_total
                .inc_by(admission.cached_prompt_tokens as u64);
        }
        metrics
            .generation_tokens_total
            .inc_by(self.generated_tokens as u64);
        for first in &self.first_tokens {
            metrics
                .time_to_first_token_seconds
                .observe(first.time_to_first_token.as_secs_f64());
            if let Some(prefill) = first.prefill {
                metrics
                    .request_prefill_time_seconds
                    .observe(prefill.as_secs_f64());
            }
        }
        for gap in &self.inter_token {
            metrics
                .inter_token_latency_seconds
                .observe(gap.as_secs_f64());
        }
        for completion in &self.completions {
            metrics.record_finish(completion.reason.as_str());
            metrics
                .e2e_request_latency_seconds
                .observe(completion.total.as_secs_f64());
            if let Some(decode) = completion.decode {
                metrics
                    .request_decode_time_seconds
                    .observe(decode.as_secs_f64());
            }
        }
        for &(layer, expert, tokens) in &self.expert_tokens {
            metrics.record_expert_tokens(layer, expert, tokens);
        }
        self.occupancy.record(metrics);
    }
}

impl Occupancy {
    pub fn record(&self, metrics: &Metrics) {
        metrics.requests_running.set(self.running as i64);
        metrics.requests_waiting.set(self.waiting as i64);
        metrics.kv_cache_usage_ratio.set(self.cache_usage_ratio);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_lands_in_the_metrics_it_names() {
        let metrics = Metrics::new("test").unwrap();
        let stats = StepStats {
            batch_size: 3,
            tokens: 40,
            preempted: 1,
            duration: Some(Duration::from_millis(20)),
            admissions: vec![Admission {
                queue: Duration::from_millis(5),
                prompt_tokens: 32,
                cached_prompt_tokens: 16,
            }],
            generated_tokens: 2,
            first_tokens: vec![FirstToken {
                time_to_first_token: Duration::from_millis(30),
                prefill: Some(Duration::from_millis(25)),
            }],
            inter_token: vec![Duration::from_millis(10)],
            completions: vec![Completion {
                reason: FinishReason::Length,
                total: Duration::from_millis(90),
                decode: Some(Duration::from_millis(60)),
            }],
            expert_tokens: vec![(1, 2, 7)],
            occupancy: Occupancy {
                running: 2,
                waiting: 4,
                queued_prompt_tokens: 64,
                cache_usage_ratio: 0.25,
            },
        };
        stats.record(&metrics);
        assert_eq!(metrics.preemptions_total.get(), 1);
        assert_eq!(metrics.prompt_tokens_total.get(), 32);
        assert_eq!(metrics.prefix_cache_hits_total.get(), 16);
        assert_eq!(metrics.generation_tokens_total.get(), 2);
        assert_eq!(metrics.batch_size.get_sample_count(), 1);
        assert_eq!(metrics.time_to_first_token_seconds.get_sample_count(), 1);
        assert_eq!(metrics.inter_token_latency_seconds.get_sample_count(), 1);
        assert_eq!(metrics.e2e_request_latency_seconds.get_sample_count(), 1);
        assert_eq!(metrics.requests_waiting.get(), 4);
        assert_eq!(metrics.kv_cache_usage_ratio.get(), 0.25);
        let text = metrics.render();
        assert!(text.contains("finish_reason=\"length\""), "{text}");
        assert!(text.contains("expert=\"2\""), "{text}");
    }

    #[test]
    fn a_step_without_a_forward_observes_no_batch() {
        let metrics = Metrics::new("test").unwrap();
        StepStats::default().record(&metrics);
        assert_eq!(metrics.batch_size.get_sample_count(), 0);
        assert_eq!(metrics.step_duration_seconds.get_sample_count(), 0);
    }
}
