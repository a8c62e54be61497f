//! The reconciler: validate -> build (pure) -> server-side apply under one field manager ->
//! delete serving groups beyond `replicas` -> status. Every write is skipped when it would change
//! nothing, so a steady state makes no writes at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PropagationPolicy,
};
use kube::core::{ApiResource, DeserializeGuard, GroupVersionKind};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::capacity::{ModelInfoSource, capacity_from};
use crate::crd::{Capacity, ModelDeployment};
use crate::discovery::PdbApi;
use crate::metrics::Metrics;
use crate::resources::{
    self, BuildContext, FIELD_MANAGER, GRPC_PORT, LABEL_GROUP, LABEL_INSTANCE, LABEL_MANAGED_BY,
    MANAGED_BY, Owner,
};
use crate::status::{self, AVAILABLE, DEGRADED, GroupObservation, Outcome};
use crate::validate::validate;

/// How long a healthy ModelDeployment waits before it is looked at again without any event.
const RESYNC: Duration = Duration::from_secs(300);
/// Retry delays after failures: doubled per consecutive failure, up to the maximum.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(120);

/// A reconcile failure, categorized for the error metric and the Event reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting {kind} {name}: {source}")]
    Delete {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing {what}: {source}")]
    List {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
    #[error("the object does not match the CRD schema: {0}")]
    Malformed(String),
}

impl Error {
    /// The `reason` label of `latentserve_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Delete { .. } => "delete",
            Error::List { .. } => "list",
            Error::Status(_) => "status",
            Error::Malformed(_) => "malformed",
        }
    }
}

/// Everything a reconcile needs besides the object.
pub struct Context {
    pub client: Client,
    pub build: BuildContext,
    pub metrics: Arc<Metrics>,
    pub recorder: Option<Recorder>,
    pub model_info: Arc<dyn ModelInfoSource>,
    /// Consecutive failures per object, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        build: BuildContext,
        metrics: Arc<Metrics>,
        model_info: Arc<dyn ModelInfoSource>,
    ) -> Self {
        let recorder = build.features.events_v1.then(|| {
            Recorder::new(
                client.clone(),
                Reporter {
                    controller: FIELD_MANAGER.into(),
                    instance: std::env::var("POD_NAME").ok(),
                },
            )
        });
        Self {
            client,
            build,
            metrics,
            recorder,
            model_info,
            failures: Mutex::new(HashMap::new()),
        }
    }

    async fn publish(
        &self,
        md: &ModelDeployment,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&event, &md.object_ref(&())).await {
            tracing::warn!(error = %err, reason, "cannot publish event");
        }
    }
}

fn key(md: &ModelDeployment) -> String {
    format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any())
}

fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Runs the controller until shutdown: ModelDeployments in `namespace` (all when `None`), the
/// objects they own and their pods.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let ours = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"));
    let deployments: Api<DeserializeGuard<ModelDeployment>> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    Controller::new(deployments, watcher::Config::default().any_semantic())
        .owns(api::<StatefulSet>(&client, &namespace), ours.clone())
        .owns(api::<Service>(&client, &namespace), ours.clone())
        .owns(api::<ConfigMap>(&client, &namespace), ours.clone())
        .watches(api::<Pod>(&client, &namespace), ours, |pod: Pod| {
            let namespace = pod.namespace();
            pod.labels()
                .get(LABEL_INSTANCE)
                .map(|name| ObjectRef::new(name).within(namespace.as_deref().unwrap_or_default()))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "controller event");
            }
        })
        .await;
}

/// One reconcile of one ModelDeployment, with its metrics.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<ModelDeployment>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = match &guard.0 {
        Ok(md) => reconcile_valid(md, &ctx).await,
        Err(invalid) => {
            let name = invalid.metadata.name.clone().unwrap_or_default();
            tracing::warn!(name, error = %invalid.error, "malformed ModelDeployment");
            Err(Error::Malformed(invalid.error.clone()))
        }
    };
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.with_label_values(&[label]).inc();
    ctx.metrics
        .reconcile_duration
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok()
        && let Ok(md) = &guard.0
    {
        ctx.failures
            .lock()
            .expect("failure map is never poisoned")
            .remove(&key(md));
    }
    result
}

/// Retries with backoff per object; a malformed object waits for a change.
pub fn error_policy(
    guard: Arc<DeserializeGuard<ModelDeployment>>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[err.metric_label()])
        .inc();
    let Ok(md) = &guard.0 else {
        return Action::await_change();
    };
    tracing::warn!(deployment = key(md), error = %err, "reconcile failed");
    let attempt = {
        let mut failures = ctx.failures.lock().expect("failure map is never poisoned");
        let count = failures.entry(key(md)).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    Action::requeue(backoff(attempt))
}

/// The delay before retry `attempt` (1-based).
pub fn backoff(attempt: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_MAX)
}

async fn reconcile_valid(md: &ModelDeployment, ctx: &Context) -> Result<Action, Error> {
    if md.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the children through their owner references.
        ctx.metrics.set_conditions(&key(md), None);
        return Ok(Action::await_change());
    }
    let namespace = md.namespace().unwrap_or_default();
    let owner = Owner::of(md);
    let statefulsets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = format!(
        "{LABEL_INSTANCE}={},{LABEL_MANAGED_BY}={MANAGED_BY}",
        owner.name
    );
    let existing = statefulsets
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::List {
            what: "StatefulSets",
            source,
        })?
        .items;
    let existing: Vec<StatefulSet> = existing.into_iter().filter(|s| owned_by(s, md)).collect();

    let (outcome, groups) = match validate(md, &ctx.build.features) {
        Err(invalid) => (Outcome::Invalid(invalid), existing),
        Ok(()) if md.spec.paused => (Outcome::Paused, existing),
        Ok(()) => match apply_and_prune(md, ctx, &existing).await {
            Ok(groups) => (Outcome::Applied, groups),
            Err(err) => {
                let outcome = Outcome::Failed(err.to_string());
                // The status tells users about the failure; the retry comes from the error policy.
                if let Err(status_err) = write_status(md, ctx, &existing, &outcome).await {
                    tracing::warn!(error = %status_err, "cannot record the failure in the status");
                }
                ctx.publish(
                    md,
                    EventType::Warning,
                    "ReconcileFailed",
                    "Reconcile",
                    err.to_string(),
                )
                .await;
                return Err(err);
            }
        },
    };
    write_status(md, ctx, &groups, &outcome).await?;
    Ok(Action::requeue(RESYNC))
}

fn owned_by<K: Resource>(child: &K, md: &ModelDeployment) -> bool {
    let uid = md.metadata.uid.as_deref();
    child
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|r| Some(r.uid.as_str()) == uid)
}

fn group_label(sts: &StatefulSet) -> Option<i32> {
    sts.labels().get(LABEL_GROUP)?.parse().ok()
}

/// Applies every desired child and deletes the groups beyond `replicas`; returns the StatefulSets
/// of the current groups as the API server answered the applies.
async fn apply_and_prune(
    md: &ModelDeployment,
    ctx: &Context,
    existing: &[StatefulSet],
) -> Result<Vec<StatefulSet>, Error> {
    let namespace = md.namespace().unwrap_or_default();
    let desired = resources::build_all(md, &ctx.build);
    let mut groups = Vec::new();
    for object in &desired {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &namespace, &object.api);
        let applied = api
            .patch(&object.name, &params(), &Patch::Apply(&object.body))
            .await
            .map_err(|source| Error::Apply {
                kind: object.kind().to_owned(),
                name: object.name.clone(),
                source,
            })?;
        if object.kind() == "StatefulSet" {
            let sts: StatefulSet = serde_json::to_value(&applied)
                .and_then(serde_json::from_value)
                .map_err(|e| Error::Apply {
                    kind: "StatefulSet".into(),
                    name: object.name.clone(),
                    source: kube::Error::SerdeError(e),
                })?;
            groups.push(sts);
        }
    }

    let before = existing.iter().filter(|s| group_label(s).is_some()).count() as i32;
    let desired_groups = md.spec.replicas;
    let extra: Vec<_> = existing
        .iter()
        .filter(|s| group_label(s).is_some_and(|g| g >= desired_groups))
        .collect();
    for sts in &extra {
        delete_group(md, ctx, sts).await?;
    }
    if before == 0 && md.status.is_none() {
        let note = format!(
            "created {desired_groups} serving groups of {} shards",
            md.spec.expert_shards
        );
        ctx.publish(md, EventType::Normal, "Created", "Create", note)
            .await;
    } else if before != desired_groups {
        let note = format!("scaled from {before} to {desired_groups} serving groups");
        ctx.publish(md, EventType::Normal, "Scaled", "Scale", note)
            .await;
    }
    if let Some(status) = &md.status
        && status.observed_generation.is_some()
        && status.observed_generation != md.metadata.generation
        && before == desired_groups
    {
        let note = format!(
            "rolling out generation {} to {desired_groups} serving groups",
            md.metadata.generation.unwrap_or_default()
        );
        ctx.publish(md, EventType::Normal, "RollingOut", "Update", note)
            .await;
    }
    Ok(groups)
}

/// Deletes a group beyond `replicas`: its StatefulSet (pods go with it) and its budget.
async fn delete_group(md: &ModelDeployment, ctx: &Context, sts: &StatefulSet) -> Result<(), Error> {
    let namespace = md.namespace().unwrap_or_default();
    let name = sts.name_any();
    let foreground = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    let statefulsets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
    ignore_not_found(statefulsets.delete(&name, &foreground).await).map_err(|source| {
        Error::Delete {
            kind: "StatefulSet".into(),
            name: name.clone(),
            source,
        }
    })?;
    let pdb_version = match ctx.build.features.pdb {
        PdbApi::V1 => Some("v1"),
        PdbApi::V1beta1 => Some("v1beta1"),
        PdbApi::None => None,
    };
    if let Some(version) = pdb_version {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("policy", version, "PodDisruptionBudget"),
            "poddisruptionbudgets",
        );
        let budgets: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &namespace, &resource);
        ignore_not_found(budgets.delete(&name, &foreground).await).map_err(|source| {
            Error::Delete {
                kind: "PodDisruptionBudget".into(),
                name: name.clone(),
                source,
            }
        })?;
    }
    tracing::info!(
        deployment = key(md),
        group = name,
        "deleted serving group beyond replicas"
    );
    Ok(())
}

fn ignore_not_found<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}

/// Observes pods, computes the status and writes it when it differs from the stored one.
async fn write_status(
    md: &ModelDeployment,
    ctx: &Context,
    stateful_sets: &[StatefulSet],
    outcome: &Outcome,
) -> Result<(), Error> {
    let namespace = md.namespace().unwrap_or_default();
    let owner = Owner::of(md);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pods = pods
        .list(&ListParams::default().labels(&owner.selector_string()))
        .await
        .map_err(|source| Error::List {
            what: "Pods",
            source,
        })?
        .items;
    let groups = status::observe_groups(stateful_sets, &pods);
    let capacity = capacity(md, ctx, &groups, &pods).await;
    let now =
        Time(Timestamp::from_second(Timestamp::now().as_second()).expect("the clock is in range"));
    let new = status::compute(md, &groups, outcome, capacity, &now);
    ctx.metrics.set_conditions(&key(md), Some(&new));
    if md.status.as_ref() == Some(&new) {
        return Ok(());
    }
    announce_transitions(md, ctx, &new).await;
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let body = json!({
        "apiVersion": ModelDeployment::api_version(&()),
        "kind": ModelDeployment::kind(&()),
        "status": new,
    });
    api.patch_status(&md.name_any(), &params(), &Patch::Apply(&body))
        .await
        .map_err(Error::Status)?;
    Ok(())
}

/// Events for the condition changes users care about.
async fn announce_transitions(
    md: &ModelDeployment,
    ctx: &Context,
    new: &crate::crd::ModelDeploymentStatus,
) {
    let old = md.status.clone().unwrap_or_default();
    let changed = |type_: &str| {
        let before = status::find(&old, type_).map(|c| (c.status.clone(), c.reason.clone()));
        let after = status::find(new, type_).map(|c| (c.status.clone(), c.reason.clone()));
        (before != after)
            .then(|| status::find(new, type_).cloned())
            .flatten()
    };
    if let Some(c) = changed(DEGRADED)
        && c.status == "True"
    {
        ctx.publish(md, EventType::Warning, &c.reason, "Reconcile", c.message)
            .await;
    }
    if let Some(c) = changed(AVAILABLE) {
        let (type_, reason) = if c.status == "True" {
            (EventType::Normal, "Available")
        } else {
            (EventType::Warning, "Unavailable")
        };
        ctx.publish(md, type_, reason, "Reconcile", c.message).await;
    }
}

/// Capacity figures: kept while the generation is unchanged, otherwise asked from a ready pod.
async fn capacity(
    md: &ModelDeployment,
    ctx: &Context,
    groups: &[GroupObservation],
    pods: &[Pod],
) -> Option<Capacity> {
    if let Some(status) = &md.status
        && status.observed_generation == md.metadata.generation
        && status.capacity.is_some()
    {
        return status.capacity.clone();
    }
    if !groups.iter().any(|g| g.ready(md.spec.expert_shards)) {
        return None;
    }
    let pod = pods.iter().find(|p| status::pod_ready(p))?;
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
    let address = if ip.contains(':') {
        format!("[{ip}]:{GRPC_PORT}")
    } else {
        format!("{ip}:{GRPC_PORT}")
    };
    match ctx.model_info.model_info(&address).await {
        Ok(info) => Some(capacity_from(
            &info,
            md.serving().max_seq_len,
            &pod.name_any(),
        )),
        Err(err) => {
            tracing::info!(deployment = key(md), error = %err, "no capacity figures yet");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), BACKOFF_MAX);
    }

    #[test]
    fn error_labels_are_short_and_distinct() {
        let labels = [
            Error::Malformed("x".into()).metric_label(),
            Error::Status(kube::Error::LinesCodecMaxLineLengthExceeded).metric_label(),
        ];
        assert_eq!(labels, ["malformed", "status"]);
    }
}
