//! The autoscaling signal the operator reads (`GET /v1/autoscaling` on the metrics port, see
//! docs/router.md): per serving group, the load its workers report and the time to first token
//! this router measured, plus the requests held for want of any group. Pure parts: the windowed
//! TTFT quantile and the per-group sums, computed from plain snapshots of the endpoints.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

/// The window of TTFT samples the signal's `ttft_p90_seconds` covers.
pub const TTFT_WINDOW: Duration = Duration::from_secs(60);
/// Newest samples a group's window keeps: a busy group's p90 over its last 4096 requests is as
/// good as over all of them, and memory stays bounded.
pub const TTFT_WINDOW_CAP: usize = 4096;

/// The time-to-first-token samples of one group, newest last, within a time window and a cap.
#[derive(Debug, Clone)]
pub struct TtftWindow {
    window: Duration,
    cap: usize,
    samples: VecDeque<(Instant, f64)>,
}

impl TtftWindow {
    pub fn new(window: Duration, cap: usize) -> Self {
        Self {
            window,
            cap: cap.max(1),
            samples: VecDeque::new(),
        }
    }

    /// Adds a sample taken at `at` (samples arrive roughly in time order).
    pub fn record(&mut self, at: Instant, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        if self.samples.len() >= self.cap {
            self.samples.pop_front();
        }
        self.samples.push_back((at, seconds));
    }

    /// Drops samples older than the window.
    pub fn expire(&mut self, now: Instant) {
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.window)
        {
            self.samples.pop_front();
        }
    }

    /// Samples within the window at `now`, and their `q` quantile (nearest rank; `None` with no
    /// sample).
    pub fn quantile(&mut self, now: Instant, q: f64) -> (usize, Option<f64>) {
        self.expire(now);
        let mut values: Vec<f64> = self.samples.iter().map(|(_, s)| *s).collect();
        if values.is_empty() {
            return (0, None);
        }
        values.sort_by(f64::total_cmp);
        let rank = (q.clamp(0.0, 1.0) * values.len() as f64).ceil() as usize;
        let value = values[rank.clamp(1, values.len()) - 1];
        (values.len(), Some(value))
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// What the signal needs of one endpoint, read at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointLoad {
    pub group: String,
    /// Its status stream is live: the reported figures below are current.
    pub reporting: bool,
    /// It takes no new request: the worker reports draining, or its group drains.
    pub draining: bool,
    /// Requests this router has in flight on it.
    pub outstanding: usize,
    pub running: usize,
    pub waiting: usize,
    pub queued_prompt_tokens: usize,
    pub available_blocks: usize,
    pub total_blocks: usize,
}

/// One serving group in the signal (field names are the contract with the operator).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupSignal {
    pub group: String,
    pub endpoints: usize,
    pub reporting_endpoints: usize,
    pub draining_endpoints: usize,
    pub in_flight_requests: usize,
    pub running_requests: usize,
    pub waiting_requests: usize,
    pub queued_prompt_tokens: usize,
    pub cache_utilization: f64,
    pub ttft_p90_seconds: Option<f64>,
    pub ttft_samples: usize,
}

/// The whole answer of `GET /v1/autoscaling`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutoscalingSignal {
    pub window_seconds: u64,
    pub held_requests: usize,
    pub oldest_held_seconds: f64,
    pub held_rejected_total: u64,
    pub idle_seconds: f64,
    pub groups: Vec<GroupSignal>,
}

/// Sums the endpoints' loads per group, ordered by group name; `ttft` holds each group's
/// `(samples, p90)` (groups without an entry have none).
pub fn group_signals(
    endpoints: &[EndpointLoad],
    ttft: &BTreeMap<String, (usize, Option<f64>)>,
) -> Vec<GroupSignal> {
    let mut groups: BTreeMap<&str, (GroupSignal, usize, usize)> = BTreeMap::new();
    for endpoint in endpoints {
        let (group, available, total) = groups.entry(&endpoint.group).or_insert_with(|| {
            let (samples, p90) = ttft.get(&endpoint.group).copied().unwrap_or((0, None));
            let signal = GroupSignal {
                group: endpoint.group.clone(),
                endpoints: 0,
                reporting_endpoints: 0,
                draining_endpoints: 0,
                in_flight_requests: 0,
                running_requests: 0,
                waiting_requests: 0,
                queued_prompt_tokens: 0,
                cache_utilization: 0.0,
                ttft_p90_seconds: p90.filter(|_| samples > 0),
                ttft_samples: samples,
            };
            (signal, 0, 0)
        });
        group.endpoints += 1;
        group.draining_endpoints += usize::from(endpoint.draining);
        // Other routers send to the same workers: what the worker reports may exceed ours.
        group.in_flight_requests += endpoint
            .outstanding
            .max(endpoint.running + endpoint.waiting);
        if endpoint.reporting {
            group.reporting_endpoints += 1;
            group.running_requests += endpoint.running;
            group.waiting_requests += endpoint.waiting;
            group.queued_prompt_tokens += endpoint.queued_prompt_tokens;
            *available += endpoint.available_blocks.min(endpoint.total_blocks);
            *total += endpoint.total_blocks;
        }
    }
    groups
        .into_values()
        .map(|(mut group, available, total)| {
            if total > 0 {
                group.cache_utilization = 1.0 - available as f64 / total as f64;
            }
            group
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_recent_samples_under_a_cap_and_gives_the_nearest_rank_p90() {
        let start = Instant::now();
        let mut window = TtftWindow::new(Duration::from_secs(60), 100);
        assert_eq!(window.quantile(start, 0.9), (0, None));
        for i in 1..=10 {
            window.record(start, f64::from(i));
        }
        assert_eq!(window.quantile(start, 0.9), (10, Some(9.0)));
        assert_eq!(window.quantile(start, 1.0), (10, Some(10.0)));
        assert_eq!(window.quantile(start, 0.0), (10, Some(1.0)));
        // Nonsense is not a sample.
        window.record(start, f64::NAN);
        window.record(start, -1.0);
        assert_eq!(window.quantile(start, 0.9).0, 10);
        // Samples past the window leave it.
        let later = start + Duration::from_secs(61);
        window.record(later, 0.5);
        assert_eq!(window.quantile(later, 0.9), (1, Some(0.5)));
        assert_eq!(
            window.quantile(later + Duration::from_secs(61), 0.9),
            (0, None)
        );
        assert!(window.is_empty());
        // The cap keeps the newest.
        let mut capped = TtftWindow::new(Duration::from_secs(60), 3);
        for i in 1..=5 {
            capped.record(start, f64::from(i));
        }
        assert_eq!(capped.quantile(start, 0.0), (3, Some(3.0)));
    }

    fn load(group: &str) -> EndpointLoad {
        EndpointLoad {
            group: group.into(),
            reporting: true,
            total_blocks: 100,
            available_blocks: 100,
            ..EndpointLoad::default()
        }
    }

    #[test]
    fn groups_sum_their_endpoints_as_the_contract_says() {
        let endpoints = vec![
            EndpointLoad {
                outstanding: 5,
                running: 2,
                waiting: 1,
                queued_prompt_tokens: 700,
                available_blocks: 40,
                ..load("demo-0")
            },
            EndpointLoad {
                outstanding: 0,
                running: 1,
                waiting: 2,
                queued_prompt_tokens: 500,
                available_blocks: 76,
                ..load("demo-0")
            },
            // Silent and draining: counted, but reports nothing.
            EndpointLoad {
                reporting: false,
                draining: true,
                outstanding: 2,
                ..load("demo-1")
            },
        ];
        let ttft = BTreeMap::from([
            ("demo-0".to_owned(), (37, Some(0.8))),
            ("gone".to_owned(), (3, Some(1.0))),
        ]);
        let groups = group_signals(&endpoints, &ttft);
        assert_eq!(groups.len(), 2);
        let demo0 = &groups[0];
        assert_eq!(demo0.group, "demo-0");
        assert_eq!((demo0.endpoints, demo0.reporting_endpoints), (2, 2));
        assert_eq!(demo0.draining_endpoints, 0);
        assert_eq!(demo0.in_flight_requests, 5 + 3);
        assert_eq!((demo0.running_requests, demo0.waiting_requests), (3, 3));
        assert_eq!(demo0.queued_prompt_tokens, 1200);
        assert!((demo0.cache_utilization - 0.42).abs() < 1e-9);
        assert_eq!(
            (demo0.ttft_samples, demo0.ttft_p90_seconds),
            (37, Some(0.8))
        );
        let demo1 = &groups[1];
        assert_eq!((demo1.endpoints, demo1.reporting_endpoints), (1, 0));
        assert_eq!(demo1.draining_endpoints, 1);
        assert_eq!(demo1.in_flight_requests, 2);
        assert_eq!(demo1.cache_utilization, 0.0, "nobody reports");
        assert_eq!((demo1.ttft_samples, demo1.ttft_p90_seconds), (0, None));
        assert!(group_signals(&[], &ttft).is_empty());
    }

    #[test]
    fn the_json_has_the_contracts_field_names() {
        let signal = AutoscalingSignal {
            window_seconds: 60,
            held_requests: 0,
            oldest_held_seconds: 0.0,
            held_rejected_total: 0,
            idle_seconds: 12.5,
            groups: group_signals(&[load("demo-0")], &BTreeMap::new()),
        };
        let value = serde_json::to_value(&signal).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        let mut top = keys(&value);
        top.sort();
        assert_eq!(
            top,
            [
                "groups",
                "held_rejected_total",
                "held_requests",
                "idle_seconds",
                "oldest_held_seconds",
                "window_seconds"
            ]
        );
        let mut group = keys(&value["groups"][0]);
        group.sort();
        assert_eq!(
            group,
            [
                "cache_utilization",
                "draining_endpoints",
                "endpoints",
                "group",
                "in_flight_requests",
                "queued_prompt_tokens",
                "reporting_endpoints",
                "running_requests",
                "ttft_p90_seconds",
                "ttft_samples",
                "waiting_requests"
            ]
        );
        assert!(value["groups"][0]["ttft_p90_seconds"].is_null());
    }
}
