//! One StatefulSet per serving group: `expertShards` worker pods whose ordinal is their shard
//! rank, started in parallel (every shard waits for its peers before it reports ready, so an
//! ordered start would never finish).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, GRPCAction,
    HTTPGetAction, HostPathVolumeSource, ImageVolumeSource, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{BuildContext, EXPERTS_PORT, GRPC_PORT, HTTP_PORT, LABEL_GROUP, METRICS_PORT, names};
use crate::crd::ModelSource;
use crate::placement::{self, PLACEMENT_KEY, PLACEMENT_MOUNT, VERSION_ANNOTATION};
use crate::validate::ValidatedSpec;
use crate::worker_args::{self, ExpertPlacementArg, ServeArgs, TlsFiles};

/// Where the model is mounted in every worker.
pub const MODEL_MOUNT: &str = "/model";
/// Where `spec.tls`'s Secret is mounted (`tls.crt`, `tls.key`, `ca.crt`).
pub const TLS_MOUNT: &str = "/etc/latentserve/tls";
/// Where the expert exchange's token Secret is mounted (`token`, `previous`).
pub const EXPERTS_TOKEN_MOUNT: &str = "/etc/latentserve/experts-token";
/// Secret files are readable by the owner (root) and the pod's fsGroup (the worker's group).
const SECRET_FILE_MODE: i32 = 0o440;
/// Seconds the worker drains in-flight requests after SIGTERM (`--drain-timeout`).
pub const DRAIN_SECONDS: i64 = 60;
/// Grace before the kubelet kills a worker: the drain plus time to flush and exit.
pub const TERMINATION_GRACE_SECONDS: i64 = DRAIN_SECONDS + 30;
/// Startup probe budget: period x failures = one hour, enough to read hundreds of GB of weights.
const STARTUP_PERIOD_SECONDS: i32 = 10;
const STARTUP_FAILURES: i32 = 360;
/// The unprivileged user the worker image runs as.
const WORKER_UID: i64 = 65532;

/// The StatefulSet of serving group `group`.
pub fn stateful_set(spec: &ValidatedSpec<'_>, group: i32, ctx: &BuildContext) -> StatefulSet {
    let owner = spec.owner();
    let mut selector = owner.pod_selector();
    selector.insert(LABEL_GROUP.to_owned(), group.to_string());
    let mut labels = owner.labels("worker");
    labels.insert(LABEL_GROUP.to_owned(), group.to_string());

    // On the StatefulSet and its pods: which placement they run (the placement stage reads it
    // back, and a pod whose value differs from its StatefulSet's is replaced).
    let version = spec.placement_plan().version_of(group).to_string();
    let mut metadata = owner.meta(names::group(&owner.name, group), labels.clone());
    metadata.annotations = Some(BTreeMap::from([(
        VERSION_ANNOTATION.to_owned(),
        version.clone(),
    )]));
    StatefulSet {
        metadata,
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.plan().expert_shards),
            service_name: Some(names::peers_service(&owner.name)),
            pod_management_policy: Some("Parallel".to_owned()),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                ..StatefulSetUpdateStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
                        ("prometheus.io/port".to_owned(), METRICS_PORT.to_string()),
                        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
                        (VERSION_ANNOTATION.to_owned(), version),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(spec, group, ctx)),
            },
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

fn pod_spec(validated: &ValidatedSpec<'_>, group: i32, ctx: &BuildContext) -> PodSpec {
    let spec = validated.spec();
    let mut volumes = vec![
        model_volume(&spec.model),
        Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    if let Some(tls) = validated.worker_tls() {
        volumes.push(secret_volume("tls", &tls.secret_name));
    }
    if needs_experts_token(validated) {
        let name = names::experts_token(&validated.owner().name);
        volumes.push(secret_volume("experts-token", &name));
    }
    let version = validated.placement_plan().version_of(group);
    if version > 0 {
        // Immutable and named by version: a group moves to a new placement only when its
        // StatefulSet names a new ConfigMap, never by the kubelet rewriting a file under it.
        volumes.push(Volume {
            name: "placement".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: placement::config_map_name(&validated.owner().name, version),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    PodSpec {
        containers: vec![worker_container(validated, group, ctx)],
        volumes: Some(volumes),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_UID),
            run_as_group: Some(WORKER_UID),
            fs_group: Some(WORKER_UID),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..PodSecurityContext::default()
        }),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        automount_service_account_token: Some(false),
        service_account_name: spec.service_account_name.clone(),
        node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
        affinity: spec.affinity.clone(),
        priority_class_name: spec.priority_class_name.clone(),
        ..PodSpec::default()
    }
}

/// Whether the group's shards exchange experts, and so share a token.
pub fn needs_experts_token(spec: &ValidatedSpec<'_>) -> bool {
    spec.plan().expert_shards > 1
}

pub fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_owned()),
            default_mode: Some(SECRET_FILE_MODE),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..SeccompProfile::default()
    }
}

fn model_volume(source: &ModelSource) -> Volume {
    let mut volume = Volume {
        name: "model".to_owned(),
        ..Volume::default()
    };
    match source {
        ModelSource::HostPath(host) => {
            volume.host_path = Some(HostPathVolumeSource {
                path: host.path.clone(),
                type_: Some("Directory".to_owned()),
            });
        }
        ModelSource::Pvc(pvc) => {
            volume.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.claim_name.clone(),
                read_only: Some(true),
            });
        }
        ModelSource::Image(image) => {
            volume.image = Some(ImageVolumeSource {
                reference: Some(image.reference.clone()),
                pull_policy: image.pull_policy.map(|p| p.as_str().to_owned()),
            });
        }
    }
    volume
}

/// The worker's command line for serving group `group`.
pub fn serve_args(spec: &ValidatedSpec<'_>, group: i32) -> ServeArgs {
    let serving = spec.serving();
    // Served under the ModelDeployment's name (what OpenAI clients send as `model`, and the
    // metrics' `model` label), unless extraArgs names it.
    let named_by_user = serving
        .extra_args
        .iter()
        .any(|arg| worker_args::flag_of(arg) == worker_args::MODEL_NAME);
    ServeArgs {
        model: MODEL_MOUNT.to_owned(),
        model_name: (!named_by_user).then(|| spec.owner().name.clone()),
        grpc_addr: format!("0.0.0.0:{GRPC_PORT}"),
        openai_addr: format!("0.0.0.0:{HTTP_PORT}"),
        experts_addr: format!("0.0.0.0:{EXPERTS_PORT}"),
        metrics_addr: format!("0.0.0.0:{METRICS_PORT}"),
        shard_count: spec.plan().expert_shards,
        peers: spec
            .plan()
            .ranks()
            .map(|rank| spec.owner().peer_address(group, rank))
            .collect(),
        drain_timeout_seconds: DRAIN_SECONDS,
        max_batch_size: serving.max_batch_size,
        max_seq_len: serving.max_seq_len,
        kv_cache_bytes: spec.kv_cache_bytes(),
        prefix_caching: serving.prefix_caching,
        dtype: serving.dtype,
        tls: spec.worker_tls().map(tls_files),
        experts_token_file: needs_experts_token(spec)
            .then(|| format!("{EXPERTS_TOKEN_MOUNT}/token")),
        expert_placement: match spec.placement_plan().version_of(group) {
            0 => ExpertPlacementArg::Default {
                redundant: spec.redundant_experts(),
            },
            _ => ExpertPlacementArg::File(format!("{PLACEMENT_MOUNT}/{PLACEMENT_KEY}")),
        },
        extra_args: serving.extra_args.clone(),
    }
}

fn worker_container(spec: &ValidatedSpec<'_>, group: i32, ctx: &BuildContext) -> Container {
    let md = spec.model_deployment();
    let port = super::container_port;
    let field_env = super::field_env;
    let sub_path = match &md.spec.model {
        ModelSource::Pvc(pvc) => pvc.sub_path.clone(),
        _ => None,
    };
    Container {
        name: "worker".to_owned(),
        image: Some(
            md.spec
                .image
                .clone()
                .unwrap_or_else(|| ctx.worker_image.clone()),
        ),
        image_pull_policy: md.spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        command: Some(vec!["latentserve-worker".to_owned()]),
        args: Some(serve_args(spec, group).render()),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(vec![
            port("grpc", GRPC_PORT),
            port("http", HTTP_PORT),
            port("experts", EXPERTS_PORT),
            port("metrics", METRICS_PORT),
        ]),
        resources: Some(resources(spec)),
        volume_mounts: Some(volume_mounts(spec, group, sub_path)),
        startup_probe: Some(Probe {
            period_seconds: Some(STARTUP_PERIOD_SECONDS),
            failure_threshold: Some(STARTUP_FAILURES),
            ..http_probe("/healthz")
        }),
        liveness_probe: Some(Probe {
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..http_probe("/healthz")
        }),
        readiness_probe: Some(Probe {
            period_seconds: Some(5),
            failure_threshold: Some(2),
            ..readiness_check(spec, ctx)
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

fn volume_mounts(
    spec: &ValidatedSpec<'_>,
    group: i32,
    model_sub_path: Option<String>,
) -> Vec<VolumeMount> {
    let read_only = |name: &str, path: &str| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let mut mounts = vec![
        VolumeMount {
            sub_path: model_sub_path,
            ..read_only("model", MODEL_MOUNT)
        },
        VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        },
    ];
    // Whole Secrets, never subPath: the kubelet updates only whole-volume mounts when a Secret
    // changes, which is how rotated certificates and tokens reach a running worker.
    if spec.worker_tls().is_some() {
        mounts.push(read_only("tls", TLS_MOUNT));
    }
    if needs_experts_token(spec) {
        mounts.push(read_only("experts-token", EXPERTS_TOKEN_MOUNT));
    }
    if spec.placement_plan().version_of(group) > 0 {
        mounts.push(read_only("placement", PLACEMENT_MOUNT));
    }
    mounts
}

/// Where a container finds `spec.tls`'s Secret, mounted whole at [`TLS_MOUNT`].
pub fn tls_files(tls: &crate::crd::TlsSpec) -> TlsFiles {
    TlsFiles {
        cert: format!("{TLS_MOUNT}/tls.crt"),
        key: format!("{TLS_MOUNT}/tls.key"),
        client_ca: tls
            .client_auth_required()
            .then(|| format!("{TLS_MOUNT}/ca.crt")),
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

/// gRPC health where the kubelet can probe it (1.24+, plain text only), the worker's HTTP
/// `/readyz` otherwise; both report SERVING only when the shard and all its peers are ready.
fn readiness_check(spec: &ValidatedSpec<'_>, ctx: &BuildContext) -> Probe {
    // The kubelet's gRPC probe speaks no TLS.
    if ctx.features.grpc_probes && spec.worker_tls().is_none() {
        Probe {
            grpc: Some(GRPCAction {
                port: GRPC_PORT,
                service: None,
            }),
            ..Probe::default()
        }
    } else {
        http_probe("/readyz")
    }
}

fn resources(spec: &ValidatedSpec<'_>) -> ResourceRequirements {
    let spec = spec.resources();
    let mut requests = spec.requests.clone();
    let mut limits = spec.limits.clone();
    if let Some(gpus) = spec.gpus.filter(|&n| n > 0) {
        // Extended resources must have requests equal to limits.
        let count = Quantity(gpus.to_string());
        requests.insert(spec.gpu_resource_name().to_owned(), count.clone());
        limits.insert(spec.gpu_resource_name().to_owned(), count);
    }
    ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Dtype, ModelDeployment, PvcSource};
    use crate::test_support::{build_context, demo, features_1_20};
    use crate::validate::validate;

    fn build_with(md: &ModelDeployment, group: i32, ctx: &BuildContext) -> StatefulSet {
        stateful_set(&validate(md, &ctx.features).unwrap(), group, ctx)
    }

    fn build(md: &ModelDeployment, group: i32) -> StatefulSet {
        build_with(md, group, &build_context())
    }

    fn container(sts: &StatefulSet) -> Container {
        sts.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .clone()
    }

    fn pod(sts: &StatefulSet) -> PodSpec {
        sts.spec.as_ref().unwrap().template.spec.clone().unwrap()
    }

    fn secret_of(pod: &PodSpec, volume: &str) -> Option<SecretVolumeSource> {
        let volume = pod.volumes.as_ref()?.iter().find(|v| v.name == volume)?;
        volume.secret.clone()
    }

    fn mount<'a>(container: &'a Container, volume: &str) -> Option<&'a VolumeMount> {
        container
            .volume_mounts
            .as_ref()?
            .iter()
            .find(|m| m.name == volume)
    }

    fn flag_value(args: &[String], flag: &str) -> Option<String> {
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1).cloned()
    }

    #[test]
    fn spec_tls_mounts_its_secret_and_passes_the_files() {
        let md = demo();
        let plain = container(&build(&md, 0));
        assert!(mount(&plain, "tls").is_none());
        assert!(!plain.args.unwrap().iter().any(|a| a.starts_with("--tls")));

        let mut md = demo();
        md.spec.tls = Some(crate::crd::TlsSpec {
            secret_name: "demo-cert".into(),
            client_auth: None,
        });
        // With the router in front, TLS ends at the router: the workers stay plain.
        let behind_router = container(&build(&md, 0));
        assert!(mount(&behind_router, "tls").is_none());
        assert!(
            !behind_router
                .args
                .unwrap()
                .iter()
                .any(|a| a.starts_with("--tls"))
        );
        // Without it, the workers terminate TLS themselves.
        md.spec.router = Some(crate::crd::RouterSpec {
            replicas: 0,
            ..crate::crd::RouterSpec::default()
        });
        let sts = build(&md, 0);
        let secret = secret_of(&pod(&sts), "tls").unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("demo-cert"));
        assert_eq!(secret.default_mode, Some(0o440));
        let worker = container(&sts);
        let tls_mount = mount(&worker, "tls").unwrap();
        assert_eq!(tls_mount.mount_path, TLS_MOUNT);
        assert_eq!(tls_mount.read_only, Some(true));
        assert_eq!(
            tls_mount.sub_path, None,
            "a subPath mount never sees a rotation"
        );
        let args = worker.args.clone().unwrap();
        assert_eq!(
            flag_value(&args, "--tls-cert").as_deref(),
            Some("/etc/latentserve/tls/tls.crt")
        );
        assert_eq!(
            flag_value(&args, "--tls-key").as_deref(),
            Some("/etc/latentserve/tls/tls.key")
        );
        assert!(flag_value(&args, "--tls-client-ca").is_none());
        // The kubelet's gRPC probe speaks no TLS: readiness is the metrics port's /readyz.
        let readiness = worker.readiness_probe.unwrap();
        assert!(readiness.grpc.is_none());
        assert_eq!(readiness.http_get.unwrap().path.as_deref(), Some("/readyz"));

        md.spec.tls.as_mut().unwrap().client_auth = Some(crate::crd::ClientAuth::Required);
        let args = container(&build(&md, 0)).args.unwrap();
        assert_eq!(
            flag_value(&args, "--tls-client-ca").as_deref(),
            Some("/etc/latentserve/tls/ca.crt")
        );
    }

    #[test]
    fn sharded_groups_mount_the_experts_token_single_shards_do_not() {
        let md = demo();
        let sts = build(&md, 0);
        let secret = secret_of(&pod(&sts), "experts-token").unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("demo-experts-token"));
        let worker = container(&sts);
        let token_mount = mount(&worker, "experts-token").unwrap();
        assert_eq!(token_mount.mount_path, EXPERTS_TOKEN_MOUNT);
        assert_eq!(token_mount.read_only, Some(true));
        assert_eq!(
            flag_value(&worker.args.unwrap(), "--experts-token-file").as_deref(),
            Some("/etc/latentserve/experts-token/token")
        );

        let mut single = demo();
        single.spec.expert_shards = 1;
        let sts = build(&single, 0);
        assert!(secret_of(&pod(&sts), "experts-token").is_none());
        let worker = container(&sts);
        assert!(mount(&worker, "experts-token").is_none());
        assert!(flag_value(&worker.args.unwrap(), "--experts-token-file").is_none());
    }

    #[test]
    fn a_group_has_one_pod_per_shard_behind_the_peers_service() {
        let sts = build(&demo(), 1);
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(sts.metadata.name.as_deref(), Some("demo-1"));
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(spec.service_name.as_deref(), Some("demo-peers"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        let selector = spec.selector.match_labels.as_ref().unwrap();
        assert_eq!(selector[LABEL_GROUP], "1");
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    }

    #[test]
    fn a_single_shard_gets_no_peer_list() {
        // The worker refuses --peers without shards: such pods would never start.
        let mut md = demo();
        md.spec.expert_shards = 1;
        let args = container(&build(&md, 0)).args.unwrap();
        assert_eq!(flag_value(&args, "--shard-count").as_deref(), Some("1"));
        assert!(!args.iter().any(|a| a == "--peers"), "{args:?}");
    }

    #[test]
    fn worker_args_follow_the_cli_contract() {
        let mut md = demo();
        let serving = md.spec.serving.as_mut().unwrap();
        serving.prefix_caching = Some(false);
        serving.dtype = Some(Dtype::F16);
        serving.extra_args = vec!["--log-format=json".into()];
        let args = container(&build(&md, 0)).args.unwrap();
        assert_eq!(
            args,
            [
                "serve",
                "--model",
                "/model",
                "--model-name",
                "demo",
                "--grpc-addr",
                "0.0.0.0:50051",
                "--openai-addr",
                "0.0.0.0:8000",
                "--experts-addr",
                "0.0.0.0:50052",
                "--metrics-addr",
                "0.0.0.0:9090",
                "--shard-rank-from-pod-name",
                "--shard-count",
                "2",
                "--peers",
                "demo-0-0.demo-peers.models.svc:50052,demo-0-1.demo-peers.models.svc:50052",
                "--drain-timeout",
                "60s",
                "--max-batch-size",
                "64",
                "--max-seq-len",
                "8192",
                "--kv-cache-memory",
                "8589934592",
                "--no-prefix-caching",
                "--dtype",
                "f16",
                "--experts-token-file",
                "/etc/latentserve/experts-token/token",
                "--log-format=json",
            ]
        );
        let env = container(&build(&md, 0)).env.unwrap();
        assert_eq!(env[0].name, "POD_NAME");
        assert_eq!(
            env[0]
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "metadata.name"
        );
    }

    #[test]
    fn the_model_is_served_under_the_deployments_name_unless_extra_args_name_it() {
        let mut md = demo();
        let named = |md: &ModelDeployment| {
            let args = container(&build(md, 0)).args.unwrap();
            args.iter()
                .filter(|arg| arg.starts_with("--model-name"))
                .count()
        };
        assert_eq!(named(&md), 1);
        md.spec.serving.as_mut().unwrap().extra_args = vec!["--model-name=deepseek-v3".into()];
        assert_eq!(named(&md), 1, "the user's flag alone");
        let args = container(&build(&md, 0)).args.unwrap();
        assert_eq!(
            args.last().map(String::as_str),
            Some("--model-name=deepseek-v3")
        );
    }

    #[test]
    fn pods_are_locked_down() {
        let sts = build(&demo(), 0);
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let pod_security = pod.security_context.unwrap();
        assert_eq!(pod_security.run_as_non_root, Some(true));
        assert_eq!(
            pod_security.seccomp_profile.unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        let security = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.unwrap().drop,
            Some(vec!["ALL".to_owned()])
        );
        assert!(pod.termination_grace_period_seconds.unwrap() > DRAIN_SECONDS);
        let mounts = pod.containers[0].volume_mounts.clone().unwrap();
        assert_eq!(mounts[0].mount_path, "/model");
        assert_eq!(mounts[0].read_only, Some(true));
        let volumes = pod.volumes.unwrap();
        assert_eq!(
            volumes[0].host_path.as_ref().unwrap().path,
            "/srv/models/demo"
        );
    }

    #[test]
    fn gpus_are_requested_and_limited() {
        let mut md = demo();
        let resources = md.spec.resources.get_or_insert_default();
        resources.gpus = Some(2);
        resources.gpu_resource_name = Some("amd.com/gpu".into());
        resources
            .requests
            .insert("memory".into(), Quantity("64Gi".into()));
        let requirements = container(&build(&md, 0)).resources.unwrap();
        assert_eq!(
            requirements.limits.unwrap()["amd.com/gpu"],
            Quantity("2".into())
        );
        let requests = requirements.requests.unwrap();
        assert_eq!(requests["amd.com/gpu"], Quantity("2".into()));
        assert_eq!(requests["memory"], Quantity("64Gi".into()));
    }

    #[test]
    fn probes_use_grpc_where_served_and_http_readyz_otherwise() {
        let md = demo();
        let new = container(&build(&md, 0));
        let readiness = new.readiness_probe.unwrap();
        assert_eq!(readiness.grpc.unwrap().port, GRPC_PORT);
        let mut old_ctx = build_context();
        old_ctx.features = features_1_20();
        let old = container(&build_with(&md, 0, &old_ctx));
        let readiness = old.readiness_probe.unwrap();
        assert!(readiness.grpc.is_none());
        assert_eq!(readiness.http_get.unwrap().path.as_deref(), Some("/readyz"));
        let startup = old.startup_probe.unwrap();
        let budget = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
        assert!(budget >= 3600, "startup budget {budget}s");
    }

    #[test]
    fn pvc_models_mount_their_sub_path_read_only() {
        let mut md = demo();
        md.spec.model = ModelSource::Pvc(PvcSource {
            claim_name: "weights".into(),
            sub_path: Some("deepseek-v2-lite".into()),
        });
        let sts = build(&md, 0);
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let claim = pod.volumes.unwrap()[0]
            .persistent_volume_claim
            .clone()
            .unwrap();
        assert_eq!(claim.claim_name, "weights");
        assert_eq!(claim.read_only, Some(true));
        let mount = &pod.containers[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!(mount.sub_path.as_deref(), Some("deepseek-v2-lite"));
    }

    #[test]
    fn image_defaults_to_the_operator_flag_and_annotations_invite_scraping() {
        let mut md = demo();
        md.spec.image = None;
        let sts = build(&md, 0);
        assert_eq!(
            container(&sts).image.as_deref(),
            Some("latentserve-worker:test")
        );
        let template = sts.spec.unwrap().template.metadata.unwrap();
        assert_eq!(template.annotations.unwrap()["prometheus.io/port"], "9090");
    }

    #[test]
    fn the_worker_names_each_port_it_listens_on() {
        let worker = container(&build(&demo(), 0));
        let ports: Vec<_> = worker
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
                ("experts", EXPERTS_PORT),
                ("metrics", METRICS_PORT)
            ]
            .map(|(name, port)| (name.to_owned(), port))
        );
        let args = worker.args.unwrap();
        for (flag, port) in [
            ("--grpc-addr", GRPC_PORT),
            ("--openai-addr", HTTP_PORT),
            ("--experts-addr", EXPERTS_PORT),
            ("--metrics-addr", METRICS_PORT),
        ] {
            let at = args.iter().position(|a| a == flag).unwrap();
            assert_eq!(args[at + 1], format!("0.0.0.0:{port}"), "{flag}");
        }
    }
}
