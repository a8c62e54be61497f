//! The worker endpoints and what the router knows of each: the load it sent there, the load and
//! prefix-cache blocks the worker reports (`latentserve.v1.WorkerStatus/Watch`), and whether it
//! has just failed. Routing reads a consistent view through [`Pool::route`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use latentserve_proto::v1::worker_status_client::WorkerStatusClient;
use latentserve_proto::v1::{GetPromptFilesRequest, WatchWorkerRequest, WorkerState};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::metrics::RouterMetrics;
use crate::policy::{Candidate, Decision, Policy, Reason, decide};
use crate::prefix::{Prompter, RouteKey};

/// How long blocks of a request just sent to an endpoint count as cached there before its reports
/// confirm them (its prefill has to run first).
pub const EXPECTED_BLOCKS_TTL: Duration = Duration::from_secs(10);
/// First and longest pause after an endpoint failed a request; it is skipped meanwhile.
pub const FAILURE_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(250), Duration::from_secs(10));
/// Pauses between attempts to read an endpoint's status stream.
const WATCH_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));
/// Connecting to a worker: past this, the attempt counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest status message (the prompt files carry tokenizer.json).
const MAX_STATUS_MESSAGE_BYTES: usize = 64 << 20;

/// Where a worker serves.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndpointAddr {
    /// `host:port` of its gRPC API.
    pub grpc: String,
    /// `host:port` of its OpenAI API, when it serves one.
    pub openai: Option<String>,
}

#[derive(Debug, Default)]
struct EndpointState {
    /// Its status stream is live: `cached` and the counts are current.
    reporting: bool,
    cached: HashSet<u64>,
    /// Blocks of requests sent here that its reports do not show yet.
    expected: HashMap<u64, Instant>,
    running: usize,
    waiting: usize,
    draining: bool,
    failures: u32,
    failing_until: Option<Instant>,
}

/// One worker.
pub struct Endpoint {
    pub addr: EndpointAddr,
    channel: Channel,
    state: Mutex<EndpointState>,
    outstanding: AtomicUsize,
    /// Prompt tokens of requests this router sent here that are not answered yet and were not
    /// cached here when sent: the prefill queued ahead of a new request.
    pending_prefill: AtomicUsize,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Endpoint {
    fn new(addr: EndpointAddr) -> Result<Self, String> {
        let channel = Channel::from_shared(format!("http://{}", addr.grpc))
            .map_err(|err| format!("`{}` is not HOST:PORT: {err}", addr.grpc))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .connect_lazy();
        let (stop, _) = watch::channel(false);
        Ok(Self {
            addr,
            channel,
            state: Mutex::new(EndpointState::default()),
            outstanding: AtomicUsize::new(0),
            pending_prefill: AtomicUsize::new(0),
            stop,
        })
    }

    pub fn name(&self) -> &str {
        &self.addr.grpc
    }

    /// Requests this router has in flight on it.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// The gRPC channel to the worker (connected on first use, reconnected after failures).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, EndpointState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests in flight: what this router sent or what the worker reports, whichever is more
    /// (other routers send to it too).
    pub fn load(&self) -> usize {
        let state = self.state();
        self.outstanding
            .load(Ordering::Relaxed)
            .max(state.running + state.waiting)
    }

    #[cfg(test)]
    fn usable(&self, now: Instant) -> bool {
        self.view(&RouteKey::default(), now).is_some()
    }

    /// Leading blocks of `key` it holds or was just sent.
    pub fn matched_blocks(&self, key: &RouteKey, now: Instant) -> usize {
        matched(&self.state(), key, now)
    }

    /// What routing needs of it, read under one lock: `None` while it is draining or failing.
    fn view(&self, key: &RouteKey, now: Instant) -> Option<View> {
        let state = self.state();
        let failing = state.failing_until.is_some_and(|until| until > now);
        if state.draining || failing {
            return None;
        }
        Some(View {
            reporting: state.reporting,
            load: self
                .outstanding
                .load(Ordering::Relaxed)
                .max(state.running + state.waiting),
            cached_blocks: matched(&state, key, now),
            pending_tokens: self.pending_prefill.load(Ordering::Relaxed),
        })
    }

    /// Counts a request as in flight here until the guard is dropped, its uncached tokens as
    /// pending prefill until [`InFlight::answered`], and expects its blocks.
    pub fn begin(self: &Arc<Self>, key: &RouteKey, metrics: &Arc<RouterMetrics>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        metrics.in_flight.with_label_values(&[self.name()]).inc();
        let now = Instant::now();
        let mut state = self.state();
        let prefill = key.uncached_tokens(matched(&state, key, now));
        self.pending_prefill.fetch_add(prefill, Ordering::Relaxed);
        if state.expected.len() > 4 * key.blocks.len() + 1024 {
            state
                .expected
                .retain(|_, sent| now.duration_since(*sent) < EXPECTED_BLOCKS_TTL);
        }
        for &hash in &key.blocks {
            if !state.cached.contains(&hash) {
                state.expected.insert(hash, now);
            }
        }
        InFlight {
            endpoint: self.clone(),
            metrics: metrics.clone(),
            prefill: AtomicUsize::new(prefill),
        }
    }

    /// The worker failed a request before answering it: skip it for a while, longer each time.
    pub fn mark_failed(&self) {
        let mut state = self.state();
        state.failures = state.failures.saturating_add(1);
        let pause = FAILURE_BACKOFF
            .0
            .saturating_mul(1 << state.failures.min(6).saturating_sub(1))
            .min(FAILURE_BACKOFF.1);
        state.failing_until = Some(Instant::now() + pause);
    }

    /// The worker answered: it is healthy again.
    pub fn mark_ok(&self) {
        let mut state = self.state();
        if state.failures > 0 || state.failing_until.is_some() {
            state.failures = 0;
            state.failing_until = None;
        }
    }

    fn apply(&self, report: WorkerState) {
        let mut state = self.state();
        if report.snapshot {
            state.cached = report.cached_added.into_iter().collect();
        } else {
            for hash in report.cached_added {
                state.cached.insert(hash);
            }
            for hash in &report.cached_removed {
                state.cached.remove(hash);
            }
        }
        let EndpointState {
            cached, expected, ..
        } = &mut *state;
        expected.retain(|hash, _| !cached.contains(hash));
        state.reporting = true;
        state.running = report.running_requests as usize;
        state.waiting = report.waiting_requests as usize;
        state.draining = report.draining;
    }

    fn lost_reports(&self) {
        let mut state = self.state();
        state.reporting = false;
        state.cached.clear();
        state.running = 0;
        state.waiting = 0;
        state.draining = false;
    }
}

/// Leading blocks of `key` in `state`'s cache or expected there.
fn matched(state: &EndpointState, key: &RouteKey, now: Instant) -> usize {
    key.blocks
        .iter()
        .take_while(|hash| {
            state.cached.contains(hash)
                || state
                    .expected
                    .get(hash)
                    .is_some_and(|sent| now.duration_since(*sent) < EXPECTED_BLOCKS_TTL)
        })
        .count()
}

/// One endpoint as routing sees it.
struct View {
    reporting: bool,
    load: usize,
    cached_blocks: usize,
    pending_tokens: usize,
}

/// A request in flight on an endpoint; dropping it ends the count.
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    metrics: Arc<RouterMetrics>,
    /// Its tokens still counted in the endpoint's pending prefill.
    prefill: AtomicUsize,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The worker answered (first message or first chunk): its prompt is computed.
    pub fn answered(&self) {
        let prefill = self.prefill.swap(0, Ordering::Relaxed);
        self.endpoint
            .pending_prefill
            .fetch_sub(prefill, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.answered();
        self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.metrics
            .in_flight
            .with_label_values(&[self.endpoint.name()])
            .dec();
    }
}

/// Endpoints to try for one request, best first.
pub struct Route {
    pub endpoints: Vec<Arc<Endpoint>>,
    pub reason: Reason,
    /// Blocks of the prompt the first endpoint holds.
    pub matched_blocks: usize,
}

/// Every known worker endpoint, and the worker's prompt files once one has sent them.
pub struct Pool {
    endpoints: RwLock<BTreeMap<EndpointAddr, Arc<Endpoint>>>,
    prompter: OnceLock<Arc<Prompter>>,
    policy: Policy,
    turn: AtomicUsize,
    metrics: Arc<RouterMetrics>,
}

impl Pool {
    pub fn new(policy: Policy, metrics: Arc<RouterMetrics>) -> Arc<Self> {
        Arc::new(Self {
            endpoints: RwLock::new(BTreeMap::new()),
            prompter: OnceLock::new(),
            policy,
            turn: AtomicUsize::new(0),
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<RouterMetrics> {
        &self.metrics
    }

    /// The workers' tokenizer and block layout, once a worker has sent them.
    pub fn prompter(&self) -> Option<&Arc<Prompter>> {
        self.prompter.get()
    }

    /// Replaces the set of endpoints: new ones are watched, gone ones stop being chosen (requests
    /// in flight on them finish).
    pub fn set_endpoints(self: &Arc<Self>, addrs: impl IntoIterator<Item = EndpointAddr>) {
        let wanted: std::collections::BTreeSet<EndpointAddr> = addrs.into_iter().collect();
        let mut endpoints = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
        endpoints.retain(|addr, endpoint| {
            let keep = wanted.contains(addr);
            if !keep {
                tracing::info!(endpoint = %endpoint.name(), "endpoint removed");
                let _ = endpoint.stop.send(true);
            }
            keep
        });
        for addr in wanted {
            if endpoints.contains_key(&addr) {
                continue;
            }
            match Endpoint::new(addr.clone()) {
                Ok(endpoint) => {
                    let endpoint = Arc::new(endpoint);
                    tracing::info!(endpoint = %endpoint.name(), "endpoint added");
                    tokio::spawn(watch_status(Arc::downgrade(self), endpoint.clone()));
                    endpoints.insert(addr, endpoint);
                }
                Err(err) => tracing::error!(error = %err, "endpoint ignored"),
            }
        }
        drop(endpoints);
        self.update_gauges();
    }

    /// Every endpoint now.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The endpoints to try for a request with `key`, best first; `None` when none is usable.
    pub fn route(&self, key: &RouteKey) -> Option<Route> {
        let now = Instant::now();
        let usable: Vec<(Arc<Endpoint>, View)> = self
            .endpoints()
            .into_iter()
            .filter_map(|e| e.view(key, now).map(|view| (e, view)))
            .collect();
        // A worker that does not report (still loading, or unreachable) is a last resort.
        let (reporting, silent): (Vec<_>, Vec<_>) =
            usable.into_iter().partition(|(_, view)| view.reporting);
        let (first_choice, fallback) = if reporting.is_empty() {
            (silent, Vec::new())
        } else {
            (reporting, silent)
        };
        let candidates: Vec<Candidate> = first_choice
            .iter()
            .map(|(e, view)| Candidate {
                name: e.name().to_owned(),
                load: view.load,
                cached_blocks: view.cached_blocks,
                pending_tokens: view.pending_tokens,
                uncached_tokens: key.uncached_tokens(view.cached_blocks),
            })
            .collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let Decision { order, reason } = decide(self.policy, &candidates, key.affinity, turn)?;
        let matched_blocks = candidates[order[0]].cached_blocks;
        let mut endpoints: Vec<Arc<Endpoint>> = order
            .into_iter()
            .map(|i| first_choice[i].0.clone())
            .collect();
        endpoints.extend(fallback.into_iter().map(|(e, _)| e));
        Some(Route {
            endpoints,
            reason,
            matched_blocks,
        })
    }

    /// Usable endpoints by load, for calls that any worker answers (tokenize, model info).
    pub fn least_loaded(&self) -> Vec<Arc<Endpoint>> {
        let now = Instant::now();
        let none = RouteKey::default();
        let mut endpoints: Vec<(Arc<Endpoint>, View)> = self
            .endpoints()
            .into_iter()
            .filter_map(|e| e.view(&none, now).map(|view| (e, view)))
            .collect();
        endpoints.sort_by_key(|(_, view)| (!view.reporting, view.load));
        endpoints.into_iter().map(|(e, _)| e).collect()
    }

    /// Refreshes `latentserve_router_endpoints`.
    pub fn update_gauges(&self) {
        let now = Instant::now();
        let endpoints = self.endpoints();
        let mut counts = BTreeMap::from([
            ("ready", 0),
            ("reporting", 0),
            ("failing", 0),
            ("draining", 0),
        ]);
        for endpoint in &endpoints {
            let state = endpoint.state();
            let failing = state.failing_until.is_some_and(|until| until > now);
            *counts.entry("ready").or_default() += i64::from(!failing && !state.draining);
            *counts.entry("reporting").or_default() += i64::from(state.reporting);
            *counts.entry("failing").or_default() += i64::from(failing);
            *counts.entry("draining").or_default() += i64::from(state.draining);
        }
        for (state, count) in counts {
            self.metrics
                .endpoints
                .with_label_values(&[state])
                .set(count);
        }
    }

    fn set_prompter(&self, prompter: Prompter) {
        if self.prompter.set(Arc::new(prompter)).is_ok() {
            tracing::info!("prompt files received: routing by the workers' cache blocks");
        }
    }
}

/// Reads one endpoint's status stream for as long as the endpoint is in the pool, reconnecting
/// with backoff; fetches the prompt files first while the pool has none.
async fn watch_status(pool: std::sync::Weak<Pool>, endpoint: Arc<Endpoint>) {
    let mut stop = endpoint.stop.subscribe();
    let mut pause = WATCH_BACKOFF.0;
    loop {
        if *stop.borrow() {
            return;
        }
        let mut client = WorkerStatusClient::new(endpoint.channel())
            .max_decoding_message_size(MAX_STATUS_MESSAGE_BYTES);
        if pool.upgrade().is_some_and(|pool| pool.prompter().is_none()) {
            match client.get_prompt_files(GetPromptFilesRequest {}).await {
                Ok(files) => match Prompter::from_files(files.get_ref()) {
                    Ok(prompter) => {
                        if let Some(pool) = pool.upgrade() {
                            pool.set_prompter(prompter);
                        }
                    }
                    Err(err) => {
                        tracing::warn!(endpoint = %endpoint.name(), error = %err, "unusable prompt files; routing by prompt text")
                    }
                },
                Err(status) => {
                    tracing::debug!(endpoint = %endpoint.name(), %status, "no prompt files yet")
                }
            }
        }
        match client.watch(WatchWorkerRequest {}).await {
            Ok(response) => {
                let mut states = response.into_inner();
                loop {
                    tokio::select! {
                        message = states.message() => match message {
                            Ok(Some(state)) => {
                                endpoint.apply(state);
                                pause = WATCH_BACKOFF.0;
                            }
                            Ok(None) => break,
                            Err(status) => {
                                tracing::debug!(endpoint = %endpoint.name(), %status, "status stream ended");
                                break;
                            }
                        },
                        _ = stop.changed() => return,
                    }
                }
            }
            Err(status) => {
                tracing::debug!(endpoint = %endpoint.name(), %status, "no status stream");
            }
        }
        endpoint.lost_reports();
        if let Some(pool) = pool.upgrade() {
            pool.update_gauges();
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
        pause = (pause * 2).min(WATCH_BACKOFF.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(snapshot: bool, added: &[u64], removed: &[u64], running: u32) -> WorkerState {
        WorkerState {
            snapshot,
            cached_added: added.to_vec(),
            cached_removed: removed.to_vec(),
            running_requests: running,
            ..WorkerState::default()
        }
    }

    fn endpoint() -> Arc<Endpoint> {
        Arc::new(
            Endpoint::new(EndpointAddr {
                grpc: "127.0.0.1:1".into(),
                openai: None,
            })
            .unwrap(),
        )
    }

    fn key(blocks: &[u64]) -> RouteKey {
        RouteKey {
            blocks: blocks.to_vec(),
            affinity: blocks.first().copied().unwrap_or_default(),
            prompt_tokens: 16 * blocks.len() + 1,
            block_tokens: 16,
        }
    }

    #[tokio::test]
    async fn reports_and_requests_sent_decide_the_matched_prefix() {
        let metrics = Arc::new(RouterMetrics::new().unwrap());
        let endpoint = endpoint();
        let now = Instant::now();
        endpoint.apply(report(true, &[1, 2], &[], 3));
        assert_eq!(endpoint.matched_blocks(&key(&[1, 2, 3]), now), 2);
        assert_eq!(
            endpoint.matched_blocks(&key(&[3, 1]), now),
            0,
            "a prefix, not a set"
        );
        assert_eq!(endpoint.load(), 3);
        {
            // Sent but not reported yet: expected, and in flight.
            let _in_flight = endpoint.begin(&key(&[1, 2, 3, 4]), &metrics);
            assert_eq!(endpoint.matched_blocks(&key(&[1, 2, 3, 4, 5]), now), 4);
            assert_eq!(endpoint.outstanding.load(Ordering::Relaxed), 1);
        }
        assert_eq!(endpoint.outstanding.load(Ordering::Relaxed), 0);
        // Expected blocks expire.
        let later = now + EXPECTED_BLOCKS_TTL + Duration::from_secs(1);
        assert_eq!(endpoint.matched_blocks(&key(&[1, 2, 3, 4]), later), 2);
        endpoint.apply(report(false, &[3], &[1], 0));
        assert_eq!(endpoint.matched_blocks(&key(&[1, 2, 3]), now), 0);
        // A new snapshot replaces everything; a lost stream forgets everything.
        endpoint.apply(report(true, &[9], &[], 0));
        assert_eq!(endpoint.matched_blocks(&key(&[2]), later), 0);
        assert_eq!(endpoint.matched_blocks(&key(&[9]), later), 1);
        endpoint.lost_reports();
        assert_eq!(endpoint.matched_blocks(&key(&[9]), later), 0);
    }

    #[tokio::test]
    async fn uncached_tokens_of_unanswered_requests_are_pending_prefill() {
        let metrics = Arc::new(RouterMetrics::new().unwrap());
        let endpoint = endpoint();
        endpoint.apply(report(true, &[1, 2], &[], 0));
        let pending = || endpoint.pending_prefill.load(Ordering::Relaxed);
        // 4 blocks + 1 token, 2 blocks held: 33 tokens to compute.
        let first = endpoint.begin(&key(&[1, 2, 3, 4]), &metrics);
        assert_eq!(pending(), 33);
        // The second finds the first's blocks expected: 1 token.
        let second = endpoint.begin(&key(&[1, 2, 3, 4]), &metrics);
        assert_eq!(pending(), 34);
        first.answered();
        first.answered();
        assert_eq!(pending(), 1, "answered counts once");
        drop(first);
        assert_eq!(pending(), 1);
        drop(second);
        assert_eq!(
            pending(),
            0,
            "a request dropped unanswered is no longer pending"
        );
    }

    #[tokio::test]
    async fn failures_back_off_and_an_answer_clears_them() {
        let endpoint = endpoint();
        let now = Instant::now();
        assert!(endpoint.usable(now));
        endpoint.mark_failed();
        assert!(!endpoint.usable(Instant::now()));
        assert!(endpoint.usable(Instant::now() + FAILURE_BACKOFF.0));
        for _ in 0..10 {
            endpoint.mark_failed();
        }
        assert!(!endpoint.usable(Instant::now() + FAILURE_BACKOFF.1 / 2));
        assert!(endpoint.usable(Instant::now() + FAILURE_BACKOFF.1 + Duration::from_millis(1)));
        endpoint.mark_ok();
        assert!(endpoint.usable(Instant::now()));
    }

    #[tokio::test]
    async fn routes_skip_failing_and_draining_endpoints_and_prefer_reporting_ones() {
        let metrics = Arc::new(RouterMetrics::new().unwrap());
        let pool = Pool::new(Policy::PrefixAware, metrics);
        let addr = |port: u16| EndpointAddr {
            grpc: format!("127.0.0.1:{port}"),
            openai: None,
        };
        pool.set_endpoints([addr(1), addr(2), addr(3)]);
        let by_port = |port: u16| {
            pool.endpoints()
                .into_iter()
                .find(|e| e.addr == addr(port))
                .unwrap()
        };
        // Nobody reports yet: every endpoint is a candidate.
        assert_eq!(pool.route(&key(&[1])).unwrap().endpoints.len(), 3);
        by_port(1).apply(report(true, &[7], &[], 0));
        by_port(2).apply(report(true, &[], &[], 0));
        let route = pool.route(&key(&[7, 8])).unwrap();
        assert_eq!(route.endpoints[0].addr, addr(1));
        assert_eq!(route.reason, Reason::Prefix);
        assert_eq!(route.matched_blocks, 1);
        assert_eq!(route.endpoints.last().unwrap().addr, addr(3), "silent last");
        by_port(1).mark_failed();
        let mut draining = report(false, &[], &[], 0);
        draining.draining = true;
        by_port(2).apply(draining);
        let route = pool.route(&key(&[7, 8])).unwrap();
        assert_eq!(route.endpoints.len(), 1);
        assert_eq!(route.endpoints[0].addr, addr(3));
        // Removal.
        pool.set_endpoints([addr(3)]);
        assert_eq!(pool.endpoints().len(), 1);
        pool.set_endpoints([]);
        assert!(pool.route(&key(&[7])).is_none());
    }
}
