//! Who reaches the worker and router pods. `NAME` covers every worker: the client ports (gRPC,
//! the OpenAI-compatible HTTP API) from the router pods while the router runs, otherwise from
//! `spec.service.allowedNamespaces` (any source when unset), and from the operator's namespace
//! either way; the metrics port from the operator's `--metrics-namespace-selector` (any source
//! when unset); nothing else. `NAME-router` covers the router pods: their client ports as the
//! workers' are without a router, their metrics port as the workers'. `NAME-g`, one per serving
//! group, admits the expert exchange to the pods of group g from the pods of group g only
//! (policies add up).
//!
//! This is admission by labels: a pod in the namespace that copies a group's labels still gets
//! in. The credential that tells shards apart is the worker's own (mutual TLS on the expert port).

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    COMPONENT_ROUTER, EXPERTS_PORT, GRPC_PORT, HTTP_PORT, LABEL_GROUP, METRICS_PORT, Owner, names,
};
use crate::policy::Policy;
use crate::validate::ValidatedSpec;

/// The label every namespace carries with its own name (Kubernetes 1.21+).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    }
}

fn namespaces(selector: LabelSelector) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(selector),
        ..NetworkPolicyPeer::default()
    }
}

fn match_labels(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels),
        ..LabelSelector::default()
    }
}

/// The operator's own namespace, by its name label.
fn operator_namespace(policy: &Policy) -> Option<NetworkPolicyPeer> {
    policy.operator_namespace.as_ref().map(|operator| {
        namespaces(match_labels(BTreeMap::from([(
            NAMESPACE_NAME_LABEL.to_owned(),
            operator.clone(),
        )])))
    })
}

/// The client ports (gRPC, OpenAI HTTP) from `sources` (`None`: any source), and the metrics
/// port from the scrapers the operator's policy names (and `also_metrics`, when they are
/// restricted).
fn client_and_metrics_rules(
    sources: Option<Vec<NetworkPolicyPeer>>,
    policy: &Policy,
    also_metrics: Option<NetworkPolicyPeer>,
) -> Vec<NetworkPolicyIngressRule> {
    let scrapers = policy.metrics_namespace_selector.clone().map(|labels| {
        std::iter::once(namespaces(match_labels(labels)))
            .chain(also_metrics)
            .collect()
    });
    vec![
        NetworkPolicyIngressRule {
            from: sources,
            ports: Some(vec![tcp(GRPC_PORT), tcp(HTTP_PORT)]),
        },
        NetworkPolicyIngressRule {
            from: scrapers,
            ports: Some(vec![tcp(METRICS_PORT)]),
        },
    ]
}

/// `NAME`: the client and metrics ports of every worker. With the router on, clients reach the
/// workers only through it; the operator's namespace stays admitted either way (it reads the
/// capacity over gRPC), and to the metrics port while it measures the experts' load
/// (`expertPlacement.rebalance`).
pub fn network_policy(spec: &ValidatedSpec<'_>, policy: &Policy) -> NetworkPolicy {
    let owner = spec.owner();
    let clients = if spec.router_enabled() {
        let routers = NetworkPolicyPeer {
            pod_selector: Some(match_labels(owner.router_selector())),
            ..NetworkPolicyPeer::default()
        };
        Some(
            std::iter::once(routers)
                .chain(operator_namespace(policy))
                .collect(),
        )
    } else {
        spec.service().allowed_namespaces.clone().map(|selector| {
            std::iter::once(namespaces(selector))
                .chain(operator_namespace(policy))
                .collect()
        })
    };
    NetworkPolicy {
        metadata: owner.meta(names::network_policy(&owner.name), owner.labels("worker")),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(match_labels(owner.pod_selector())),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(client_and_metrics_rules(
                clients,
                policy,
                operator_namespace(policy)
                    .filter(|_| spec.placement().is_some_and(|p| p.rebalance.is_some())),
            )),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// `NAME-router`: the router pods' client ports from `spec.service.allowedNamespaces` (any
/// source when unset), their metrics port as the workers', and from the operator's namespace
/// under `spec.autoscaling` (the operator reads `/v1/autoscaling` there).
pub fn router_network_policy(spec: &ValidatedSpec<'_>, policy: &Policy) -> NetworkPolicy {
    let owner = spec.owner();
    let clients = spec
        .service()
        .allowed_namespaces
        .clone()
        .map(|selector| vec![namespaces(selector)]);
    NetworkPolicy {
        metadata: owner.meta(names::router(&owner.name), owner.labels(COMPONENT_ROUTER)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(match_labels(owner.router_selector())),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(client_and_metrics_rules(
                clients,
                policy,
                operator_namespace(policy).filter(|_| spec.autoscaling().is_some()),
            )),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// `NAME-g`: the expert port of group g, from group g.
pub fn experts_network_policy(owner: &Owner, group: i32) -> NetworkPolicy {
    let mut group_pods = owner.pod_selector();
    group_pods.insert(LABEL_GROUP.to_owned(), group.to_string());
    let mut labels = owner.labels("worker");
    labels.insert(LABEL_GROUP.to_owned(), group.to_string());
    NetworkPolicy {
        metadata: owner.meta(names::group(&owner.name, group), labels),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(match_labels(group_pods.clone())),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(match_labels(group_pods)),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(vec![tcp(EXPERTS_PORT)]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ServiceSpec;
    use crate::test_support::{demo, features_latest};
    use crate::validate::validate;

    fn ports(rule: &NetworkPolicyIngressRule) -> Vec<i32> {
        rule.ports
            .iter()
            .flatten()
            .map(|p| match p.port {
                Some(IntOrString::Int(port)) => port,
                _ => panic!("numeric ports"),
            })
            .collect()
    }

    fn without_router(mut md: crate::crd::ModelDeployment) -> crate::crd::ModelDeployment {
        md.spec.router = Some(crate::crd::RouterSpec {
            replicas: 0,
            ..crate::crd::RouterSpec::default()
        });
        md
    }

    #[test]
    fn by_default_clients_and_scrapers_come_from_anywhere_and_experts_from_nowhere() {
        let md = without_router(demo());
        let spec = validate(&md, &features_latest()).unwrap();
        let policy = network_policy(&spec, &Policy::default());
        let ingress = policy.spec.unwrap().ingress.unwrap();
        assert_eq!(ports(&ingress[0]), [GRPC_PORT, HTTP_PORT]);
        assert!(ingress[0].from.is_none());
        assert_eq!(ports(&ingress[1]), [METRICS_PORT]);
        assert!(ingress[1].from.is_none());
        assert!(
            ingress
                .iter()
                .all(|rule| !ports(rule).contains(&EXPERTS_PORT))
        );
    }

    #[test]
    fn client_and_metrics_ports_follow_their_namespace_selectors() {
        let mut md = without_router(demo());
        let tenants = match_labels(BTreeMap::from([("team".into(), "chat".into())]));
        md.spec.service = Some(ServiceSpec {
            allowed_namespaces: Some(tenants.clone()),
            ..ServiceSpec::default()
        });
        let spec = validate(&md, &features_latest()).unwrap();
        let monitoring = BTreeMap::from([(NAMESPACE_NAME_LABEL.into(), "monitoring".into())]);
        let settings = Policy {
            metrics_namespace_selector: Some(monitoring.clone()),
            operator_namespace: Some("latentserve-system".into()),
            ..Policy::default()
        };
        let ingress = network_policy(&spec, &settings)
            .spec
            .unwrap()
            .ingress
            .unwrap();
        let from = ingress[0].from.as_ref().unwrap();
        assert_eq!(from[0].namespace_selector.as_ref(), Some(&tenants));
        assert_eq!(
            from[1]
                .namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()[NAMESPACE_NAME_LABEL],
            "latentserve-system",
            "the operator still reads the capacity"
        );
        assert_eq!(
            ingress[1].from.as_ref().unwrap()[0].namespace_selector,
            Some(match_labels(monitoring))
        );
    }

    #[test]
    fn with_the_router_on_workers_admit_clients_only_through_it() {
        let mut md = demo();
        let tenants = match_labels(BTreeMap::from([("team".into(), "chat".into())]));
        md.spec.service = Some(ServiceSpec {
            allowed_namespaces: Some(tenants.clone()),
            ..ServiceSpec::default()
        });
        let spec = validate(&md, &features_latest()).unwrap();
        let settings = Policy {
            operator_namespace: Some("latentserve-system".into()),
            ..Policy::default()
        };
        let owner = Owner::of(&md);

        let workers = network_policy(&spec, &settings).spec.unwrap();
        let ingress = workers.ingress.unwrap();
        assert_eq!(ports(&ingress[0]), [GRPC_PORT, HTTP_PORT]);
        let from = ingress[0].from.as_ref().unwrap();
        assert_eq!(
            from[0].pod_selector.as_ref().unwrap().match_labels.as_ref(),
            Some(&owner.router_selector())
        );
        assert!(
            from[0].namespace_selector.is_none(),
            "the router's namespace only"
        );
        assert_eq!(
            from[1]
                .namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()[NAMESPACE_NAME_LABEL],
            "latentserve-system"
        );
        assert_eq!(
            from.len(),
            2,
            "the tenants reach the router, not the workers"
        );
        assert_eq!(ports(&ingress[1]), [METRICS_PORT]);

        let router = router_network_policy(&spec, &settings);
        assert_eq!(router.metadata.name.as_deref(), Some("demo-router"));
        let router = router.spec.unwrap();
        assert_eq!(
            router.pod_selector.unwrap().match_labels.unwrap(),
            owner.router_selector()
        );
        let ingress = router.ingress.unwrap();
        assert_eq!(ports(&ingress[0]), [GRPC_PORT, HTTP_PORT]);
        assert_eq!(
            ingress[0].from.as_ref().unwrap()[0]
                .namespace_selector
                .as_ref(),
            Some(&tenants)
        );
        assert_eq!(ports(&ingress[1]), [METRICS_PORT]);
        assert!(
            ingress[1].from.is_none(),
            "scrapers from anywhere by default"
        );
    }

    #[test]
    fn under_autoscaling_the_operator_reaches_the_routers_metrics_port() {
        let monitoring = BTreeMap::from([(NAMESPACE_NAME_LABEL.into(), "monitoring".into())]);
        let settings = Policy {
            metrics_namespace_selector: Some(monitoring),
            operator_namespace: Some("latentserve-system".into()),
            ..Policy::default()
        };
        let metrics_sources = |md: &crate::crd::ModelDeployment| {
            let spec = validate(md, &features_latest()).unwrap();
            let ingress = router_network_policy(&spec, &settings)
                .spec
                .unwrap()
                .ingress
                .unwrap();
            assert_eq!(ports(&ingress[1]), [METRICS_PORT]);
            ingress[1]
                .from
                .iter()
                .flatten()
                .map(|peer| {
                    peer.namespace_selector
                        .as_ref()
                        .unwrap()
                        .match_labels
                        .as_ref()
                        .unwrap()[NAMESPACE_NAME_LABEL]
                        .clone()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(metrics_sources(&demo()), ["monitoring"]);
        let mut md = demo();
        md.spec.autoscaling = Some(
            serde_json::from_value(serde_json::json!({
                "maxReplicas": 2, "target": {"metric": "InFlightRequests", "value": 4}
            }))
            .unwrap(),
        );
        assert_eq!(metrics_sources(&md), ["monitoring", "latentserve-system"]);
    }

    #[test]
    fn while_it_balances_experts_the_operator_reaches_the_workers_metrics_port() {
        let monitoring = BTreeMap::from([(NAMESPACE_NAME_LABEL.into(), "monitoring".into())]);
        let settings = Policy {
            metrics_namespace_selector: Some(monitoring),
            operator_namespace: Some("latentserve-system".into()),
            ..Policy::default()
        };
        let metrics_sources = |md: &crate::crd::ModelDeployment| {
            let spec = validate(md, &features_latest()).unwrap();
            let ingress = network_policy(&spec, &settings)
                .spec
                .unwrap()
                .ingress
                .unwrap();
            assert_eq!(ports(&ingress[1]), [METRICS_PORT]);
            ingress[1].from.iter().flatten().count()
        };
        assert_eq!(metrics_sources(&demo()), 1, "the scrapers only");
        let mut md = demo();
        md.spec.expert_placement =
            Some(serde_json::from_value(serde_json::json!({"policy": "Balanced"})).unwrap());
        assert_eq!(metrics_sources(&md), 2, "and the operator's namespace");
    }

    #[test]
    fn the_expert_port_admits_only_pods_of_the_same_group() {
        let md = demo();
        let policy = experts_network_policy(&Owner::of(&md), 1);
        assert_eq!(policy.metadata.name.as_deref(), Some("demo-1"));
        let spec = policy.spec.unwrap();
        let target = spec.pod_selector.unwrap().match_labels.unwrap();
        assert_eq!(target[LABEL_GROUP], "1");
        assert_eq!(target["app.kubernetes.io/instance"], "demo");
        let rule = &spec.ingress.unwrap()[0];
        assert_eq!(ports(rule), [EXPERTS_PORT]);
        let from = rule.from.as_ref().unwrap()[0]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        assert_eq!(from, &target);
    }
}
