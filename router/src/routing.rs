//! Groups the operator is scaling away (`--routing-configmap NAME-routing`): the ConfigMap's key
//! `draining-groups.json` maps each draining group to the time its drain began. Their endpoints
//! get no new requests, as if their workers reported draining, so that the operator can remove
//! the group once what it runs has finished. The router reads that one ConfigMap (a Role with
//! get, list and watch on `configmaps`, `resourceNames: [NAME-routing]`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

use crate::pool::Pool;

/// The key of the routing ConfigMap that lists the draining groups.
pub const DRAINING_GROUPS_KEY: &str = "draining-groups.json";

/// `draining-groups.json` is not a JSON object of group names to drain start times.
#[derive(Debug, thiserror::Error)]
#[error("{DRAINING_GROUPS_KEY} is not a JSON object of group name -> RFC 3339 time: {0}")]
pub struct DrainingGroupsError(#[from] serde_json::Error);

/// The draining groups a ConfigMap's data names: none when the key is missing. The start times
/// are the operator's business (it times the drain); the router only needs the names.
pub fn draining_groups(
    data: Option<&BTreeMap<String, String>>,
) -> Result<BTreeSet<String>, DrainingGroupsError> {
    let Some(text) = data.and_then(|data| data.get(DRAINING_GROUPS_KEY)) else {
        return Ok(BTreeSet::new());
    };
    let groups: BTreeMap<String, String> = serde_json::from_str(text)?;
    Ok(groups.into_keys().collect())
}

/// Keeps the pool's draining groups at what ConfigMap `name` in `namespace` says, for as long as
/// the router runs. A missing ConfigMap means no group drains; a malformed one is logged and
/// changes nothing; the watch retries with backoff when the API server cannot be read (the
/// router goes on routing meanwhile, with the last groups it knew).
pub async fn follow_routing_configmap(
    client: Client,
    namespace: &str,
    name: &str,
    pool: Arc<Pool>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    // During a relist, the ConfigMap seen so far (none: it does not exist).
    let mut relist: Option<Option<ConfigMap>> = None;
    while let Some(event) = stream.next().await {
        let current = match event {
            Ok(Event::Apply(configmap)) => Some(configmap),
            Ok(Event::Delete(_)) => None,
            Ok(Event::Init) => {
                relist = Some(None);
                continue;
            }
            Ok(Event::InitApply(configmap)) => {
                relist = Some(Some(configmap));
                continue;
            }
            Ok(Event::InitDone) => relist.take().flatten(),
            Err(err) => {
                tracing::warn!(error = %err, %namespace, configmap = %name, "watching the routing ConfigMap; retrying");
                continue;
            }
        };
        let data = current
            .as_ref()
            .and_then(|configmap| configmap.data.as_ref());
        match draining_groups(data) {
            Ok(groups) => pool.set_draining_groups(groups),
            Err(err) => {
                tracing::warn!(error = %err, %namespace, configmap = %name, "ignoring the routing ConfigMap's change")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(value: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(DRAINING_GROUPS_KEY.to_owned(), value.to_owned())])
    }

    #[test]
    fn the_draining_groups_are_the_keys_of_the_json_object() {
        assert!(draining_groups(None).unwrap().is_empty());
        assert!(draining_groups(Some(&BTreeMap::new())).unwrap().is_empty());
        assert!(draining_groups(Some(&data("{}"))).unwrap().is_empty());
        let groups = draining_groups(Some(&data(
            r#"{"demo-2": "2026-12-02T00:30:00Z", "demo-1": "2026-12-02T00:31:00Z"}"#,
        )))
        .unwrap();
        assert_eq!(groups.into_iter().collect::<Vec<_>>(), ["demo-1", "demo-2"]);
    }

    #[test]
    fn a_malformed_value_is_an_error() {
        for bad in ["", "not json", "[\"demo-1\"]", r#"{"demo-1": 3}"#, "null"] {
            let err = draining_groups(Some(&data(bad))).unwrap_err();
            assert!(err.to_string().contains(DRAINING_GROUPS_KEY), "{err}");
        }
    }
}
