//! The scaffolding of the cluster scenarios that run the demo model through the node agent:
//! what a scenario started (cleaned up whatever happens), the logs to print when it fails, and
//! clients that generate through a router and count what failed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt as _};
use latentserve_operator::crd::ModelDeployment;
use latentserve_proto::v1::inference_client::InferenceClient;
use latentserve_proto::v1::{GenerateRequest, SamplingParams, StoppingCriteria, generate_request};

use crate::demo::{MODEL, WORKERS};
use crate::k8s::{OperatorProcess, delete_namespace};
use crate::node_agent::runtime::NodeAgent;
use crate::pods::pod_ready;

/// Generous bounds for one step of a scenario: model load of debug builds on a busy 2-core
/// machine, and the operator's windows.
pub const STEP_LIMIT: Duration = Duration::from_secs(300);

/// The prompt the clients send (greedy, 40 tokens, EOS ignored).
pub const PROMPT: &str = "What is 12 plus 30?";

/// What a scenario started: removed by [`Started::cleanup`].
pub struct Started {
    pub client: Client,
    pub namespace: String,
    pub scratch: PathBuf,
    pub agent: Option<NodeAgent>,
    pub operator: Option<OperatorProcess>,
}

impl Started {
    /// A fresh namespace `<prefix>-...` with the CRD installed and a scratch directory; `None`
    /// without a test control plane (the test is then skipped, except under `CI=true`).
    pub async fn begin(prefix: &str) -> Option<Started> {
        let client = crate::k8s::admin_client().await?;
        let scratch =
            std::env::temp_dir().join(format!("latentserve-{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).expect("the scratch directory");
        crate::k8s::install_crd(&client)
            .await
            .expect("the CRD installs");
        let namespace = crate::k8s::create_namespace(&client, prefix)
            .await
            .expect("the test namespace");
        Some(Started {
            client,
            namespace,
            scratch,
            agent: None,
            operator: None,
        })
    }

    /// The operator as a process with the checked-in RBAC, watching this namespace, and the
    /// node agent that runs the demo's worker and router pods.
    pub async fn start_operator_and_agent(
        &mut self,
        identity: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<()> {
        let kubeconfig = crate::k8s::operator_kubeconfig(&self.client)
            .await
            .context("the operator's RBAC")?;
        let mut operator = OperatorProcess::start(&crate::k8s::OperatorOptions {
            kubeconfig: &kubeconfig,
            namespace: &self.namespace,
            leader_lease: None,
            identity,
            extra_args,
        })?;
        operator.ensure_running()?;
        self.operator = Some(operator);
        let config = crate::demo::agent_config(&self.namespace, &self.scratch)?;
        self.agent = Some(NodeAgent::start(self.client.clone(), config).await?);
        Ok(())
    }

    /// Cleans up, then fails the test with the scenario's error (or its panic) and the logs.
    pub async fn finish(self, outcome: std::thread::Result<anyhow::Result<()>>) {
        let logs = diagnostics(&self);
        let problems = self.cleanup().await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(err)) => panic!("{err:#}\n{logs}"),
            Err(panic) => {
                eprintln!("{logs}");
                std::panic::resume_unwind(panic)
            }
        }
        assert!(problems.is_empty(), "cleanup failed: {problems:?}");
    }

    /// Deletes the ModelDeployment, stops the agent and the operator, deletes the namespace and
    /// the scratch directory; returns what went wrong.
    pub async fn cleanup(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let models: Api<ModelDeployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let _ = models.delete(MODEL, &DeleteParams::default()).await;
        if let Some(agent) = self.agent.take()
            && let Err(err) = agent.shutdown().await
        {
            problems.push(format!("stopping the node agent: {err:#}"));
        }
        drop(self.operator.take());
        delete_namespace(&self.client, &self.namespace).await;
        let _ = std::fs::remove_dir_all(&self.scratch);
        problems
    }
}

/// The last lines of the operator's log and of every pod's process log, for a failure message.
pub fn diagnostics(started: &Started) -> String {
    fn tail(out: &mut String, title: &str, text: &str, lines: usize) {
        let all: Vec<&str> = text.lines().collect();
        out.push_str(&format!("--- {title} (last {lines} lines)\n"));
        for line in &all[all.len().saturating_sub(lines)..] {
            out.push_str(line);
            out.push('\n');
        }
    }
    let mut out = String::new();
    if let Some(operator) = &started.operator {
        tail(&mut out, "operator log", &operator.log_text(), 30);
    }
    if let Some(agent) = &started.agent
        && let Some(dir) = agent.log_path(&started.namespace, "x").parent()
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            tail(&mut out, &entry.file_name().to_string_lossy(), &text, 20);
        }
    }
    out
}

/// What the load clients saw.
#[derive(Clone, Default)]
pub struct Load {
    pub ok: Arc<AtomicUsize>,
    pub failures: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Generates through `address` until `stop`, counting answers and failures.
pub async fn client_loop(address: String, stop: Arc<AtomicBool>, load: Load) {
    while !stop.load(Ordering::SeqCst) {
        match generate(&address, Duration::from_secs(120)).await {
            Ok(_) => {
                load.ok.fetch_add(1, Ordering::SeqCst);
            }
            Err(err) => load
                .failures
                .lock()
                .expect("not poisoned")
                .push(format!("{err:#}")),
        }
    }
}

/// One streamed Generate through `address`; returns when its first message arrived, after
/// reading the stream to its end.
pub async fn generate(address: &str, limit: Duration) -> anyhow::Result<Instant> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .timeout(limit)
        .connect()
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let request = GenerateRequest {
        prompt: Some(generate_request::Prompt::Text(PROMPT.to_owned())),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..SamplingParams::default()
        }),
        stopping: Some(StoppingCriteria {
            max_tokens: Some(40),
            ignore_eos: true,
            ..StoppingCriteria::default()
        }),
        ..GenerateRequest::default()
    };
    let run = async {
        let mut stream = InferenceClient::new(channel)
            .generate(request)
            .await?
            .into_inner();
        let mut first = None;
        while let Some(_message) = stream.message().await? {
            first.get_or_insert_with(Instant::now);
        }
        first.context("the stream ended without a message")
    };
    tokio::time::timeout(limit, run)
        .await
        .with_context(|| format!("Generate did not finish within {limit:?}"))?
}

/// The demo's worker pods.
pub async fn workers(pods: &Api<Pod>) -> anyhow::Result<Vec<Pod>> {
    Ok(pods
        .list(&ListParams::default().labels(WORKERS))
        .await?
        .items)
}

/// Waits until exactly `count` pods match `selector`, all Ready.
pub async fn wait_for_pods(
    pods: &Api<Pod>,
    selector: &str,
    count: usize,
    what: &str,
) -> anyhow::Result<Vec<Pod>> {
    let deadline = Instant::now() + STEP_LIMIT;
    loop {
        let list = pods
            .list(&ListParams::default().labels(selector))
            .await?
            .items;
        if list.len() == count && list.iter().all(pod_ready) {
            return Ok(list);
        }
        if Instant::now() >= deadline {
            let names: Vec<String> = list.iter().map(|p| p.name_any()).collect();
            bail!("timed out after {STEP_LIMIT:?} waiting for {what}; pods: {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
