//! The router's Prometheus metrics (`latentserve_router_*`), listed in docs/metrics.md.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds: sub-millisecond routing up to minute-long generations.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];
/// Cold-start buckets in seconds: a group already loading up to a node provisioned, an image
/// pulled and a model loaded from scratch.
const COLD_START_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0, 450.0,
    600.0,
];
/// Prefix-match buckets in tokens.
const TOKEN_BUCKETS: &[f64] = &[
    0.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

pub struct RouterMetrics {
    registry: Registry,
    /// Requests by API, the endpoint that served them (or `none`), the routing reason and outcome.
    pub requests: IntCounterVec,
    /// Attempts abandoned on one endpoint and retried on another, by why.
    pub retries: IntCounterVec,
    /// Tokens of the prompt the chosen endpoint was known to hold in its prefix cache.
    pub prefix_match_tokens: HistogramVec,
    /// Arrival to the upstream call: tokenizing the prompt, choosing, retries.
    pub queue_seconds: HistogramVec,
    /// Upstream call to the worker's first answer (first token, or the response head over HTTP).
    pub upstream_seconds: HistogramVec,
    /// Endpoints known, by state (`ready`, `reporting`, `failing`, `draining`).
    pub endpoints: IntGaugeVec,
    /// Requests in flight through this router, by endpoint.
    pub in_flight: IntGaugeVec,
    /// Requests held because no endpoint could take them.
    pub held: IntGauge,
    /// Requests not held (`full`) or no longer held (`timeout`) that then failed.
    pub hold_rejected: IntCounterVec,
    /// Arrival of a request that had to be held to its first token.
    pub cold_start_seconds: Histogram,
    /// Per serving group (the signal of `GET /v1/autoscaling`, for KEDA or an HPA).
    pub group_in_flight: IntGaugeVec,
    pub group_queued_prompt_tokens: IntGaugeVec,
    pub group_cache_utilization: GaugeVec,
}

impl RouterMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "latentserve_router_requests_total",
                "Requests routed, by API, endpoint, routing reason and outcome.",
            ),
            &["api", "endpoint", "reason", "outcome"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "latentserve_router_retries_total",
                "Attempts that failed before the first token and were retried on another endpoint, by reason.",
            ),
            &["api", "reason"],
        )?;
        let prefix_match_tokens = HistogramVec::new(
            HistogramOpts::new(
                "latentserve_router_prefix_match_tokens",
                "Prompt tokens the chosen endpoint holds in its prefix cache, as the router knows it.",
            )
            .buckets(TOKEN_BUCKETS.to_vec()),
            &["api"],
        )?;
        let queue_seconds = HistogramVec::new(
            HistogramOpts::new(
                "latentserve_router_queue_seconds",
                "Arrival at the router to the upstream call: keying the prompt, choosing, retries.",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["api"],
        )?;
        let upstream_seconds = HistogramVec::new(
            HistogramOpts::new(
                "latentserve_router_upstream_seconds",
                "Upstream call to the worker's first answer (first token, or the HTTP response head).",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["api"],
        )?;
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "latentserve_router_endpoints",
                "Worker endpoints known to the router, by state.",
            ),
            &["state"],
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "latentserve_router_in_flight_requests",
                "Requests in flight through this router, by endpoint.",
            ),
            &["endpoint"],
        )?;
        let held = IntGauge::new(
            "latentserve_router_held_requests",
            "Requests held because no worker endpoint can take them (scale from zero).",
        )?;
        let hold_rejected = IntCounterVec::new(
            Opts::new(
                "latentserve_router_hold_rejected_total",
                "Requests that found no usable worker and failed: the hold queue was full, or no worker became ready in time.",
            ),
            &["reason"],
        )?;
        // Both reasons from the start, so that rate() sees the first refusal.
        for reason in ["full", "timeout"] {
            hold_rejected.with_label_values(&[reason]);
        }
        let cold_start_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "latentserve_router_cold_start_seconds",
                "Arrival of a request that had to be held to its first token.",
            )
            .buckets(COLD_START_BUCKETS.to_vec()),
        )?;
        let group_in_flight = IntGaugeVec::new(
            Opts::new(
                "latentserve_router_group_in_flight_requests",
                "Requests in flight per serving group: per endpoint, the larger of what this router sent and what the worker reports.",
            ),
            &["group"],
        )?;
        let group_queued_prompt_tokens = IntGaugeVec::new(
            Opts::new(
                "latentserve_router_group_queued_prompt_tokens",
                "Prompt tokens the serving group's workers report not yet prefilled.",
            ),
            &["group"],
        )?;
        let group_cache_utilization = GaugeVec::new(
            Opts::new(
                "latentserve_router_group_cache_utilization",
                "Share of the serving group's latent-cache blocks in use, as its workers report.",
            ),
            &["group"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(prefix_match_tokens.clone()))?;
        registry.register(Box::new(queue_seconds.clone()))?;
        registry.register(Box::new(upstream_seconds.clone()))?;
        registry.register(Box::new(endpoints.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(held.clone()))?;
        registry.register(Box::new(hold_rejected.clone()))?;
        registry.register(Box::new(cold_start_seconds.clone()))?;
        registry.register(Box::new(group_in_flight.clone()))?;
        registry.register(Box::new(group_queued_prompt_tokens.clone()))?;
        registry.register(Box::new(group_cache_utilization.clone()))?;
        Ok(Self {
            registry,
            requests,
            retries,
            prefix_match_tokens,
            queue_seconds,
            upstream_seconds,
            endpoints,
            in_flight,
            held,
            hold_rejected,
            cold_start_seconds,
            group_in_flight,
            group_queued_prompt_tokens,
            group_cache_utilization,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(err) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %err, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
