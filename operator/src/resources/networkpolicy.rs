//! Admits the expert exchange only from pods of the same ModelDeployment; the client ports (gRPC,
//! the OpenAI-compatible HTTP API) and the metrics port stay open to the cluster.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{EXPERTS_PORT, GRPC_PORT, HTTP_PORT, METRICS_PORT, Owner, names};

pub fn network_policy(owner: &Owner) -> NetworkPolicy {
    let workers = LabelSelector {
        match_labels: Some(owner.pod_selector()),
        ..LabelSelector::default()
    };
    let tcp = |port: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    };
    NetworkPolicy {
        metadata: owner.meta(names::network_policy(&owner.name), owner.labels("worker")),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(workers.clone()),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(workers),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![tcp(EXPERTS_PORT)]),
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![tcp(GRPC_PORT), tcp(HTTP_PORT), tcp(METRICS_PORT)]),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::demo;

    #[test]
    fn experts_port_admits_only_sibling_pods_and_client_ports_everyone() {
        let md = demo();
        let policy = network_policy(&Owner::of(&md));
        let ingress = policy.spec.unwrap().ingress.unwrap();
        let experts = &ingress[0];
        assert_eq!(
            experts.ports.as_ref().unwrap()[0].port,
            Some(IntOrString::Int(EXPERTS_PORT))
        );
        let from = experts.from.as_ref().unwrap()[0]
            .pod_selector
            .as_ref()
            .unwrap();
        assert_eq!(
            from.match_labels.as_ref().unwrap()["app.kubernetes.io/instance"],
            "demo"
        );
        let open: Vec<_> = ingress[1]
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.port.clone())
            .collect();
        assert_eq!(
            open,
            [GRPC_PORT, HTTP_PORT, METRICS_PORT].map(|p| Some(IntOrString::Int(p)))
        );
        assert!(ingress[1].from.is_none());
    }
}
