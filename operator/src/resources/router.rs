//! The request router of a ModelDeployment: the Deployment `NAME-router`, whose pods pick a ready
//! worker pod per request, and the account it discovers the workers with. The router reads the
//! EndpointSlices of the headless Service `NAME-workers` and the ConfigMap `NAME-routing` (the
//! groups to drain) through the API server, so it gets a ServiceAccount `NAME-router` bound
//! (RoleBinding) to a Role that allows exactly that, in the ModelDeployment's namespace only. It
//! holds no model: it asks a worker for the tokenizer.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, HTTPGetAction, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccount,
    Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    BuildContext, COMPONENT_ROUTER, GRPC_PORT, HTTP_PORT, METRICS_PORT, Owner, names, serves_openai,
};
use crate::router_args::{ROUTER_BINARY, RouterArgs};
use crate::validate::ValidatedSpec;

/// Seconds the router lets requests in flight finish after SIGTERM (`--drain-timeout`): as long
/// as a worker's own drain, since it forwards the workers' streams.
pub const DRAIN_SECONDS: i64 = super::statefulset::DRAIN_SECONDS;
/// Seconds the kubelet waits after SIGTERM: the drain plus time to close and exit.
pub const TERMINATION_GRACE_SECONDS: i64 = DRAIN_SECONDS + 30;
/// The unprivileged user the router image runs as.
const ROUTER_UID: i64 = 65532;
/// What a router pod asks for when `spec.router.resources` is unset: one busy core routes
/// thousands of requests a second, and it holds a tokenizer and per-endpoint state.
const DEFAULT_CPU_REQUEST: &str = "250m";
const DEFAULT_MEMORY_REQUEST: &str = "256Mi";

/// The API group and resource the router reads, and nothing else.
const DISCOVERY_GROUP: &str = "discovery.k8s.io";
const ENDPOINT_SLICES: &str = "endpointslices";

/// `NAME-router`: `spec.router.replicas` router pods.
pub fn deployment(spec: &ValidatedSpec<'_>, ctx: &BuildContext) -> Deployment {
    let owner = spec.owner();
    let labels = owner.labels(COMPONENT_ROUTER);
    Deployment {
        metadata: owner.meta(names::router(&owner.name), labels.clone()),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.router().replicas),
            revision_history_limit: Some(3),
            selector: LabelSelector {
                match_labels: Some(owner.router_selector()),
                ..LabelSelector::default()
            },
            // A new router pod is ready before an old one goes: clients always find one.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
                        ("prometheus.io/port".to_owned(), METRICS_PORT.to_string()),
                        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(spec, ctx)),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

fn pod_spec(spec: &ValidatedSpec<'_>, ctx: &BuildContext) -> PodSpec {
    let owner = spec.owner();
    PodSpec {
        containers: vec![container(spec, ctx)],
        // The router writes nothing but may want scratch space; the root stays read-only.
        volumes: Some(
            std::iter::once(Volume {
                name: "tmp".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            })
            .chain(
                spec.router_tls()
                    .map(|tls| super::statefulset::secret_volume("tls", &tls.secret_name)),
            )
            .collect(),
        ),
        service_account_name: Some(names::router(&owner.name)),
        // The router's one credential: it lists and watches EndpointSlices.
        automount_service_account_token: Some(true),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(ROUTER_UID),
            run_as_group: Some(ROUTER_UID),
            fs_group: Some(ROUTER_UID),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..PodSecurityContext::default()
        }),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        ..PodSpec::default()
    }
}

/// The router's command line.
pub fn router_args(spec: &ValidatedSpec<'_>) -> RouterArgs {
    let openai = serves_openai(spec);
    RouterArgs {
        endpoints_service: names::workers_service(&spec.owner().name),
        routing_configmap: names::routing_config_map(&spec.owner().name),
        worker_grpc_port: GRPC_PORT,
        worker_openai_port: openai.then_some(HTTP_PORT),
        grpc_addr: format!("0.0.0.0:{GRPC_PORT}"),
        openai_addr: openai.then(|| format!("0.0.0.0:{HTTP_PORT}")),
        metrics_addr: format!("0.0.0.0:{METRICS_PORT}"),
        policy: spec.router().policy,
        drain_timeout_seconds: DRAIN_SECONDS,
        tls: spec.router_tls().map(super::statefulset::tls_files),
    }
}

fn container(spec: &ValidatedSpec<'_>, ctx: &BuildContext) -> Container {
    let port = super::container_port;
    let field_env = super::field_env;
    let mut ports = vec![port("grpc", GRPC_PORT)];
    if serves_openai(spec) {
        ports.push(port("http", HTTP_PORT));
    }
    ports.push(port("metrics", METRICS_PORT));
    Container {
        name: "router".to_owned(),
        image: Some(ctx.router_image.clone()),
        command: Some(vec![ROUTER_BINARY.to_owned()]),
        args: Some(router_args(spec).render()),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            // The namespace of the workers' Service.
            field_env("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(ports),
        resources: Some(resources(spec)),
        volume_mounts: Some(
            std::iter::once(VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..VolumeMount::default()
            })
            // The whole Secret, never a subPath, so that renewed certificates reach the pod.
            .chain(spec.router_tls().map(|_| VolumeMount {
                name: "tls".to_owned(),
                mount_path: super::statefulset::TLS_MOUNT.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            }))
            .collect(),
        ),
        liveness_probe: Some(Probe {
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..http_probe("/healthz")
        }),
        // Ready even without workers (it answers UNAVAILABLE then); not ready once draining.
        readiness_probe: Some(Probe {
            period_seconds: Some(5),
            failure_threshold: Some(2),
            ..http_probe("/readyz")
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

fn http_probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".to_owned()),
            ..HTTPGetAction::default()
        }),
        ..Probe::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..SeccompProfile::default()
    }
}

/// `spec.router.resources`, or the defaults when it is unset.
fn resources(spec: &ValidatedSpec<'_>) -> ResourceRequirements {
    let (requests, limits) = match &spec.router().resources {
        Some(resources) => (resources.requests.clone(), resources.limits.clone()),
        None => (
            BTreeMap::from([
                ("cpu".to_owned(), Quantity(DEFAULT_CPU_REQUEST.to_owned())),
                (
                    "memory".to_owned(),
                    Quantity(DEFAULT_MEMORY_REQUEST.to_owned()),
                ),
            ]),
            BTreeMap::new(),
        ),
    };
    ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    }
}

/// `NAME-router`: the router pods' identity.
pub fn service_account(owner: &Owner) -> ServiceAccount {
    ServiceAccount {
        metadata: owner.meta(names::router(&owner.name), owner.labels(COMPONENT_ROUTER)),
        ..ServiceAccount::default()
    }
}

/// `NAME-router`: read the EndpointSlices of this namespace (they cannot be granted per Service:
/// their names are generated) and the one ConfigMap `NAME-routing` (by name: the router lists and
/// watches it with a `metadata.name` field selector), nothing else.
pub fn role(owner: &Owner) -> Role {
    let read = || ["get", "list", "watch"].map(str::to_owned).to_vec();
    Role {
        metadata: owner.meta(names::router(&owner.name), owner.labels(COMPONENT_ROUTER)),
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec![DISCOVERY_GROUP.to_owned()]),
                resources: Some(vec![ENDPOINT_SLICES.to_owned()]),
                verbs: read(),
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["configmaps".to_owned()]),
                resource_names: Some(vec![names::routing_config_map(&owner.name)]),
                verbs: read(),
                ..PolicyRule::default()
            },
        ]),
    }
}

/// `NAME-router`: the Role to the ServiceAccount.
pub fn role_binding(owner: &Owner) -> RoleBinding {
    let name = names::router(&owner.name);
    RoleBinding {
        metadata: owner.meta(name.clone(), owner.labels(COMPONENT_ROUTER)),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name,
            namespace: Some(owner.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ModelDeployment, RouterResources, RouterSpec, RoutingPolicy};
    use crate::test_support::{build_context, demo};
    use crate::validate::validate;

    fn build(md: &ModelDeployment) -> Deployment {
        let ctx = build_context();
        deployment(&validate(md, &ctx.features).unwrap(), &ctx)
    }

    fn pod(deployment: &Deployment) -> PodSpec {
        deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .clone()
            .unwrap()
    }

    #[test]
    fn the_router_deployment_runs_the_router_image_with_its_own_account() {
        let deployment = build(&demo());
        assert_eq!(deployment.metadata.name.as_deref(), Some("demo-router"));
        let labels = deployment.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/component"], "router");
        let spec = deployment.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1), "one router pod by default");
        let selector = spec.selector.match_labels.as_ref().unwrap();
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
        assert_eq!(selector["app.kubernetes.io/component"], "router");
        let rolling = spec
            .strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .clone()
            .unwrap();
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));

        let pod = pod(&deployment);
        assert_eq!(pod.service_account_name.as_deref(), Some("demo-router"));
        assert_eq!(pod.automount_service_account_token, Some(true));
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some("latentserve-router:test"));
        assert_eq!(
            container.command.as_deref(),
            Some(&["latentserve-router".to_owned()][..])
        );
        let env = container.env.as_ref().unwrap();
        let namespace = env.iter().find(|e| e.name == "POD_NAMESPACE").unwrap();
        assert_eq!(
            namespace
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "metadata.namespace"
        );
    }

    #[test]
    fn router_args_follow_the_cli_contract() {
        let mut md = demo();
        md.spec.router = Some(RouterSpec {
            policy: RoutingPolicy::LeastLoaded,
            ..RouterSpec::default()
        });
        let args = pod(&build(&md)).containers[0].args.clone().unwrap();
        assert_eq!(
            args,
            [
                "--endpoints-service",
                "demo-workers",
                "--routing-configmap",
                "demo-routing",
                "--worker-grpc-port",
                "50051",
                "--worker-openai-port",
                "8000",
                "--grpc-addr",
                "0.0.0.0:50051",
                "--openai-addr",
                "0.0.0.0:8000",
                "--metrics-addr",
                "0.0.0.0:9090",
                "--policy",
                "least-loaded",
                "--drain-timeout",
                "60s",
            ]
        );
        let default = pod(&build(&demo())).containers[0].args.clone().unwrap();
        assert!(
            default
                .windows(2)
                .any(|w| w == ["--policy", "prefix-aware"])
        );
    }

    #[test]
    fn the_router_listens_where_the_client_service_sends_and_is_probed_on_metrics() {
        let container = pod(&build(&demo())).containers[0].clone();
        let ports: Vec<_> = container
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [
                ("grpc", GRPC_PORT),
                ("http", HTTP_PORT),
                ("metrics", METRICS_PORT)
            ]
            .map(|(name, port)| (name.to_owned(), port))
        );
        for (probe, path) in [
            (container.liveness_probe.unwrap(), "/healthz"),
            (container.readiness_probe.unwrap(), "/readyz"),
        ] {
            let http = probe.http_get.unwrap();
            assert_eq!(http.path.as_deref(), Some(path));
            assert_eq!(http.port, IntOrString::String("metrics".into()));
        }
    }

    #[test]
    fn router_pods_are_locked_down_and_drain_within_their_grace() {
        let pod = pod(&build(&demo()));
        let pod_security = pod.security_context.unwrap();
        assert_eq!(pod_security.run_as_non_root, Some(true));
        assert_eq!(
            pod_security.seccomp_profile.unwrap().type_,
            "RuntimeDefault"
        );
        let security = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.unwrap().drop,
            Some(vec!["ALL".to_owned()])
        );
        assert!(
            pod.termination_grace_period_seconds.unwrap() > DRAIN_SECONDS,
            "the kubelet waits for the drain"
        );
        assert_eq!(
            DRAIN_SECONDS,
            crate::resources::statefulset::DRAIN_SECONDS,
            "a stream the router forwards may last as long as a worker's drain"
        );
        assert!(pod.node_selector.is_none() && pod.tolerations.is_none());
    }

    #[test]
    fn resources_default_to_a_small_request_and_follow_the_spec() {
        let requirements = pod(&build(&demo())).containers[0]
            .resources
            .clone()
            .unwrap();
        assert_eq!(
            requirements.requests.unwrap()["cpu"],
            Quantity("250m".into())
        );
        assert!(requirements.limits.is_none());

        let mut md = demo();
        md.spec.router = Some(RouterSpec {
            replicas: 3,
            resources: Some(RouterResources {
                requests: BTreeMap::from([("cpu".into(), Quantity("2".into()))]),
                limits: BTreeMap::from([("memory".into(), Quantity("1Gi".into()))]),
            }),
            ..RouterSpec::default()
        });
        let deployment = build(&md);
        assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(3));
        let requirements = pod(&deployment).containers[0].resources.clone().unwrap();
        assert_eq!(
            requirements.requests.unwrap(),
            BTreeMap::from([("cpu".into(), Quantity("2".into()))])
        );
        assert_eq!(
            requirements.limits.unwrap()["memory"],
            Quantity("1Gi".into())
        );
    }

    #[test]
    fn the_role_reads_endpoint_slices_and_the_routing_config_map_only_and_is_bound_to_the_routers_account()
     {
        let md = demo();
        let owner = Owner::of(&md);
        let role = role(&owner);
        assert_eq!(role.metadata.name.as_deref(), Some("demo-router"));
        assert_eq!(role.metadata.namespace.as_deref(), Some("models"));
        let rules = role.rules.unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[0].api_groups.as_deref(),
            Some(&["discovery.k8s.io".to_owned()][..])
        );
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["endpointslices".to_owned()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
        assert!(rules[0].resource_names.is_none());
        assert_eq!(rules[1].api_groups.as_deref(), Some(&[String::new()][..]));
        assert_eq!(
            rules[1].resources.as_deref(),
            Some(&["configmaps".to_owned()][..])
        );
        assert_eq!(
            rules[1].resource_names.as_deref(),
            Some(&["demo-routing".to_owned()][..]),
            "one ConfigMap, by name"
        );
        assert_eq!(rules[1].verbs, ["get", "list", "watch"]);

        let binding = role_binding(&owner);
        assert_eq!(binding.role_ref.kind, "Role");
        assert_eq!(binding.role_ref.name, "demo-router");
        let subject = &binding.subjects.unwrap()[0];
        assert_eq!(
            (
                subject.kind.as_str(),
                subject.name.as_str(),
                subject.namespace.as_deref()
            ),
            ("ServiceAccount", "demo-router", Some("models"))
        );
        let account = service_account(&owner);
        assert_eq!(account.metadata.name.as_deref(), Some("demo-router"));
        assert_eq!(
            account.metadata.labels.unwrap()["app.kubernetes.io/component"],
            "router"
        );
    }
}
