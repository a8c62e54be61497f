//! Server-side apply of every desired object, whole, under the one field manager, forced: the
//! operator owns every field it writes. An apply that changes nothing changes no
//! `resourceVersion`, so a steady state makes no writes.
//!
//! Force would take over any object of the same name, so nothing is applied while one of the
//! names is taken by an object this ModelDeployment does not control (its owner reference with
//! `controller: true` and this uid): that object is left untouched and the reconcile fails with
//! [`Error::Conflict`], which the status and an Event name.

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use tracing::instrument;

use super::{Context, Error};
use crate::resources::{Desired, FIELD_MANAGER, Owner};

/// The parameters of every write the operator makes.
pub fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Applies `desired` in order; returns the StatefulSets as the API server answered, with
/// their status, for the status stage. Call [`refuse_adoption`] first.
#[instrument(skip_all)]
pub async fn apply(
    owner: &Owner,
    ctx: &Context,
    desired: &[Desired],
) -> Result<Vec<StatefulSet>, Error> {
    let mut groups = Vec::new();
    for object in desired {
        // `build_all` leaves out the kinds this cluster does not serve.
        let Some(resource) = object.kind().api(&ctx.build.features) else {
            continue;
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &owner.namespace, &resource);
        let apply_error = |source| Error::Apply {
            kind: object.kind(),
            name: object.name().to_owned(),
            source,
        };
        let applied = api
            .patch(
                object.name(),
                &params(),
                &Patch::Apply(&object.body(&resource)),
            )
            .await
            .map_err(apply_error)?;
        if let Desired::StatefulSet(_) = object {
            let sts: StatefulSet = serde_json::to_value(&applied)
                .and_then(serde_json::from_value)
                .map_err(|e| apply_error(kube::Error::SerdeError(e)))?;
            groups.push(sts);
        }
    }
    Ok(groups)
}

/// Fails with every desired name that an object not controlled by `owner` holds.
pub async fn refuse_adoption(
    owner: &Owner,
    ctx: &Context,
    desired: &[Desired],
) -> Result<(), Error> {
    let mut taken = Vec::new();
    for object in desired {
        let Some(resource) = object.kind().api(&ctx.build.features) else {
            continue;
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &owner.namespace, &resource);
        let existing = api
            .get_opt(object.name())
            .await
            .map_err(|source| Error::Apply {
                kind: object.kind(),
                name: object.name().to_owned(),
                source,
            })?;
        if let Some(existing) = existing
            && !owner.controls(&existing.metadata)
        {
            taken.push(format!("{} {}", object.kind(), object.name()));
        }
    }
    if taken.is_empty() {
        Ok(())
    } else {
        Err(Error::Conflict { objects: taken })
    }
}
