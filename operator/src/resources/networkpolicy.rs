//! Who reaches the worker pods. `NAME` covers every worker: the client ports (gRPC, the
//! OpenAI-compatible HTTP API) from `spec.service.allowedNamespaces` (any source when unset) and
//! the operator's namespace, the metrics port from the operator's `--metrics-namespace-selector`
//! (any source when unset), and nothing else. `NAME-g`, one per serving group, admits the expert
//! exchange to the pods of group g from the pods of group g only (policies add up).
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

use super::{EXPERTS_PORT, GRPC_PORT, HTTP_PORT, LABEL_GROUP, METRICS_PORT, Owner, names};
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

/// `NAME`: the client and metrics ports of every worker.
pub fn network_policy(spec: &ValidatedSpec<'_>, policy: &Policy) -> NetworkPolicy {
    let owner = spec.owner();
    let clients = spec.service().allowed_namespaces.clone().map(|selector| {
        let mut from = vec![namespaces(selector)];
        if let Some(operator) = &policy.operator_namespace {
            from.push(namespaces(match_labels(BTreeMap::from([(
                NAMESPACE_NAME_LABEL.to_owned(),
                operator.clone(),
            )]))));
        }
        from
    });
    let scrapers = policy
        .metrics_namespace_selector
        .clone()
        .map(|labels| vec![namespaces(match_labels(labels))]);
    NetworkPolicy {
        metadata: owner.meta(names::network_policy(&owner.name), owner.labels("worker")),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(match_labels(owner.pod_selector())),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: clients,
                    ports: Some(vec![tcp(GRPC_PORT), tcp(HTTP_PORT)]),
                },
                NetworkPolicyIngressRule {
                    from: scrapers,
                    ports: Some(vec![tcp(METRICS_PORT)]),
                },
            ]),
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

    #[test]
    fn by_default_clients_and_scrapers_come_from_anywhere_and_experts_from_nowhere() {
        let md = demo();
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
        let mut md = demo();
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
