//! Expert placement as a control loop on the real test control plane, with real worker and
//! router processes run by the node agent and the operator as a process with the checked-in
//! RBAC:
//!
//! the demo model in 2 groups of 2 shards with `expertPlacement: {policy: Balanced}` and a 15 s
//! window -> clients send one prompt over and over through the router (a skewed load: the same
//! tokens pick the same experts) -> the operator measures the shards' imbalance, stores a
//! balanced placement as the ConfigMap `demo-placement-1` and moves the groups onto it one at a
//! time (never both out of service) -> the next window measures a lower imbalance -> not one
//! request failed throughout.
//!
//! Needs what `e2e_cluster` needs; skipped without a control plane except under `CI=true`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use futures::FutureExt as _;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, PostParams};
use latentserve_e2e::demo::{MODEL, ROUTERS, WORKERS, repo_root};
use latentserve_e2e::pods::{grpc_address, pod_ready};
use latentserve_e2e::scenario::{Load, STEP_LIMIT, Started, client_loop, wait_for_pods};
use latentserve_operator::crd::{ExpertPlacementStatus, ModelDeployment};
use serde_json::json;

const GROUPS: usize = 2;
const SHARDS: usize = 2;
const CLIENTS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skewed_load_rebalances_the_experts_and_rolls_groups_one_at_a_time() {
    let Some(mut started) = Started::begin("e2e-placement").await else {
        return;
    };
    let outcome = std::panic::AssertUnwindSafe(scenario(&mut started))
        .catch_unwind()
        .await;
    started.finish(outcome).await;
}

async fn scenario(started: &mut Started) -> anyhow::Result<()> {
    let client = started.client.clone();
    let ns = started.namespace.clone();
    started.start_operator_and_agent("placement", &[]).await?;

    let example = std::fs::read_to_string(repo_root().join("examples/demo-hostpath.yaml"))?;
    let mut model: serde_json::Value = serde_yaml::from_str(&example)?;
    model["spec"]["replicas"] = json!(GROUPS);
    model["spec"]["expertShards"] = json!(SHARDS);
    model["spec"]["expertPlacement"] = json!({
        "policy": "Balanced",
        "rebalance": {"interval": "15s", "minImbalance": 1.05},
    });
    let models: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    models
        .create(&PostParams::default(), &serde_json::from_value(model)?)
        .await
        .context("creating the ModelDeployment")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let router = wait_for_pods(&pods, ROUTERS, 1, "the router pod Ready").await?;
    let router_address = grpc_address(router.first().context("the router pod")?)?;
    wait_for_pods(&pods, WORKERS, GROUPS * SHARDS, "every shard Ready").await?;

    let stop = Arc::new(AtomicBool::new(false));
    let load = Load::default();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(client_loop(
                router_address.clone(),
                stop.clone(),
                load.clone(),
            ))
        })
        .collect();

    // The first window measures the skew and stores version 1.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let made =
        wait_for_placement(&models, "a balanced placement version", |p| p.version >= 1).await?;
    let before = made
        .imbalance_before
        .context("the imbalance measured before")?;
    let predicted = made
        .predicted_imbalance
        .context("the predicted imbalance")?;
    eprintln!("imbalance measured {before:.3}, predicted after rebalancing {predicted:.3}");
    ensure!(predicted < before, "{made:?}");
    let stored = config_maps
        .get(&format!("{MODEL}-placement-1"))
        .await
        .context("the ConfigMap of version 1")?;
    ensure!(stored.immutable == Some(true), "version 1 is not immutable");

    // The groups move one at a time: at every look, some group has every shard ready.
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + STEP_LIMIT;
    let mut order = Vec::new();
    loop {
        let workers = pods
            .list(&ListParams::default().labels(WORKERS))
            .await?
            .items;
        let serving = (0..GROUPS)
            .filter(|g| ready_shards(&workers, *g) == SHARDS)
            .count();
        ensure!(
            serving >= 1,
            "no group had every shard ready during the rollout"
        );
        for sts in statefulsets
            .list(&ListParams::default().labels(WORKERS))
            .await?
            .items
        {
            let on_new = sts
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("latentserve.io/placement-version"))
                .is_some_and(|v| v == "1");
            let name = sts.metadata.name.clone().unwrap_or_default();
            if on_new && !order.contains(&name) {
                order.push(name);
            }
        }
        let md = models.get(MODEL).await?;
        let placement = md.status.and_then(|s| s.expert_placement);
        if order.len() == GROUPS
            && serving == GROUPS
            && placement
                .is_some_and(|p| p.groups_on_version == GROUPS as i32 && p.rolling_group.is_none())
        {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {STEP_LIMIT:?} waiting for both groups on version 1 ({order:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("groups moved in this order: {order:?}");

    // A window on the new placement measures the lower imbalance.
    let after = wait_for_placement(&models, "a lower measured imbalance", |p| {
        p.measured_imbalance.is_some_and(|m| m < before)
    })
    .await?;
    eprintln!("imbalance measured after: {:?}", after.measured_imbalance);

    stop.store(true, Ordering::SeqCst);
    for handle in clients {
        handle.await?;
    }
    let failures = load.failures.lock().expect("not poisoned").clone();
    let ok = load.ok.load(Ordering::SeqCst);
    ensure!(
        failures.is_empty(),
        "{} of {} requests failed during the rebalance: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    ensure!(ok > CLIENTS, "the clients completed only {ok} requests");
    Ok(())
}

fn ready_shards(workers: &[Pod], group: usize) -> usize {
    workers
        .iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("latentserve.io/group"))
                .is_some_and(|g| *g == group.to_string())
                && p.metadata.deletion_timestamp.is_none()
                && pod_ready(p)
        })
        .count()
}

async fn wait_for_placement(
    models: &Api<ModelDeployment>,
    what: &str,
    done: impl Fn(&ExpertPlacementStatus) -> bool,
) -> anyhow::Result<ExpertPlacementStatus> {
    let deadline = Instant::now() + STEP_LIMIT;
    loop {
        let md = models.get(MODEL).await?;
        let status = md.status.and_then(|s| s.expert_placement);
        if let Some(status) = status.as_ref().filter(|s| done(s)) {
            return Ok(status.clone());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {STEP_LIMIT:?} waiting for {what}; last: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
