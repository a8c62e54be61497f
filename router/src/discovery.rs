//! Where the workers are: a fixed list (`--endpoints`), or the ready endpoints of a Service's
//! EndpointSlices (`--endpoints-service`), watched through the Kubernetes API with no more than a
//! namespaced Role to get, list and watch EndpointSlices. Clusters before 1.21 serve them only
//! as `discovery.k8s.io/v1beta1`; the version is found through API discovery.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

use crate::pool::{EndpointAddr, Pool};

/// The ports of a worker, where an EndpointSlice does not name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerPorts {
    pub grpc: u16,
    /// `None`: the workers serve no OpenAI API.
    pub openai: Option<u16>,
}

/// `host:port` as an address string; IPv6 hosts get brackets.
fn join(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The serving group of a worker endpoint: the StatefulSet of its pod (`targetRef` of kind Pod,
/// named `STS-ORDINAL`: the trailing `-ORDINAL` removed), else the endpoint's own gRPC address.
/// A pod name without an ordinal is a group of its own.
pub fn group_name(pod: Option<&str>, grpc: &str) -> String {
    let Some(pod) = pod.filter(|pod| !pod.is_empty()) else {
        return grpc.to_owned();
    };
    match pod.rsplit_once('-') {
        Some((set, ordinal))
            if !set.is_empty()
                && !ordinal.is_empty()
                && ordinal.bytes().all(|b| b.is_ascii_digit()) =>
        {
            set.to_owned()
        }
        _ => pod.to_owned(),
    }
}

/// The endpoints of `--endpoints HOST:PORT,...` (the workers' gRPC addresses). Their OpenAI APIs
/// are `openai` in the same order when given (`--openai-endpoints`), else on the same hosts at
/// `ports.openai`.
pub fn static_endpoints(
    list: &[String],
    openai: &[String],
    ports: WorkerPorts,
) -> Result<Vec<EndpointAddr>, String> {
    if !openai.is_empty() && openai.len() != list.len() {
        return Err(format!(
            "--openai-endpoints: {} addresses for {} --endpoints; give one per worker, in the same order",
            openai.len(),
            list.len()
        ));
    }
    list.iter()
        .enumerate()
        .map(|(index, entry)| {
            let entry = entry.trim();
            let (host, port) = entry
                .rsplit_once(':')
                .ok_or_else(|| format!("--endpoints: `{entry}` is not HOST:PORT"))?;
            port.parse::<u16>()
                .map_err(|_| format!("--endpoints: `{entry}` has no valid port"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(format!("--endpoints: `{entry}` has no host"));
            }
            let openai = match openai.get(index) {
                Some(address) => Some(address.trim().to_owned()),
                None => ports.openai.map(|port| join(host, port)),
            };
            Ok(EndpointAddr {
                grpc: entry.to_owned(),
                openai: openai.filter(|_| ports.openai.is_some()),
                group: group_name(None, entry),
            })
        })
        .collect()
}

/// The ready endpoints of a set of EndpointSlices. The slice's ports named `grpc` and `http` win
/// over `ports`. Kubernetes says an unset `ready` means ready; terminating endpoints are not ready.
pub fn ready_endpoints<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ports: WorkerPorts,
) -> BTreeSet<EndpointAddr> {
    let mut ready = BTreeSet::new();
    for slice in slices {
        let named = |name: &str| {
            slice.ports.iter().flatten().find_map(|p| {
                (p.name.as_deref() == Some(name))
                    .then_some(p.port)
                    .flatten()
                    .and_then(|port| u16::try_from(port).ok())
            })
        };
        let grpc = named("grpc").unwrap_or(ports.grpc);
        let openai = ports.openai.map(|port| named("http").unwrap_or(port));
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            if conditions.and_then(|c| c.ready) == Some(false)
                || conditions.and_then(|c| c.terminating) == Some(true)
            {
                continue;
            }
            if let Some(address) = endpoint.addresses.first() {
                let pod = endpoint
                    .target_ref
                    .as_ref()
                    .filter(|target| target.kind.as_deref().is_none_or(|kind| kind == "Pod"))
                    .and_then(|target| target.name.as_deref());
                let grpc = join(address, grpc);
                ready.insert(EndpointAddr {
                    group: group_name(pod, &grpc),
                    grpc,
                    openai: openai.map(|port| join(address, port)),
                });
            }
        }
    }
    ready
}

/// Why following a Service's EndpointSlices could not start.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("API discovery of discovery.k8s.io failed: {0}")]
    Discovery(#[source] kube::Error),
    #[error("the cluster serves no EndpointSlice API (discovery.k8s.io)")]
    NotServed,
}

/// The EndpointSlice API this cluster serves: `discovery.k8s.io/v1` from Kubernetes 1.21,
/// `v1beta1` before (1.20 serves only that). Discovery documents are open to every
/// authenticated account.
async fn endpoint_slice_api(client: &Client) -> Result<ApiResource, FollowError> {
    let group = kube::discovery::group(client, "discovery.k8s.io")
        .await
        .map_err(FollowError::Discovery)?;
    group
        .recommended_kind("EndpointSlice")
        .map(|(resource, _)| resource)
        .ok_or(FollowError::NotServed)
}

/// An EndpointSlice of any served version as the `v1` type: the fields the router reads
/// (addresses, conditions, ports, address type) are the same in `v1beta1`, whose `topology`
/// is dropped. `None` for an object that does not decode as one.
fn as_v1(object: DynamicObject) -> Option<EndpointSlice> {
    let mut value = serde_json::to_value(object).ok()?;
    value["apiVersion"] = serde_json::Value::from("discovery.k8s.io/v1");
    value["kind"] = serde_json::Value::from("EndpointSlice");
    serde_json::from_value(value).ok()
}

/// A watch event of the served EndpointSlice version as one of the `v1` type.
fn slice_event(event: Event<DynamicObject>) -> Option<Event<EndpointSlice>> {
    Some(match event {
        Event::Apply(object) => Event::Apply(as_v1(object)?),
        Event::Delete(object) => Event::Delete(as_v1(object)?),
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(as_v1(object)?),
        Event::InitDone => Event::InitDone,
    })
}

/// Keeps `pool` at the ready endpoints of Service `service` in `namespace`. A failing watch (API
/// server restarts, lost connections, expired resource versions) is retried with backoff while
/// the last known endpoints stay in force; only finding no EndpointSlice API at all at start is
/// an error (the caller logs it and exits: the pod restarts).
pub async fn follow_service(
    client: Client,
    namespace: &str,
    service: &str,
    ports: WorkerPorts,
    pool: Arc<Pool>,
) -> Result<(), FollowError> {
    let resource = endpoint_slice_api(&client).await?;
    tracing::info!(api_version = %resource.api_version, "watching EndpointSlices");
    let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &resource);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    // While a relist is in progress the old set stays in force.
    let mut pending: Option<BTreeMap<String, EndpointSlice>> = None;
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(error = %err, %service, "watching the workers' EndpointSlices failed; retrying");
                continue;
            }
        };
        let Some(event) = slice_event(event) else {
            tracing::warn!("an EndpointSlice that does not decode was skipped");
            continue;
        };
        let name = |slice: &EndpointSlice| slice.metadata.name.clone().unwrap_or_default();
        match event {
            Event::Apply(slice) => {
                slices.insert(name(&slice), slice);
            }
            Event::Delete(slice) => {
                slices.remove(&name(&slice));
            }
            Event::Init => pending = Some(BTreeMap::new()),
            Event::InitApply(slice) => {
                pending.get_or_insert_default().insert(name(&slice), slice);
            }
            Event::InitDone => slices = pending.take().unwrap_or_default(),
        }
        if pending.is_none() {
            let ready = ready_endpoints(slices.values(), ports);
            tracing::debug!(endpoints = ready.len(), "EndpointSlices changed");
            pool.set_endpoints(ready);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    const PORTS: WorkerPorts = WorkerPorts {
        grpc: 50051,
        openai: Some(8000),
    };

    fn endpoint(ip: &str, ready: Option<bool>, terminating: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.to_owned()],
            conditions: Some(EndpointConditions {
                ready,
                serving: ready,
                terminating,
            }),
            ..Endpoint::default()
        }
    }

    #[test]
    fn only_ready_endpoints_count_and_named_ports_win() {
        let slice = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: vec![
                Endpoint {
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some("demo-1-0".into()),
                        ..ObjectReference::default()
                    }),
                    ..endpoint("10.0.0.1", Some(true), None)
                },
                endpoint("10.0.0.2", None, None),
                endpoint("10.0.0.3", Some(false), None),
                endpoint("10.0.0.4", Some(true), Some(true)),
            ],
            ports: Some(vec![EndpointPort {
                name: Some("grpc".into()),
                port: Some(6000),
                ..EndpointPort::default()
            }]),
            ..EndpointSlice::default()
        };
        let ready: Vec<EndpointAddr> = ready_endpoints([&slice], PORTS).into_iter().collect();
        assert_eq!(
            ready,
            vec![
                EndpointAddr {
                    grpc: "10.0.0.1:6000".into(),
                    openai: Some("10.0.0.1:8000".into()),
                    group: "demo-1".into(),
                },
                EndpointAddr {
                    grpc: "10.0.0.2:6000".into(),
                    openai: Some("10.0.0.2:8000".into()),
                    group: "10.0.0.2:6000".into(),
                },
            ]
        );
        let v6 = EndpointSlice {
            address_type: "IPv6".into(),
            endpoints: vec![endpoint("fd00::1", Some(true), None)],
            ..EndpointSlice::default()
        };
        let none = WorkerPorts {
            grpc: 50051,
            openai: None,
        };
        assert_eq!(
            ready_endpoints([&v6], none).into_iter().next().unwrap(),
            EndpointAddr {
                grpc: "[fd00::1]:50051".into(),
                openai: None,
                group: "[fd00::1]:50051".into(),
            }
        );
    }

    #[test]
    fn a_v1beta1_slice_reads_as_v1() {
        // As Kubernetes 1.20 serves it: `topology` instead of `nodeName` and `zone`.
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1",
            "kind": "EndpointSlice",
            "metadata": {"name": "demo-workers-x7k2p", "namespace": "models"},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["127.0.0.3"], "conditions": {"ready": true},
                 "topology": {"kubernetes.io/hostname": "node-a"}},
                {"addresses": ["127.0.0.4"], "conditions": {"ready": false}},
            ],
            "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
        }))
        .unwrap();
        let slice = as_v1(object).expect("a v1beta1 slice decodes");
        assert_eq!(slice.metadata.name.as_deref(), Some("demo-workers-x7k2p"));
        let ready: Vec<EndpointAddr> = ready_endpoints([&slice], PORTS).into_iter().collect();
        assert_eq!(
            ready,
            vec![EndpointAddr {
                grpc: "127.0.0.3:50051".into(),
                openai: Some("127.0.0.3:8000".into()),
                group: "127.0.0.3:50051".into(),
            }]
        );
        let broken: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "x"}, "addressType": "IPv4", "endpoints": "not a list",
        }))
        .unwrap();
        assert!(as_v1(broken).is_none());
    }

    #[test]
    fn static_endpoints_are_checked_and_get_their_openai_address() {
        let list = vec!["127.0.0.1:50051".to_owned(), "[::1]:7000".to_owned()];
        let endpoints = static_endpoints(&list, &[], PORTS).unwrap();
        assert_eq!(endpoints[0].openai.as_deref(), Some("127.0.0.1:8000"));
        assert_eq!(endpoints[1].group, "[::1]:7000", "each its own group");
        assert_eq!(endpoints[1].openai.as_deref(), Some("[::1]:8000"));
        let openai = vec!["127.0.0.1:8001".to_owned(), "[::1]:8002".to_owned()];
        let endpoints = static_endpoints(&list, &openai, PORTS).unwrap();
        assert_eq!(endpoints[1].openai.as_deref(), Some("[::1]:8002"));
        let err = static_endpoints(&list, &openai[..1], PORTS).unwrap_err();
        assert!(err.contains("--openai-endpoints"), "{err}");
        for bad in ["localhost", "host:port", ":50051"] {
            let err = static_endpoints(&[bad.to_owned()], &[], PORTS).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn a_group_is_the_statefulset_of_the_endpoints_pod() {
        let address = "10.0.0.9:50051";
        assert_eq!(group_name(Some("demo-1-0"), address), "demo-1");
        assert_eq!(group_name(Some("demo-12-3"), address), "demo-12");
        assert_eq!(group_name(Some("demo-0"), address), "demo");
        // Without an ordinal the pod is a group of its own; without a pod, the address is.
        assert_eq!(
            group_name(Some("demo-7d9f-x2kq"), address),
            "demo-7d9f-x2kq"
        );
        assert_eq!(group_name(Some("demo-"), address), "demo-");
        assert_eq!(group_name(Some("-3"), address), "-3");
        assert_eq!(group_name(Some(""), address), address);
        assert_eq!(group_name(None, address), address);
    }
}
