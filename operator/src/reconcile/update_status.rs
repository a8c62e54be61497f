//! The last stage: observe the pods and the router, ask a ready worker for the capacity figures, compute the
//! status ([`crate::status`], pure) and write it with server-side apply when it differs from
//! the stored one, announcing the condition changes as Events.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::instrument;

use super::{Context, Error, apply::params, events, key};
use crate::capacity::capacity_from;
use crate::crd::{Capacity, ExpertPlacementStatus, ModelDeployment};
use crate::resources::{GRPC_PORT, Owner, names, selector_string};
use crate::status::{self, AutoscalingView, GroupObservation, Outcome, RouterObservation};

/// Observes pods, computes the status and writes it when it differs from the stored one.
#[instrument(skip_all)]
pub async fn update_status(
    md: &ModelDeployment,
    ctx: &Context,
    stateful_sets: &[StatefulSet],
    outcome: &Outcome,
    autoscaling: Option<&AutoscalingView>,
    placement: Option<&ExpertPlacementStatus>,
) -> Result<(), Error> {
    let owner = Owner::of(md);
    let pods = super::list_pods(ctx, &owner.namespace, &owner.selector_string()).await?;
    let groups = status::observe_groups(stateful_sets, &pods);
    let router = observe_router(md, ctx, &owner).await?;
    let capacity = capacity(md, ctx, &groups, &pods).await;
    let now =
        Time(Timestamp::from_second(Timestamp::now().as_second()).expect("the clock is in range"));
    let mut new = status::compute(md, &groups, &router, outcome, capacity, autoscaling, &now);
    new.expert_placement = status::expert_placement(md, &groups, placement);
    ctx.metrics
        .record_placement(&owner.namespace, &owner.name, new.expert_placement.as_ref());
    ctx.metrics.set_conditions(&key(md), Some(&new));
    if md.status.as_ref() == Some(&new) {
        return Ok(());
    }
    events::announce_transitions(md, ctx, &new).await;
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &owner.namespace);
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

/// The router Deployment and its pods, while the router is on (nothing to look at otherwise).
async fn observe_router(
    md: &ModelDeployment,
    ctx: &Context,
    owner: &Owner,
) -> Result<RouterObservation, Error> {
    if md.router().replicas <= 0 {
        return Ok(RouterObservation::default());
    }
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let deployment = deployments
        .get_opt(&names::router(&owner.name))
        .await
        .map_err(|source| Error::List {
            what: "Deployments",
            source,
        })?
        .filter(|d| owner.owns(&d.metadata));
    let pods = super::list_pods(
        ctx,
        &owner.namespace,
        &selector_string(&owner.router_selector()),
    )
    .await?;
    Ok(status::observe_router(deployment.as_ref(), &pods))
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
    let address = status::pod_address(pod, GRPC_PORT)?;
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
