//! Status from observations: which groups are ready, what the reconcile achieved, and the
//! previous status (whose condition `lastTransitionTime`s move only on a real change). Pure: the
//! clock comes in as an argument.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{
    AutoscalingStatus, Capacity, ExpertPlacementStatus, ModelDeployment, ModelDeploymentStatus,
    RouterStatus,
};
use crate::resources::{DEFAULT_SERVICE_PORT, HTTP_PORT, LABEL_GROUP, Owner};
use crate::validate::InvalidSpec;

pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// Set while the router is on (`spec.router.replicas` > 0).
pub const ROUTER_READY: &str = "RouterReady";
/// Set while `spec.autoscaling` is: whether the autoscaler owns the group count.
pub const AUTOSCALING_ACTIVE: &str = "AutoscalingActive";

/// Container waiting reasons that will not fix themselves.
const STUCK_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// What one serving group looks like.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupObservation {
    pub group: i32,
    /// Shards the StatefulSet runs (its `spec.replicas`).
    pub shards: i32,
    pub ready_pods: i32,
    /// The StatefulSet controller has rolled out the current template to every pod.
    pub rolled_out: bool,
    /// Pods that are failing rather than starting, with the reason.
    pub failing: Vec<String>,
}

impl GroupObservation {
    /// A group serves only when every shard is ready.
    pub fn ready(&self, expert_shards: i32) -> bool {
        self.shards == expert_shards && self.ready_pods >= expert_shards
    }

    /// Whether the group serves. A worker is ready only while its own experts and those of its
    /// ready peers cover every expert of every layer, so with redundant copies
    /// (`expertPlacement.redundantExperts` > 0) one ready shard means the group serves; without
    /// copies every shard must be ready.
    pub fn serving(&self, expert_shards: i32, redundant: bool) -> bool {
        self.ready(expert_shards)
            || (redundant && self.shards == expert_shards && self.ready_pods >= 1)
    }

    /// Serving with some shard down, on the copies of its experts.
    pub fn degraded(&self, expert_shards: i32, redundant: bool) -> bool {
        self.serving(expert_shards, redundant) && !self.ready(expert_shards)
    }
}

/// Whether `spec.expertPlacement` gives the shards copies of each other's experts.
pub fn has_redundancy(md: &ModelDeployment) -> bool {
    md.spec
        .expert_placement
        .as_ref()
        .is_some_and(|p| p.redundant_experts > 0)
}

/// `status.expertPlacement`: the placement stage's view of this reconcile (the last one's
/// when the stage did not run), with the degraded groups as observed now.
pub fn expert_placement(
    md: &ModelDeployment,
    groups: &[GroupObservation],
    view: Option<&ExpertPlacementStatus>,
) -> Option<ExpertPlacementStatus> {
    md.spec.expert_placement.as_ref()?;
    if md.spec.expert_shards < 2 {
        return None;
    }
    let mut status = view
        .cloned()
        .or_else(|| md.status.as_ref()?.expert_placement.clone())
        .unwrap_or_default();
    let redundant = has_redundancy(md);
    status.degraded_groups = groups
        .iter()
        .filter(|g| g.degraded(md.spec.expert_shards, redundant))
        .map(|g| g.group)
        .collect();
    Some(status)
}

/// Groups as seen through their StatefulSets and pods.
pub fn observe_groups(stateful_sets: &[StatefulSet], pods: &[Pod]) -> Vec<GroupObservation> {
    let mut groups: BTreeMap<i32, GroupObservation> = BTreeMap::new();
    for sts in stateful_sets {
        let Some(group) = group_of(&sts.metadata.labels) else {
            continue;
        };
        let spec_replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let rolled_out = sts.status.as_ref().is_some_and(|status| {
            status.observed_generation >= sts.metadata.generation
                && status.updated_replicas.unwrap_or(0) >= spec_replicas
                && status.current_revision == status.update_revision
        });
        groups.insert(
            group,
            GroupObservation {
                group,
                shards: spec_replicas,
                rolled_out,
                ..GroupObservation::default()
            },
        );
    }
    for pod in pods {
        let Some(observation) = group_of(&pod.metadata.labels).and_then(|g| groups.get_mut(&g))
        else {
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if pod_ready(pod) {
            observation.ready_pods += 1;
        } else if let Some(reason) = failing_reason(pod) {
            let name = pod.metadata.name.clone().unwrap_or_default();
            observation.failing.push(format!("{name}: {reason}"));
        }
    }
    groups.into_values().collect()
}

/// What the router looks like, through its Deployment and its pods.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouterObservation {
    /// Router pods that are ready (and not terminating).
    pub ready_pods: i32,
    /// The Deployment controller has rolled the current template out to every pod, and no old
    /// pod is left.
    pub rolled_out: bool,
    /// Router pods that are failing rather than starting, with the reason.
    pub failing: Vec<String>,
}

/// The router as seen through its Deployment (`None` before it exists) and its pods.
pub fn observe_router(deployment: Option<&Deployment>, pods: &[Pod]) -> RouterObservation {
    let rolled_out = deployment.is_some_and(|deployment| {
        let wanted = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        deployment.status.as_ref().is_some_and(|status| {
            status.observed_generation >= deployment.metadata.generation
                && status.updated_replicas.unwrap_or(0) >= wanted
                && status.replicas.unwrap_or(0) == wanted
        })
    });
    let mut observation = RouterObservation {
        rolled_out,
        ..RouterObservation::default()
    };
    for pod in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        if pod_ready(pod) {
            observation.ready_pods += 1;
        } else if let Some(reason) = failing_reason(pod) {
            let name = pod.metadata.name.clone().unwrap_or_default();
            observation.failing.push(format!("{name}: {reason}"));
        }
    }
    observation
}

fn group_of(labels: &Option<BTreeMap<String, String>>) -> Option<i32> {
    labels.as_ref()?.get(LABEL_GROUP)?.parse().ok()
}

/// The worker group a pod belongs to, from its group label.
pub fn pod_group(pod: &Pod) -> Option<i32> {
    group_of(&pod.metadata.labels)
}

/// `IP:PORT` of a pod (`[IP]:PORT` for IPv6), once it has an IP.
pub fn pod_address(pod: &Pod, port: i32) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
    Some(if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    })
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// Why a pod that is not ready is failing rather than still starting.
fn failing_reason(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() == Some("Failed") {
        return Some("pod failed".to_owned());
    }
    for container in status.container_statuses.iter().flatten() {
        if let Some(reason) = container
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref())
            .filter(|r| STUCK_REASONS.contains(r))
        {
            return Some(reason.to_owned());
        }
        if container.restart_count > 0 {
            return Some(format!(
                "container {} restarted {} times",
                container.name, container.restart_count
            ));
        }
    }
    None
}

/// What the autoscaler decided in this reconcile.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscalingView {
    /// The groups that should serve: the desired ones (draining groups are not among them).
    pub serving: BTreeSet<i32>,
    pub status: AutoscalingStatus,
}

/// What the reconcile did this time.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every child was applied.
    Applied,
    /// `spec.paused`: nothing was applied.
    Paused,
    /// The spec cannot be built; nothing was applied.
    Invalid(InvalidSpec),
    /// An API call failed; the reconcile is retried.
    Failed {
        /// The condition's reason (`ReconcileFailed`, `ResourceConflict`).
        reason: &'static str,
        message: String,
    },
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// The status that the observations call for. `router` is what was seen of the router; it
/// counts only while `spec.router.replicas` > 0. `autoscaling` is what the autoscaler decided
/// in this reconcile (under `spec.autoscaling`, when it ran): its groups are the desired ones,
/// otherwise groups `0..spec.replicas` are.
pub fn compute(
    md: &ModelDeployment,
    groups: &[GroupObservation],
    router: &RouterObservation,
    outcome: &Outcome,
    capacity: Option<Capacity>,
    autoscaling: Option<&AutoscalingView>,
    now: &Time,
) -> ModelDeploymentStatus {
    let owner = Owner::of(md);
    let generation = md.metadata.generation;
    let autoscaled = md.spec.autoscaling.is_some();
    let wanted: BTreeSet<i32> = match autoscaling {
        Some(view) => view.serving.clone(),
        // Not evaluated (paused, invalid, failed): the groups there are.
        None if autoscaled => groups.iter().map(|g| g.group).collect(),
        None => (0..md.spec.replicas).collect(),
    };
    let desired = wanted.len() as i32;
    let shards = md.spec.expert_shards;
    let routers = md.router().replicas.max(0);
    let router = (routers > 0).then_some(router);
    let current: Vec<_> = groups
        .iter()
        .filter(|g| wanted.contains(&g.group))
        .collect();
    let draining = groups.len() - current.len();
    let redundant = has_redundancy(md);
    let ready = current
        .iter()
        .filter(|g| g.serving(shards, redundant))
        .count() as i32;
    let failing: Vec<String> = groups
        .iter()
        .flat_map(|g| g.failing.iter().cloned())
        .collect();
    let router_settled =
        router.is_none_or(|r| r.rolled_out && r.ready_pods >= routers && r.failing.is_empty());
    let settled = current.len() as i32 == desired
        && groups.len() as i32 == desired
        && ready == desired
        && current.iter().all(|g| g.rolled_out)
        && router_settled;
    let routers_ready =
        |r: &RouterObservation| format!("{}/{routers} router pods ready", r.ready_pods);

    let available = if desired == 0 {
        condition(
            AVAILABLE,
            false,
            "ScaledToZero",
            if autoscaled {
                "spec.autoscaling scaled to zero groups: the router holds requests, and the first one starts a group".to_owned()
            } else {
                "spec.replicas is 0".to_owned()
            },
            generation,
            now,
        )
    } else if ready > 0
        && let Some(r) = router.filter(|r| r.ready_pods == 0)
    {
        condition(
            AVAILABLE,
            false,
            "NoRouterReady",
            format!(
                "{ready}/{desired} serving groups ready, but {}: the client Service has no endpoint",
                routers_ready(r)
            ),
            generation,
            now,
        )
    } else if ready > 0 {
        let through = router.map_or(String::new(), |r| format!(", {}", routers_ready(r)));
        condition(
            AVAILABLE,
            true,
            "GroupsReady",
            format!("{ready}/{desired} serving groups have all {shards} shards ready{through}"),
            generation,
            now,
        )
    } else {
        condition(
            AVAILABLE,
            false,
            "NoGroupReady",
            format!("0/{desired} serving groups have all {shards} shards ready"),
            generation,
            now,
        )
    };

    let progressing = match outcome {
        Outcome::Paused => condition(
            PROGRESSING,
            false,
            "Paused",
            "spec.paused is set: children are left as they are".to_owned(),
            generation,
            now,
        ),
        Outcome::Invalid(err) => condition(
            PROGRESSING,
            false,
            err.reason,
            "the spec is invalid: see Degraded".to_owned(),
            generation,
            now,
        ),
        _ if settled => condition(
            PROGRESSING,
            false,
            "Complete",
            format!("{desired} serving groups ready and up to date"),
            generation,
            now,
        ),
        _ => {
            let rolling_out =
                current.iter().any(|g| !g.rolled_out) || router.is_some_and(|r| !r.rolled_out);
            let reason = if rolling_out {
                "RollingOut"
            } else if autoscaled && ready == desired && draining > 0 {
                "DrainingGroups"
            } else {
                "WaitingForShards"
            };
            let mut message = match router {
                Some(r) => format!(
                    "{ready}/{desired} serving groups ready, {}",
                    routers_ready(r)
                ),
                None => format!("{ready}/{desired} serving groups ready"),
            };
            if autoscaled && draining > 0 {
                message.push_str(&format!(
                    ", {draining} draining (no new requests; removed once idle)"
                ));
            }
            condition(PROGRESSING, true, reason, message, generation, now)
        }
    };

    let degraded = match outcome {
        Outcome::Invalid(err) => {
            condition(DEGRADED, true, err.reason, err.to_string(), generation, now)
        }
        Outcome::Failed { reason, message } => {
            condition(DEGRADED, true, reason, message.clone(), generation, now)
        }
        _ if !failing.is_empty() => condition(
            DEGRADED,
            true,
            "ShardsFailing",
            failing.join("; "),
            generation,
            now,
        ),
        _ if router.is_some_and(|r| !r.failing.is_empty()) => condition(
            DEGRADED,
            true,
            "RouterFailing",
            router.map(|r| r.failing.join("; ")).unwrap_or_default(),
            generation,
            now,
        ),
        _ => condition(
            DEGRADED,
            false,
            "AsExpected",
            "no failing shards".to_owned(),
            generation,
            now,
        ),
    };

    let router_ready = router.map(|r| {
        if r.ready_pods > 0 {
            condition(
                ROUTER_READY,
                true,
                "RouterPodsReady",
                routers_ready(r),
                generation,
                now,
            )
        } else if !r.failing.is_empty() {
            condition(
                ROUTER_READY,
                false,
                "RouterFailing",
                r.failing.join("; "),
                generation,
                now,
            )
        } else {
            condition(
                ROUTER_READY,
                false,
                "NoRouterReady",
                routers_ready(r),
                generation,
                now,
            )
        }
    });

    let previous = md.status.as_ref();
    let autoscaling_active = md.spec.autoscaling.as_ref().map(|spec| {
        let bounds = format!("between {} and {}", spec.min_replicas, spec.max_replicas);
        match autoscaling {
            Some(view) if view.status.desired_replicas == md.spec.replicas => condition(
                AUTOSCALING_ACTIVE,
                true,
                "ReplicasManaged",
                format!(
                    "spec.autoscaling owns the number of serving groups ({}, {bounds}); \
                     spec.replicas and the scale subresource are ignored",
                    view.status.desired_replicas
                ),
                generation,
                now,
            ),
            Some(view) => condition(
                AUTOSCALING_ACTIVE,
                true,
                "ManualScaleIgnored",
                format!(
                    "spec.replicas is {} but spec.autoscaling owns the number of serving groups \
                     ({}, {bounds}): kubectl scale and edits of spec.replicas are ignored; \
                     remove spec.autoscaling to scale by hand",
                    md.spec.replicas, view.status.desired_replicas
                ),
                generation,
                now,
            ),
            None => {
                let (reason, message) = match outcome {
                    Outcome::Paused => (
                        "Paused",
                        "spec.paused is set: the autoscaler changes nothing".to_owned(),
                    ),
                    Outcome::Invalid(err) => {
                        (err.reason, "the spec is invalid: see Degraded".to_owned())
                    }
                    Outcome::Failed { reason, .. } => (
                        *reason,
                        "the autoscaler could not run: see Degraded".to_owned(),
                    ),
                    Outcome::Applied => {
                        ("NotEvaluated", "the autoscaler has not run yet".to_owned())
                    }
                };
                condition(AUTOSCALING_ACTIVE, false, reason, message, generation, now)
            }
        }
    });
    let conditions = [available, progressing, degraded]
        .into_iter()
        .chain(router_ready)
        .chain(autoscaling_active)
        .map(|c| keep_transition_time(c, previous.map(|p| p.conditions.as_slice()).unwrap_or(&[])))
        .collect();

    ModelDeploymentStatus {
        observed_generation: generation,
        replicas: groups.len() as i32,
        ready_replicas: ready,
        selector: Some(owner.selector_string()),
        conditions,
        endpoint: Some(owner.endpoint(md.service().port.unwrap_or(DEFAULT_SERVICE_PORT))),
        openai_endpoint: Some(format!(
            "{}://{}/v1",
            if md.spec.tls.is_some() {
                "https"
            } else {
                "http"
            },
            owner.endpoint(HTTP_PORT)
        )),
        capacity,
        router: router.map(|r| RouterStatus {
            replicas: routers,
            ready_replicas: r.ready_pods,
        }),
        autoscaling: match autoscaling {
            Some(view) => Some(view.status.clone()),
            // Kept while the autoscaler does not run, so its last decision stays visible.
            None if autoscaled => previous.and_then(|p| p.autoscaling.clone()),
            None => None,
        },
        // Set by the placement stage's caller (`expert_placement`).
        expert_placement: None,
    }
}

/// A condition whose status did not change keeps its earlier `lastTransitionTime`.
fn keep_transition_time(mut new: Condition, previous: &[Condition]) -> Condition {
    if let Some(old) = previous.iter().find(|c| c.type_ == new.type_)
        && old.status == new.status
    {
        new.last_transition_time = old.last_transition_time.clone();
    }
    new
}

/// The condition of a type, if set.
pub fn find<'a>(status: &'a ModelDeploymentStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::demo;
    use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateWaiting, ContainerStatus, PodCondition, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    fn group(group: i32, ready_pods: i32) -> GroupObservation {
        GroupObservation {
            group,
            shards: 2,
            ready_pods,
            rolled_out: true,
            failing: vec![],
        }
    }

    /// One router pod, ready and up to date.
    fn serving_router() -> RouterObservation {
        RouterObservation {
            ready_pods: 1,
            rolled_out: true,
            failing: vec![],
        }
    }

    fn status_of<'a>(status: &'a ModelDeploymentStatus, type_: &str) -> (&'a str, &'a str) {
        let c = find(status, type_).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn a_group_is_ready_only_when_all_shards_are() {
        let md = demo();
        let status = compute(
            &md,
            &[group(0, 1)],
            &serving_router(),
            &Outcome::Applied,
            None,
            None,
            &at(1),
        );
        assert_eq!(status.ready_replicas, 0);
        assert_eq!(status_of(&status, AVAILABLE), ("False", "NoGroupReady"));
        assert_eq!(
            status_of(&status, PROGRESSING),
            ("True", "WaitingForShards")
        );
        let status = compute(
            &md,
            &[group(0, 2)],
            &serving_router(),
            &Outcome::Applied,
            None,
            None,
            &at(1),
        );
        assert_eq!(status.ready_replicas, 1);
        assert_eq!(status_of(&status, AVAILABLE), ("True", "GroupsReady"));
        assert_eq!(status_of(&status, PROGRESSING), ("False", "Complete"));
        assert_eq!(status_of(&status, DEGRADED), ("False", "AsExpected"));
        assert_eq!(status.endpoint.as_deref(), Some("demo.models.svc:50051"));
        assert_eq!(
            status.openai_endpoint.as_deref(),
            Some("http://demo.models.svc:8000/v1")
        );
        let mut with_tls = md.clone();
        with_tls.spec.tls = Some(crate::crd::TlsSpec {
            secret_name: "demo-cert".into(),
            client_auth: None,
        });
        let tls_status = compute(
            &with_tls,
            &[group(0, 2)],
            &serving_router(),
            &Outcome::Applied,
            None,
            None,
            &at(1),
        );
        assert_eq!(
            tls_status.openai_endpoint.as_deref(),
            Some("https://demo.models.svc:8000/v1")
        );
        // host:port, as gRPC clients take it; TLS is the client's choice of channel.
        assert_eq!(tls_status.endpoint, status.endpoint);
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(
            status.selector.as_deref(),
            Some(
                "app.kubernetes.io/component=worker,app.kubernetes.io/instance=demo,app.kubernetes.io/name=latentserve-worker"
            )
        );
    }

    #[test]
    fn transition_times_move_only_when_the_status_changes() {
        let mut md = demo();
        let first = compute(
            &md,
            &[group(0, 2)],
            &serving_router(),
            &Outcome::Applied,
            None,
            None,
            &at(100),
        );
        md.status = Some(first.clone());
        let same = compute(
            &md,
            &[group(0, 2)],
            &serving_router(),
            &Outcome::Applied,
            None,
            None,
            &at(200),
        );
        assert_eq!(same, first, "a repeated observation changes nothing");
        let lost = compute(
            &md,
            &[group(0, 1)],
            &serving_router(),
            &Outcome::Applied,
            None,
            None,
            &at(300),
        );
        assert_eq!(
            find(&lost, AVAILABLE).unwrap().last_transition_time,
            at(300)
        );
        assert_eq!(find(&lost, DEGRADED).unwrap().last_transition_time, at(100));
    }

    #[test]
    fn invalid_specs_degrade_with_the_field_named() {
        let md = demo();
        let err = InvalidSpec {
            reason: crate::validate::INVALID_SPEC,
            field: "spec.serving.kvCacheMemory".into(),
            message: "bad".into(),
        };
        let status = compute(
            &md,
            &[],
            &serving_router(),
            &Outcome::Invalid(err),
            None,
            None,
            &at(1),
        );
        let degraded = find(&status, DEGRADED).unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert!(degraded.message.contains("spec.serving.kvCacheMemory"));
        assert_eq!(status_of(&status, PROGRESSING), ("False", "InvalidSpec"));
    }

    #[test]
    fn paused_and_scaled_to_zero_say_so() {
        let mut md = demo();
        let status = compute(
            &md,
            &[group(0, 2)],
            &serving_router(),
            &Outcome::Paused,
            None,
            None,
            &at(1),
        );
        assert_eq!(status_of(&status, PROGRESSING), ("False", "Paused"));
        assert_eq!(status_of(&status, AVAILABLE), ("True", "GroupsReady"));
        md.spec.replicas = 0;
        let status = compute(
            &md,
            &[],
            &serving_router(),
            &Outcome::Applied,
            None,
            None,
            &at(1),
        );
        assert_eq!(status_of(&status, AVAILABLE), ("False", "ScaledToZero"));
    }

    #[test]
    fn groups_beyond_replicas_do_not_count_as_ready() {
        let md = demo();
        let status = compute(
            &md,
            &[group(0, 2), group(1, 2)],
            &serving_router(),
            &Outcome::Applied,
            None,
            None,
            &at(1),
        );
        assert_eq!(status.ready_replicas, 1);
        assert_eq!(status.replicas, 2);
        assert_eq!(status_of(&status, PROGRESSING).0, "True");
    }

    #[test]
    fn available_needs_a_ready_router_while_it_is_on() {
        let mut md = demo();
        let starting = RouterObservation::default();
        let status = compute(
            &md,
            &[group(0, 2)],
            &starting,
            &Outcome::Applied,
            None,
            None,
            &at(1),
        );
        assert_eq!(status_of(&status, AVAILABLE), ("False", "NoRouterReady"));
        assert_eq!(status_of(&status, ROUTER_READY), ("False", "NoRouterReady"));
        assert_eq!(status_of(&status, PROGRESSING), ("True", "RollingOut"));
        assert_eq!(
            status.router,
            Some(RouterStatus {
                replicas: 1,
                ready_replicas: 0
            })
        );

        let status = compute(
            &md,
            &[group(0, 2)],
            &serving_router(),
            &Outcome::Applied,
            None,
            None,
            &at(1),
        );
        assert_eq!(status_of(&status, AVAILABLE), ("True", "GroupsReady"));
        assert!(
            find(&status, AVAILABLE)
                .unwrap()
                .message
                .contains("1/1 router pods ready")
        );
        assert_eq!(
            status_of(&status, ROUTER_READY),
            ("True", "RouterPodsReady")
        );
        assert_eq!(status_of(&status, PROGRESSING), ("False", "Complete"));

        let crashing = RouterObservation {
            failing: vec!["demo-router-abc: CrashLoopBackOff".into()],
            ..RouterObservation::default()
        };
        let status = compute(
            &md,
            &[group(0, 2)],
            &crashing,
            &Outcome::Applied,
            None,
            None,
            &at(1),
        );
        assert_eq!(status_of(&status, DEGRADED), ("True", "RouterFailing"));
        assert_eq!(status_of(&status, ROUTER_READY), ("False", "RouterFailing"));

        // Off: the workers serve the clients, and the router is not mentioned.
        md.spec.router = Some(crate::crd::RouterSpec {
            replicas: 0,
            ..crate::crd::RouterSpec::default()
        });
        let status = compute(
            &md,
            &[group(0, 2)],
            &starting,
            &Outcome::Applied,
            None,
            None,
            &at(1),
        );
        assert_eq!(status_of(&status, AVAILABLE), ("True", "GroupsReady"));
        assert_eq!(status_of(&status, PROGRESSING), ("False", "Complete"));
        assert!(find(&status, ROUTER_READY).is_none());
        assert_eq!(status.router, None);
    }

    fn autoscaled(replicas: i32) -> ModelDeployment {
        let mut md = demo();
        md.spec.replicas = replicas;
        md.spec.autoscaling = Some(
            serde_json::from_value(serde_json::json!({
                "minReplicas": 0,
                "maxReplicas": 4,
                "target": {"metric": "InFlightRequests", "value": 4},
            }))
            .unwrap(),
        );
        md
    }

    fn view(serving: &[i32], desired: i32) -> AutoscalingView {
        AutoscalingView {
            serving: serving.iter().copied().collect(),
            status: AutoscalingStatus {
                current_replicas: serving.len() as i32,
                desired_replicas: desired,
                target: 4.0,
                ..AutoscalingStatus::default()
            },
        }
    }

    #[test]
    fn under_autoscaling_the_autoscalers_groups_are_the_desired_ones() {
        let md = autoscaled(1);
        // Groups 0 and 2 serve, 1 drains.
        let groups = [group(0, 2), group(1, 2), group(2, 2)];
        let decided = view(&[0, 2], 2);
        let status = compute(
            &md,
            &groups,
            &serving_router(),
            &Outcome::Applied,
            None,
            Some(&decided),
            &at(1),
        );
        assert_eq!(status.ready_replicas, 2);
        assert_eq!(status.replicas, 3, "the draining group still exists");
        assert_eq!(status_of(&status, PROGRESSING), ("True", "DrainingGroups"));
        assert_eq!(status_of(&status, AVAILABLE), ("True", "GroupsReady"));
        assert_eq!(
            status_of(&status, AUTOSCALING_ACTIVE),
            ("True", "ManualScaleIgnored")
        );
        let message = &find(&status, AUTOSCALING_ACTIVE).unwrap().message;
        assert!(message.contains("remove spec.autoscaling"), "{message}");
        assert_eq!(status.autoscaling, Some(decided.status.clone()));

        let md = autoscaled(2);
        let status = compute(
            &md,
            &[group(0, 2), group(2, 2)],
            &serving_router(),
            &Outcome::Applied,
            None,
            Some(&decided),
            &at(1),
        );
        assert_eq!(
            status_of(&status, AUTOSCALING_ACTIVE),
            ("True", "ReplicasManaged")
        );
        assert_eq!(status_of(&status, PROGRESSING), ("False", "Complete"));

        let zero = view(&[], 0);
        let status = compute(
            &md,
            &[],
            &serving_router(),
            &Outcome::Applied,
            None,
            Some(&zero),
            &at(1),
        );
        assert_eq!(status_of(&status, AVAILABLE), ("False", "ScaledToZero"));
        assert!(
            find(&status, AVAILABLE)
                .unwrap()
                .message
                .contains("the router holds requests")
        );
    }

    #[test]
    fn a_paused_autoscaler_says_so_and_keeps_its_last_decision() {
        let mut md = autoscaled(1);
        let decided = view(&[0], 1);
        md.status = Some(ModelDeploymentStatus {
            autoscaling: Some(decided.status.clone()),
            ..ModelDeploymentStatus::default()
        });
        let status = compute(
            &md,
            &[group(0, 2)],
            &serving_router(),
            &Outcome::Paused,
            None,
            None,
            &at(1),
        );
        assert_eq!(status_of(&status, AUTOSCALING_ACTIVE), ("False", "Paused"));
        assert_eq!(status.autoscaling, Some(decided.status));
        assert_eq!(status_of(&status, PROGRESSING), ("False", "Paused"));

        // Without spec.autoscaling: neither the condition nor the field.
        let status = compute(
            &demo(),
            &[group(0, 2)],
            &serving_router(),
            &Outcome::Applied,
            None,
            None,
            &at(1),
        );
        assert!(find(&status, AUTOSCALING_ACTIVE).is_none());
        assert_eq!(status.autoscaling, None);
    }

    #[test]
    fn the_router_is_observed_through_its_deployment_and_pods() {
        use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
        let deployment = |updated: i32, replicas: i32| Deployment {
            metadata: ObjectMeta {
                generation: Some(4),
                ..ObjectMeta::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(4),
                updated_replicas: Some(updated),
                replicas: Some(replicas),
                ..DeploymentStatus::default()
            }),
        };
        let pods = [
            pod("demo-router-a", 0, true, None),
            pod("demo-router-b", 0, false, Some("ImagePullBackOff")),
        ];
        let seen = observe_router(Some(&deployment(2, 2)), &pods);
        assert_eq!(seen.ready_pods, 1);
        assert!(seen.rolled_out);
        assert_eq!(seen.failing, ["demo-router-b: ImagePullBackOff"]);
        assert!(
            !observe_router(Some(&deployment(2, 3)), &pods).rolled_out,
            "an old pod is still there"
        );
        assert!(!observe_router(None, &[]).rolled_out);
    }

    fn sts(group: i32, rolled_out: bool) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                generation: Some(2),
                labels: Some([(LABEL_GROUP.to_owned(), group.to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(StatefulSetSpec {
                replicas: Some(2),
                ..StatefulSetSpec::default()
            }),
            status: Some(StatefulSetStatus {
                observed_generation: Some(2),
                replicas: 2,
                updated_replicas: Some(2),
                current_revision: Some("a".into()),
                update_revision: Some(if rolled_out { "a" } else { "b" }.into()),
                ..StatefulSetStatus::default()
            }),
        }
    }

    fn pod(name: &str, group: i32, ready: bool, waiting: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([(LABEL_GROUP.to_owned(), group.to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                container_statuses: Some(vec![ContainerStatus {
                    name: "worker".into(),
                    state: waiting.map(|reason| ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some(reason.into()),
                            message: None,
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn observations_come_from_statefulsets_and_pods() {
        let groups = observe_groups(
            &[sts(0, true), sts(1, false)],
            &[
                pod("demo-0-0", 0, true, None),
                pod("demo-0-1", 0, true, None),
                pod("demo-1-0", 1, false, Some("CrashLoopBackOff")),
                pod("demo-1-1", 1, false, Some("ContainerCreating")),
            ],
        );
        assert_eq!(groups.len(), 2);
        assert!(groups[0].ready(2) && groups[0].rolled_out);
        assert!(!groups[1].ready(2) && !groups[1].rolled_out);
        assert_eq!(groups[1].failing, ["demo-1-0: CrashLoopBackOff"]);
        let mut md = demo();
        md.spec.replicas = 2;
        let status = compute(
            &md,
            &groups,
            &serving_router(),
            &Outcome::Applied,
            None,
            None,
            &at(1),
        );
        assert_eq!(status_of(&status, DEGRADED), ("True", "ShardsFailing"));
        assert_eq!(status_of(&status, PROGRESSING), ("True", "RollingOut"));
    }
}
