//! The autoscaler stage, before build under `spec.autoscaling`: observe the groups, read which
//! of them drain (the `NAME-routing` ConfigMap the operator wrote), read the routers' reports,
//! decide ([`crate::autoscaling::decide`], pure), and hand the chosen groups to the builders.
//! It announces every change (Events, metrics) and remembers the proposals per object for the
//! stabilization windows, as the HPA controller does.
//!
//! A pass runs at most once per `--autoscale-interval` per object: reconciles in between (a pod
//! changed, the status was written) reuse the last decision, so that watch events neither speed
//! the windows up nor make a status write trigger another read of the routers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;
use tracing::instrument;

use super::{Context, Error, events, key};
use crate::autoscaling::Settings;
use crate::autoscaling::decide::{
    self, Demand, Group, GroupState, Input, Recommendation, finished_drains,
};
use crate::autoscaling::signal::{self, Signal};
use crate::crd::{AutoscalingStatus, ModelDeployment, ScalingDecision};
use crate::metrics::AutoscalerPass;
use crate::resources::configmap::parse_draining;
use crate::resources::{METRICS_PORT, Owner, names, selector_string, statefulset};
use crate::status::{self, AutoscalingView};
use crate::validate::ValidatedSpec;

/// The autoscaler's pass interval when `--autoscale-interval` is not given (the HPA's default).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);
/// How old a drain must be before the routers' zero in-flight counts end it: long enough for
/// every router to have seen the ConfigMap that began it (they watch it).
pub const DRAIN_SETTLE: Duration = Duration::from_secs(10);
/// A drain ends at the latest after the workers' own drain timeout: by then whatever a router
/// still counts is finished by the workers' SIGTERM drain.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(statefulset::DRAIN_SECONDS.unsigned_abs());
/// See [`forget_stale`].
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// The groups the builders get, and what the status reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Autoscaled {
    /// Serving groups (existing and new).
    pub serving: BTreeSet<i32>,
    /// Draining groups and when their drain began; their StatefulSets stay.
    pub draining: BTreeMap<i32, Timestamp>,
    pub view: AutoscalingView,
    /// When the next pass is due: the reconcile requeues then.
    pub next_pass: Duration,
}

/// What the autoscaler remembers of one object between reconciles.
#[derive(Debug, Default)]
pub struct Memory {
    history: Vec<Recommendation>,
    last: Option<Evaluation>,
}

#[derive(Debug)]
struct Evaluation {
    generation: Option<i64>,
    at: Instant,
    result: Autoscaled,
}

/// Forgets an object the autoscaler no longer manages (deleted, or `spec.autoscaling` removed).
pub fn forget(md: &ModelDeployment, ctx: &Context) {
    let removed = ctx
        .autoscalers
        .lock()
        .expect("autoscaler memory is never poisoned")
        .remove(&key(md));
    if removed.is_some() {
        ctx.metrics.forget_autoscaler(
            md.namespace().as_deref().unwrap_or_default(),
            &md.name_any(),
        );
    }
}

/// One pass (or the last one's result, within the interval).
#[instrument(skip_all)]
pub async fn autoscale(
    spec: &ValidatedSpec<'_>,
    settings: &Settings,
    ctx: &Context,
    existing: &[StatefulSet],
) -> Result<Autoscaled, Error> {
    let md = spec.model_deployment();
    let object = key(md);
    if let Some(last) = ctx
        .autoscalers
        .lock()
        .expect("autoscaler memory is never poisoned")
        .get(&object)
        .and_then(|memory| memory.last.as_ref())
        .filter(|last| {
            last.generation == md.metadata.generation && last.at.elapsed() < ctx.autoscale_interval
        })
    {
        return Ok(Autoscaled {
            next_pass: ctx.autoscale_interval.saturating_sub(last.at.elapsed()),
            ..last.result.clone()
        });
    }

    let owner = spec.owner();
    let now = Timestamp::from_second(Timestamp::now().as_second()).expect("the clock is in range");
    let observed = observe_groups(ctx, owner, existing).await?;
    let mut draining = read_draining(ctx, owner).await?;
    // A drain whose StatefulSet is gone (deleted by hand) has nothing left to drain.
    draining.retain(|group, _| observed.iter().any(|g| g.group == *group));
    let signal = read_signal(ctx, owner).await?;

    let groups: Vec<Group> = observed
        .iter()
        .map(|g| Group {
            index: g.group,
            state: if draining.contains_key(&g.group) {
                GroupState::Draining
            } else if g.ready(spec.plan().expert_shards) {
                GroupState::Ready
            } else {
                GroupState::Loading
            },
            value: signal
                .as_ref()
                .and_then(|s| s.groups.get(&g.group))
                .and_then(|load| load.value(settings.metric)),
        })
        .collect();
    let history = ctx
        .autoscalers
        .lock()
        .expect("autoscaler memory is never poisoned")
        .get(&object)
        .map(|memory| memory.history.clone())
        .unwrap_or_default();
    let decision = decide::decide(&Input {
        settings,
        groups: &groups,
        demand: signal.as_ref().map(|s| Demand {
            held_requests: s.held_requests,
            idle_seconds: s.idle_seconds,
        }),
        history: &history,
        now,
    });

    let mut serving: BTreeSet<i32> = groups
        .iter()
        .filter(|g| g.state != GroupState::Draining && !decision.drain.contains(&g.index))
        .map(|g| g.index)
        .collect();
    serving.extend(decision.add.iter().chain(&decision.take_back));
    for group in &decision.take_back {
        draining.remove(group);
    }
    let still_draining: Vec<(i32, Timestamp)> = draining.iter().map(|(g, t)| (*g, *t)).collect();
    let in_flight = |group: i32| {
        signal.as_ref().map(|s| {
            s.groups
                .get(&group)
                .map_or(0, |load| load.in_flight_requests)
        })
    };
    for group in finished_drains(&still_draining, in_flight, now, DRAIN_SETTLE, DRAIN_TIMEOUT) {
        draining.remove(&group);
        tracing::info!(
            deployment = object,
            group = names::group(&owner.name, group),
            "drained: the group's StatefulSet goes"
        );
    }
    for group in &decision.drain {
        draining.insert(*group, now);
    }

    let from = decision.current;
    let to = serving.len() as i32;
    let direction = match to.cmp(&from) {
        std::cmp::Ordering::Greater => Some("up"),
        std::cmp::Ordering::Less => Some("down"),
        std::cmp::Ordering::Equal => None,
    };
    tracing::info!(
        deployment = object,
        current = from,
        desired = decision.desired,
        serving = to,
        value = ?decision.value,
        reason = decision.reason,
        "autoscaler pass"
    );
    let previous = md.status.as_ref().and_then(|s| s.autoscaling.clone());
    let last_decision = match direction {
        Some(_) => Some(ScalingDecision {
            from,
            to,
            reason: decision.reason.clone(),
            time: Time(now),
        }),
        None => previous.as_ref().and_then(|p| p.last_decision.clone()),
    };
    let view = AutoscalingView {
        serving: serving.clone(),
        status: AutoscalingStatus {
            current_replicas: from,
            desired_replicas: decision.desired,
            metric: Some(settings.metric),
            value: decision.value,
            target: settings.target,
            held_requests: signal
                .as_ref()
                .map_or(0, |s| i64::try_from(s.held_requests).unwrap_or(i64::MAX)),
            draining_groups: draining
                .keys()
                .map(|g| names::group(&owner.name, *g))
                .collect(),
            last_scale_time: match direction {
                Some(_) => Some(Time(now)),
                None => previous.and_then(|p| p.last_scale_time),
            },
            last_decision,
        },
    };
    let result = Autoscaled {
        serving,
        draining,
        view,
        next_pass: ctx.autoscale_interval,
    };

    ctx.metrics.record_autoscaler(
        &owner.namespace,
        &owner.name,
        &AutoscalerPass {
            current: from,
            desired: decision.desired,
            metric: settings.metric,
            value: decision.value,
            direction,
        },
    );
    announce(md, ctx, owner, from, to, &decision).await;
    let forgotten = {
        let mut memories = ctx
            .autoscalers
            .lock()
            .expect("autoscaler memory is never poisoned");
        let forgotten = forget_stale(&mut memories, ctx.autoscale_interval, Instant::now());
        let memory = memories.entry(object).or_default();
        if let Some(groups) = decision.recommendation {
            decide::remember(
                &mut memory.history,
                Recommendation { at: now, groups },
                settings,
            );
        }
        memory.last = Some(Evaluation {
            generation: md.metadata.generation,
            at: Instant::now(),
            result: result.clone(),
        });
        forgotten
    };
    for stale in forgotten {
        if let Some((namespace, name)) = stale.split_once('/') {
            ctx.metrics.forget_autoscaler(namespace, name);
        }
    }
    Ok(result)
}

/// Drops the memory of objects that no pass looked at for [`FORGET_AFTER`] (or ten intervals,
/// if longer), and returns their keys. Every object under autoscaling is looked at every
/// interval, so these were deleted (the controller does not reconcile a deleted object, so
/// [`forget`] never ran for it) or have been paused that long.
fn forget_stale(
    memories: &mut HashMap<String, Memory>,
    interval: Duration,
    now: Instant,
) -> Vec<String> {
    let limit = FORGET_AFTER.max(interval.saturating_mul(10));
    let stale: Vec<String> = memories
        .iter()
        .filter(|(_, memory)| {
            memory
                .last
                .as_ref()
                .is_none_or(|last| now.saturating_duration_since(last.at) > limit)
        })
        .map(|(key, _)| key.clone())
        .collect();
    for key in &stale {
        memories.remove(key);
    }
    stale
}

/// Events for a change of the serving groups: `ScaledUp`, `ScaledDown`, and `DrainingGroup` per
/// group that starts to drain.
async fn announce(
    md: &ModelDeployment,
    ctx: &Context,
    owner: &Owner,
    from: i32,
    to: i32,
    decision: &decide::Decision,
) {
    if to > from {
        let note = format!(
            "scaled from {from} to {to} serving groups: {}",
            decision.reason
        );
        events::publish(md, ctx, EventType::Normal, "ScaledUp", "Scale", note).await;
    } else if to < from {
        let note = format!(
            "scaled from {from} to {to} serving groups: {}",
            decision.reason
        );
        events::publish(md, ctx, EventType::Normal, "ScaledDown", "Scale", note).await;
    }
    for group in &decision.drain {
        let note = format!(
            "draining {}: the routers send it no new requests, and it goes once they report it \
             idle (at most {}s)",
            names::group(&owner.name, *group),
            DRAIN_TIMEOUT.as_secs()
        );
        events::publish(md, ctx, EventType::Normal, "DrainingGroup", "Scale", note).await;
    }
}

/// The groups as their StatefulSets and worker pods show them.
async fn observe_groups(
    ctx: &Context,
    owner: &Owner,
    existing: &[StatefulSet],
) -> Result<Vec<status::GroupObservation>, Error> {
    let pods = super::list_pods(ctx, &owner.namespace, &owner.selector_string()).await?;
    Ok(status::observe_groups(existing, &pods))
}

/// The draining groups as the operator last wrote them into `NAME-routing`.
async fn read_draining(ctx: &Context, owner: &Owner) -> Result<BTreeMap<i32, Timestamp>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let config_map = api
        .get_opt(&names::routing_config_map(&owner.name))
        .await
        .map_err(|source| Error::List {
            what: "ConfigMaps",
            source,
        })?;
    Ok(config_map
        .filter(|c| owner.owns(&c.metadata))
        .map(|c| parse_draining(&owner.name, &c))
        .unwrap_or_default())
}

/// The reports of the ready router pods, combined; `None` when no router could be read.
async fn read_signal(ctx: &Context, owner: &Owner) -> Result<Option<Signal>, Error> {
    let routers = super::list_pods(
        ctx,
        &owner.namespace,
        &selector_string(&owner.router_selector()),
    )
    .await?;
    let addresses: Vec<String> = routers
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && status::pod_ready(pod))
        .filter_map(|pod| status::pod_address(pod, METRICS_PORT))
        .collect();
    let answers = join_all(addresses.iter().map(|a| ctx.reports.report(a))).await;
    let mut reports = Vec::new();
    for answer in answers {
        match answer {
            Ok(report) => reports.push(report),
            Err(err) => {
                ctx.metrics
                    .autoscaler_signal_error(&owner.namespace, &owner.name);
                tracing::warn!(error = %err, "cannot read a router's autoscaling report; it is left out");
            }
        }
    }
    Ok(signal::combine(&owner.name, &reports))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memories_of_objects_no_pass_looked_at_for_long_are_dropped() {
        // Instants from `start` on only: one before the process (or the machine) started may
        // not exist.
        let start = Instant::now();
        let now = start + Duration::from_secs(7200);
        let evaluated = |at: Instant| Memory {
            history: vec![],
            last: Some(Evaluation {
                generation: Some(1),
                at,
                result: Autoscaled {
                    serving: BTreeSet::new(),
                    draining: BTreeMap::new(),
                    view: AutoscalingView {
                        serving: BTreeSet::new(),
                        status: AutoscalingStatus::default(),
                    },
                    next_pass: Duration::ZERO,
                },
            }),
        };
        let mut memories = HashMap::from([
            (
                "models/live".to_owned(),
                evaluated(now - Duration::from_secs(20)),
            ),
            ("models/gone".to_owned(), evaluated(start)),
        ]);
        let forgotten = forget_stale(&mut memories, DEFAULT_INTERVAL, now);
        assert_eq!(forgotten, ["models/gone"]);
        assert!(memories.contains_key("models/live"));
        // A long interval stretches the limit: ten of them.
        let mut memories = HashMap::from([("models/slow".to_owned(), evaluated(start))]);
        assert!(forget_stale(&mut memories, Duration::from_secs(900), now).is_empty());
    }
}
