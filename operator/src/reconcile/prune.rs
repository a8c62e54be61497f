//! Deletes what this ModelDeployment owns but no longer wants: for every kind the operator
//! owns (and the cluster serves), the objects with the ModelDeployment's labels and owner
//! reference whose names are not among the desired objects of that kind. Serving groups beyond
//! `replicas` go this way (their StatefulSets and budgets), and so would a NetworkPolicy or any
//! other child once a change stops building it.

use std::collections::BTreeSet;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PropagationPolicy};
use tracing::instrument;

use super::{Context, Error};
use crate::resources::{Desired, OwnedKind, Owner};

/// Lists every owned kind and deletes the owned objects not in `desired`.
#[instrument(skip_all)]
pub async fn prune(owner: &Owner, ctx: &Context, desired: &[Desired]) -> Result<(), Error> {
    let wanted: BTreeSet<(OwnedKind, &str)> =
        desired.iter().map(|d| (d.kind(), d.name())).collect();
    let selector = ListParams::default().labels(&owner.children_selector());
    for kind in OwnedKind::ALL {
        let Some(resource) = kind.api(&ctx.build.features) else {
            continue;
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &owner.namespace, &resource);
        let present = api
            .list_metadata(&selector)
            .await
            .map_err(|source| Error::List {
                what: kind.plural(),
                source,
            })?;
        let unwanted = present.items.iter().filter(|object| {
            let name = object.metadata.name.as_deref().unwrap_or_default();
            owner.owns(&object.metadata) && !wanted.contains(&(kind, name))
        });
        for object in unwanted {
            let name = object.metadata.name.clone().unwrap_or_default();
            delete(&api, kind, &name).await?;
            tracing::info!(kind = %kind, object = name, "deleted a child that is no longer desired");
        }
    }
    Ok(())
}

async fn delete(api: &Api<DynamicObject>, kind: OwnedKind, name: &str) -> Result<(), Error> {
    let background = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    match api.delete(name, &background).await {
        Ok(_) => Ok(()),
        // Gone already: someone else deleted it since the list.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Delete {
            kind,
            name: name.to_owned(),
            source,
        }),
    }
}
