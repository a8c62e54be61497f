//! Events about a ModelDeployment (events.k8s.io/v1, where the cluster serves it): what a
//! reconcile created, scaled or rolled out, condition changes users care about, and failures.

use kube::Resource;
use kube::runtime::events::{Event, EventType};

use super::{Context, Error};
use crate::crd::{ModelDeployment, ModelDeploymentStatus};
use crate::status::{self, AVAILABLE, DEGRADED};

pub(super) async fn publish(
    md: &ModelDeployment,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let Some(recorder) = &ctx.recorder else {
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

/// `ReconcileFailed` (or `ResourceConflict`), with the error.
pub async fn reconcile_failed(md: &ModelDeployment, ctx: &Context, err: &Error) {
    publish(
        md,
        ctx,
        EventType::Warning,
        err.reason(),
        "Reconcile",
        err.to_string(),
    )
    .await;
}

/// `Created`, `Scaled` or `RollingOut` after an apply, from the number of serving groups
/// (StatefulSets) that existed before it and that it applied. Under `spec.autoscaling` the
/// autoscaler announces its own changes (`ScaledUp`, `ScaledDown`) instead of `Scaled`.
pub async fn announce_changes(
    md: &ModelDeployment,
    ctx: &Context,
    groups_before: i32,
    desired_groups: i32,
) {
    if groups_before == 0 && md.status.is_none() {
        let note = format!(
            "created {desired_groups} serving groups of {} shards",
            md.spec.expert_shards
        );
        publish(md, ctx, EventType::Normal, "Created", "Create", note).await;
    } else if groups_before != desired_groups && md.spec.autoscaling.is_none() {
        let note = format!("scaled from {groups_before} to {desired_groups} serving groups");
        publish(md, ctx, EventType::Normal, "Scaled", "Scale", note).await;
    }
    if let Some(status) = &md.status
        && status.observed_generation.is_some()
        && status.observed_generation != md.metadata.generation
        && groups_before == desired_groups
    {
        let note = format!(
            "rolling out generation {} to {desired_groups} serving groups",
            md.metadata.generation.unwrap_or_default()
        );
        publish(md, ctx, EventType::Normal, "RollingOut", "Update", note).await;
    }
}

/// Events for the condition changes users care about: Degraded turning true, Available
/// changing either way.
pub async fn announce_transitions(
    md: &ModelDeployment,
    ctx: &Context,
    new: &ModelDeploymentStatus,
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
        publish(
            md,
            ctx,
            EventType::Warning,
            &c.reason,
            "Reconcile",
            c.message,
        )
        .await;
    }
    if let Some(c) = changed(AVAILABLE) {
        let (type_, reason) = if c.status == "True" {
            (EventType::Normal, "Available")
        } else {
            (EventType::Warning, "Unavailable")
        };
        publish(md, ctx, type_, reason, "Reconcile", c.message).await;
    }
}
