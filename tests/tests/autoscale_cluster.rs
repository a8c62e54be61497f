//! Autoscaling on the real test control plane, with real worker and router processes run by the
//! node agent and the operator as a process with the checked-in RBAC:
//!
//! a ModelDeployment with `spec.autoscaling` (0 to 3 groups, one request in flight per group)
//! starts with no group and its router -> a request through the router is held, the operator
//! reads the held request from the router's `/v1/autoscaling` and makes a group, and the request
//! is answered (the cold start) -> four clients generating in a loop -> 3 groups -> one client
//! left -> 1 group: the groups leave the router (the routing ConfigMap) before their
//! StatefulSets go, and no request fails -> idle -> 0 groups after `scaleToZeroAfter` ->
//! `spec.replicas` set by hand is ignored, with a condition that says why.
//!
//! It prints the cold start (request at zero -> first token) and the time from the load step to
//! the third group serving, for docs/benchmarks.md. Needs what `e2e_cluster` needs; skipped
//! without a control plane except under `CI=true`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use futures::FutureExt as _;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use latentserve_e2e::demo::{MODEL, ROUTERS, WORKERS, repo_root};
use latentserve_e2e::node_agent::runtime::wait_for;
use latentserve_e2e::pods::{get_from_metrics_port, grpc_address, metric_sum};
use latentserve_e2e::scenario::{
    Load, STEP_LIMIT, Started, client_loop, generate, wait_for_pods, workers,
};
use latentserve_operator::crd::ModelDeployment;
use serde_json::json;

const MAX_GROUPS: usize = 3;
/// Clients generating in a loop during the load step: four requests in flight for a target of
/// one per group asks for four groups, capped at three.
const CLIENTS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_to_three_groups_and_back_to_zero_without_losing_a_request() {
    let Some(mut started) = Started::begin("e2e-autoscale").await else {
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
    started
        .start_operator_and_agent("autoscale", &["--autoscale-interval", "2s"])
        .await?;

    // The demo example with one shard per group (fewer processes on a small machine) and an
    // autoscaler with short windows.
    let example = std::fs::read_to_string(repo_root().join("examples/demo-hostpath.yaml"))?;
    let mut model: serde_json::Value = serde_yaml::from_str(&example)?;
    model["spec"]["expertShards"] = json!(1);
    model["spec"]["autoscaling"] = json!({
        "minReplicas": 0,
        "maxReplicas": MAX_GROUPS,
        "target": {"metric": "InFlightRequests", "value": 1.0},
        "scaleUpStabilization": "0s",
        "scaleDownDelay": "10s",
        "scaleToZeroAfter": "20s",
    });
    let models: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    models
        .create(&PostParams::default(), &serde_json::from_value(model)?)
        .await
        .context("creating the ModelDeployment")?;

    // No traffic yet: the router runs, no group does.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let router = wait_for_pods(&pods, ROUTERS, 1, "the router pod Ready").await?;
    let router = router.into_iter().next().context("the router pod")?;
    wait_for_autoscaling(&models, "reporting 0 groups", |s| {
        s.current_replicas == 0 && s.desired_replicas == 0
    })
    .await?;
    ensure!(
        workers(&pods).await?.is_empty(),
        "worker pods exist before any request"
    );

    // A request at zero: held by the router, answered once the first group is ready.
    let router_address = grpc_address(&router)?;
    let arrival = Instant::now();
    let first_token = generate(&router_address, STEP_LIMIT)
        .await
        .context("the request sent at zero groups")?;
    let cold_start = first_token.duration_since(arrival);
    eprintln!(
        "cold start (request at zero groups -> first token): {:.1} s",
        cold_start.as_secs_f64()
    );
    ensure!(
        workers(&pods).await?.len() == 1,
        "one group serves the first request"
    );
    let router_metrics = get_from_metrics_port(&router, "/metrics").await?;
    ensure!(
        metric_sum(
            &router_metrics,
            "latentserve_router_cold_start_seconds_count"
        ) >= 1.0,
        "the router's cold-start histogram did not count the held request"
    );

    // The load step: CLIENTS clients in a loop -> MAX_GROUPS groups.
    let stop_all = Arc::new(AtomicBool::new(false));
    let stop_last = Arc::new(AtomicBool::new(false));
    let load = Load::default();
    let load_step = Instant::now();
    let mut clients = Vec::new();
    for index in 0..CLIENTS {
        let stop = if index == 0 {
            stop_last.clone()
        } else {
            stop_all.clone()
        };
        clients.push(tokio::spawn(client_loop(
            router_address.clone(),
            stop,
            load.clone(),
        )));
    }
    wait_for_pods(&pods, WORKERS, MAX_GROUPS, "three groups Ready").await?;
    eprintln!(
        "load step -> {MAX_GROUPS} groups serving: {:.1} s",
        load_step.elapsed().as_secs_f64()
    );
    wait_for_autoscaling(&models, "at 3 groups", |s| {
        s.current_replicas == MAX_GROUPS as i32
    })
    .await?;

    // One client left: one request in flight -> one group. The others drain through the
    // routing ConfigMap while that client keeps sending.
    stop_all.store(true, Ordering::SeqCst);
    let routing: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let saw_draining = AtomicBool::new(false);
    wait_for("one group left", STEP_LIMIT, || async {
        if let Ok(map) = routing.get(&format!("{MODEL}-routing")).await {
            let draining = map
                .data
                .and_then(|d| d.get("draining-groups.json").cloned())
                .unwrap_or_default();
            if draining.contains(&format!("\"{MODEL}-")) {
                saw_draining.store(true, Ordering::SeqCst);
            }
        }
        let groups = statefulsets
            .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={MODEL}")))
            .await?
            .items
            .len();
        Ok(groups == 1)
    })
    .await?;
    ensure!(
        saw_draining.load(Ordering::SeqCst),
        "no group was listed in {MODEL}-routing before its StatefulSet went"
    );
    stop_last.store(true, Ordering::SeqCst);
    for handle in clients {
        handle.await?;
    }
    let failures = load.failures.lock().expect("not poisoned").clone();
    ensure!(
        failures.is_empty(),
        "{} of {} requests failed while groups came and went: {:?}",
        failures.len(),
        load.ok.load(Ordering::SeqCst) + failures.len(),
        &failures[..failures.len().min(5)]
    );
    ensure!(
        load.ok.load(Ordering::SeqCst) > CLIENTS,
        "the clients completed only {} requests",
        load.ok.load(Ordering::SeqCst)
    );

    // Idle: back to zero after scaleToZeroAfter.
    wait_for_autoscaling(&models, "back at 0 groups", |s| s.current_replicas == 0).await?;
    wait_for("the worker pods to go", STEP_LIMIT, || async {
        Ok(workers(&pods).await?.is_empty())
    })
    .await?;

    // Every change was announced.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for reason in ["ScaledUp", "ScaledDown"] {
        ensure!(
            reasons.iter().any(|r| r == reason),
            "no {reason} Event among {reasons:?}"
        );
    }

    // `kubectl scale` while the autoscaler owns the count: ignored, with a condition saying why.
    models
        .patch(
            MODEL,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await?;
    wait_for(
        "the manual scale to be refused by a condition",
        STEP_LIMIT,
        || async {
            let md = models.get(MODEL).await?;
            Ok(md.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "AutoscalingActive" && c.reason == "ManualScaleIgnored")
            }))
        },
    )
    .await?;
    ensure!(
        workers(&pods).await?.is_empty(),
        "spec.replicas made groups although the autoscaler owns the count"
    );
    Ok(())
}

async fn wait_for_autoscaling(
    models: &Api<ModelDeployment>,
    what: &str,
    done: impl Fn(&latentserve_operator::crd::AutoscalingStatus) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP_LIMIT;
    loop {
        let md = models.get(MODEL).await?;
        let status = md.status.as_ref().and_then(|s| s.autoscaling.as_ref());
        if status.is_some_and(&done) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {STEP_LIMIT:?} waiting for the autoscaler {what}; last: {status:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
