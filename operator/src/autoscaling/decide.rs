//! The autoscaling decision, a pure function of the settings, the groups, the combined signal,
//! the recommendations of earlier passes and the time (passed in, never read from a clock).
//!
//! It follows the Kubernetes HPA (`replica_calculator.go`, `horizontal.go`), with a serving group
//! in place of a pod:
//!
//! 1. ratio = the average signal of the ready groups / the target. Within `tolerance` of 1: keep.
//!    Otherwise the proposal is `ceil(ratio x ready groups)`. Groups that are still loading
//!    count, when the ratio says "up", as groups with no load (they will take load soon, so
//!    scaling up for it again would overshoot); ready groups the routers do not report count as
//!    at the target when scaling down and as idle when scaling up. If those additions flip the
//!    direction or land within tolerance, keep.
//! 2. Stabilization: scale up only to the lowest proposal within `scaleUpStabilization`, down
//!    only to the highest within `scaleDownDelay` (the proposals are remembered per object by the
//!    caller).
//! 3. Bounds: `[max(minReplicas, 1), maxReplicas]` while any group serves; to 0 only when
//!    `minReplicas` is 0 and no router had a request in flight or held for `scaleToZeroAfter`;
//!    held requests always ask for a group (scale from zero), at once.
//! 4. No signal (no router could be read): keep the current count (within the bounds).
//!
//! Then which groups: new ones take the lowest free indices, but a draining group is taken back
//! first; the groups to remove are the least-loaded ready ones (never a loading or a draining
//! one), which the caller drains before it deletes them.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::Settings;

/// The most recommendations remembered per object, whatever the windows: a bound on memory
/// should reconciles come faster than expected.
pub const MAX_HISTORY: usize = 1024;

/// Where a serving group stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// Every shard ready: the group serves and its load counts.
    Ready,
    /// Its StatefulSet exists but not every shard is ready yet.
    Loading,
    /// Listed in the routing ConfigMap: gets no new requests, goes once idle.
    Draining,
}

/// One existing serving group.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub index: i32,
    pub state: GroupState,
    /// The group's value of the target metric, `None` when no router reports the group.
    pub value: Option<f64>,
}

/// What the routers say about demand as a whole.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Demand {
    pub held_requests: u64,
    /// Since any router last had a request in flight or held.
    pub idle_seconds: f64,
}

/// A proposal of an earlier pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recommendation {
    pub at: Timestamp,
    pub groups: i32,
}

/// Everything a decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub settings: &'a Settings,
    pub groups: &'a [Group],
    /// `None`: no router could be read, so there is no signal.
    pub demand: Option<Demand>,
    pub history: &'a [Recommendation],
    pub now: Timestamp,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Serving groups now (ready and loading, not draining).
    pub current: i32,
    /// Serving groups wanted.
    pub desired: i32,
    /// New groups to create, by index.
    pub add: Vec<i32>,
    /// Draining groups that serve again.
    pub take_back: Vec<i32>,
    /// Ready groups to start draining.
    pub drain: Vec<i32>,
    /// The average signal over the ready groups that have one.
    pub value: Option<f64>,
    /// The proposal to remember for the stabilization windows; `None` without a signal.
    pub recommendation: Option<i32>,
    /// Why, for the status, the Events and the log.
    pub reason: String,
}

impl Decision {
    /// `desired` with the direction of the change, if any.
    pub fn direction(&self) -> Option<&'static str> {
        match self.desired.cmp(&self.current) {
            std::cmp::Ordering::Greater => Some("up"),
            std::cmp::Ordering::Less => Some("down"),
            std::cmp::Ordering::Equal => None,
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Milliseconds from `earlier` to `later` (negative if `earlier` is in the future).
fn age_ms(later: Timestamp, earlier: Timestamp) -> i64 {
    later
        .as_millisecond()
        .saturating_sub(earlier.as_millisecond())
}

fn groups_word(n: i32) -> &'static str {
    if n == 1 { "group" } else { "groups" }
}

/// The HPA's replica calculation over groups: the proposal and why, or `None` when no ready
/// group has a value (nothing to compute a ratio from).
fn propose(settings: &Settings, groups: &[Group], current: i32) -> Option<(i32, String)> {
    let ready: Vec<&Group> = groups
        .iter()
        .filter(|g| g.state == GroupState::Ready)
        .collect();
    let loading = groups
        .iter()
        .filter(|g| g.state == GroupState::Loading)
        .count();
    let measured: Vec<f64> = ready.iter().filter_map(|g| g.value).collect();
    let missing = ready.len() - measured.len();
    if measured.is_empty() {
        return None;
    }
    let target = settings.target;
    let average = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
    let ratio = average(&measured) / target;
    // With a hair of slack, so that 11 against 10 is within 10% although 1.1 - 1 is not, in
    // binary floating point.
    let within = |ratio: f64| (1.0 - ratio).abs() <= settings.tolerance + 1e-9;
    let metric = settings.metric.as_str();
    let scale_up_with_loading = loading > 0 && ratio > 1.0;
    if !scale_up_with_loading && missing == 0 {
        if within(ratio) {
            return Some((
                current,
                format!(
                    "{metric} {:.2} per ready group is within {:.0}% of the target {target}",
                    average(&measured),
                    settings.tolerance * 100.0
                ),
            ));
        }
        let proposal = ceil_groups(ratio * measured.len() as f64);
        return Some((
            proposal,
            format!(
                "{metric} {:.2} per ready group against a target of {target} over {} ready {}",
                average(&measured),
                measured.len(),
                groups_word(measured.len() as i32)
            ),
        ));
    }
    // As the HPA does with pods: a ready group without a value counts as at the target when
    // the ratio says "down" (no scale-down on missing data) and as idle when it says "up"; a
    // loading group counts as idle when scaling up (it will soon take its share).
    let mut values = measured;
    let fill = if ratio < 1.0 { target } else { 0.0 };
    values.extend(std::iter::repeat_n(fill, missing));
    if scale_up_with_loading {
        values.extend(std::iter::repeat_n(0.0, loading));
    }
    let new_ratio = average(&values) / target;
    let flipped = (ratio < 1.0 && new_ratio > 1.0) || (ratio > 1.0 && new_ratio < 1.0);
    let counted = format!(
        "{metric} {:.2} per group, counting {missing} unreported and {} loading {} as {}",
        average(&values),
        if scale_up_with_loading { loading } else { 0 },
        groups_word(if scale_up_with_loading {
            loading as i32
        } else {
            0
        }),
        if ratio < 1.0 { "at the target" } else { "idle" },
    );
    if within(new_ratio) || flipped {
        return Some((
            current,
            format!("{counted} is close enough to the target {target}"),
        ));
    }
    let proposal = ceil_groups(new_ratio * values.len() as f64);
    if (new_ratio < 1.0 && proposal > current) || (new_ratio > 1.0 && proposal < current) {
        return Some((
            current,
            format!("{counted}: no change against the direction of the signal"),
        ));
    }
    Some((proposal, format!("{counted} against a target of {target}")))
}

/// `ceil(x)` as a group count, saturating (the bounds clamp it afterwards). A hair below the
/// integer first, so that float noise (0.9 / 0.6 x 2 = 3.0000000000000004) asks for no extra group.
fn ceil_groups(x: f64) -> i32 {
    let x = (x - 1e-9).ceil();
    if x.is_nan() || x <= 0.0 {
        0
    } else if x >= f64::from(i32::MAX) {
        i32::MAX
    } else {
        x as i32
    }
}

/// The HPA's stabilization: between the lowest proposal within the scale-up window and the
/// highest within the scale-down window, as close to `current` as that allows.
fn stabilize(
    settings: &Settings,
    proposal: i32,
    current: i32,
    history: &[Recommendation],
    now: Timestamp,
) -> i32 {
    let up_window = millis(settings.scale_up_stabilization);
    let down_window = millis(settings.scale_down_delay);
    let mut up = proposal;
    let mut down = proposal;
    for recommendation in history {
        let age = age_ms(now, recommendation.at);
        if age < up_window {
            up = up.min(recommendation.groups);
        }
        if age < down_window {
            down = down.max(recommendation.groups);
        }
    }
    current.max(up).min(down)
}

/// The decision for one pass. Never panics, whatever the input.
pub fn decide(input: &Input<'_>) -> Decision {
    let settings = input.settings;
    let serving: Vec<&Group> = input
        .groups
        .iter()
        .filter(|g| g.state != GroupState::Draining)
        .collect();
    let current = serving.len() as i32;
    let measured: Vec<f64> = serving
        .iter()
        .filter(|g| g.state == GroupState::Ready)
        .filter_map(|g| g.value)
        .collect();
    let value =
        (!measured.is_empty()).then(|| measured.iter().sum::<f64>() / measured.len() as f64);
    let max = settings.max_groups.max(1);
    let serving_floor = settings.min_groups.clamp(1, max);

    let (desired, recommendation, reason) = match input.demand {
        None => {
            let floor = if current == 0 {
                settings.min_groups.clamp(0, max)
            } else {
                serving_floor
            };
            let desired = current.clamp(floor, max);
            (
                desired,
                None,
                bounded(
                    format!(
                        "no router could be read: no signal, keeping {current} {}",
                        groups_word(current)
                    ),
                    current,
                    desired,
                ),
            )
        }
        Some(demand) if current == 0 => {
            if demand.held_requests > 0 {
                // At once, whatever the windows: requests are waiting.
                (
                    serving_floor,
                    Some(serving_floor),
                    format!(
                        "{} requests held with no group serving: scaling from zero to {serving_floor}",
                        demand.held_requests
                    ),
                )
            } else {
                let floor = settings.min_groups.clamp(0, max);
                let reason = if floor > 0 {
                    format!("no group serving: starting minReplicas ({floor})")
                } else {
                    "no group serving and no request held".to_owned()
                };
                (floor, Some(floor), reason)
            }
        }
        Some(demand)
            if settings.min_groups <= 0
                && demand.held_requests == 0
                && demand.idle_seconds >= settings.scale_to_zero_after.as_secs_f64() =>
        {
            // Idle for that long means no load, whatever the metric says (a cache keeps its
            // blocks when idle): the windows are the idle time itself.
            (
                0,
                Some(0),
                format!(
                    "no request in flight or held for {:.0}s (scaleToZeroAfter {}s): scaling to zero",
                    demand.idle_seconds,
                    settings.scale_to_zero_after.as_secs()
                ),
            )
        }
        Some(_) => {
            let (proposal, why) = propose(settings, input.groups, current).unwrap_or_else(|| {
                (
                    current,
                    format!(
                        "no ready group reports {}: keeping {current} {}",
                        settings.metric.as_str(),
                        groups_word(current)
                    ),
                )
            });
            let stabilized = stabilize(settings, proposal, current, input.history, input.now);
            let desired = stabilized.clamp(serving_floor, max);
            let mut reason = format!("{why}: proposes {proposal}");
            if stabilized != proposal {
                let window = if stabilized > proposal {
                    format!(
                        "the highest proposal within scaleDownDelay ({}s)",
                        settings.scale_down_delay.as_secs()
                    )
                } else {
                    format!(
                        "the lowest proposal within scaleUpStabilization ({}s)",
                        settings.scale_up_stabilization.as_secs()
                    )
                };
                reason.push_str(&format!(", held at {stabilized} by {window}"));
            }
            (
                desired,
                Some(proposal),
                bounded(reason, stabilized, desired),
            )
        }
    };

    let (add, take_back, drain) = choose(input.groups, current, desired);
    Decision {
        current,
        desired,
        add,
        take_back,
        drain,
        value,
        recommendation,
        reason,
    }
}

/// The reason, with the bound that moved `wanted` to `desired` if one did.
fn bounded(reason: String, wanted: i32, desired: i32) -> String {
    match wanted.cmp(&desired) {
        std::cmp::Ordering::Less => format!("{reason}; raised to the lower bound {desired}"),
        std::cmp::Ordering::Greater => format!("{reason}; limited to maxReplicas {desired}"),
        std::cmp::Ordering::Equal => reason,
    }
}

/// Which groups to add (draining ones taken back first, then the lowest free indices), and which
/// ready groups to drain (least loaded first; among equals the highest index). Loading groups are
/// never drained, and while some load, no more ready groups drain than leave `desired` ready
/// ones: the count comes down once they are ready rather than by losing the groups that serve.
fn choose(groups: &[Group], current: i32, desired: i32) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut add = Vec::new();
    let mut take_back = Vec::new();
    let mut drain = Vec::new();
    if desired > current {
        let mut needed = (desired - current) as usize;
        let mut draining: Vec<i32> = groups
            .iter()
            .filter(|g| g.state == GroupState::Draining)
            .map(|g| g.index)
            .collect();
        draining.sort_unstable();
        take_back = draining.into_iter().take(needed).collect();
        needed -= take_back.len();
        let used: BTreeSet<i32> = groups.iter().map(|g| g.index).collect();
        add = (0..i32::MAX)
            .filter(|index| !used.contains(index))
            .take(needed)
            .collect();
    } else if desired < current {
        let mut ready: Vec<&Group> = groups
            .iter()
            .filter(|g| g.state == GroupState::Ready)
            .collect();
        let excess =
            ((current - desired) as usize).min(ready.len().saturating_sub(desired.max(0) as usize));
        let load = |g: &Group| g.value.unwrap_or(0.0);
        ready.sort_by(|a, b| {
            load(a)
                .total_cmp(&load(b))
                .then_with(|| b.index.cmp(&a.index))
        });
        drain = ready.into_iter().take(excess).map(|g| g.index).collect();
    }
    (add, take_back, drain)
}

/// Remembers `recommendation` and forgets what no window can reach any more.
pub fn remember(
    history: &mut Vec<Recommendation>,
    recommendation: Recommendation,
    settings: &Settings,
) {
    let keep = millis(
        settings
            .scale_up_stabilization
            .max(settings.scale_down_delay),
    );
    history.push(recommendation);
    history.retain(|r| age_ms(recommendation.at, r.at) < keep || r == &recommendation);
    if history.len() > MAX_HISTORY {
        let excess = history.len() - MAX_HISTORY;
        history.drain(..excess);
    }
}

/// The draining groups whose StatefulSets may go now: every router that could be read reports no
/// request in flight to the group (and the drain is at least `settle` old, so that the routers
/// have seen it in the routing ConfigMap), or the drain began more than `timeout` ago (the
/// workers' own drain then covers whatever is left). `in_flight` is the group's in-flight count
/// over the routers that answered; `None` when none did.
pub fn finished_drains(
    draining: &[(i32, Timestamp)],
    in_flight: impl Fn(i32) -> Option<u64>,
    now: Timestamp,
    settle: Duration,
    timeout: Duration,
) -> Vec<i32> {
    draining
        .iter()
        .filter(|(group, since)| {
            let age = age_ms(now, *since);
            age > millis(timeout) || (age >= millis(settle) && in_flight(*group) == Some(0))
        })
        .map(|(group, _)| *group)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::AutoscalingMetric;

    fn settings(metric: AutoscalingMetric, target: f64) -> Settings {
        Settings {
            min_groups: 1,
            max_groups: 10,
            metric,
            target,
            scale_up_stabilization: Duration::ZERO,
            scale_down_delay: Duration::from_secs(300),
            scale_to_zero_after: Duration::from_secs(600),
            tolerance: 0.1,
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn ready(index: i32, value: f64) -> Group {
        Group {
            index,
            state: GroupState::Ready,
            value: Some(value),
        }
    }

    fn loading(index: i32) -> Group {
        Group {
            index,
            state: GroupState::Loading,
            value: None,
        }
    }

    fn draining(index: i32) -> Group {
        Group {
            index,
            state: GroupState::Draining,
            value: Some(0.0),
        }
    }

    fn busy() -> Option<Demand> {
        Some(Demand {
            held_requests: 0,
            idle_seconds: 0.0,
        })
    }

    fn run(settings: &Settings, groups: &[Group], demand: Option<Demand>) -> Decision {
        decide(&Input {
            settings,
            groups,
            demand,
            history: &[],
            now: at(1000),
        })
    }

    #[test]
    fn each_metric_scales_to_its_per_group_target() {
        // Per ready group averages at 3x, 2x, 1.5x and 2.5x the target.
        for (metric, target, values, expected) in [
            (AutoscalingMetric::InFlightRequests, 4.0, vec![12.0], 3),
            (
                AutoscalingMetric::QueuedPromptTokens,
                1000.0,
                vec![2500.0, 1500.0],
                4,
            ),
            (AutoscalingMetric::CacheUtilization, 0.6, vec![0.9, 0.9], 3),
            (
                AutoscalingMetric::CacheUtilization,
                0.5,
                vec![0.75, 0.75],
                3,
            ),
            (AutoscalingMetric::TtftP90Seconds, 0.5, vec![1.5, 1.0], 5),
        ] {
            let s = settings(metric, target);
            let groups: Vec<Group> = values
                .iter()
                .enumerate()
                .map(|(i, v)| ready(i as i32, *v))
                .collect();
            let decision = run(&s, &groups, busy());
            assert_eq!(
                decision.desired, expected,
                "{metric:?}: {}",
                decision.reason
            );
            assert_eq!(decision.direction(), Some("up"));
            assert!(
                decision.reason.contains(metric.as_str()),
                "{}",
                decision.reason
            );
            assert_eq!(
                decision.value,
                Some(values.iter().sum::<f64>() / values.len() as f64)
            );
        }
    }

    #[test]
    fn within_tolerance_nothing_changes() {
        let s = settings(AutoscalingMetric::InFlightRequests, 10.0);
        for value in [9.0, 10.0, 11.0] {
            let decision = run(&s, &[ready(0, value), ready(1, value)], busy());
            assert_eq!(decision.desired, 2, "{value}");
            assert!(
                decision.reason.contains("within 10%"),
                "{}",
                decision.reason
            );
            assert!(decision.add.is_empty() && decision.drain.is_empty());
        }
        let decision = run(&s, &[ready(0, 11.5), ready(1, 11.5)], busy());
        assert_eq!(decision.desired, 3, "15% above: up");
        let mut wide = s.clone();
        wide.tolerance = 0.2;
        assert_eq!(
            run(&wide, &[ready(0, 11.5), ready(1, 11.5)], busy()).desired,
            2
        );
    }

    #[test]
    fn scale_up_takes_the_lowest_free_indices() {
        let s = settings(AutoscalingMetric::InFlightRequests, 4.0);
        let decision = run(&s, &[ready(0, 16.0), ready(2, 16.0)], busy());
        assert_eq!(decision.desired, 8);
        assert_eq!(decision.add, [1, 3, 4, 5, 6, 7]);
        assert!(decision.take_back.is_empty());
    }

    #[test]
    fn scale_up_takes_a_draining_group_back_first() {
        let s = settings(AutoscalingMetric::InFlightRequests, 4.0);
        let decision = run(&s, &[ready(0, 8.0), draining(3), draining(1)], busy());
        assert_eq!(decision.current, 1, "draining groups are not capacity");
        assert_eq!(decision.desired, 2);
        assert_eq!(decision.take_back, [1]);
        assert!(decision.add.is_empty());
        let decision = run(&s, &[ready(0, 16.0), draining(3), draining(1)], busy());
        assert_eq!(decision.take_back, [1, 3]);
        assert_eq!(decision.add, [2]);
    }

    #[test]
    fn scale_down_drains_the_least_loaded_ready_group_never_a_loading_or_draining_one() {
        let s = settings(AutoscalingMetric::InFlightRequests, 10.0);
        let groups = [ready(0, 3.0), ready(1, 1.0), ready(2, 2.0), draining(3)];
        let decision = run(&s, &groups, busy());
        // 2 per group over 3 groups against 10: 1 group.
        assert_eq!(decision.desired, 1, "{}", decision.reason);
        assert_eq!(decision.drain, [1, 2]);
        assert_eq!(decision.direction(), Some("down"));

        // Equal loads: the highest index goes first, so that indices stay low.
        let decision = run(&s, &[ready(0, 1.0), ready(1, 1.0)], busy());
        assert_eq!(decision.drain, [1]);

        // A loading group is never drained, nor the only ready one while the other loads: the
        // count comes down once it is ready.
        let decision = run(&s, &[ready(0, 0.0), loading(1)], busy());
        assert_eq!(decision.desired, 1);
        assert!(decision.drain.is_empty(), "{:?}", decision.drain);
        let decision = run(&s, &[ready(0, 0.0), ready(1, 0.0), loading(2)], busy());
        assert_eq!(decision.drain, [1]);
    }

    #[test]
    fn loading_groups_count_as_idle_capacity_when_scaling_up() {
        let s = settings(AutoscalingMetric::InFlightRequests, 10.0);
        // One ready group at 2x: alone it asks for 2; the loading group is that second group.
        let decision = run(&s, &[ready(0, 20.0), loading(1)], busy());
        assert_eq!(decision.desired, 2, "{}", decision.reason);
        assert!(decision.add.is_empty());
        // At 3x: (30 + 0) / 2 = 15 per group, 1.5 x 2 groups = 3.
        let decision = run(&s, &[ready(0, 30.0), loading(1)], busy());
        assert_eq!(decision.desired, 3, "{}", decision.reason);
        assert_eq!(decision.add, [2]);
    }

    #[test]
    fn groups_the_routers_do_not_report_do_not_cause_a_scale_down() {
        let s = settings(AutoscalingMetric::InFlightRequests, 10.0);
        let unreported = Group {
            index: 1,
            state: GroupState::Ready,
            value: None,
        };
        // Low load on group 0, nothing known of group 1: counted at the target, 0.6 x 2 = 2.
        let decision = run(&s, &[ready(0, 2.0), unreported.clone()], busy());
        assert_eq!(decision.desired, 2, "{}", decision.reason);
        // High load: group 1 counts as idle, (30 + 0) / 2 = 1.5 -> 3.
        let decision = run(&s, &[ready(0, 30.0), unreported], busy());
        assert_eq!(decision.desired, 3, "{}", decision.reason);
    }

    #[test]
    fn the_scale_down_delay_keeps_the_highest_recent_proposal() {
        let s = settings(AutoscalingMetric::InFlightRequests, 10.0);
        let groups = [ready(0, 1.0), ready(1, 1.0), ready(2, 1.0), ready(3, 1.0)];
        let history = [
            Recommendation {
                at: at(1000 - 400),
                groups: 6,
            }, // outside the 5m window
            Recommendation {
                at: at(1000 - 200),
                groups: 3,
            },
            Recommendation {
                at: at(1000 - 100),
                groups: 2,
            },
        ];
        let decision = decide(&Input {
            settings: &s,
            groups: &groups,
            demand: busy(),
            history: &history,
            now: at(1000),
        });
        assert_eq!(decision.recommendation, Some(1));
        assert_eq!(decision.desired, 3, "{}", decision.reason);
        assert!(
            decision.reason.contains("scaleDownDelay"),
            "{}",
            decision.reason
        );
        assert_eq!(decision.drain, [3]);
        // Once the window has passed, the proposal itself.
        let later = decide(&Input {
            settings: &s,
            groups: &groups,
            demand: busy(),
            history: &history,
            now: at(1000 + 300),
        });
        assert_eq!(later.desired, 1);
    }

    #[test]
    fn scale_up_stabilization_keeps_the_lowest_recent_proposal() {
        let mut s = settings(AutoscalingMetric::InFlightRequests, 10.0);
        s.scale_up_stabilization = Duration::from_secs(60);
        let groups = [ready(0, 40.0)];
        let history = [
            Recommendation {
                at: at(1000 - 90),
                groups: 1,
            }, // outside
            Recommendation {
                at: at(1000 - 30),
                groups: 2,
            },
        ];
        let decision = decide(&Input {
            settings: &s,
            groups: &groups,
            demand: busy(),
            history: &history,
            now: at(1000),
        });
        assert_eq!(decision.recommendation, Some(4));
        assert_eq!(decision.desired, 2, "{}", decision.reason);
        assert!(
            decision.reason.contains("scaleUpStabilization"),
            "{}",
            decision.reason
        );
        // 0s (the default): at once.
        s.scale_up_stabilization = Duration::ZERO;
        let decision = decide(&Input {
            settings: &s,
            groups: &groups,
            demand: busy(),
            history: &history,
            now: at(1000),
        });
        assert_eq!(decision.desired, 4);
    }

    #[test]
    fn min_and_max_bound_the_count() {
        let mut s = settings(AutoscalingMetric::InFlightRequests, 1.0);
        s.max_groups = 3;
        let decision = run(&s, &[ready(0, 100.0)], busy());
        assert_eq!(decision.desired, 3);
        assert!(
            decision.reason.contains("maxReplicas 3"),
            "{}",
            decision.reason
        );
        assert_eq!(decision.add, [1, 2]);

        s.min_groups = 2;
        let decision = run(&s, &[ready(0, 0.0), ready(1, 0.0), ready(2, 0.0)], busy());
        assert_eq!(decision.desired, 2, "{}", decision.reason);
        // Below the minimum (a group was deleted by hand): back up at once.
        let decision = run(&s, &[ready(0, 0.0)], busy());
        assert_eq!(decision.desired, 2, "{}", decision.reason);
        assert!(
            decision.reason.contains("lower bound"),
            "{}",
            decision.reason
        );
    }

    #[test]
    fn an_idle_deployment_goes_to_zero_only_with_min_zero_after_scale_to_zero_after() {
        let mut s = settings(AutoscalingMetric::CacheUtilization, 0.5);
        let idle = |seconds: f64| {
            Some(Demand {
                held_requests: 0,
                idle_seconds: seconds,
            })
        };
        // minReplicas 1: never below one group.
        let decision = run(&s, &[ready(0, 0.4)], idle(3600.0));
        assert_eq!(decision.desired, 1);
        s.min_groups = 0;
        // Not idle long enough: the metric decides (and never below 1).
        let decision = run(&s, &[ready(0, 0.0), ready(1, 0.0)], idle(599.0));
        assert_eq!(decision.desired, 1, "{}", decision.reason);
        // Idle long enough: to zero, whatever the cache holds.
        let decision = run(&s, &[ready(0, 0.4), ready(1, 0.3)], idle(600.0));
        assert_eq!(decision.desired, 0);
        assert_eq!(decision.recommendation, Some(0));
        assert!(
            decision.reason.contains("scaling to zero"),
            "{}",
            decision.reason
        );
        assert_eq!(decision.drain, [1, 0], "least loaded first");
        // Held requests are not idle.
        let held = Some(Demand {
            held_requests: 1,
            idle_seconds: 900.0,
        });
        assert_eq!(run(&s, &[ready(0, 0.0)], held).desired, 1);
    }

    #[test]
    fn held_requests_scale_from_zero_at_once() {
        let mut s = settings(AutoscalingMetric::InFlightRequests, 4.0);
        s.min_groups = 0;
        s.scale_up_stabilization = Duration::from_secs(300);
        let held = Some(Demand {
            held_requests: 3,
            idle_seconds: 0.0,
        });
        let decision = decide(&Input {
            settings: &s,
            groups: &[],
            demand: held,
            history: &[Recommendation {
                at: at(990),
                groups: 0,
            }],
            now: at(1000),
        });
        assert_eq!(decision.desired, 1);
        assert_eq!(decision.add, [0]);
        assert!(
            decision.reason.contains("3 requests held"),
            "{}",
            decision.reason
        );
        // A draining group is taken back rather than a new one made.
        let decision = run(&s, &[draining(2)], held);
        assert_eq!(decision.take_back, [2]);
        assert!(decision.add.is_empty());
        // Nothing held: stays at zero.
        let decision = run(
            &s,
            &[],
            Some(Demand {
                held_requests: 0,
                idle_seconds: 10.0,
            }),
        );
        assert_eq!(decision.desired, 0);
        assert_eq!(decision.direction(), None);
    }

    #[test]
    fn without_a_signal_the_count_stays_within_the_bounds() {
        let s = settings(AutoscalingMetric::InFlightRequests, 4.0);
        let decision = run(&s, &[ready(0, 100.0), ready(1, 100.0)], None);
        assert_eq!(decision.desired, 2);
        assert_eq!(decision.recommendation, None, "nothing to remember");
        assert!(decision.reason.contains("no signal"), "{}", decision.reason);
        // The minimum still holds: a new deployment gets its first group before any router runs.
        let decision = run(&s, &[], None);
        assert_eq!(decision.desired, 1);
        assert_eq!(decision.add, [0]);
        // No ready group reports the metric: keep.
        let decision = run(&s, &[loading(0), loading(1)], busy());
        assert_eq!(decision.desired, 2);
        assert!(
            decision.reason.contains("no ready group"),
            "{}",
            decision.reason
        );
    }

    #[test]
    fn remembered_proposals_expire_with_the_longest_window() {
        let s = settings(AutoscalingMetric::InFlightRequests, 4.0);
        let mut history = vec![];
        remember(
            &mut history,
            Recommendation {
                at: at(0),
                groups: 1,
            },
            &s,
        );
        remember(
            &mut history,
            Recommendation {
                at: at(200),
                groups: 2,
            },
            &s,
        );
        remember(
            &mut history,
            Recommendation {
                at: at(400),
                groups: 3,
            },
            &s,
        );
        assert_eq!(history.iter().map(|r| r.groups).collect::<Vec<_>>(), [2, 3]);
        for i in 0..2000 {
            remember(
                &mut history,
                Recommendation {
                    at: at(400),
                    groups: i,
                },
                &s,
            );
        }
        assert_eq!(history.len(), MAX_HISTORY);
    }

    #[test]
    fn a_drain_ends_when_the_routers_report_the_group_idle_or_after_the_timeout() {
        let settle = Duration::from_secs(10);
        let timeout = Duration::from_secs(150);
        let draining = [(1, at(100)), (2, at(100)), (3, at(195)), (4, at(40))];
        let in_flight = |group: i32| match group {
            1 => Some(0),
            2 => Some(3),
            3 => Some(0),
            _ => Some(5),
        };
        // 1: idle; 2: busy; 3: idle but just begun; 4: past the timeout.
        assert_eq!(
            finished_drains(&draining, in_flight, at(200), settle, timeout),
            [1, 4]
        );
        // No router could be read: only the timeout ends a drain.
        assert_eq!(
            finished_drains(&draining, |_| None, at(200), settle, timeout),
            [4]
        );
    }

    #[test]
    fn absurd_inputs_do_not_panic() {
        let mut s = settings(AutoscalingMetric::InFlightRequests, 1e-300);
        s.min_groups = 5;
        s.max_groups = 2;
        let decision = run(&s, &[ready(0, 1e300)], busy());
        assert_eq!(decision.desired, 2);
        s.max_groups = 0;
        let decision = run(&s, &[ready(0, f64::MAX)], None);
        assert_eq!(decision.desired, 1);
    }
}
