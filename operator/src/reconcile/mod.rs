//! The reconciler, one module per stage:
//!
//! validate ([`crate::validate`]) -> autoscale ([`autoscale`], under `spec.autoscaling`: which
//! groups) -> build the desired objects ([`crate::resources`]) -> apply ([`apply`]) -> prune
//! ([`prune`]) -> update status ([`update_status`]).
//!
//! Validate and build are pure; the stages here do the I/O. Every write is skipped when it
//! would change nothing, so a steady state makes no writes at all. This module wires the stages
//! into the controller, with its metrics, Events ([`events`]) and retry backoff.

pub mod apply;
pub mod autoscale;
mod error;
pub mod events;
pub mod experts_token;
pub mod placement;
pub mod prune;
pub mod update_status;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{Api, ListParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::instrument;

pub use self::error::Error;
use crate::autoscaling::fetch::{HttpReports, ReportSource};
use crate::capacity::ModelInfoSource;
use crate::crd::ModelDeployment;
use crate::metrics::Metrics;
use crate::placement::fetch::{HttpLoads, LoadSource};
use crate::resources::{
    self, BuildContext, FIELD_MANAGER, LABEL_GROUP, LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY,
    Owner,
};
use crate::status::{AutoscalingView, Outcome};
use crate::validate::{ValidatedSpec, check_allowed, validate};

/// How long a healthy ModelDeployment waits before it is looked at again without any event.
const RESYNC: Duration = Duration::from_secs(300);
/// Retry delays after failures: doubled per consecutive failure, up to the maximum.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(120);

/// Everything a reconcile needs besides the object.
pub struct Context {
    pub client: Client,
    pub build: BuildContext,
    pub metrics: Arc<Metrics>,
    pub recorder: Option<Recorder>,
    pub model_info: Arc<dyn ModelInfoSource>,
    /// The routers' autoscaling reports.
    pub reports: Arc<dyn ReportSource>,
    /// How often the autoscaler looks at an object under `spec.autoscaling`.
    pub autoscale_interval: Duration,
    /// Consecutive failures per object, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The autoscaler's memory per object (`namespace/name`).
    autoscalers: Mutex<HashMap<String, autoscale::Memory>>,
    /// Where the placement stage reads the workers' expert counters.
    pub loads: Arc<dyn LoadSource>,
    /// The placement stage's measurement windows per object.
    placements: Mutex<HashMap<String, placement::Memory>>,
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
            reports: Arc::new(HttpReports::default()),
            autoscale_interval: autoscale::DEFAULT_INTERVAL,
            failures: Mutex::new(HashMap::new()),
            autoscalers: Mutex::new(HashMap::new()),
            loads: Arc::new(HttpLoads::default()),
            placements: Mutex::new(HashMap::new()),
        }
    }

    /// Where the placement stage reads the workers' expert counters (tests answer themselves).
    pub fn with_loads(mut self, loads: Arc<dyn LoadSource>) -> Self {
        self.loads = loads;
        self
    }

    /// The autoscaler's pass interval and where it reads the routers' reports.
    pub fn with_autoscaler(mut self, interval: Duration, reports: Arc<dyn ReportSource>) -> Self {
        self.autoscale_interval = interval;
        self.reports = reports;
        self
    }
}

/// The pods in `namespace` that match the label `selector` (the workers' or the routers').
pub(crate) async fn list_pods(
    ctx: &Context,
    namespace: &str,
    selector: &str,
) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(pods
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|source| Error::List {
            what: "Pods",
            source,
        })?
        .items)
}

/// `namespace/name`: the key of the per-object metrics and backoff.
fn key(md: &ModelDeployment) -> String {
    format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any())
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
        // The router's rollout and readiness feed the status.
        .owns(api::<Deployment>(&client, &namespace), ours.clone())
        .owns(api::<Service>(&client, &namespace), ours.clone())
        .owns(api::<ConfigMap>(&client, &namespace), ours.clone())
        // A deleted token Secret is made again (with a new token) at once.
        .owns(api::<Secret>(&client, &namespace), ours.clone())
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
#[instrument(skip_all, fields(
    namespace = guard.meta().namespace.as_deref().unwrap_or_default(),
    name = guard.meta().name.as_deref().unwrap_or_default(),
))]
pub async fn reconcile(
    guard: Arc<DeserializeGuard<ModelDeployment>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = match &guard.0 {
        Ok(md) => reconcile_valid(md, &ctx).await,
        Err(invalid) => {
            tracing::warn!(error = %invalid.error, "malformed ModelDeployment");
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

/// The pipeline. Invalid and paused specs skip autoscale, apply and prune, and only report
/// status.
async fn reconcile_valid(md: &ModelDeployment, ctx: &Context) -> Result<Action, Error> {
    if md.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the children through their owner references.
        ctx.metrics.set_conditions(&key(md), None);
        autoscale::forget(md, ctx);
        placement::forget(md, ctx);
        return Ok(Action::await_change());
    }
    if md.spec.autoscaling.is_none() {
        autoscale::forget(md, ctx);
    }
    let existing = existing_groups(md, ctx).await?;
    let checked = validate(md, &ctx.build.features)
        .and_then(|spec| check_allowed(&spec, &ctx.build.policy).map(|()| spec));
    let mut view = None;
    let mut placement_view = None;
    let mut next_pass = RESYNC;
    let (outcome, groups) = match checked {
        Err(invalid) => (Outcome::Invalid(invalid), existing),
        Ok(_) if md.spec.paused => (Outcome::Paused, existing),
        Ok(spec) => {
            let spec = match spec.autoscaling() {
                Some(settings) => {
                    match autoscale::autoscale(&spec, settings, ctx, &existing).await {
                        Ok(autoscaled) => {
                            view = Some(autoscaled.view);
                            next_pass = autoscaled.next_pass;
                            spec.with_groups(autoscaled.serving, autoscaled.draining)
                        }
                        Err(err) => return failed(md, ctx, &existing, None, err).await,
                    }
                }
                None => spec,
            };
            let spec = match placement::place(&spec, ctx, &existing).await {
                Ok(placed) => {
                    placement_view = placed.view;
                    if let Some(pass) = placed.next_pass {
                        next_pass = next_pass.min(pass);
                    }
                    spec.with_placement(placed.plan)
                }
                Err(err) => return failed(md, ctx, &existing, view.as_ref(), err).await,
            };
            match apply_and_prune(&spec, ctx, &existing).await {
                Ok(groups) => (Outcome::Applied, groups),
                Err(err) => return failed(md, ctx, &existing, view.as_ref(), err).await,
            }
        }
    };
    update_status::update_status(
        md,
        ctx,
        &groups,
        &outcome,
        view.as_ref(),
        placement_view.as_ref(),
    )
    .await?;
    // Under autoscaling the next pass comes at the autoscaler's interval, events or not.
    Ok(Action::requeue(next_pass))
}

/// Records a failed reconcile in the status and an Event, and returns the error: the retry
/// comes from the error policy.
async fn failed(
    md: &ModelDeployment,
    ctx: &Context,
    existing: &[StatefulSet],
    view: Option<&AutoscalingView>,
    err: Error,
) -> Result<Action, Error> {
    let outcome = Outcome::Failed {
        reason: err.reason(),
        message: err.to_string(),
    };
    if let Err(status_err) =
        update_status::update_status(md, ctx, existing, &outcome, view, None).await
    {
        tracing::warn!(error = %status_err, "cannot record the failure in the status");
    }
    events::reconcile_failed(md, ctx, &err).await;
    Err(err)
}

/// Build -> experts token -> apply -> prune, then the Events that describe what changed. Returns the
/// StatefulSets of the current groups as the API server answered the applies.
async fn apply_and_prune(
    spec: &ValidatedSpec<'_>,
    ctx: &Context,
    existing: &[StatefulSet],
) -> Result<Vec<StatefulSet>, Error> {
    let desired = resources::build_all(spec, &ctx.build);
    apply::refuse_adoption(spec.owner(), ctx, &desired).await?;
    // Before the pods that mount it.
    experts_token::ensure(spec, ctx).await?;
    let groups = apply::apply(spec.owner(), ctx, &desired).await?;
    prune::prune(spec.owner(), ctx, &desired).await?;
    let before = existing.iter().filter(|s| group_of(s).is_some()).count() as i32;
    let after = spec.plan().groups().count() as i32;
    events::announce_changes(spec.model_deployment(), ctx, before, after).await;
    Ok(groups)
}

/// The serving groups as they are before this reconcile writes anything: what the status
/// reports when nothing is applied, and what the Events compare with.
async fn existing_groups(md: &ModelDeployment, ctx: &Context) -> Result<Vec<StatefulSet>, Error> {
    let owner = Owner::of(md);
    let statefulsets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let existing = statefulsets
        .list(&ListParams::default().labels(&owner.children_selector()))
        .await
        .map_err(|source| Error::List {
            what: "StatefulSets",
            source,
        })?
        .items;
    Ok(existing
        .into_iter()
        .filter(|s| owner.owns(&s.metadata))
        .collect())
}

pub(crate) fn group_of(sts: &StatefulSet) -> Option<i32> {
    sts.labels().get(LABEL_GROUP)?.parse().ok()
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), BACKOFF_MAX);
    }
}
