//! The Services: a headless one that gives every shard a stable DNS name for its peers, a
//! headless one over the ready workers that the router discovers them through, and the client
//! Service, over the router pods while the router runs and over all ready workers otherwise.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    DEFAULT_SERVICE_PORT, EXPERTS_PORT, GRPC_PORT, HTTP_PORT, Owner, names, serves_openai,
};
use crate::validate::ValidatedSpec;

fn port(name: &str, port: i32, target: i32, app_protocol: Option<&str>) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".to_owned()),
        app_protocol: app_protocol.map(str::to_owned),
        ..ServicePort::default()
    }
}

/// `NAME-peers`: headless, governing every group's StatefulSet. It publishes pods before they
/// are ready, because a shard only becomes ready once it has reached all its peers.
pub fn peers_service(owner: &Owner) -> Service {
    Service {
        metadata: owner.meta(names::peers_service(&owner.name), owner.labels("peers")),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(owner.pod_selector()),
            ports: Some(vec![
                port(
                    "experts",
                    EXPERTS_PORT,
                    EXPERTS_PORT,
                    Some("kubernetes.io/h2c"),
                ),
                port("grpc", GRPC_PORT, GRPC_PORT, Some("kubernetes.io/h2c")),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// `NAME-workers`: headless, over the ready worker pods of every group (unlike `NAME-peers`, it
/// does not publish pods before they are ready). The router watches its EndpointSlices.
pub fn workers_service(spec: &ValidatedSpec<'_>) -> Service {
    let owner = spec.owner();
    Service {
        metadata: owner.meta(names::workers_service(&owner.name), owner.labels("workers")),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            // Unset is false. An explicit false is not stored (omitempty), so every apply
            // would find it missing and write the Service again.
            publish_not_ready_addresses: None,
            selector: Some(owner.pod_selector()),
            ports: Some(client_ports(spec, GRPC_PORT)),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// `NAME`: what clients connect to: the router pods while the router runs, otherwise every
/// ready worker pod of every group. The ports are the same either way.
pub fn client_service(spec: &ValidatedSpec<'_>) -> Service {
    let owner = spec.owner();
    let service = spec.service();
    let mut metadata = owner.meta(names::client_service(&owner.name), owner.labels("client"));
    if !service.annotations.is_empty() {
        metadata.annotations = Some(service.annotations.clone());
    }
    let selector = if spec.router_enabled() {
        owner.router_selector()
    } else {
        owner.pod_selector()
    };
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(service.type_.map_or("ClusterIP", |t| t.as_str()).to_owned()),
            selector: Some(selector),
            // No metrics port: Prometheus scrapes the pods, and a LoadBalancer Service would
            // publish /metrics outside the cluster.
            ports: Some(client_ports(
                spec,
                service.port.unwrap_or(DEFAULT_SERVICE_PORT),
            )),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// `grpc` on `grpc_port` and, where the workers serve the OpenAI API, `http` 8000; the targets
/// are the same on the workers and on the router.
fn client_ports(spec: &ValidatedSpec<'_>, grpc_port: i32) -> Vec<ServicePort> {
    let mut ports = vec![port(
        "grpc",
        grpc_port,
        GRPC_PORT,
        Some("kubernetes.io/h2c"),
    )];
    if serves_openai(spec) {
        ports.push(port("http", HTTP_PORT, HTTP_PORT, Some("http")));
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ServiceSpec as ClientServiceSpec, ServiceType};
    use crate::resources::METRICS_PORT;
    use crate::test_support::{demo, features_latest};
    use crate::validate::validate;

    #[test]
    fn peers_service_is_headless_and_publishes_unready_pods() {
        let md = demo();
        let service = peers_service(&Owner::of(&md));
        let spec = service.spec.unwrap();
        assert_eq!(service.metadata.name.as_deref(), Some("demo-peers"));
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.ports.unwrap()[0].port, EXPERTS_PORT);
    }

    #[test]
    fn client_service_speaks_h2c_on_the_configured_port() {
        let mut md = demo();
        md.spec.service = Some(ClientServiceSpec {
            port: Some(8443),
            type_: Some(ServiceType::LoadBalancer),
            annotations: [("lb.example/internal".to_owned(), "true".to_owned())].into(),
            allowed_namespaces: None,
        });
        let service = client_service(&validate(&md, &features_latest()).unwrap());
        assert_eq!(
            service.metadata.annotations.unwrap()["lb.example/internal"],
            "true"
        );
        let spec = service.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        let grpc = &spec.ports.as_ref().unwrap()[0];
        assert_eq!(grpc.port, 8443);
        assert_eq!(grpc.target_port, Some(IntOrString::Int(GRPC_PORT)));
        assert_eq!(grpc.app_protocol.as_deref(), Some("kubernetes.io/h2c"));
        assert_eq!(spec.selector.unwrap()["app.kubernetes.io/instance"], "demo");
    }

    #[test]
    fn the_client_service_selects_the_router_while_it_runs_and_the_workers_otherwise() {
        let mut md = demo();
        let selector = |md: &crate::crd::ModelDeployment| {
            client_service(&validate(md, &features_latest()).unwrap())
                .spec
                .unwrap()
                .selector
                .unwrap()
        };
        assert_eq!(selector(&md)["app.kubernetes.io/component"], "router");
        md.spec.router = Some(crate::crd::RouterSpec {
            replicas: 0,
            ..crate::crd::RouterSpec::default()
        });
        assert_eq!(selector(&md), Owner::of(&md).pod_selector());
    }

    #[test]
    fn the_workers_service_is_headless_over_ready_workers_only() {
        let md = demo();
        let service = workers_service(&validate(&md, &features_latest()).unwrap());
        assert_eq!(service.metadata.name.as_deref(), Some("demo-workers"));
        let spec = service.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_ne!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector.unwrap(), Owner::of(&md).pod_selector());
        let ports: Vec<_> = spec
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("grpc".to_owned(), GRPC_PORT),
                ("http".to_owned(), HTTP_PORT)
            ]
        );
    }

    #[test]
    fn client_service_serves_grpc_and_openai_http_but_not_metrics() {
        let service = client_service(&validate(&demo(), &features_latest()).unwrap());
        let ports: Vec<_> = service
            .spec
            .unwrap()
            .ports
            .unwrap()
            .into_iter()
            .map(|p| {
                (
                    p.name.unwrap(),
                    p.port,
                    p.target_port.unwrap(),
                    p.app_protocol.unwrap(),
                )
            })
            .collect();
        assert!(ports.iter().all(|p| p.1 != METRICS_PORT));
        assert_eq!(
            ports,
            [
                ("grpc", 50051, GRPC_PORT, "kubernetes.io/h2c"),
                ("http", 8000, HTTP_PORT, "http"),
            ]
            .map(|(name, port, target, protocol)| (
                name.to_owned(),
                port,
                IntOrString::Int(target),
                protocol.to_owned()
            ))
        );
    }
}
