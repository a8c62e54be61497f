//! The operator against a real control plane (kube-apiserver, etcd, kube-controller-manager from
//! `tests/k8s/up.sh`), run as a real process with the ServiceAccount token of the checked-in
//! RBAC. Each test works in its own namespace with its own operator, so they run in parallel.
//! There is no kubelet: where a scenario needs ready pods, the test sets pod status as a kubelet
//! would.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use latentserve_e2e::k8s::{
    OPERATOR_NAMESPACE, OperatorOptions, OperatorProcess, admin_client, create_namespace,
    delete_namespace, install_crd, operator_client, operator_kubeconfig, wait_for,
};
use latentserve_operator::crd::ModelDeployment;
use latentserve_operator::leader::{LEASE_DURATION, RETRY_PERIOD};
use serde_json::{Value, json};

const SHORT: Duration = Duration::from_secs(30);
/// The garbage collector needs ~35 s for custom-resource owners on a fresh CRD.
const GC_LIMIT: Duration = Duration::from_secs(120);

struct Setup {
    admin: Client,
    namespace: String,
    kubeconfig: PathBuf,
}

impl Setup {
    async fn new(prefix: &str) -> Option<Self> {
        let admin = admin_client().await?;
        install_crd(&admin).await.expect("the CRD installs");
        let kubeconfig = operator_kubeconfig(&admin)
            .await
            .expect("operator RBAC sets up");
        let namespace = create_namespace(&admin, prefix).await.expect("namespace");
        Some(Self {
            admin,
            namespace,
            kubeconfig,
        })
    }

    fn operator(&self, identity: &str, lease: Option<&str>) -> OperatorProcess {
        OperatorProcess::start(&OperatorOptions {
            kubeconfig: &self.kubeconfig,
            namespace: &self.namespace,
            leader_lease: lease,
            identity,
            extra_args: &[],
        })
        .expect("operator starts")
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.admin.clone(), &self.namespace)
    }

    fn pdbs(&self) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"),
            "poddisruptionbudgets",
        );
        Api::namespaced_with(self.admin.clone(), &self.namespace, &resource)
    }

    async fn apply(&self, name: &str, spec: Value) {
        let body = json!({
            "apiVersion": "latentserve.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name},
            "spec": spec,
        });
        self.api::<ModelDeployment>()
            .patch(
                name,
                &PatchParams::apply("kubectl").force(),
                &Patch::Apply(&body),
            )
            .await
            .expect("ModelDeployment applies");
    }

    async fn get(&self, name: &str) -> ModelDeployment {
        self.api::<ModelDeployment>()
            .get(name)
            .await
            .expect("ModelDeployment exists")
    }

    async fn cleanup(self) {
        delete_namespace(&self.admin, &self.namespace).await;
    }
}

fn demo_spec(shards: i32) -> Value {
    json!({
        "model": {"hostPath": {"path": "/srv/models/demo"}},
        "replicas": 1,
        "expertShards": shards,
        "serving": {"maxBatchSize": 64, "maxSeqLen": 8192, "kvCacheMemory": "8Gi"},
    })
}

/// Sets every pod of the namespace's StatefulSet `sts` Running and Ready, as a kubelet would.
async fn make_pods_ready(setup: &Setup, sts: &str, shards: i32) {
    let pods = setup.api::<Pod>();
    for rank in 0..shards {
        let name = format!("{sts}-{rank}");
        wait_for(&format!("pod {name}"), SHORT, || async {
            pods.get(&name).await.ok()
        })
        .await;
        pods.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&ready_status("worker")),
        )
        .await
        .expect("pod status patches");
    }
}

/// A running, Ready pod's status, as a kubelet reports it.
fn ready_status(container: &str) -> Value {
    json!({"status": {
        "phase": "Running",
        "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ],
        "containerStatuses": [{
            "name": container, "ready": true, "restartCount": 0, "image": "test",
            "imageID": "", "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        }]
    }})
}

/// Sets the router pod of ModelDeployment `name` (made by the real Deployment and ReplicaSet
/// controllers) Running and Ready, as a kubelet would.
async fn make_router_ready(setup: &Setup, name: &str) {
    let pods = setup.api::<Pod>();
    let selector = format!("app.kubernetes.io/instance={name},app.kubernetes.io/component=router");
    let pod = wait_for(&format!("the router pod of {name}"), SHORT, || async {
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .ok()?;
        list.items.into_iter().next()
    })
    .await;
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&ready_status("router")),
    )
    .await
    .expect("router pod status patches");
}

fn condition(md: &ModelDeployment, type_: &str) -> Option<(String, String)> {
    let status = md.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn crd_is_established_and_the_schema_rejects_invalid_objects() {
    let Some(setup) = Setup::new("op-schema").await else {
        return;
    };
    let api = setup.api::<ModelDeployment>();
    let invalid = [
        ("no-model", json!({"replicas": 1})),
        (
            "two-models",
            json!({"model": {"hostPath": {"path": "/m"}, "pvc": {"claimName": "w"}}}),
        ),
        (
            "negative-replicas",
            json!({"model": {"hostPath": {"path": "/m"}}, "replicas": -1}),
        ),
        (
            "zero-shards",
            json!({"model": {"hostPath": {"path": "/m"}}, "expertShards": 0}),
        ),
        (
            "bad-dtype",
            json!({"model": {"hostPath": {"path": "/m"}}, "serving": {"dtype": "int3"}}),
        ),
        (
            "relative-path",
            json!({"model": {"hostPath": {"path": "srv/m"}}}),
        ),
        (
            "bad-service",
            json!({"model": {"hostPath": {"path": "/m"}}, "service": {"type": "Ingress"}}),
        ),
    ];
    for (name, spec) in invalid {
        let body: ModelDeployment = match serde_json::from_value(json!({
            "apiVersion": "latentserve.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name}, "spec": spec.clone(),
        })) {
            Ok(md) => md,
            // Shapes the Rust types cannot even hold go through as raw JSON.
            Err(_) => {
                let raw: Api<DynamicObject> = Api::namespaced_with(
                    setup.admin.clone(),
                    &setup.namespace,
                    &ApiResource::erase::<ModelDeployment>(&()),
                );
                let object: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": "latentserve.io/v1alpha1", "kind": "ModelDeployment",
                    "metadata": {"name": name}, "spec": spec,
                }))
                .unwrap();
                let err = raw
                    .create(&PostParams::default(), &object)
                    .await
                    .unwrap_err();
                assert!(
                    matches!(&err, kube::Error::Api(s) if s.code == 422),
                    "{name}: {err}"
                );
                continue;
            }
        };
        let err = api.create(&PostParams::default(), &body).await.unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 422),
            "{name} accepted: {err}"
        );
    }
    let valid: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "latentserve.io/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "valid"}, "spec": demo_spec(2),
    }))
    .unwrap();
    let created = api
        .create(&PostParams::default(), &valid)
        .await
        .expect("valid object is accepted");
    assert_eq!(created.spec.replicas, 1, "defaults are applied");
    setup.cleanup().await;
}

#[tokio::test]
async fn a_model_deployment_becomes_wired_workers_scales_updates_pauses_and_is_collected() {
    let Some(setup) = Setup::new("op-lifecycle").await else {
        return;
    };
    let mut operator = setup.operator("op-lifecycle", None);
    setup.apply("demo", demo_spec(2)).await;
    let md = setup.get("demo").await;
    let uid = md.uid().unwrap();

    // Children with owner references, labels and the worker's arguments.
    let statefulsets = setup.api::<StatefulSet>();
    let sts = wait_for("StatefulSet demo-0", SHORT, || async {
        statefulsets.get("demo-0").await.ok()
    })
    .await;
    operator.ensure_running().unwrap();
    let owner = &sts.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("ModelDeployment", uid.as_str(), Some(true))
    );
    assert_eq!(sts.labels()["app.kubernetes.io/instance"], "demo");
    assert_eq!(
        sts.labels()["app.kubernetes.io/managed-by"],
        "latentserve-operator"
    );
    let pod_spec = sts.spec.clone().unwrap().template.spec.unwrap();
    let args = pod_spec.containers[0].args.clone().unwrap();
    let ns = &setup.namespace;
    let peers = format!("demo-0-0.demo-peers.{ns}.svc:50052,demo-0-1.demo-peers.{ns}.svc:50052");
    for expected in [
        "--shard-rank-from-pod-name",
        "--peers",
        peers.as_str(),
        "--shard-count",
        "--kv-cache-memory",
        "8589934592",
    ] {
        assert!(
            args.iter().any(|a| a == expected),
            "{expected} missing from {args:?}"
        );
    }
    let readiness = pod_spec.containers[0].readiness_probe.clone().unwrap();
    assert_eq!(
        readiness.http_get.unwrap().path.as_deref(),
        Some("/readyz"),
        "1.20 has no gRPC probes"
    );
    for name in ["demo", "demo-peers"] {
        let service = setup.api::<Service>().get(name).await.expect("service");
        assert_eq!(service.owner_references()[0].uid, uid);
    }
    assert!(setup.api::<ConfigMap>().get("demo-config").await.is_ok());
    assert!(setup.api::<NetworkPolicy>().get("demo").await.is_ok());
    // The budget is applied right after its StatefulSet, so it may not be there yet.
    wait_for(
        "the policy/v1beta1 budget demo-0 on 1.20",
        SHORT,
        || async { setup.pdbs().get("demo-0").await.ok() },
    )
    .await;

    // The real StatefulSet controller creates the pods; readiness makes the group available.
    let pods = setup.api::<Pod>();
    wait_for("pods demo-0-0 and demo-0-1", SHORT, || async {
        let workers = ListParams::default().labels("app.kubernetes.io/component=worker");
        let list = pods.list(&workers).await.ok()?;
        (list.items.len() == 2).then_some(())
    })
    .await;
    // The pods can appear before the reconcile that created their StatefulSet has written the
    // status (it prunes in between), so wait for the first status, then check what it says.
    let available = wait_for("the first Available condition", SHORT, || async {
        condition(&setup.get("demo").await, "Available")
    })
    .await;
    assert_eq!(available, ("False".into(), "NoGroupReady".into()));
    make_pods_ready(&setup, "demo-0", 2).await;
    // The clients reach the workers through the router: no router pod ready, no availability.
    wait_for("Available=False/NoRouterReady", SHORT, || async {
        let md = setup.get("demo").await;
        (condition(&md, "Available")? == ("False".into(), "NoRouterReady".into())).then_some(())
    })
    .await;
    make_router_ready(&setup, "demo").await;
    let md = wait_for("Available", SHORT, || async {
        let md = setup.get("demo").await;
        (condition(&md, "Available")?.0 == "True").then_some(md)
    })
    .await;
    let status = md.status.clone().unwrap();
    assert_eq!((status.replicas, status.ready_replicas), (1, 1));
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("demo.{ns}.svc:50051").as_str())
    );
    assert_eq!(status.observed_generation, md.metadata.generation);

    // `kubectl scale` -> a second group.
    let scale = json!({"spec": {"replicas": 2}});
    setup
        .api::<ModelDeployment>()
        .patch_scale("demo", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .expect("scale subresource");
    wait_for("StatefulSet demo-1", SHORT, || async {
        statefulsets.get("demo-1").await.ok()
    })
    .await;
    wait_for("budget demo-1", SHORT, || async {
        setup.pdbs().get("demo-1").await.ok()
    })
    .await;
    let events = setup.api::<k8s_openapi::api::events::v1::Event>();
    for reason in ["Created", "Available", "Scaled"] {
        wait_for(&format!("a {reason} event"), SHORT, || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("demo")
                })
                .then_some(())
        })
        .await;
    }

    // A spec change -> the StatefulSets carry the new arguments.
    let mut spec = demo_spec(2);
    spec["replicas"] = json!(2);
    spec["serving"]["maxBatchSize"] = json!(32);
    setup.apply("demo", spec.clone()).await;
    for group in ["demo-0", "demo-1"] {
        wait_for(
            &format!("{group} with --max-batch-size 32"),
            SHORT,
            || async {
                let sts = statefulsets.get(group).await.ok()?;
                let args = sts.spec?.template.spec?.containers[0].args.clone()?;
                args.windows(2)
                    .any(|w| w[0] == "--max-batch-size" && w[1] == "32")
                    .then_some(())
            },
        )
        .await;
    }

    // Scale down -> the extra group goes.
    spec["replicas"] = json!(1);
    setup.apply("demo", spec.clone()).await;
    wait_for("demo-1 deleted", SHORT, || async {
        statefulsets
            .get_opt("demo-1")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    wait_for("budget demo-1 deleted", SHORT, || async {
        setup
            .pdbs()
            .get_opt("demo-1")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    // Paused: spec changes are not applied, and the status says so.
    spec["paused"] = json!(true);
    spec["serving"]["maxBatchSize"] = json!(16);
    setup.apply("demo", spec.clone()).await;
    wait_for("Progressing=Paused", SHORT, || async {
        let md = setup.get("demo").await;
        (condition(&md, "Progressing")? == ("False".into(), "Paused".into())).then_some(())
    })
    .await;
    let args = statefulsets
        .get("demo-0")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--max-batch-size" && w[1] == "32"),
        "paused object changed: {args:?}"
    );

    // An invalid spec (caught only by the operator on 1.20) -> Degraded/InvalidSpec naming the field.
    spec["paused"] = json!(false);
    spec["serving"]["extraArgs"] = json!(["--peers=evil:1"]);
    setup.apply("demo", spec.clone()).await;
    let message = wait_for("Degraded=InvalidSpec", SHORT, || async {
        let md = setup.get("demo").await;
        let c = md
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Degraded")?;
        (c.reason == "InvalidSpec").then_some(c.message)
    })
    .await;
    assert!(message.contains("spec.serving.extraArgs[0]"), "{message}");

    // Delete -> the garbage collector removes the children.
    setup
        .api::<ModelDeployment>()
        .delete("demo", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("children garbage-collected", GC_LIMIT, || async {
        let sts = statefulsets.list(&ListParams::default()).await.ok()?;
        let services = setup
            .api::<Service>()
            .list(&ListParams::default())
            .await
            .ok()?;
        let configs = setup
            .api::<ConfigMap>()
            .list(
                &ListParams::default().labels("app.kubernetes.io/managed-by=latentserve-operator"),
            )
            .await
            .ok()?;
        (sts.items.is_empty() && services.items.is_empty() && configs.items.is_empty())
            .then_some(())
    })
    .await;
    operator.ensure_running().unwrap();
    setup.cleanup().await;
}

/// A client that acts as ServiceAccount `account` of the setup's namespace, with a token from
/// the TokenRequest API.
async fn client_as(setup: &Setup, account: &str) -> Client {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use latentserve_e2e::node_agent::credentials::ClusterAccess;
    let accounts = setup.api::<ServiceAccount>();
    let issued: TokenRequest = accounts
        .create_subresource(
            "token",
            account,
            &PostParams::default(),
            &TokenRequest::default(),
        )
        .await
        .expect("a token of the account");
    let token = issued.status.expect("an issued token").token;
    let admin = latentserve_e2e::k8s::kubeconfig_path();
    let access = ClusterAccess::from_kubeconfig(
        &std::fs::read_to_string(&admin).unwrap(),
        admin.parent().unwrap(),
    )
    .unwrap();
    let kubeconfig = Kubeconfig::from_yaml(&access.kubeconfig(&token, &setup.namespace)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// EndpointSlices as this server serves them (`discovery.k8s.io/v1beta1` on 1.20).
async fn endpoint_slices(setup: &Setup) -> ApiResource {
    kube::discovery::group(&setup.admin, "discovery.k8s.io")
        .await
        .unwrap()
        .recommended_kind("EndpointSlice")
        .expect("the server serves EndpointSlices")
        .0
}

fn forbidden<T: std::fmt::Debug>(result: kube::Result<T>) -> bool {
    matches!(&result, Err(kube::Error::Api(s)) if s.code == 403)
}

#[tokio::test]
async fn the_router_fronts_the_workers_with_its_own_narrow_role_and_goes_when_turned_off() {
    let Some(setup) = Setup::new("op-router").await else {
        return;
    };
    let mut operator = setup.operator("op-router", None);
    let mut spec = demo_spec(2);
    spec["service"] = json!({"allowedNamespaces": {"matchLabels": {"team": "chat"}}});
    setup.apply("demo", spec.clone()).await;
    let uid = setup.get("demo").await.uid().unwrap();
    let owned_by_demo = |meta: &kube::api::ObjectMeta| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|r| r.uid == uid && r.controller == Some(true))
    };

    // The router: a Deployment of the router image with its own account, by default.
    let deployments = setup.api::<Deployment>();
    let deployment = wait_for("Deployment demo-router", SHORT, || async {
        deployments.get("demo-router").await.ok()
    })
    .await;
    operator.ensure_running().unwrap();
    assert!(owned_by_demo(&deployment.metadata));
    assert_eq!(deployment.labels()["app.kubernetes.io/component"], "router");
    let pod = deployment.spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("demo-router"));
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("latentserve-router:test"));
    let args = container.args.clone().unwrap();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--endpoints-service" && w[1] == "demo-workers"),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--policy" && w[1] == "prefix-aware"),
        "{args:?}"
    );
    // Its account, Role and binding (applied before the Deployment).
    let account = setup
        .api::<ServiceAccount>()
        .get("demo-router")
        .await
        .unwrap();
    assert!(owned_by_demo(&account.metadata));
    let role = setup.api::<Role>().get("demo-router").await.unwrap();
    assert!(owned_by_demo(&role.metadata));
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(
        rules[0].api_groups,
        Some(vec!["discovery.k8s.io".to_owned()])
    );
    assert_eq!(rules[0].resources, Some(vec!["endpointslices".to_owned()]));
    // The drain list, by name only.
    assert_eq!(rules[1].resources, Some(vec!["configmaps".to_owned()]));
    assert_eq!(
        rules[1].resource_names,
        Some(vec!["demo-routing".to_owned()])
    );
    let binding = setup.api::<RoleBinding>().get("demo-router").await.unwrap();
    assert_eq!(binding.role_ref.name, "demo-router");

    // The discovery Service lists ready workers only; the client Service selects the router.
    let services = setup.api::<Service>();
    let workers = services.get("demo-workers").await.unwrap().spec.unwrap();
    assert_eq!(workers.cluster_ip.as_deref(), Some("None"));
    assert_ne!(workers.publish_not_ready_addresses, Some(true));
    assert_eq!(
        workers.selector.unwrap()["app.kubernetes.io/component"],
        "worker"
    );
    let client_selector = |service: Service| {
        service.spec.unwrap().selector.unwrap()["app.kubernetes.io/component"].clone()
    };
    assert_eq!(
        client_selector(services.get("demo").await.unwrap()),
        "router"
    );
    // The tenants reach the router; the workers admit the router.
    let policies = setup.api::<NetworkPolicy>();
    let router_policy = policies.get("demo-router").await.unwrap().spec.unwrap();
    let from = router_policy.ingress.unwrap()[0].from.clone().unwrap();
    assert_eq!(
        from[0]
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["team"],
        "chat"
    );
    let worker_policy = policies.get("demo").await.unwrap().spec.unwrap();
    let from = worker_policy.ingress.unwrap()[0].from.clone().unwrap();
    assert_eq!(
        from[0]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["app.kubernetes.io/component"],
        "router"
    );

    // The router's token reads EndpointSlices of this namespace and nothing else.
    let as_router = client_as(&setup, "demo-router").await;
    let slices = endpoint_slices(&setup).await;
    let here: Api<DynamicObject> =
        Api::namespaced_with(as_router.clone(), &setup.namespace, &slices);
    here.list(&ListParams::default())
        .await
        .expect("the router lists EndpointSlices in its namespace");
    let elsewhere: Api<DynamicObject> = Api::namespaced_with(as_router.clone(), "default", &slices);
    assert!(forbidden(elsewhere.list(&ListParams::default()).await));
    let all: Api<DynamicObject> = Api::all_with(as_router.clone(), &slices);
    assert!(forbidden(all.list(&ListParams::default()).await));
    let pods: Api<Pod> = Api::namespaced(as_router.clone(), &setup.namespace);
    assert!(forbidden(pods.list(&ListParams::default()).await));
    let secrets: Api<Secret> = Api::namespaced(as_router, &setup.namespace);
    assert!(forbidden(secrets.list(&ListParams::default()).await));

    // Ready workers and a ready router: Available, and the status counts the router.
    make_pods_ready(&setup, "demo-0", 2).await;
    make_router_ready(&setup, "demo").await;
    let md = wait_for("Available with the router ready", SHORT, || async {
        let md = setup.get("demo").await;
        (condition(&md, "Available")?.0 == "True" && condition(&md, "RouterReady")?.0 == "True")
            .then_some(md)
    })
    .await;
    let router = md.status.unwrap().router.unwrap();
    assert_eq!((router.replicas, router.ready_replicas), (1, 1));

    // Off: the router's objects go, the client Service selects the workers again, and the
    // workers stay available without it.
    spec["router"] = json!({"replicas": 0});
    setup.apply("demo", spec.clone()).await;
    wait_for("the router's objects deleted", SHORT, || async {
        let gone = deployments.get_opt("demo-router").await.ok()?.is_none()
            && setup
                .api::<ServiceAccount>()
                .get_opt("demo-router")
                .await
                .ok()?
                .is_none()
            && setup
                .api::<Role>()
                .get_opt("demo-router")
                .await
                .ok()?
                .is_none()
            && setup
                .api::<RoleBinding>()
                .get_opt("demo-router")
                .await
                .ok()?
                .is_none()
            && services.get_opt("demo-workers").await.ok()?.is_none()
            && policies.get_opt("demo-router").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    assert_eq!(
        client_selector(services.get("demo").await.unwrap()),
        "worker"
    );
    let md = wait_for("the status without the router", SHORT, || async {
        let md = setup.get("demo").await;
        (md.status.as_ref()?.router.is_none()).then_some(md)
    })
    .await;
    assert_eq!(condition(&md, "Available").unwrap().0, "True");
    assert_eq!(condition(&md, "RouterReady"), None);

    // On again, two router pods taking turns.
    spec["router"] = json!({"replicas": 2, "policy": "RoundRobin"});
    setup.apply("demo", spec).await;
    let deployment = wait_for("Deployment demo-router again", SHORT, || async {
        deployments.get("demo-router").await.ok()
    })
    .await;
    let deployment_spec = deployment.spec.unwrap();
    assert_eq!(deployment_spec.replicas, Some(2));
    let args = deployment_spec.template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--policy" && w[1] == "round-robin"),
        "{args:?}"
    );
    // The Service is applied after the Deployment in the same reconcile: wait for it too.
    wait_for("the client Service back on the router", SHORT, || async {
        let service = services.get("demo").await.ok()?;
        (client_selector(service) == "router").then_some(())
    })
    .await;
    operator.ensure_running().unwrap();
    setup.cleanup().await;
}

/// `(kind/name, resourceVersion)` of everything the operator writes in the namespace.
async fn snapshot(setup: &Setup) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    let lp = ListParams::default();
    let owned = lp
        .clone()
        .labels("app.kubernetes.io/managed-by=latentserve-operator");
    record(
        &mut all,
        "ModelDeployment",
        setup.api::<ModelDeployment>().list(&lp).await.unwrap(),
    );
    record(
        &mut all,
        "StatefulSet",
        setup.api::<StatefulSet>().list(&lp).await.unwrap(),
    );
    record(
        &mut all,
        "Service",
        setup.api::<Service>().list(&lp).await.unwrap(),
    );
    record(
        &mut all,
        "ConfigMap",
        setup.api::<ConfigMap>().list(&owned).await.unwrap(),
    );
    record(
        &mut all,
        "NetworkPolicy",
        setup.api::<NetworkPolicy>().list(&lp).await.unwrap(),
    );
    record(
        &mut all,
        "PodDisruptionBudget",
        setup.pdbs().list(&lp).await.unwrap(),
    );
    record(
        &mut all,
        "Deployment",
        setup.api::<Deployment>().list(&lp).await.unwrap(),
    );
    record(
        &mut all,
        "ServiceAccount",
        setup.api::<ServiceAccount>().list(&owned).await.unwrap(),
    );
    record(
        &mut all,
        "Role",
        setup.api::<Role>().list(&lp).await.unwrap(),
    );
    record(
        &mut all,
        "RoleBinding",
        setup.api::<RoleBinding>().list(&lp).await.unwrap(),
    );
    all
}

/// Adds `kind/name -> resourceVersion` of each object to `all`.
fn record<K: ResourceExt>(
    all: &mut BTreeMap<String, String>,
    kind: &str,
    objects: impl IntoIterator<Item = K>,
) {
    for object in objects {
        all.insert(
            format!("{kind}/{}", object.name_any()),
            object.resource_version().unwrap(),
        );
    }
}

/// Waits until nothing in the namespace changed for `quiet`.
async fn settled(setup: &Setup, quiet: Duration) -> BTreeMap<String, String> {
    let start = Instant::now();
    let mut last = snapshot(setup).await;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = snapshot(setup).await;
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return last;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "objects never stopped changing"
        );
    }
}

#[tokio::test]
async fn a_restarted_operator_creates_no_duplicates_and_writes_nothing_at_steady_state() {
    let Some(setup) = Setup::new("op-restart").await else {
        return;
    };
    let mut first = setup.operator("op-restart-1", None);
    for name in ["alpha", "beta", "gamma"] {
        setup.apply(name, demo_spec(2)).await;
    }
    wait_for("all three deployments reconciled", SHORT, || async {
        let list = setup
            .api::<ModelDeployment>()
            .list(&ListParams::default())
            .await
            .ok()?;
        list.items
            .iter()
            .all(|md| md.status.is_some())
            .then_some(())
    })
    .await;
    let before = settled(&setup, Duration::from_secs(3)).await;
    assert_eq!(
        before
            .keys()
            .filter(|k| k.starts_with("StatefulSet/"))
            .count(),
        3
    );
    first.ensure_running().unwrap();
    first.kill();

    let second = setup.operator("op-restart-2", None);
    // Every deployment reconciled at least once more, and then some quiet time.
    wait_for("the new operator to reconcile all three", SHORT, || async {
        (second
            .metric("latentserve_operator_reconciles_total{result=\"ok\"}")
            .await
            >= 3.0)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = snapshot(&setup).await;
    assert_eq!(
        after,
        before,
        "the restarted operator changed objects:\n{}",
        second.log_text()
    );
    setup.cleanup().await;
}

#[tokio::test]
async fn the_operator_needs_no_more_than_its_role() {
    let Some(setup) = Setup::new("op-rbac").await else {
        return;
    };
    let operator = operator_client(&setup.kubeconfig).await.unwrap();
    // The role grants what the reconciler uses ...
    let own: Api<StatefulSet> = Api::namespaced(operator.clone(), &setup.namespace);
    own.list(&ListParams::default())
        .await
        .expect("the operator lists StatefulSets");
    let deployments: Api<Deployment> = Api::namespaced(operator.clone(), &setup.namespace);
    deployments
        .list(&ListParams::default())
        .await
        .expect("the operator lists the routers' Deployments");
    // ... Secrets only as far as the expert exchange's token needs (read, create, patch; never
    // delete) ...
    let secrets: Api<Secret> = Api::namespaced(operator.clone(), &setup.namespace);
    secrets
        .list(&ListParams::default())
        .await
        .expect("the operator reads Secrets (its experts token)");
    let err = secrets
        .delete("not-allowed", &Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{err}"
    );
    // ... and nothing beyond: no pods of its own making, no cluster-wide roles, no writes to
    // ModelDeployment specs.
    let pods: Api<Pod> = Api::namespaced(operator.clone(), &setup.namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "not-allowed"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }))
    .unwrap();
    let err = pods.create(&PostParams::default(), &pod).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{err}"
    );
    let cluster_roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(operator.clone());
    let err = cluster_roles
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{err}"
    );
    setup.apply("rbac", demo_spec(1)).await;
    let mds: Api<ModelDeployment> = Api::namespaced(operator, &setup.namespace);
    let err = mds
        .patch(
            "rbac",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{err}"
    );
    setup.cleanup().await;
}

#[tokio::test]
async fn a_standby_takes_over_within_twenty_seconds_after_the_leader_dies() {
    let Some(setup) = Setup::new("op-leader").await else {
        return;
    };
    let lease_name = format!("latentserve-operator-{}", setup.namespace);
    let mut a = setup.operator("op-a", Some(&lease_name));
    let mut b = setup.operator("op-b", Some(&lease_name));
    let leases: Api<Lease> = Api::namespaced(setup.admin.clone(), OPERATOR_NAMESPACE);
    let holder = wait_for("a leader", SHORT, || async {
        leases.get(&lease_name).await.ok()?.spec?.holder_identity
    })
    .await;
    setup.apply("led", demo_spec(1)).await;
    let statefulsets = setup.api::<StatefulSet>();
    wait_for("led-0 from the leader", SHORT, || async {
        statefulsets.get("led-0").await.ok()
    })
    .await;
    let (leader, standby, standby_name) = if holder == "op-a" {
        (&mut a, &mut b, "op-b")
    } else {
        (&mut b, &mut a, "op-a")
    };
    // The standby serves its metrics and says there that it does not lead (an unreachable
    // endpoint is a failure, not a 0).
    let standby_ref: &OperatorProcess = standby;
    let text = wait_for("the standby's /metrics", SHORT, || standby_ref.metrics()).await;
    let leading = text
        .lines()
        .find_map(|line| {
            line.strip_prefix("latentserve_operator_leader ")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or_else(|| {
            panic!("no latentserve_operator_leader in the standby's /metrics:\n{text}")
        });
    assert_eq!(leading, 0.0, "the standby does not reconcile");

    // The lease timing bounds the takeover: the standby sees the leader's last renewal up to one
    // retry period late, finds the lease expired LEASE_DURATION after that sight, on a try up to
    // one more retry period later (16 s). Four seconds more cover the API round trips and this
    // test's polling; together they are the twenty seconds of the test's name.
    let limit = LEASE_DURATION + 2 * RETRY_PERIOD + Duration::from_secs(4);
    assert!(
        limit <= Duration::from_secs(20),
        "the lease timing allows a takeover of {limit:?}: rename this test"
    );
    leader.kill();
    let died = Instant::now();
    // Waits past the limit, so that a slow takeover fails with its measured time.
    wait_for(
        "the standby to take the lease",
        limit + Duration::from_secs(15),
        || async {
            let holder = leases.get(&lease_name).await.ok()?.spec?.holder_identity?;
            (holder == standby_name).then_some(())
        },
    )
    .await;
    let took = died.elapsed();
    eprintln!("leader failover took {took:?} (limit {limit:?})");
    assert!(
        took <= limit,
        "the standby took the lease {took:?} after the leader died, more than {limit:?}"
    );

    // The new leader reconciles.
    let scale = json!({"spec": {"replicas": 2}});
    setup
        .api::<ModelDeployment>()
        .patch_scale("led", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    wait_for("led-1 from the new leader", SHORT, || async {
        statefulsets.get("led-1").await.ok()
    })
    .await;
    standby.ensure_running().unwrap();
    setup.cleanup().await;
}
