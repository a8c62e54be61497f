//! Every Prometheus metric of the worker, named once. Names follow vLLM's so dashboards and the
//! Gateway API Inference Extension carry over, within Prometheus' naming conventions (checked by
//! `promtool check metrics` in `worker/tests/metrics_lint.rs`); all carry the prefix
//! `latentserve_` and the label `model`. `docs/metrics.md` describes each one.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latencies of whole requests: from milliseconds on a GPU to many minutes on two CPU cores.
const REQUEST_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1200.0, 2400.0,
];
/// Time to first token: a prefill, from a cached short prompt on a GPU to a long one on a CPU.
const TTFT_SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0,
];
/// One decode step of one request or of the whole batch.
const STEP_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The worker's metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    pub requests_running: IntGauge,
    pub requests_waiting: IntGauge,
    pub kv_cache_usage_ratio: Gauge,
    kv_cache_blocks: IntGauge,
    pub kv_cache_bytes_per_token: IntGauge,
    pub prefix_cache_queries_total: IntCounter,
    pub prefix_cache_hits_total: IntCounter,
    pub preemptions_total: IntCounter,
    pub prompt_tokens_total: IntCounter,
    pub generation_tokens_total: IntCounter,
    request_success_total: IntCounterVec,
    pub time_to_first_token_seconds: Histogram,
    pub inter_token_latency_seconds: Histogram,
    pub e2e_request_latency_seconds: Histogram,
    pub request_queue_time_seconds: Histogram,
    pub request_prefill_time_seconds: Histogram,
    pub request_decode_time_seconds: Histogram,
    pub batch_size: Histogram,
    pub step_duration_seconds: Histogram,
    pub model_load_seconds: Gauge,
    expert_tokens_total: IntCounterVec,
    expert_dispatch_bytes_total: IntCounterVec,
    expert_rpc_seconds: HistogramVec,
    expert_rpc_errors_total: IntCounterVec,
    expert_shard_info: IntGaugeVec,
    expert_retries_total: IntCounterVec,
    expert_peers_usable: IntGauge,
    expert_group_degraded: IntGauge,
    expert_placement_info: IntGaugeVec,
    cache_config_info: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric for the model served as `model`.
    pub fn new(model: &str) -> Result<Self, prometheus::Error> {
        let labels = [("model".to_owned(), model.to_owned())]
            .into_iter()
            .collect();
        let registry = Registry::new_custom(Some("latentserve".to_owned()), Some(labels))?;
        let reg = |collector: Box<dyn prometheus::core::Collector>| registry.register(collector);

        let int_gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let gauge = IntGauge::new(name, help)?;
            reg(Box::new(gauge.clone()))?;
            Ok(gauge)
        };
        let gauge = |name: &str, help: &str| -> Result<Gauge, prometheus::Error> {
            let gauge = Gauge::new(name, help)?;
            reg(Box::new(gauge.clone()))?;
            Ok(gauge)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let counter = IntCounter::new(name, help)?;
            reg(Box::new(counter.clone()))?;
            Ok(counter)
        };
        let histogram =
            |name: &str, help: &str, buckets: &[f64]| -> Result<Histogram, prometheus::Error> {
                let histogram =
                    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
                reg(Box::new(histogram.clone()))?;
                Ok(histogram)
            };
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
                reg(Box::new(counter.clone()))?;
                Ok(counter)
            };
        let histogram_vec = |name: &str,
                             help: &str,
                             labels: &[&str],
                             buckets: &[f64]|
         -> Result<HistogramVec, prometheus::Error> {
            let histogram = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )?;
            reg(Box::new(histogram.clone()))?;
            Ok(histogram)
        };
        let int_gauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
                let gauge = IntGaugeVec::new(Opts::new(name, help), labels)?;
                reg(Box::new(gauge.clone()))?;
                Ok(gauge)
            };

        Ok(Self {
            requests_running: int_gauge(
                "requests_running",
                "Requests in the running batch (prefilling or decoding).",
            )?,
            requests_waiting: int_gauge(
                "requests_waiting",
                "Requests waiting to be scheduled, preempted ones included.",
            )?,
            kv_cache_usage_ratio: gauge(
                "kv_cache_usage_ratio",
                "Fraction of latent cache blocks referenced by requests (0 to 1).",
            )?,
            kv_cache_blocks: int_gauge("kv_cache_blocks", "Blocks in the latent cache pool.")?,
            kv_cache_bytes_per_token: int_gauge(
                "kv_cache_bytes_per_token",
                "Latent cache bytes per token over all layers.",
            )?,
            prefix_cache_queries_total: counter(
                "prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
            )?,
            prefix_cache_hits_total: counter(
                "prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache.",
            )?,
            preemptions_total: counter(
                "preemptions_total",
                "Requests preempted (blocks freed, recomputed later) because the cache ran out.",
            )?,
            prompt_tokens_total: counter("prompt_tokens_total", "Prompt tokens received.")?,
            generation_tokens_total: counter("generation_tokens_total", "Tokens generated.")?,
            request_success_total: counter_vec(
                "request_success_total",
                "Requests that finished, by finish reason.",
                &["finish_reason"],
            )?,
            time_to_first_token_seconds: histogram(
                "time_to_first_token_seconds",
                "Arrival to first generated token.",
                TTFT_SECONDS,
            )?,
            inter_token_latency_seconds: histogram(
                "inter_token_latency_seconds",
                "Time between consecutive generated tokens of a request.",
                STEP_SECONDS,
            )?,
            e2e_request_latency_seconds: histogram(
                "e2e_request_latency_seconds",
                "Arrival to the end of a request.",
                REQUEST_SECONDS,
            )?,
            request_queue_time_seconds: histogram(
                "request_queue_time_seconds",
                "Arrival to the first step that ran the request.",
                REQUEST_SECONDS,
            )?,
            request_prefill_time_seconds: histogram(
                "request_prefill_time_seconds",
                "First scheduled step to first generated token.",
                REQUEST_SECONDS,
            )?,
            request_decode_time_seconds: histogram(
                "request_decode_time_seconds",
                "First generated token to the end of the request.",
                REQUEST_SECONDS,
            )?,
            batch_size: histogram(
                "batch_size",
                "Sequences in one engine step (prefill chunks and decode tokens).",
                BATCH_SIZES,
            )?,
            step_duration_seconds: histogram(
                "step_duration_seconds",
                "Duration of one engine step (schedule, batched forward, sampling).",
                STEP_SECONDS,
            )?,
            model_load_seconds: gauge(
                "model_load_seconds",
                "Time taken to load the model weights.",
            )?,
            expert_tokens_total: counter_vec(
                "expert_tokens_total",
                "Tokens routed to each expert of each MoE layer (expert load).",
                &["layer", "expert"],
            )?,
            expert_dispatch_bytes_total: counter_vec(
                "expert_dispatch_bytes_total",
                "Bytes of RunExperts requests sent to each expert peer (hidden rows, expert ids, weights).",
                &["peer"],
            )?,
            expert_rpc_seconds: histogram_vec(
                "expert_rpc_seconds",
                "Duration of one RunExperts call to an expert peer (one MoE layer of one step).",
                &["peer"],
                STEP_SECONDS,
            )?,
            expert_rpc_errors_total: counter_vec(
                "expert_rpc_errors_total",
                "Failed RunExperts calls to an expert peer, by gRPC code.",
                &["peer", "code"],
            )?,
            expert_shard_info: int_gauge_vec(
                "expert_shard_info",
                "Always 1: this worker's expert shard rank and the shard count of its group.",
                &["rank", "count"],
            )?,
            expert_retries_total: counter_vec(
                "expert_retries_total",
                "Failed RunExperts calls to an expert peer whose work was re-sent to replicas \
                 (other shards holding the same experts) in the same step.",
                &["peer"],
            )?,
            expert_peers_usable: int_gauge(
                "expert_peers_usable",
                "Expert peers that are ready with this shard's fingerprint now.",
            )?,
            expert_group_degraded: int_gauge(
                "expert_group_degraded",
                "1 while this shard serves with at least one expert peer unusable (replicas cover \
                 its experts), else 0.",
            )?,
            expert_placement_info: int_gauge_vec(
                "expert_placement_info",
                "Always 1: the version of the expert placement file (`default` without one).",
                &["version"],
            )?,
            cache_config_info: int_gauge_vec(
                "cache_config_info",
                "Always 1: the latent cache's block size in tokens and its number of blocks \
                 (vLLM's label names, which the Gateway API Inference Extension reads).",
                &["block_size", "num_gpu_blocks"],
            )?,
            registry,
        })
    }

    /// Counts a finished request under its `finish_reason` label (`length`, `stop`, `eos`,
    /// `cancelled`).
    pub fn record_finish(&self, finish_reason: &str) {
        self.request_success_total
            .with_label_values(&[finish_reason])
            .inc();
    }

    pub fn record_expert_tokens(&self, layer: usize, expert: usize, tokens: u64) {
        self.expert_tokens_total
            .with_label_values(&[&layer.to_string(), &expert.to_string()])
            .inc_by(tokens);
    }

    pub fn record_expert_dispatch(&self, peer: &str, bytes: u64) {
        self.expert_dispatch_bytes_total
            .with_label_values(&[peer])
            .inc_by(bytes);
    }

    pub fn record_expert_rpc(&self, peer: &str, seconds: f64) {
        self.expert_rpc_seconds
            .with_label_values(&[peer])
            .observe(seconds);
    }

    pub fn record_expert_rpc_error(&self, peer: &str, code: &str) {
        self.expert_rpc_errors_total
            .with_label_values(&[peer, code])
            .inc();
    }

    /// The shape of the latent cache pool: `block_size` tokens per block, `num_blocks` blocks.
    /// Both as labels of `cache_config_info` (where a gateway's endpoint picker reads the block
    /// size, as it does vLLM's) and the block count as a gauge for queries.
    pub fn set_cache_config(&self, block_size: usize, num_blocks: usize) {
        self.kv_cache_blocks.set(num_blocks as i64);
        self.cache_config_info.reset();
        self.cache_config_info
            .with_label_values(&[&block_size.to_string(), &num_blocks.to_string()])
            .set(1);
    }

    pub fn set_expert_shard(&self, rank: usize, count: usize) {
        self.expert_shard_info
            .with_label_values(&[&rank.to_string(), &count.to_string()])
            .set(1);
    }

    /// Counts a failed call to `peer` whose work went to replicas instead.
    pub fn record_expert_retry(&self, peer: &str) {
        self.expert_retries_total.with_label_values(&[peer]).inc();
    }

    pub fn set_expert_peers_usable(&self, usable: usize) {
        self.expert_peers_usable.set(usable as i64);
    }

    pub fn set_expert_group_degraded(&self, degraded: bool) {
        self.expert_group_degraded.set(i64::from(degraded));
    }

    pub fn set_expert_placement_version(&self, version: &str) {
        self.expert_placement_info.reset();
        self.expert_placement_info
            .with_label_values(&[version])
            .set(1);
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_the_prefix_and_the_model_label() {
        let metrics = Metrics::new("demo").unwrap();
        metrics.record_finish("stop");
        metrics.record_expert_tokens(1, 3, 5);
        metrics.record_expert_dispatch("shard-1:50051", 4096);
        metrics.record_expert_rpc("shard-1:50051", 0.003);
        metrics.record_expert_rpc_error("shard-1:50051", "Unavailable");
        metrics.set_expert_shard(0, 2);
        metrics.record_expert_retry("shard-1:50051");
        metrics.set_expert_peers_usable(1);
        metrics.set_expert_group_degraded(false);
        metrics.set_expert_placement_version("7");
        metrics.set_cache_config(16, 512);
        metrics.time_to_first_token_seconds.observe(0.2);
        let text = metrics.render();
        for name in [
            "requests_running",
            "requests_waiting",
            "kv_cache_usage_ratio",
            "kv_cache_blocks",
            "kv_cache_bytes_per_token",
            "prefix_cache_queries_total",
            "prefix_cache_hits_total",
            "preemptions_total",
            "prompt_tokens_total",
            "generation_tokens_total",
            "request_success_total",
            "time_to_first_token_seconds",
            "inter_token_latency_seconds",
            "e2e_request_latency_seconds",
            "request_queue_time_seconds",
            "request_prefill_time_seconds",
            "request_decode_time_seconds",
            "batch_size",
            "step_duration_seconds",
            "model_load_seconds",
            "expert_tokens_total",
            "expert_dispatch_bytes_total",
            "expert_rpc_seconds",
            "expert_rpc_errors_total",
            "expert_shard_info",
            "expert_retries_total",
            "expert_peers_usable",
            "expert_group_degraded",
            "expert_placement_info",
            "cache_config_info",
        ] {
            assert!(
                text.contains(&format!("# TYPE latentserve_{name} ")),
                "{name} missing"
            );
        }
        assert!(
            text.contains(
                r#"latentserve_request_success_total{finish_reason="stop",model="demo"} 1"#
            )
        );
        assert!(
            text.contains(
                r#"latentserve_expert_tokens_total{expert="3",layer="1",model="demo"} 5"#
            )
        );
        assert!(text.contains(
            r#"latentserve_expert_rpc_errors_total{code="Unavailable",peer="shard-1:50051",model="demo"} 1"#
        ));
        assert!(
            text.contains(r#"latentserve_expert_shard_info{count="2",rank="0",model="demo"} 1"#)
        );
    }

    #[test]
    fn the_cache_config_is_one_info_series_and_the_block_gauge() {
        let metrics = Metrics::new("demo").unwrap();
        metrics.set_cache_config(16, 512);
        // A second engine start in the same process (tests do this) replaces the series.
        metrics.set_cache_config(16, 256);
        let text = metrics.render();
        let info: Vec<_> = text
            .lines()
            .filter(|l| l.starts_with("latentserve_cache_config_info{"))
            .collect();
        assert_eq!(
            info,
            [
                r#"latentserve_cache_config_info{block_size="16",num_gpu_blocks="256",model="demo"} 1"#
            ]
        );
        assert!(text.contains(r#"latentserve_kv_cache_blocks{model="demo"} 256"#));
    }
}
