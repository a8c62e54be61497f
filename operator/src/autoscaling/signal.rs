//! The router's `GET /v1/autoscaling` report (the contract of issue 19), and how the reports of
//! several router pods combine into one signal. Pure.
//!
//! Every router sees every group, but each only through the requests it sent itself, while the
//! workers' own figures (running, waiting, queued tokens, cache) are the same whichever router
//! relays them. So per group the combination takes the maximum over routers of every field (the
//! worker-reported ones agree; for in-flight requests and TTFT the maximum is the conservative
//! choice), the held requests add up (each router holds its own), and the idle time is the
//! shortest (the deployment is idle only when every router is).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::crd::AutoscalingMetric;

/// One router's report. Fields missing from the JSON read as zero or empty, so that a router of
/// a newer or older version still yields what it has.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct RouterReport {
    pub window_seconds: f64,
    pub held_requests: u64,
    pub oldest_held_seconds: f64,
    pub held_rejected_total: u64,
    pub idle_seconds: f64,
    pub groups: Vec<GroupReport>,
}

/// One serving group as one router sees it.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct GroupReport {
    /// `NAME-G` for the groups of a ModelDeployment (the StatefulSet's name).
    pub group: String,
    pub endpoints: u32,
    pub reporting_endpoints: u32,
    pub draining_endpoints: u32,
    pub in_flight_requests: u64,
    pub running_requests: u64,
    pub waiting_requests: u64,
    pub queued_prompt_tokens: u64,
    pub cache_utilization: f64,
    /// `None` (JSON null) while the router measured no first token from the group.
    pub ttft_p90_seconds: Option<f64>,
    pub ttft_samples: u64,
}

/// One group's load over every router that could be read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GroupLoad {
    pub in_flight_requests: u64,
    pub running_requests: u64,
    pub waiting_requests: u64,
    pub queued_prompt_tokens: u64,
    pub cache_utilization: f64,
    pub ttft_p90_seconds: Option<f64>,
}

impl GroupLoad {
    /// The group's value of `metric`. A TTFT that nobody measured is 0 for an idle group
    /// (nothing waits for a first token there), and unknown (`None`) while requests are in
    /// flight: the decision then treats the group as the HPA treats a pod without metrics.
    pub fn value(&self, metric: AutoscalingMetric) -> Option<f64> {
        match metric {
            AutoscalingMetric::QueuedPromptTokens => Some(self.queued_prompt_tokens as f64),
            AutoscalingMetric::InFlightRequests => Some(self.in_flight_requests as f64),
            AutoscalingMetric::CacheUtilization => Some(self.cache_utilization),
            AutoscalingMetric::TtftP90Seconds => self
                .ttft_p90_seconds
                .or((self.in_flight_requests == 0).then_some(0.0)),
        }
    }
}

/// The reports of the routers that answered, combined. There is no `Signal` without at least one
/// report: no data means no scaling.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signal {
    /// Routers whose report is in here.
    pub routers: usize,
    pub held_requests: u64,
    pub idle_seconds: f64,
    /// Per group index (`NAME-G` -> G); groups of other names (static endpoints) are left out.
    pub groups: BTreeMap<i32, GroupLoad>,
}

/// A float from a report as a usable figure: negative, NaN or infinite values (which no correct
/// router sends) count as 0 rather than steering the decision.
fn sane(value: f64) -> f64 {
    if value.is_finite() && value > 0.0 {
        value
    } else {
        0.0
    }
}

/// The group index of a router group name: `NAME-G` -> G.
pub fn group_index(deployment: &str, group: &str) -> Option<i32> {
    let index = group.strip_prefix(deployment)?.strip_prefix('-')?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    index.parse().ok()
}

/// Combines the reports of the routers of the ModelDeployment `deployment` that answered;
/// `None` when none did.
pub fn combine(deployment: &str, reports: &[RouterReport]) -> Option<Signal> {
    if reports.is_empty() {
        return None;
    }
    let mut signal = Signal {
        routers: reports.len(),
        idle_seconds: f64::INFINITY,
        ..Signal::default()
    };
    for report in reports {
        signal.held_requests = signal.held_requests.saturating_add(report.held_requests);
        signal.idle_seconds = signal.idle_seconds.min(sane(report.idle_seconds));
        for group in &report.groups {
            let Some(index) = group_index(deployment, &group.group) else {
                continue;
            };
            let load = signal.groups.entry(index).or_default();
            load.in_flight_requests = load.in_flight_requests.max(group.in_flight_requests);
            load.running_requests = load.running_requests.max(group.running_requests);
            load.waiting_requests = load.waiting_requests.max(group.waiting_requests);
            load.queued_prompt_tokens = load.queued_prompt_tokens.max(group.queued_prompt_tokens);
            load.cache_utilization = load
                .cache_utilization
                .max(sane(group.cache_utilization).min(1.0));
            let ttft = group
                .ttft_p90_seconds
                .filter(|_| group.ttft_samples > 0)
                .map(sane);
            load.ttft_p90_seconds = match (load.ttft_p90_seconds, ttft) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
    }
    Some(signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(
        name: &str,
        in_flight: u64,
        queued: u64,
        cache: f64,
        ttft: Option<f64>,
    ) -> GroupReport {
        GroupReport {
            group: name.into(),
            endpoints: 2,
            reporting_endpoints: 2,
            in_flight_requests: in_flight,
            queued_prompt_tokens: queued,
            cache_utilization: cache,
            ttft_p90_seconds: ttft,
            ttft_samples: u64::from(ttft.is_some()) * 10,
            ..GroupReport::default()
        }
    }

    #[test]
    fn the_contracts_example_parses() {
        let report: RouterReport = serde_json::from_str(
            r#"{
              "window_seconds": 60, "held_requests": 0, "oldest_held_seconds": 0.0,
              "held_rejected_total": 0, "idle_seconds": 12.5,
              "groups": [{
                "group": "demo-0", "endpoints": 2, "reporting_endpoints": 2,
                "draining_endpoints": 0, "in_flight_requests": 3, "running_requests": 2,
                "waiting_requests": 1, "queued_prompt_tokens": 1200, "cache_utilization": 0.42,
                "ttft_p90_seconds": 0.8, "ttft_samples": 37
              }]
            }"#,
        )
        .unwrap();
        assert_eq!(report.idle_seconds, 12.5);
        assert_eq!(report.groups[0].queued_prompt_tokens, 1200);
        assert_eq!(report.groups[0].ttft_p90_seconds, Some(0.8));
        let null_ttft: GroupReport =
            serde_json::from_str(r#"{"group": "demo-1", "ttft_p90_seconds": null}"#).unwrap();
        assert_eq!(null_ttft.ttft_p90_seconds, None);
        assert!(serde_json::from_str::<RouterReport>(r#"{"groups": 3}"#).is_err());
    }

    #[test]
    fn group_names_map_to_indices_of_this_deployment_only() {
        assert_eq!(group_index("demo", "demo-0"), Some(0));
        assert_eq!(group_index("demo", "demo-12"), Some(12));
        assert_eq!(group_index("demo", "demo-x"), None);
        assert_eq!(group_index("demo", "demo-"), None);
        assert_eq!(group_index("demo", "demo-+1"), None);
        assert_eq!(group_index("demo", "demo2-1"), None);
        assert_eq!(group_index("demo", "10.0.0.1:50051"), None);
        assert_eq!(group_index("demo", "demo-99999999999"), None);
    }

    #[test]
    fn reports_combine_by_max_per_group_sum_of_held_and_min_of_idle() {
        assert_eq!(combine("demo", &[]), None, "no report, no signal");
        let a = RouterReport {
            held_requests: 2,
            idle_seconds: 30.0,
            groups: vec![
                group("demo-0", 3, 100, 0.5, Some(0.4)),
                group("demo-1", 0, 0, 0.1, None),
                group("10.0.0.1:50051", 99, 99, 0.9, None),
            ],
            ..RouterReport::default()
        };
        let b = RouterReport {
            held_requests: 1,
            idle_seconds: 0.0,
            groups: vec![group("demo-0", 5, 80, 0.4, Some(0.9))],
            ..RouterReport::default()
        };
        let signal = combine("demo", &[a, b]).unwrap();
        assert_eq!(signal.routers, 2);
        assert_eq!(signal.held_requests, 3);
        assert_eq!(signal.idle_seconds, 0.0);
        assert_eq!(signal.groups.keys().copied().collect::<Vec<_>>(), [0, 1]);
        let g0 = &signal.groups[&0];
        assert_eq!(g0.in_flight_requests, 5);
        assert_eq!(g0.queued_prompt_tokens, 100);
        assert_eq!(g0.cache_utilization, 0.5);
        assert_eq!(g0.ttft_p90_seconds, Some(0.9));
        assert_eq!(signal.groups[&1].ttft_p90_seconds, None);
        assert_eq!(
            signal.groups[&1].value(AutoscalingMetric::TtftP90Seconds),
            Some(0.0),
            "idle: nothing waits for a first token"
        );
        let busy_unmeasured = GroupLoad {
            in_flight_requests: 2,
            ..GroupLoad::default()
        };
        assert_eq!(
            busy_unmeasured.value(AutoscalingMetric::TtftP90Seconds),
            None
        );
        assert_eq!(g0.value(AutoscalingMetric::InFlightRequests), Some(5.0));
        assert_eq!(g0.value(AutoscalingMetric::QueuedPromptTokens), Some(100.0));
        assert_eq!(g0.value(AutoscalingMetric::CacheUtilization), Some(0.5));
    }

    #[test]
    fn nonsense_figures_count_as_zero() {
        let report = RouterReport {
            idle_seconds: -5.0,
            groups: vec![group("demo-0", 1, 1, 7.0, Some(-1.0))],
            ..RouterReport::default()
        };
        let signal = combine("demo", &[report]).unwrap();
        assert_eq!(signal.idle_seconds, 0.0);
        assert_eq!(signal.groups[&0].cache_utilization, 1.0);
        assert_eq!(signal.groups[&0].ttft_p90_seconds, Some(0.0));
    }
}
