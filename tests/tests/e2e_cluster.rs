//! The whole path a user takes, on the real test control plane with real worker processes:
//!
//! `helm install` the chart -> the operator runs as a local process with the chart's
//! ServiceAccount token (so with exactly the chart's RBAC) -> the demo example is applied ->
//! the node agent runs its pods as worker processes (two serving groups), Ready from the
//! workers' real health, and the router pod as a router process with its ServiceAccount's token
//! (so with exactly the Role the operator made) -> the ModelDeployment turns Available with
//! capacity figures read from a worker -> a gRPC client generates greedily through the router
//! pod's address and gets the same tokens as a local `latentserve-worker generate` -> the
//! workers' `/metrics` count the one request -> the same question as an OpenAI chat on the
//! router's `http` port, to the model served under the ModelDeployment's name, gets the same
//! answer -> one worker is killed: its group stops being ready, and a new request through the
//! router still succeeds on the other group; the group is ready again once the agent has
//! restarted the worker -> deleting the ModelDeployment removes every child (garbage collector)
//! -> `helm uninstall` removes the release.
//!
//! Needs the control plane of `tests/k8s/up.sh` (kubeconfig in `LATENTSERVE_TEST_KUBECONFIG`,
//! default `/tmp/latentserve-k8s/kubeconfig`), the workspace's binaries (`cargo build
//! --workspace --bins`) and what `tests/helm/fetch-helm.sh` needs. Without a control plane it is
//! skipped with a notice, except under `CI=true`. Everything it starts is stopped and everything
//! it creates is removed, also when it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent};
use kube::api::{ObjectMeta, WatchParams};
use kube::{Client, ResourceExt as _};
use latentserve_e2e::demo::{
    DEMO_MODEL_PATH, MODEL, ROUTERS, WORKERS, agent_config, model_dir, repo_root,
};
use latentserve_e2e::k8s::{
    OperatorOptions, OperatorProcess, admin_client, create_namespace, delete_namespace,
    kubeconfig_path,
};
use latentserve_e2e::node_agent::runtime::{NodeAgent, wait_for};
use latentserve_e2e::pods::{get_from_metrics_port, grpc_address, metric_sum, pod_port, pod_ready};
use latentserve_e2e::workspace_binary;
use latentserve_operator::crd::ModelDeployment;
use latentserve_proto::v1::inference_client::InferenceClient;
use latentserve_proto::v1::{
    GenerateRequest, GenerateResponse, GetModelInfoRequest, SamplingParams, StoppingCriteria,
    TokenIds, generate_request,
};
use serde_json::json;

const RELEASE: &str = "e2e";
/// The chart's full name for this release: the ServiceAccount, ClusterRole and Deployment.
const FULLNAME: &str = "e2e-latentserve";
/// Expert shards per serving group (the example asks for 2).
const EXPERT_SHARDS: i64 = 2;
/// Serving groups: two, so that the router has a whole group left when a worker of the other dies.
const GROUPS: i64 = 2;
/// A question for the demo model, and its answer.
const PROMPT: &str = "What is 12 plus 30?";
const ANSWER: &str = "42";
/// Greedy tokens compared between the pod and the local worker (past EOS, so every shard's
/// experts are exercised at every step).
const NEW_TOKENS: u32 = 12;
/// Generous bounds: model load and warm-up of debug builds on a busy 2-core machine.
const READY_LIMIT: Duration = Duration::from_secs(240);
/// The garbage collector takes ~35 s for children of custom resources on 1.20.
const GC_LIMIT: Duration = Duration::from_secs(180);

/// Runs helm (from tests/helm/fetch-helm.sh) against the test control plane only.
struct Helm {
    binary: PathBuf,
    home: PathBuf,
}

impl Helm {
    fn fetch(scratch: &Path) -> anyhow::Result<Self> {
        let output = Command::new(repo_root().join("tests/helm/fetch-helm.sh"))
            .output()
            .context("running tests/helm/fetch-helm.sh")?;
        ensure!(
            output.status.success(),
            "tests/helm/fetch-helm.sh failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let binary = PathBuf::from(String::from_utf8(output.stdout)?.trim());
        Ok(Self {
            binary,
            home: scratch.join("helm"),
        })
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        // Never the user's $KUBECONFIG or helm settings: the test control plane, private dirs.
        let output = Command::new(&self.binary)
            .args(args)
            .current_dir(repo_root())
            .env("KUBECONFIG", kubeconfig_path())
            .env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .output()
            .with_context(|| format!("running helm {}", args.join(" ")))?;
        ensure!(
            output.status.success(),
            "helm {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Everything the scenario started, for the cleanup that runs whether it passed or not.
struct Started {
    client: Client,
    helm: Helm,
    chart_namespace: String,
    model_namespace: String,
    scratch: PathBuf,
    agent: Option<NodeAgent>,
    operator: Option<OperatorProcess>,
    installed: bool,
}

impl Started {
    async fn cleanup(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let models: Api<ModelDeployment> =
            Api::namespaced(self.client.clone(), &self.model_namespace);
        let _ = models.delete(MODEL, &DeleteParams::default()).await;
        if let Some(agent) = self.agent.take()
            && let Err(err) = agent.shutdown().await
        {
            problems.push(format!("stopping the node agent: {err:#}"));
        }
        // Dropping the process handle kills the operator.
        drop(self.operator.take());
        if self.installed
            && let Err(err) =
                self.helm
                    .run(&["uninstall", RELEASE, "-n", &self.chart_namespace, "--wait"])
        {
            problems.push(format!("{err:#}"));
        }
        delete_namespace(&self.client, &self.model_namespace).await;
        delete_namespace(&self.client, &self.chart_namespace).await;
        let _ = std::fs::remove_dir_all(&self.scratch);
        problems
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn helm_install_apply_generate_kill_delete_uninstall() {
    let Some(client) = admin_client().await else {
        return;
    };
    if !worker_serves().unwrap() {
        let message = "latentserve-worker has no `serve` subcommand yet";
        assert!(!std::env::var("CI").is_ok_and(|v| v == "true"), "{message}");
        eprintln!("SKIPPED: {message}");
        return;
    }
    let started_at = Instant::now();
    let scratch =
        std::env::temp_dir().join(format!("latentserve-e2e-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let helm = Helm::fetch(&scratch).unwrap();
    let chart_namespace = create_namespace(&client, "e2e-system").await.unwrap();
    let model_namespace = create_namespace(&client, "e2e-models").await.unwrap();
    let mut started = Started {
        client,
        helm,
        chart_namespace,
        model_namespace,
        scratch,
        agent: None,
        operator: None,
        installed: false,
    };
    let outcome = std::panic::AssertUnwindSafe(scenario(&mut started))
        .catch_unwind()
        .await;
    let logs = diagnostics(&started);
    let problems = started.cleanup().await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(err)) => panic!("{err:#}\n{logs}"),
        Err(panic) => {
            eprintln!("{logs}");
            std::panic::resume_unwind(panic)
        }
    }
    assert!(problems.is_empty(), "cleanup failed: {problems:?}");
    eprintln!(
        "e2e scenario passed in {:.1} s",
        started_at.elapsed().as_secs_f64()
    );
}

/// The operator's and the workers' logs, for a failure message.
fn diagnostics(started: &Started) -> String {
    let mut out = String::new();
    if let Some(operator) = &started.operator {
        let log = operator.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        out.push_str("--- operator log (last 40 lines)\n");
        for line in tail.iter().rev() {
            out.push_str(line);
            out.push('\n');
        }
    }
    if let Some(agent) = &started.agent {
        let mut pods: Vec<String> = (0..GROUPS)
            .flat_map(|group| (0..EXPERT_SHARDS).map(move |rank| format!("{MODEL}-{group}-{rank}")))
            .collect();
        // The router pod's name has the ReplicaSet's hash: whatever the agent logged for it.
        let logs = agent.log_path(&started.model_namespace, "x");
        if let Some(dir) = logs.parent()
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            pods.extend(entries.flatten().filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".log")
                    .filter(|n| n.starts_with(&format!("{MODEL}-router-")))
                    .map(str::to_owned)
            }));
        }
        for pod in pods {
            let log = std::fs::read_to_string(agent.log_path(&started.model_namespace, &pod))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            out.push_str(&format!("--- {pod} log (last 30 lines)\n"));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

async fn scenario(started: &mut Started) -> anyhow::Result<()> {
    let client = started.client.clone();
    let chart_ns = started.chart_namespace.clone();
    let model_ns = started.model_namespace.clone();

    // helm install: the CRD from the chart's crds/ (kept if another test installed it already),
    // the ServiceAccount and the least-privilege ClusterRole.
    let notes = started
        .helm
        .run(&["install", RELEASE, "charts/latentserve", "-n", &chart_ns])?;
    started.installed = true;
    ensure!(notes.contains("STATUS: deployed"), "helm install: {notes}");
    let roles: Api<ClusterRole> = Api::all(client.clone());
    roles
        .get(FULLNAME)
        .await
        .context("the chart's ClusterRole")?;
    wait_for("the CRD to be served", Duration::from_secs(60), || async {
        let models: Api<ModelDeployment> = Api::namespaced(client.clone(), &model_ns);
        Ok(models.list(&ListParams::default()).await.is_ok())
    })
    .await?;

    // The operator runs here as a process instead of in the chart's Deployment (there is no
    // kubelet for its image): scale that to zero before the node agent would bind its pod.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &chart_ns);
    deployments
        .patch(
            FULLNAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .context("scaling the chart's operator Deployment to zero")?;
    let chart_pods: Api<Pod> = Api::namespaced(client.clone(), &chart_ns);
    wait_for(
        "the chart's operator pods to go",
        Duration::from_secs(60),
        || async {
            Ok(chart_pods
                .list(&ListParams::default())
                .await?
                .items
                .is_empty())
        },
    )
    .await?;

    let kubeconfig = service_account_kubeconfig(&client, &chart_ns, FULLNAME, &started.scratch)
        .await
        .context("a kubeconfig with the chart's ServiceAccount token")?;
    let mut operator = OperatorProcess::start(&OperatorOptions {
        kubeconfig: &kubeconfig,
        namespace: &model_ns,
        leader_lease: None,
        identity: "e2e",
        extra_args: &[],
    })?;
    operator.ensure_running()?;
    started.operator = Some(operator);

    let config = agent_config(&model_ns, &started.scratch)?;
    started.agent = Some(NodeAgent::start(client.clone(), config).await?);

    // The demo example, as a user applies it.
    let example = std::fs::read_to_string(repo_root().join("examples/demo-hostpath.yaml"))?;
    let mut model: serde_json::Value = serde_yaml::from_str(&example)?;
    ensure!(
        model["spec"]["model"]["hostPath"]["path"] == DEMO_MODEL_PATH,
        "the demo example no longer reads {DEMO_MODEL_PATH}"
    );
    ensure!(
        model["spec"]["router"]["replicas"] == 1,
        "the demo example no longer runs one router pod"
    );
    model["spec"]["expertShards"] = json!(EXPERT_SHARDS);
    model["spec"]["replicas"] = json!(GROUPS);
    let models: Api<ModelDeployment> = Api::namespaced(client.clone(), &model_ns);
    let model: ModelDeployment = serde_json::from_value(model)?;
    models
        .create(&PostParams::default(), &model)
        .await
        .context("creating the demo ModelDeployment")?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &model_ns);
    let selector = format!("app.kubernetes.io/instance={MODEL}");
    wait_for("every worker pod Ready", READY_LIMIT, || async {
        let list = pods.list(&ListParams::default().labels(WORKERS)).await?;
        Ok(list.items.len() == (GROUPS * EXPERT_SHARDS) as usize
            && list.items.iter().all(pod_ready))
    })
    .await?;
    let mut worker_pods = pods
        .list(&ListParams::default().labels(WORKERS))
        .await?
        .items;
    worker_pods.sort_by_key(|p| p.name_any());
    // The router pod, made by the real Deployment and ReplicaSet controllers, Ready from its
    // own /readyz.
    wait_for("the router pod Ready", READY_LIMIT, || async {
        let list = pods.list(&ListParams::default().labels(ROUTERS)).await?;
        Ok(list.items.len() == 1 && list.items.iter().all(pod_ready))
    })
    .await?;
    let router = pods
        .list(&ListParams::default().labels(ROUTERS))
        .await?
        .items
        .into_iter()
        .next()
        .context("the router pod")?;

    // Ready came from the node agent's probe; the gRPC health service agrees on every pod.
    for pod in &worker_pods {
        let address = grpc_address(pod)?;
        let status = grpc_health(&address).await?;
        ensure!(
            status == tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{} answers gRPC health {status:?}",
            pod.name_any()
        );
    }

    let available = wait_for_model(
        "Available with capacity figures",
        READY_LIMIT,
        &models,
        |md| {
            let status = md.status.as_ref();
            condition_status(md, "Available") == Some("True")
                && condition_status(md, "RouterReady") == Some("True")
                && status
                    .is_some_and(|s| i64::from(s.ready_replicas) == GROUPS && s.capacity.is_some())
        },
    )
    .await?;
    let status = available.status.clone().context("status")?;
    let capacity = status.capacity.context("capacity")?;
    let endpoint = status.endpoint.context("status.endpoint")?;
    ensure!(
        endpoint.starts_with(&format!("{MODEL}.{model_ns}.svc")),
        "endpoint {endpoint}"
    );

    // The capacity is rank 0's, as it reports it itself.
    let rank0 = &worker_pods[0];
    let address = grpc_address(rank0)?;
    let mut direct = InferenceClient::connect(format!("http://{address}"))
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let info = direct
        .get_model_info(GetModelInfoRequest {})
        .await?
        .into_inner();
    ensure!(
        capacity.kv_cache_bytes_per_token == i64::try_from(info.kv_cache_bytes_per_token)?
            && capacity.kv_cache_tokens == i64::try_from(info.kv_cache_capacity_tokens)?
            && capacity.concurrent_sequences_at_max_len > 0,
        "status capacity {capacity:?} does not match the worker's {info:?}"
    );
    ensure!(
        i64::from(info.shard_count) == EXPERT_SHARDS && info.shard_rank == 0,
        "rank 0 reports shard {}/{}",
        info.shard_rank,
        info.shard_count
    );

    // The client talks to the router pod's own address, where the client Service sends it; the
    // router picks a worker per request.
    let router_address = grpc_address(&router)?;
    let mut inference = InferenceClient::connect(format!("http://{router_address}"))
        .await
        .with_context(|| format!("connecting to the router at {router_address}"))?;
    let (prompt_ids, local) = local_greedy(PROMPT)?;
    let metrics_before = workers_metrics(&worker_pods).await?;
    let served = served_greedy(&mut inference, &prompt_ids).await?;
    ensure!(
        served == local,
        "the router's worker generated {served:?}, a local worker {local:?}"
    );
    let metrics_after = workers_metrics(&worker_pods).await?;
    let success = |text: &str| metric_sum(text, "latentserve_request_success_total");
    let generated = |text: &str| metric_sum(text, "latentserve_generation_tokens_total");
    ensure!(
        success(&metrics_after) - success(&metrics_before) == 1.0,
        "the workers' /metrics count {} finished requests more, not 1",
        success(&metrics_after) - success(&metrics_before)
    );
    ensure!(
        generated(&metrics_after) - generated(&metrics_before) == f64::from(NEW_TOKENS),
        "the workers' /metrics count {} generated tokens more, not {NEW_TOKENS}",
        generated(&metrics_after) - generated(&metrics_before)
    );
    metrics_of(&router).await.context("the router's /metrics")?;
    // And the question, asked as text, gets the right answer from the two shards.
    let answer = served_answer(&mut inference, PROMPT).await?;
    ensure!(
        answer.trim() == ANSWER,
        "the router answered {PROMPT:?} with {answer:?}, not {ANSWER:?}"
    );
    // The same question through the router's OpenAI port, as a chat, to the model served under
    // the ModelDeployment's name.
    let chat = openai_chat(&router, MODEL, PROMPT).await?;
    ensure!(
        chat.trim() == ANSWER,
        "the router's OpenAI chat answered {PROMPT:?} with {chat:?}, not {ANSWER:?}"
    );

    // A worker of group 1 crashes: the watch sees its group stop being ready (group 0 keeps the
    // ModelDeployment Available); a new request through the router succeeds on group 0 meanwhile;
    // the group is ready again once the agent has restarted the process.
    let victim = worker_pods.last().context("worker pods")?.name_any();
    ensure!(
        victim.starts_with(&format!("{MODEL}-1-")),
        "{victim} is not in group 1"
    );
    let mut events = models
        .watch(
            &WatchParams::default().fields(&format!("metadata.name={MODEL}")),
            &available.resource_version().context("resourceVersion")?,
        )
        .await?
        .boxed();
    let agent = started.agent.as_ref().context("node agent")?;
    ensure!(
        agent.kill_process(&model_ns, &victim).await?,
        "the agent runs no process for {victim}"
    );
    let mut lost_group = false;
    let mut served_meanwhile = None;
    let recovered = tokio::time::timeout(READY_LIMIT, async {
        while let Some(event) = events.next().await {
            let md = match event? {
                WatchEvent::Added(md) | WatchEvent::Modified(md) => md,
                WatchEvent::Bookmark(_) => continue,
                WatchEvent::Deleted(_) => bail!("the ModelDeployment was deleted"),
                WatchEvent::Error(err) => bail!("watch error: {err:?}"),
            };
            let ready = md
                .status
                .as_ref()
                .map_or(0, |s| i64::from(s.ready_replicas));
            if ready < GROUPS {
                ensure!(
                    condition_status(&md, "Available") == Some("True"),
                    "the ModelDeployment lost Available with one group left"
                );
                if !lost_group {
                    lost_group = true;
                    // The cluster has seen the group go: the router must not send there, or
                    // must retry elsewhere before the first token.
                    served_meanwhile = Some(served_greedy(&mut inference, &prompt_ids).await?);
                }
            } else if lost_group {
                return Ok(md);
            }
        }
        bail!("the watch ended")
    })
    .await
    .with_context(|| {
        format!("group 1 did not stop being ready and recover within {READY_LIMIT:?}")
    })??;
    ensure!(lost_group, "group 1 never stopped being ready");
    ensure!(
        served_meanwhile.as_ref() == Some(&local),
        "with group 1 down the router's request generated {served_meanwhile:?}"
    );
    let restarted = pods.get(&victim).await?;
    ensure!(
        restart_count(&restarted) == 1 && pod_ready(&restarted),
        "{victim} was not restarted once and Ready"
    );
    ensure!(
        recovered
            .status
            .as_ref()
            .map(|s| i64::from(s.ready_replicas))
            == Some(GROUPS),
        "readyReplicas after recovery"
    );
    // And the router serves again, with the same tokens.
    let served_again = served_greedy(&mut inference, &prompt_ids).await?;
    ensure!(
        served_again == local,
        "after the restart the router's worker generated {served_again:?}"
    );

    // Deleting the ModelDeployment deletes its children: owner references + garbage collector.
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &model_ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &model_ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &model_ns);
    let network_policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &model_ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &model_ns);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &model_ns);
    let roles_here: Api<Role> = Api::namespaced(client.clone(), &model_ns);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &model_ns);
    let by_label = ListParams::default().labels(&selector);
    let children = statefulsets.list(&by_label).await?.items.len()
        + services.list(&by_label).await?.items.len()
        + network_policies.list(&by_label).await?.items.len()
        + deployments.list(&by_label).await?.items.len()
        + accounts.list(&by_label).await?.items.len()
        + roles_here.list(&by_label).await?.items.len()
        + bindings.list(&by_label).await?.items.len();
    ensure!(
        children >= 11,
        "only {children} children of the ModelDeployment before the delete"
    );
    models.delete(MODEL, &DeleteParams::default()).await?;
    wait_for(
        "every child of the ModelDeployment to go",
        GC_LIMIT,
        || async {
            Ok(models.get_opt(MODEL).await?.is_none()
                && statefulsets.list(&by_label).await?.items.is_empty()
                && services.list(&by_label).await?.items.is_empty()
                && config_maps.list(&by_label).await?.items.is_empty()
                && network_policies.list(&by_label).await?.items.is_empty()
                && deployments.list(&by_label).await?.items.is_empty()
                && accounts.list(&by_label).await?.items.is_empty()
                && roles_here.list(&by_label).await?.items.is_empty()
                && bindings.list(&by_label).await?.items.is_empty()
                && pods.list(&by_label).await?.items.is_empty())
        },
    )
    .await?;
    for pod in worker_pods.iter().chain([&router]) {
        let address = grpc_address(pod)?;
        ensure!(
            tokio::net::TcpStream::connect(&address).await.is_err(),
            "{} still listens on {address} after its pod was deleted",
            pod.name_any()
        );
    }

    // helm uninstall removes the release's objects and keeps the CRD (docs/install.md).
    started.installed = false;
    started
        .helm
        .run(&["uninstall", RELEASE, "-n", &chart_ns, "--wait"])?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &chart_ns);
    ensure!(
        accounts.get_opt(FULLNAME).await?.is_none() && roles.get_opt(FULLNAME).await?.is_none(),
        "helm uninstall left the ServiceAccount or the ClusterRole"
    );
    Ok(())
}

/// Creates a token Secret for the ServiceAccount (what 1.20's token controller fills in; newer
/// clusters still do for such a Secret) and writes a kubeconfig that authenticates with it.
async fn service_account_kubeconfig(
    client: &Client,
    namespace: &str,
    account: &str,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let name = format!("{account}-e2e-token");
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: Some(BTreeMap::from([(
                "kubernetes.io/service-account.name".to_owned(),
                account.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/service-account-token".to_owned()),
        ..Secret::default()
    };
    secrets.create(&PostParams::default(), &secret).await?;
    let token_of = |secret: Secret| {
        secret
            .data
            .and_then(|mut d| d.remove("token"))
            .map(|token| token.0)
            .filter(|token| !token.is_empty())
    };
    wait_for(
        "the token controller to fill in the token",
        Duration::from_secs(60),
        || async { Ok(token_of(secrets.get(&name).await?).is_some()) },
    )
    .await?;
    let token = String::from_utf8(token_of(secrets.get(&name).await?).context("no token")?)?;
    let admin = std::fs::read_to_string(kubeconfig_path())?;
    let mut kubeconfig: serde_yaml::Value = serde_yaml::from_str(&admin)?;
    kubeconfig["users"] = serde_yaml::to_value(json!([
        {"name": account, "user": {"token": token}}
    ]))?;
    kubeconfig["contexts"][0]["context"]["user"] = account.into();
    let path = dir.join("operator.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&kubeconfig)?)?;
    Ok(path)
}

fn restart_count(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(-1, |c| c.restart_count)
}

fn condition_status<'a>(md: &'a ModelDeployment, type_: &str) -> Option<&'a str> {
    md.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

async fn wait_for_model(
    what: &str,
    limit: Duration,
    models: &Api<ModelDeployment>,
    done: impl Fn(&ModelDeployment) -> bool,
) -> anyhow::Result<ModelDeployment> {
    let deadline = Instant::now() + limit;
    loop {
        let md = models.get(MODEL).await?;
        if done(&md) {
            return Ok(md);
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {limit:?} waiting for the ModelDeployment to be {what}; last status: {:?}",
                md.status
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn grpc_health(
    address: &str,
) -> anyhow::Result<tonic_health::pb::health_check_response::ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect()
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    Ok(response.status())
}

/// The pod's `/metrics` text, fetched over plain HTTP/1.1.
async fn metrics_of(pod: &Pod) -> anyhow::Result<String> {
    get_from_metrics_port(pod, "/metrics").await
}

/// The `/metrics` text of every pod, concatenated (sums over it add up the pods).
async fn workers_metrics(pods: &[Pod]) -> anyhow::Result<String> {
    let mut all = String::new();
    for pod in pods {
        all.push_str(&metrics_of(pod).await?);
        all.push('\n');
    }
    Ok(all)
}

/// The assistant's answer to `question` from the pod's OpenAI-compatible port (`http`), greedy.
async fn openai_chat(pod: &Pod, model: &str, question: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let address = pod_port(pod, "http")?;
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 8,
    })
    .to_string();
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(120),
        stream.read_to_string(&mut response),
    )
    .await
    .context("/v1/chat/completions did not answer within 120 s")??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    ensure!(
        head.contains(" 200 "),
        "/v1/chat/completions answered {head}: {body}"
    );
    let answer: serde_json::Value = serde_json::from_str(body).context("the answer is not JSON")?;
    answer["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no message content in {answer}"))
}

/// The sum of every sample of a metric family (all label sets).
/// Whether the built worker has the `serve` subcommand that the operator's pods run.
fn worker_serves() -> anyhow::Result<bool> {
    let output = workspace_binary("latentserve-worker")?
        .args(["serve", "--help"])
        .output()
        .context("running latentserve-worker serve --help")?;
    Ok(output.status.success())
}

/// Prompt ids and greedy tokens of a single local worker process on the same model.
fn local_greedy(prompt: &str) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let output = workspace_binary("latentserve-worker")?
        .args(["generate", "--model"])
        .arg(model_dir())
        .args(["--prompt", prompt])
        .args(["--max-new-tokens", &NEW_TOKENS.to_string()])
        .args(["--temperature", "0", "--ignore-eos", "--json"])
        .output()
        .context("running latentserve-worker generate")?;
    ensure!(
        output.status.success(),
        "latentserve-worker generate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout)
        .context("latentserve-worker generate --json printed no JSON object")?;
    let ids = |key: &str| -> anyhow::Result<Vec<u32>> {
        serde_json::from_value(answer[key].clone())
            .with_context(|| format!("generate --json has no {key} list"))
    };
    Ok((ids("prompt_ids")?, ids("generated_ids")?))
}

/// The text of a greedy answer to `prompt`, asked as text, through the pod's Inference service.
async fn served_answer(
    inference: &mut InferenceClient<tonic::transport::Channel>,
    prompt: &str,
) -> anyhow::Result<String> {
    let request = GenerateRequest {
        prompt: Some(generate_request::Prompt::Text(prompt.to_owned())),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..SamplingParams::default()
        }),
        stopping: Some(StoppingCriteria {
            max_tokens: Some(8),
            ..StoppingCriteria::default()
        }),
        ..GenerateRequest::default()
    };
    let responses = served_stream(inference, request).await?;
    Ok(responses.into_iter().map(|r| r.text).collect())
}

/// Greedy tokens through the pod's Inference service, collected from the stream.
async fn served_greedy(
    inference: &mut InferenceClient<tonic::transport::Channel>,
    prompt_ids: &[u32],
) -> anyhow::Result<Vec<u32>> {
    let request = GenerateRequest {
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds {
            ids: prompt_ids.to_vec(),
        })),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..SamplingParams::default()
        }),
        stopping: Some(StoppingCriteria {
            max_tokens: Some(NEW_TOKENS),
            ignore_eos: true,
            ..StoppingCriteria::default()
        }),
        ..GenerateRequest::default()
    };
    let responses = served_stream(inference, request).await?;
    Ok(responses.into_iter().flat_map(|r| r.token_ids).collect())
}

/// Every message of one Generate stream, with bounds on its start and its end.
async fn served_stream(
    inference: &mut InferenceClient<tonic::transport::Channel>,
    request: GenerateRequest,
) -> anyhow::Result<Vec<GenerateResponse>> {
    let mut stream = tokio::time::timeout(Duration::from_secs(60), inference.generate(request))
        .await
        .context("Generate did not start within 60 s")??
        .into_inner();
    let mut responses = Vec::new();
    let collect = async {
        while let Some(response) = stream.message().await? {
            responses.push(response);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(120), collect)
        .await
        .context("Generate did not finish within 120 s")??;
    Ok(responses)
}
