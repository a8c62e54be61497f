//! The router's command line as the operator writes it, parsed by the router's own parser: every
//! flag exists, every value parses, and the parsed arguments mean what the operator intends (the
//! workers' discovery Service and ports, the addresses the router pod's ports name, the policy
//! of `spec.router.policy`, a drain that fits in the pod's grace period).

use std::time::Duration;

use clap::Parser;
use latentserve_operator::crd::{ModelDeployment, RouterSpec, RoutingPolicy};
use latentserve_operator::discovery::{Features, KubeVersion};
use latentserve_operator::resources::{BuildContext, router};
use latentserve_operator::validate::validate;
use latentserve_router::cli::RouterArgs;
use serde_json::json;

fn model_deployment(policy: RoutingPolicy) -> ModelDeployment {
    let mut md: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "latentserve.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "demo", "namespace": "models", "uid": "5d0c7e59-router"},
        "spec": {"model": {"hostPath": {"path": "/srv/models/demo"}}, "expertShards": 2},
    }))
    .expect("a ModelDeployment");
    md.spec.router = Some(RouterSpec {
        policy,
        ..RouterSpec::default()
    });
    md
}

/// The router container's arguments, parsed as the router binary parses them.
fn parsed(md: &ModelDeployment) -> (RouterArgs, k8s_openapi::api::core::v1::PodSpec) {
    let ctx = BuildContext {
        worker_image: "latentserve-worker:test".into(),
        router_image: "latentserve-router:test".into(),
        features: Features::from_discovery(KubeVersion::new(1, 33), &[]),
        policy: Default::default(),
    };
    let spec = validate(md, &ctx.features).expect("a valid spec");
    let pod = router::deployment(&spec, &ctx)
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap();
    let words = container.command.clone().unwrap().into_iter().chain(args);
    let parsed = RouterArgs::try_parse_from(words)
        .unwrap_or_else(|err| panic!("the router refuses the operator's arguments: {err}"));
    (parsed, pod)
}

#[test]
fn the_router_parses_what_the_operator_writes() {
    let (args, pod) = parsed(&model_deployment(RoutingPolicy::PrefixAware));
    assert_eq!(args.endpoints_service.as_deref(), Some("demo-workers"));
    assert!(args.endpoints.is_empty());
    assert_eq!(
        (args.worker_grpc_port, args.worker_openai_port),
        (50051, 8000)
    );
    let ports = |name: &str| {
        pod.containers[0]
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
            .unwrap_or_else(|| panic!("no container port {name}"))
    };
    assert_eq!(i32::from(args.grpc_addr.port()), ports("grpc"));
    assert_eq!(
        args.openai_addr.0.map(|a| i32::from(a.port())),
        Some(ports("http"))
    );
    assert_eq!(i32::from(args.metrics_addr.port()), ports("metrics"));
    assert!(
        args.grpc_addr.ip().is_unspecified(),
        "listens on the pod's address"
    );
    let grace = Duration::from_secs(pod.termination_grace_period_seconds.unwrap() as u64);
    assert!(
        args.drain_timeout + Duration::from_secs(10) <= grace,
        "a drain of {:?} does not fit in the grace period of {grace:?}",
        args.drain_timeout
    );
}

#[test]
fn every_routing_policy_maps_to_the_routers_own() {
    for policy in [
        RoutingPolicy::PrefixAware,
        RoutingPolicy::LeastLoaded,
        RoutingPolicy::RoundRobin,
    ] {
        let (args, _) = parsed(&model_deployment(policy));
        assert_eq!(
            format!("{:?}", args.policy),
            format!("{policy:?}"),
            "spec.router.policy {policy:?}"
        );
    }
}
