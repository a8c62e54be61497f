//! The worker endpoints and what the router knows of each: the load it sent there, the load and
//! prefix-cache blocks the worker reports (`latentserve.v1.WorkerStatus/Watch`), and whether it
//! has just failed. Routing reads a consistent view through [`Pool::route`]; with no usable
//! endpoint a request waits in the pool's [`HoldQueue`] ([`Pool::wait_for_endpoint`]). Endpoints
//! belong to serving groups; the pool sums them per group for the autoscaling signal.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use latentserve_proto::v1::worker_status_client::WorkerStatusClient;
use latentserve_proto::v1::{GetPromptFilesRequest, WatchWorkerRequest, WorkerState};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::autoscaling::{
    AutoscalingSignal, EndpointLoad, GroupSignal, TTFT_WINDOW, TTFT_WINDOW_CAP, TtftWindow,
    group_signals,
};
use crate::hold::{HoldConfig, HoldError, HoldQueue, give_up_at};
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
    /// Its serving group: the StatefulSet of its pod, else its gRPC address
    /// ([`crate::discovery::group_name`]).
    pub group: String,
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
    queued_prompt_tokens: usize,
    available_blocks: usize,
    total_blocks: usize,
    draining: bool,
    failures: u32,
    failing_until: Option<Instant>,
}

/// Whether the router has a request in flight or held, and when it last had one (the signal's
/// `idle_seconds`, which an autoscaler reads to scale to zero).
struct Activity {
    in_flight: AtomicUsize,
    last_busy: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_busy: Mutex::new(Instant::now()),
        }
    }

    fn touch(&self) {
        *self.last_busy.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Time since the router last had anything in flight or held; zero while it has.
    fn idle(&self, held: usize, now: Instant) -> Duration {
        if held > 0 || self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = *self.last_busy.lock().unwrap_or_else(|e| e.into_inner());
        now.saturating_duration_since(last)
    }
}

/// Marks the router busy until dropped (a held request, whichever way its wait ends).
struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.touch();
    }
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
    /// Its group is being scaled away (the routing ConfigMap): like a worker that reports
    /// draining, it takes no new request.
    group_draining: AtomicBool,
    activity: Arc<Activity>,
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
    fn new(addr: EndpointAddr, activity: Arc<Activity>) -> Result<Self, String> {
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
            group_draining: AtomicBool::new(false),
            activity,
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

    /// It may take a request now: neither draining nor failing.
    fn usable(&self, now: Instant) -> bool {
        self.view(&RouteKey::default(), now).is_some()
    }

    /// It takes no new request, whether its worker or its group drains.
    fn draining(&self, state: &EndpointState) -> bool {
        state.draining || self.group_draining.load(Ordering::Relaxed)
    }

    /// When it stops failing, if it is failing but not draining at `now`.
    fn recovers_at(&self, now: Instant) -> Option<Instant> {
        let state = self.state();
        if self.draining(&state) {
            return None;
        }
        state.failing_until.filter(|until| *until > now)
    }

    /// What the autoscaling signal needs of it.
    fn load_snapshot(&self) -> EndpointLoad {
        let state = self.state();
        EndpointLoad {
            group: self.addr.group.clone(),
            reporting: state.reporting,
            draining: self.draining(&state),
            outstanding: self.outstanding.load(Ordering::Relaxed),
            running: state.running,
            waiting: state.waiting,
            queued_prompt_tokens: state.queued_prompt_tokens,
            available_blocks: state.available_blocks,
            total_blocks: state.total_blocks,
        }
    }

    /// Leading blocks of `key` it holds or was just sent.
    pub fn matched_blocks(&self, key: &RouteKey, now: Instant) -> usize {
        matched(&self.state(), key, now)
    }

    /// What routing needs of it, read under one lock: `None` while it is draining or failing.
    fn view(&self, key: &RouteKey, now: Instant) -> Option<View> {
        let state = self.state();
        let failing = state.failing_until.is_some_and(|until| until > now);
        if self.draining(&state) || failing {
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
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        self.activity.touch();
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
        state.queued_prompt_tokens = report.queued_prompt_tokens as usize;
        state.available_blocks = report.available_blocks as usize;
        state.total_blocks = report.total_blocks as usize;
        state.draining = report.draining;
    }

    fn lost_reports(&self) {
        let mut state = self.state();
        state.reporting = false;
        state.cached.clear();
        state.running = 0;
        state.waiting = 0;
        state.queued_prompt_tokens = 0;
        state.available_blocks = 0;
        state.total_blocks = 0;
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
        self.endpoint.activity.touch();
        self.endpoint
            .activity
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
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
    hold: Arc<HoldQueue>,
    /// Groups the routing ConfigMap drains (lock order: `endpoints` first).
    draining_groups: RwLock<BTreeSet<String>>,
    /// Each group's recent times to first token.
    ttft: Mutex<BTreeMap<String, TtftWindow>>,
    activity: Arc<Activity>,
    /// The groups the per-group gauges have label sets for.
    gauge_groups: Mutex<BTreeSet<String>>,
}

impl Pool {
    pub fn new(policy: Policy, hold: HoldConfig, metrics: Arc<RouterMetrics>) -> Arc<Self> {
        Arc::new(Self {
            endpoints: RwLock::new(BTreeMap::new()),
            prompter: OnceLock::new(),
            policy,
            turn: AtomicUsize::new(0),
            hold: Arc::new(HoldQueue::new(hold, metrics.held.clone())),
            metrics,
            draining_groups: RwLock::new(BTreeSet::new()),
            ttft: Mutex::new(BTreeMap::new()),
            activity: Arc::new(Activity::new()),
            gauge_groups: Mutex::new(BTreeSet::new()),
        })
    }

    /// Requests in flight through the router or held by it (a drain waits for them).
    pub fn busy(&self) -> usize {
        self.activity.in_flight.load(Ordering::Relaxed) + self.hold.len()
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
        let wanted: BTreeSet<EndpointAddr> = addrs.into_iter().collect();
        let mut endpoints = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
        let draining_groups = self
            .draining_groups
            .read()
            .unwrap_or_else(|e| e.into_inner());
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
            match Endpoint::new(addr.clone(), self.activity.clone()) {
                Ok(endpoint) => {
                    endpoint
                        .group_draining
                        .store(draining_groups.contains(&addr.group), Ordering::Relaxed);
                    let endpoint = Arc::new(endpoint);
                    tracing::info!(endpoint = %endpoint.name(), group = %addr.group, "endpoint added");
                    tokio::spawn(watch_status(Arc::downgrade(self), endpoint.clone()));
                    endpoints.insert(addr, endpoint);
                }
                Err(err) => tracing::error!(error = %err, "endpoint ignored"),
            }
        }
        drop(draining_groups);
        drop(endpoints);
        self.update_gauges();
        self.wake_held();
    }

    /// Stops sending new requests to the endpoints of `groups` (and resumes for groups no longer
    /// listed), as if their workers reported draining.
    pub fn set_draining_groups(&self, groups: BTreeSet<String>) {
        let endpoints = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
        let mut current = self
            .draining_groups
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if *current == groups {
            return;
        }
        tracing::info!(?groups, "draining groups changed");
        for endpoint in endpoints.values() {
            endpoint
                .group_draining
                .store(groups.contains(&endpoint.addr.group), Ordering::Relaxed);
        }
        *current = groups;
        drop(current);
        drop(endpoints);
        self.update_gauges();
        self.wake_held();
    }

    /// Whether some endpoint may take a request now.
    fn any_usable(&self, now: Instant) -> bool {
        self.endpoints().iter().any(|e| e.usable(now))
    }

    /// Wakes the held requests when an endpoint can take them (called on every change that may
    /// make one usable: endpoints added, reports, draining groups).
    fn wake_held(&self) {
        if !self.hold.is_empty() && self.any_usable(Instant::now()) {
            self.hold.wake_all();
        }
    }

    /// Returns at once when an endpoint can take a request; else holds the request (arrived at
    /// `arrival`, the client's `deadline` if it has one) until one can, in arrival order, within
    /// `--hold-timeout` and the deadline. `Ok(true)`: the request was held.
    pub async fn wait_for_endpoint(
        &self,
        arrival: Instant,
        deadline: Option<Instant>,
    ) -> Result<bool, HoldError> {
        if self.any_usable(Instant::now()) {
            return Ok(false);
        }
        let ticket = self
            .hold
            .join(arrival)
            .inspect_err(|err| self.rejected(err))?;
        let _busy = Busy(&self.activity);
        self.activity.touch();
        let (give_up, why) = give_up_at(arrival, deadline, self.hold.config().timeout);
        tracing::debug!(
            held = self.hold.len(),
            "no usable endpoint: holding the request"
        );
        loop {
            let now = Instant::now();
            if self.any_usable(now) {
                return Ok(true);
            }
            if now >= give_up {
                self.rejected(&why);
                return Err(why);
            }
            // A failing endpoint recovers at a known time; anything else wakes the queue.
            let recovers = self
                .endpoints()
                .iter()
                .filter_map(|e| e.recovers_at(now))
                .min();
            let wake_at = recovers.map_or(give_up, |at| at.min(give_up));
            tokio::select! {
                _ = ticket.woken() => {}
                _ = tokio::time::sleep_until(wake_at.into()) => {}
            }
        }
    }

    fn rejected(&self, err: &HoldError) {
        if let Some(reason) = err.reason() {
            self.metrics
                .hold_rejected
                .with_label_values(&[reason])
                .inc();
        }
    }

    /// A request got its first token from `endpoint`: a TTFT sample of its group, from `routed`
    /// (its arrival, or the end of its hold: the wait for a group to exist is not the group's
    /// latency, and counting it would make a new group look slow and scale up another), and a
    /// cold start from `held_since` when it was held.
    pub fn first_token(&self, endpoint: &Endpoint, routed: Instant, held_since: Option<Instant>) {
        let now = Instant::now();
        if let Some(arrival) = held_since {
            self.metrics
                .cold_start_seconds
                .observe(now.saturating_duration_since(arrival).as_secs_f64());
        }
        let seconds = now.saturating_duration_since(routed).as_secs_f64();
        let mut ttft = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        ttft.entry(endpoint.addr.group.clone())
            .or_insert_with(|| TtftWindow::new(TTFT_WINDOW, TTFT_WINDOW_CAP))
            .record(now, seconds);
    }

    /// Every endpoint's load, per group, with the TTFT of the groups that have samples; drops
    /// the TTFT windows of groups that have neither endpoints nor recent samples.
    fn groups(&self, now: Instant) -> Vec<GroupSignal> {
        let loads: Vec<EndpointLoad> = self.endpoints().iter().map(|e| e.load_snapshot()).collect();
        let mut windows = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        let mut ttft = BTreeMap::new();
        windows.retain(|group, window| {
            ttft.insert(group.clone(), window.quantile(now, 0.9));
            !window.is_empty() || loads.iter().any(|l| &l.group == group)
        });
        drop(windows);
        group_signals(&loads, &ttft)
    }

    /// The answer of `GET /v1/autoscaling`.
    pub fn signal(&self) -> AutoscalingSignal {
        let now = Instant::now();
        let held = self.hold.len();
        let rejected = &self.metrics.hold_rejected;
        AutoscalingSignal {
            window_seconds: TTFT_WINDOW.as_secs(),
            held_requests: held,
            oldest_held_seconds: self.hold.oldest(now).as_secs_f64(),
            held_rejected_total: rejected.with_label_values(&["full"]).get()
                + rejected.with_label_values(&["timeout"]).get(),
            idle_seconds: self.activity.idle(held, now).as_secs_f64(),
            groups: self.groups(now),
        }
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
            let draining = endpoint.draining(&state);
            *counts.entry("ready").or_default() += i64::from(!failing && !draining);
            *counts.entry("reporting").or_default() += i64::from(state.reporting);
            *counts.entry("failing").or_default() += i64::from(failing);
            *counts.entry("draining").or_default() += i64::from(draining);
        }
        for (state, count) in counts {
            self.metrics
                .endpoints
                .with_label_values(&[state])
                .set(count);
        }
        self.update_group_gauges(now);
    }

    /// Refreshes the per-group gauges; the label sets of groups that left are removed.
    fn update_group_gauges(&self, now: Instant) {
        let groups = self.groups(now);
        let mut known = self.gauge_groups.lock().unwrap_or_else(|e| e.into_inner());
        let current: BTreeSet<String> = groups.iter().map(|g| g.group.clone()).collect();
        for gone in known.difference(&current) {
            let labels = [gone.as_str()];
            let _ = self.metrics.group_in_flight.remove_label_values(&labels);
            let _ = self
                .metrics
                .group_queued_prompt_tokens
                .remove_label_values(&labels);
            let _ = self
                .metrics
                .group_cache_utilization
                .remove_label_values(&labels);
        }
        for group in &groups {
            let labels = [group.group.as_str()];
            let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            self.metrics
                .group_in_flight
                .with_label_values(&labels)
                .set(count(group.in_flight_requests));
            self.metrics
                .group_queued_prompt_tokens
                .with_label_values(&labels)
                .set(count(group.queued_prompt_tokens));
            self.metrics
                .group_cache_utilization
                .with_label_values(&labels)
                .set(group.cache_utilization);
        }
        *known = current;
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
                                // A first report, or the end of a drain, may free held requests.
                                if let Some(pool) = pool.upgrade() {
                                    pool.wake_held();
                                }
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
            Endpoint::new(
                EndpointAddr {
                    grpc: "127.0.0.1:1".into(),
                    openai: None,
                    group: "127.0.0.1:1".into(),
                },
                Arc::new(Activity::new()),
            )
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
        let pool = Pool::new(Policy::PrefixAware, HoldConfig::default(), metrics);
        let addr = |port: u16| EndpointAddr {
            grpc: format!("127.0.0.1:{port}"),
            openai: None,
            group: format!("127.0.0.1:{port}"),
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

    fn grouped(port: u16, group: &str) -> EndpointAddr {
        EndpointAddr {
            grpc: format!("127.0.0.1:{port}"),
            openai: None,
            group: group.into(),
        }
    }

    fn pool(hold: HoldConfig) -> Arc<Pool> {
        Pool::new(
            Policy::PrefixAware,
            hold,
            Arc::new(RouterMetrics::new().unwrap()),
        )
    }

    #[tokio::test]
    async fn a_draining_group_takes_no_request_but_stays_in_the_signal() {
        let pool = pool(HoldConfig::default());
        pool.set_endpoints([grouped(1, "demo-0"), grouped(2, "demo-1")]);
        pool.set_draining_groups(BTreeSet::from(["demo-1".to_owned()]));
        let route = pool.route(&key(&[1])).unwrap();
        assert_eq!(route.endpoints.len(), 1);
        assert_eq!(route.endpoints[0].addr.group, "demo-0");
        // An endpoint that joins a draining group drains at once.
        pool.set_endpoints([
            grouped(1, "demo-0"),
            grouped(2, "demo-1"),
            grouped(3, "demo-1"),
        ]);
        assert_eq!(pool.route(&key(&[1])).unwrap().endpoints.len(), 1);
        let signal = pool.signal();
        let groups: Vec<(&str, usize, usize)> = signal
            .groups
            .iter()
            .map(|g| (g.group.as_str(), g.endpoints, g.draining_endpoints))
            .collect();
        assert_eq!(groups, [("demo-0", 1, 0), ("demo-1", 2, 2)]);
        let text = pool.metrics().render();
        assert!(
            text.contains("latentserve_router_endpoints{state=\"draining\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("latentserve_router_group_in_flight_requests{group=\"demo-1\"} 0"),
            "{text}"
        );
        pool.set_draining_groups(BTreeSet::new());
        assert_eq!(pool.route(&key(&[1])).unwrap().endpoints.len(), 3);
        // A group that leaves the pool leaves the gauges.
        pool.set_endpoints([grouped(1, "demo-0")]);
        let text = pool.metrics().render();
        assert!(!text.contains("group=\"demo-1\""), "{text}");
    }

    #[tokio::test]
    async fn a_held_request_goes_on_when_an_endpoint_appears() {
        let pool = pool(HoldConfig::default());
        let arrival = Instant::now();
        // An endpoint now: not held.
        pool.set_endpoints([grouped(1, "demo-0")]);
        assert_eq!(pool.wait_for_endpoint(arrival, None).await, Ok(false));
        pool.set_endpoints([]);
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.wait_for_endpoint(Instant::now(), None).await })
        };
        for _ in 0..1000 {
            if pool.signal().held_requests == 1 {
                break;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let signal = pool.signal();
        assert_eq!(signal.held_requests, 1);
        assert_eq!(signal.idle_seconds, 0.0, "a held request is activity");
        pool.set_endpoints([grouped(1, "demo-0")]);
        let held = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("released without waiting for a timer")
            .unwrap();
        assert_eq!(held, Ok(true));
        assert_eq!(pool.signal().held_requests, 0);
        assert_eq!(pool.metrics().held.get(), 0);
    }

    #[tokio::test]
    async fn a_hold_ends_at_the_hold_timeout_and_holding_can_be_off() {
        let off = pool(HoldConfig {
            capacity: 0,
            timeout: Duration::from_secs(300),
        });
        assert_eq!(
            off.wait_for_endpoint(Instant::now(), None).await,
            Err(HoldError::Off)
        );
        let short = pool(HoldConfig {
            capacity: 1,
            timeout: Duration::from_millis(20),
        });
        let result = short.wait_for_endpoint(Instant::now(), None).await;
        assert_eq!(result, Err(HoldError::TimedOut(Duration::from_millis(20))));
        let signal = short.signal();
        assert_eq!(signal.held_rejected_total, 1);
        assert_eq!(signal.held_requests, 0);
        assert!(signal.groups.is_empty());
    }

    #[tokio::test]
    async fn first_tokens_feed_the_groups_ttft_and_cold_starts() {
        let pool = pool(HoldConfig::default());
        pool.set_endpoints([grouped(1, "demo-0")]);
        let endpoint = pool.endpoints()[0].clone();
        let arrival = Instant::now() - Duration::from_millis(300);
        pool.first_token(&endpoint, arrival, None);
        pool.first_token(&endpoint, arrival, Some(arrival - Duration::from_secs(60)));
        let signal = pool.signal();
        let group = &signal.groups[0];
        assert_eq!(group.ttft_samples, 2);
        assert!(group.ttft_p90_seconds.unwrap() >= 0.3);
        assert_eq!(pool.metrics().cold_start_seconds.get_sample_count(), 1);
        {
            let _in_flight = endpoint.begin(&key(&[1]), pool.metrics());
            assert_eq!(pool.signal().idle_seconds, 0.0);
            assert_eq!(pool.signal().groups[0].in_flight_requests, 1);
        }
        assert_eq!(pool.busy(), 0);
    }
}
