//! The operator's targets, measured on the test control plane (figures printed, not asserted):
//!
//! ```sh
//! tests/k8s/up.sh && LATENTSERVE_TEST_KUBECONFIG=/tmp/latentserve-k8s/kubeconfig \
//!   cargo test -p latentserve-e2e --test operator_bench -- --ignored --nocapture --test-threads 1
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use latentserve_e2e::k8s::{
    OperatorOptions, OperatorProcess, admin_client, create_namespace, delete_namespace,
    install_crd, operator_kubeconfig, wait_for,
};
use latentserve_operator::crd::ModelDeployment;
use serde_json::json;

async fn apply(client: &Client, namespace: &str, name: &str) {
    let body = json!({
        "apiVersion": "latentserve.io/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"hostPath": {"path": "/srv/models/demo"}}, "expertShards": 2},
    });
    Api::<ModelDeployment>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(&body),
        )
        .await
        .expect("ModelDeployment applies");
}

fn pdbs(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"),
        "poddisruptionbudgets",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// Every child of `name` exists.
async fn all_children(client: &Client, namespace: &str, name: &str) -> bool {
    let ok = |r: Result<Option<_>, _>| matches!(r, Ok(Some(_)));
    ok(pdbs(client, namespace)
        .get_opt(&format!("{name}-0"))
        .await
        .map(|o| o.map(|_| ())))
        && ok(Api::<StatefulSet>::namespaced(client.clone(), namespace)
            .get_opt(&format!("{name}-0"))
            .await
            .map(|o| o.map(|_| ())))
        && ok(Api::<Service>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map(|o| o.map(|_| ())))
        && ok(Api::<Service>::namespaced(client.clone(), namespace)
            .get_opt(&format!("{name}-peers"))
            .await
            .map(|o| o.map(|_| ())))
        && ok(Api::<ConfigMap>::namespaced(client.clone(), namespace)
            .get_opt(&format!("{name}-config"))
            .await
            .map(|o| o.map(|_| ())))
        && ok(Api::<NetworkPolicy>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map(|o| o.map(|_| ())))
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::test]
#[ignore = "benchmark: run with --ignored against tests/k8s/up.sh"]
async fn apply_to_children_latency_and_steady_state_with_fifty_deployments() {
    let Some(admin) = admin_client().await else {
        return;
    };
    install_crd(&admin).await.unwrap();
    let kubeconfig = operator_kubeconfig(&admin).await.unwrap();
    let namespace = create_namespace(&admin, "op-bench").await.unwrap();
    let operator = OperatorProcess::start(&OperatorOptions {
        kubeconfig: &kubeconfig,
        namespace: &namespace,
        leader_lease: None,
        identity: "op-bench",
        extra_args: &[],
    })
    .unwrap();
    wait_for("operator metrics", Duration::from_secs(30), || async {
        operator.metrics().await
    })
    .await;

    // Apply -> all children created, 20 runs.
    let mut latencies = Vec::new();
    for i in 0..20 {
        let name = format!("lat-{i}");
        let start = Instant::now();
        apply(&admin, &namespace, &name).await;
        loop {
            if all_children(&admin, &namespace, &name).await {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name}: children never appeared"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();
    eprintln!(
        "apply -> all children created over 20 runs: median {:?}, min {:?}, max {:?}",
        latencies[10], latencies[0], latencies[19]
    );

    // 50 ModelDeployments (30 more), settled, then 60 s of watching resourceVersions.
    for i in 20..50 {
        apply(&admin, &namespace, &format!("lat-{i}")).await;
    }
    let mds: Api<ModelDeployment> = Api::namespaced(admin.clone(), &namespace);
    wait_for(
        "50 reconciled deployments",
        Duration::from_secs(120),
        || async {
            let list = mds.list(&ListParams::default()).await.ok()?;
            (list.items.len() == 50 && list.items.iter().all(|m| m.status.is_some())).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = versions(&admin, &namespace).await;
    let reconciles_before = operator
        .metric("latentserve_operator_reconciles_total{result=\"ok\"}")
        .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let after = versions(&admin, &namespace).await;
    let changed: Vec<_> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    let reconciles = operator
        .metric("latentserve_operator_reconciles_total{result=\"ok\"}")
        .await
        - reconciles_before;
    eprintln!(
        "steady state, 50 ModelDeployments ({} objects), 60 s: {} objects changed {changed:?}; {reconciles} reconciles",
        before.len(),
        changed.len()
    );
    eprintln!(
        "operator RSS with 50 ModelDeployments: {:.1} MB",
        rss_mb(operator.pid())
    );
    delete_namespace(&admin, &namespace).await;
}

/// resourceVersion of every ModelDeployment and child in the namespace.
async fn versions(client: &Client, namespace: &str) -> BTreeMap<String, String> {
    let lp = ListParams::default();
    let mut all = BTreeMap::new();
    macro_rules! collect {
        ($kind:literal, $api:expr) => {
            for object in $api.list(&lp).await.unwrap() {
                all.insert(
                    format!("{}/{}", $kind, object.name_any()),
                    object.resource_version().unwrap_or_default(),
                );
            }
        };
    }
    collect!(
        "ModelDeployment",
        Api::<ModelDeployment>::namespaced(client.clone(), namespace)
    );
    collect!(
        "StatefulSet",
        Api::<StatefulSet>::namespaced(client.clone(), namespace)
    );
    collect!(
        "Service",
        Api::<Service>::namespaced(client.clone(), namespace)
    );
    collect!(
        "ConfigMap",
        Api::<ConfigMap>::namespaced(client.clone(), namespace)
    );
    collect!(
        "NetworkPolicy",
        Api::<NetworkPolicy>::namespaced(client.clone(), namespace)
    );
    collect!("PodDisruptionBudget", pdbs(client, namespace));
    all
}
