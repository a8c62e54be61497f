//! The test node agent against the real test control plane: a Pending pod is bound to the
//! agent's Node, runs as a local process on its own 127.0.0.x address, turns Ready from its real
//! readiness probe, is restarted after its process is killed, and is stopped and removed when
//! the pod is deleted. The pod runs Python's HTTP server, so this needs no model. A pod that
//! uses a ServiceAccount gets a token of it, bound to the pod, with exactly its account's rights.
//!
//! Needs the control plane of `tests/k8s/up.sh` (kubeconfig in `LATENTSERVE_TEST_KUBECONFIG`,
//! default `/tmp/latentserve-k8s/kubeconfig`); without one it is skipped, except under `CI=true`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use latentserve_e2e::k8s::{create_namespace, delete_namespace};
use latentserve_e2e::node_agent::credentials::ClusterAccess;
use latentserve_e2e::node_agent::runtime::{AgentConfig, NodeAgent, wait_for};
use serde_json::json;

const NAMESPACE: &str = "node-agent-test";

async fn test_client() -> Option<Client> {
    let path = std::env::var_os("LATENTSERVE_TEST_KUBECONFIG").map_or_else(
        || PathBuf::from("/tmp/latentserve-k8s/kubeconfig"),
        PathBuf::from,
    );
    let connect = async {
        let kubeconfig = Kubeconfig::read_from(&path)?;
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        let client = Client::try_from(config)?;
        tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await??;
        anyhow::Ok(client)
    };
    match connect.await {
        Ok(client) => Some(client),
        Err(err) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("no test control plane at {}: {err:#}", path.display())
        }
        Err(err) => {
            eprintln!(
                "SKIPPED: no test control plane at {} ({err:#}); start it with tests/k8s/up.sh",
                path.display()
            );
            None
        }
    }
}

fn python() -> PathBuf {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("python3 is installed")
}

fn condition(pod: &Pod, type_: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(-1, |c| c.restart_count)
}

#[tokio::test]
async fn a_pending_pod_runs_as_a_local_process_and_reports_real_readiness() {
    let Some(client) = test_client().await else {
        return;
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).unwrap();
    match namespaces.create(&PostParams::default(), &namespace).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(err) => panic!("creating the namespace: {err}"),
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let name = "web";
    // A leftover from an interrupted run would keep its old uid and node.
    let _ = pods
        .delete(
            name,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await;
    wait_for("the old pod to go", Duration::from_secs(10), || async {
        Ok(pods.get_opt(name).await?.is_none())
    })
    .await
    .unwrap();

    let scratch =
        std::env::temp_dir().join(format!("latentserve-node-agent-{}", std::process::id()));
    let mut config = AgentConfig::new(
        BTreeMap::from([("python3".to_owned(), python())]),
        scratch.clone(),
    );
    config.namespaces = BTreeSet::from([NAMESPACE.to_owned()]);
    let node_name = config.node_name.clone();
    let agent = NodeAgent::start(client.clone(), config).await.unwrap();

    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "web",
                "image": "python:3",
                "command": ["python3"],
                "args": ["-m", "http.server", "--bind", "$(POD_IP)", "--directory", "/data", "8000"],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "ports": [{"name": "http", "containerPort": 8000}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
            }],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();

    wait_for(
        "the pod to be bound, running and Ready",
        Duration::from_secs(30),
        || async {
            let pod = pods.get(name).await?;
            Ok(condition(&pod, "Ready").as_deref() == Some("True"))
        },
    )
    .await
    .unwrap_or_else(|err| {
        panic!(
            "{err:#}; log: {:?}",
            std::fs::read_to_string(agent.log_path(NAMESPACE, name))
        )
    });
    let running = pods.get(name).await.unwrap();
    assert_eq!(
        running.spec.as_ref().unwrap().node_name.as_deref(),
        Some(node_name.as_str())
    );
    let pod_ip = running.status.as_ref().unwrap().pod_ip.clone().unwrap();
    assert!(
        pod_ip.starts_with("127.0.0.") && pod_ip != "127.0.0.1",
        "pod IP {pod_ip}"
    );
    assert_eq!(restarts(&running), 0);
    // The process really listens on the pod's address (the env var was expanded in its args).
    tokio::net::TcpStream::connect(format!("{pod_ip}:8000"))
        .await
        .unwrap();

    assert!(agent.kill_process(NAMESPACE, name).await.unwrap());
    wait_for(
        "the killed process to be restarted and Ready again",
        Duration::from_secs(30),
        || async {
            let pod = pods.get(name).await?;
            Ok(restarts(&pod) == 1 && condition(&pod, "Ready").as_deref() == Some("True"))
        },
    )
    .await
    .unwrap();
    assert_eq!(
        pods.get(name)
            .await
            .unwrap()
            .status
            .unwrap()
            .pod_ip
            .as_deref(),
        Some(pod_ip.as_str()),
        "a restarted pod keeps its address"
    );

    pods.delete(name, &DeleteParams::default()).await.unwrap();
    wait_for(
        "the deleted pod to be stopped and removed",
        Duration::from_secs(30),
        || async { Ok(pods.get_opt(name).await?.is_none()) },
    )
    .await
    .unwrap();
    assert!(
        tokio::net::TcpStream::connect(format!("{pod_ip}:8000"))
            .await
            .is_err(),
        "the process still listens after its pod was deleted"
    );

    agent.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(scratch);
}

/// EndpointSlices as this server serves them (`discovery.k8s.io/v1` from 1.21, `v1beta1`
/// before).
async fn endpoint_slices(client: &Client) -> ApiResource {
    let group = kube::discovery::group(client, "discovery.k8s.io")
        .await
        .expect("the server serves discovery.k8s.io");
    group
        .recommended_kind("EndpointSlice")
        .expect("the server serves EndpointSlices")
        .0
}

fn forbidden<T: std::fmt::Debug>(result: kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

#[tokio::test]
async fn a_pod_with_a_service_account_gets_a_token_bound_to_it_with_exactly_its_rights() {
    let Some(client) = test_client().await else {
        return;
    };
    // A namespace of its own per run: deleting one takes a while.
    let namespace = create_namespace(&client, "node-agent-sa").await.unwrap();
    let namespace = namespace.as_str();
    // An account that may read EndpointSlices in its namespace, as the operator sets up the router's.
    let admin = |kind: &str, body: serde_json::Value| {
        let client = client.clone();
        let kind = kind.to_owned();
        async move {
            let (group, version, plural) = match kind.as_str() {
                "ServiceAccount" => ("", "v1", "serviceaccounts"),
                "Role" => ("rbac.authorization.k8s.io", "v1", "roles"),
                _ => ("rbac.authorization.k8s.io", "v1", "rolebindings"),
            };
            let resource = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, &kind),
                plural,
            );
            let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &resource);
            let object: DynamicObject = serde_json::from_value(body).unwrap();
            let name = object.metadata.name.clone().unwrap();
            api.patch(
                &name,
                &PatchParams::apply("node-agent-test").force(),
                &Patch::Apply(&object),
            )
            .await
            .unwrap();
        }
    };
    admin(
        "ServiceAccount",
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "reader"}}),
    )
    .await;
    admin(
        "Role",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "reader"},
        "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                   "verbs": ["get", "list", "watch"]}]}),
    )
    .await;
    admin(
        "RoleBinding",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]}),
    )
    .await;

    let scratch =
        std::env::temp_dir().join(format!("latentserve-node-agent-sa-{}", std::process::id()));
    let kubeconfig = std::env::var_os("LATENTSERVE_TEST_KUBECONFIG").map_or_else(
        || PathBuf::from("/tmp/latentserve-k8s/kubeconfig"),
        PathBuf::from,
    );
    let mut config = AgentConfig::new(
        BTreeMap::from([("python3".to_owned(), python())]),
        scratch.clone(),
    );
    config.namespaces = BTreeSet::from([namespace.to_owned()]);
    config.cluster = Some(
        ClusterAccess::from_kubeconfig(
            &std::fs::read_to_string(&kubeconfig).unwrap(),
            kubeconfig.parent().unwrap(),
        )
        .unwrap(),
    );
    let agent = NodeAgent::start(client.clone(), config).await.unwrap();

    // Each process prints the credential it was given, then idles.
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let script =
        "import os, time; print(os.environ.get('KUBECONFIG'), flush=True); time.sleep(600)";
    for (name, account, automount) in [("reader", "reader", true), ("none", "reader", false)] {
        let _ = pods
            .delete(
                name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                },
            )
            .await;
        wait_for("an old pod to go", Duration::from_secs(10), || async {
            Ok(pods.get_opt(name).await?.is_none())
        })
        .await
        .unwrap();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": account,
                "automountServiceAccountToken": automount,
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": "python:3", "command": ["python3"],
                                "args": ["-c", script]}],
            },
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    let printed = |name: &str| {
        std::fs::read_to_string(agent.log_path(namespace, name))
            .unwrap_or_default()
            .lines()
            .next()
            .map(str::to_owned)
    };
    for name in ["reader", "none"] {
        wait_for(
            &format!("pod {name} to print its credential"),
            Duration::from_secs(30),
            || async { Ok(printed(name).is_some()) },
        )
        .await
        .unwrap();
    }
    assert_eq!(printed("none").as_deref(), Some("None"), "it opted out");
    let path = PathBuf::from(printed("reader").unwrap());
    let pod_config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&path).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(pod_config.default_namespace, namespace);
    let as_pod = Client::try_from(pod_config).unwrap();

    // Exactly the Role's rights: EndpointSlices of its namespace, nothing else.
    let slices = endpoint_slices(&client).await;
    let own_slices: Api<DynamicObject> = Api::namespaced_with(as_pod.clone(), namespace, &slices);
    own_slices
        .list(&ListParams::default())
        .await
        .expect("the pod's account lists EndpointSlices in its namespace");
    let other_slices: Api<DynamicObject> = Api::namespaced_with(as_pod.clone(), "default", &slices);
    assert!(forbidden(other_slices.list(&ListParams::default()).await));
    let secrets: Api<Secret> = Api::namespaced(as_pod.clone(), namespace);
    assert!(forbidden(secrets.list(&ListParams::default()).await));

    // Bound to the pod: gone with it.
    pods.delete("reader", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the pod's token to stop working",
        Duration::from_secs(30),
        || async {
            Ok(matches!(
                own_slices.list(&ListParams::default()).await,
                Err(kube::Error::Api(status)) if status.code == 401
            ))
        },
    )
    .await
    .unwrap();

    agent.shutdown().await.unwrap();
    delete_namespace(&client, namespace).await;
    let _ = std::fs::remove_dir_all(scratch);
}
