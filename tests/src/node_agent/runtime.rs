//! The node agent's I/O: a Node in the API server, Pending pods bound to it, each pod's
//! container run as a local process (with its ServiceAccount's token, see [`super::credentials`]),
//! and the pod's status (its 127.0.0.x address, phase, restarts, readiness from the process's
//! real health endpoint) written back as a kubelet would.
//!
//! The agent polls (every `poll_interval`) instead of watching: a test has a handful of pods,
//! and a poll loop has no reconnect logic to get wrong. Every wait is bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    Binding, ConfigMap, Node, ObjectReference, Pod, Secret, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::credentials::{self, ClusterAccess};
use super::{
    AddressBook, Placement, ProcessSpec, ReadinessCheck, process_for_pod, readiness_check,
};

/// How the agent runs pods.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Name of the Node the agent registers and binds pods to.
    pub node_name: String,
    /// Only pods in these namespaces are bound and run (all when empty), so that the agent leaves
    /// alone the pods of other tests that share the control plane.
    pub namespaces: BTreeSet<String>,
    /// Local binaries by command name (`latentserve-worker` -> the workspace's build).
    pub binaries: BTreeMap<String, PathBuf>,
    /// hostPath volume paths -> directories on this machine (see [`Placement::host_paths`]).
    pub host_paths: BTreeMap<String, PathBuf>,
    /// emptyDir volumes and process logs (`<root>/<namespace>/<pod>.log`) go here.
    pub scratch_root: PathBuf,
    /// Environment every process gets on top of its container's (e.g. `RUST_LOG`); nothing
    /// else is inherited from the test process.
    pub base_env: Vec<(String, String)>,
    pub poll_interval: Duration,
    /// Time a process that exited stays down, reported not ready, before it is started again
    /// (the kubelet's crash back-off starts at 10 s). Without it a worker that restarts within
    /// one poll could be ready again before the control plane saw it go.
    pub restart_delay: Duration,
    /// Time a stopping process gets between SIGTERM and SIGKILL (the pod's grace period, capped).
    pub max_grace: Duration,
    /// How pods reach the API server. When set, a pod that uses a ServiceAccount gets a token
    /// of it bound to the pod, in `$KUBECONFIG`; when unset, pods get no credential.
    pub cluster: Option<ClusterAccess>,
}

impl AgentConfig {
    pub fn new(binaries: BTreeMap<String, PathBuf>, scratch_root: PathBuf) -> Self {
        Self {
            node_name: "latentserve-test-node".to_owned(),
            namespaces: BTreeSet::new(),
            binaries,
            host_paths: BTreeMap::new(),
            scratch_root,
            base_env: vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())],
            poll_interval: Duration::from_millis(200),
            restart_delay: Duration::from_secs(1),
            max_grace: Duration::from_secs(10),
            cluster: None,
        }
    }
}

enum Request {
    Kill {
        namespace: String,
        name: String,
        done: oneshot::Sender<bool>,
    },
    Shutdown,
}

/// A running node agent; dropping it without [`NodeAgent::shutdown`] still kills its
/// processes (they are spawned with `kill_on_drop`).
pub struct NodeAgent {
    requests: mpsc::Sender<Request>,
    task: JoinHandle<anyhow::Result<()>>,
    scratch_root: PathBuf,
}

impl NodeAgent {
    /// Registers the Node (Ready, with room for many pods) and starts the agent loop.
    pub async fn start(client: Client, config: AgentConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.scratch_root)
            .with_context(|| format!("cannot create {}", config.scratch_root.display()))?;
        register_node(&client, &config.node_name).await?;
        let (requests, receiver) = mpsc::channel(16);
        let scratch_root = config.scratch_root.clone();
        let agent = Agent {
            pods: Api::all(client.clone()),
            client,
            config,
            book: AddressBook::default(),
            running: BTreeMap::new(),
            reported_errors: BTreeSet::new(),
            last_heartbeat: Instant::now(),
        };
        let task = tokio::spawn(agent.run(receiver));
        Ok(Self {
            requests,
            task,
            scratch_root,
        })
    }

    /// Kills a pod's process with SIGKILL, as a crash would; the agent restarts it (restart
    /// count + 1) on its next round. False when the agent runs no process for that pod.
    pub async fn kill_process(&self, namespace: &str, name: &str) -> anyhow::Result<bool> {
        let (done, answer) = oneshot::channel();
        self.requests
            .send(Request::Kill {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                done,
            })
            .await
            .context("the node agent has stopped")?;
        answer.await.context("the node agent has stopped")
    }

    /// Where a pod's process writes its stdout and stderr.
    pub fn log_path(&self, namespace: &str, name: &str) -> PathBuf {
        log_path(&self.scratch_root, namespace, name)
    }

    /// Stops every process (SIGTERM, then SIGKILL after the grace period) and the loop.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        // A send error means the loop already ended; its result says why.
        let _ = self.requests.send(Request::Shutdown).await;
        self.task.await.context("the node agent task panicked")?
    }
}

fn log_path(root: &std::path::Path, namespace: &str, name: &str) -> PathBuf {
    root.join(namespace).join(format!("{name}.log"))
}

struct Process {
    uid: String,
    child: Child,
    spec: ProcessSpec,
    check: Option<ReadinessCheck>,
    state: ContainerState,
    /// When the agent found the process exited (it is restarted `restart_delay` later).
    exited_at: Option<std::time::Instant>,
}

/// What the pod's status says about its one container.
#[derive(Debug, Clone)]
struct ContainerState {
    container: String,
    image: String,
    ready: bool,
    restarts: i32,
    started_at: Timestamp,
}

struct Agent {
    client: Client,
    pods: Api<Pod>,
    config: AgentConfig,
    book: AddressBook,
    running: BTreeMap<(String, String), Process>,
    /// Pods (by uid) whose failure to start was already reported, so it is not re-patched every round.
    reported_errors: BTreeSet<String>,
    last_heartbeat: Instant,
}

type PodKey = (String, String);

impl Agent {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>) -> anyhow::Result<()> {
        loop {
            while let Ok(request) = requests.try_recv() {
                match request {
                    Request::Kill {
                        namespace,
                        name,
                        done,
                    } => {
                        let killed = match self.running.get_mut(&(namespace, name)) {
                            Some(process) => process.child.start_kill().is_ok(),
                            None => false,
                        };
                        let _ = done.send(killed);
                    }
                    Request::Shutdown => {
                        for ((namespace, name), process) in std::mem::take(&mut self.running) {
                            stop(process, self.config.max_grace, &namespace, &name).await;
                        }
                        return Ok(());
                    }
                }
            }
            if let Err(err) = self.round().await {
                // The API server may be briefly unavailable; the next round retries.
                eprintln!("node agent: {err:#}");
            }
            if self.last_heartbeat.elapsed() > Duration::from_secs(10) {
                if let Err(err) = heartbeat(&self.client, &self.config.node_name).await {
                    eprintln!("node agent: node heartbeat failed: {err:#}");
                }
                self.last_heartbeat = Instant::now();
            }
            tokio::time::sleep(self.config.poll_interval).await;
        }
    }

    /// One pass over every pod: bind, start, restart, probe, stop.
    async fn round(&mut self) -> anyhow::Result<()> {
        let pods = self
            .pods
            .list(&ListParams::default())
            .await
            .context("listing pods")?;
        let mut seen: BTreeSet<PodKey> = BTreeSet::new();
        for pod in pods.items {
            let (Some(namespace), Some(name), Some(uid)) = (
                pod.metadata.namespace.clone(),
                pod.metadata.name.clone(),
                pod.metadata.uid.clone(),
            ) else {
                continue;
            };
            if !self.config.namespaces.is_empty() && !self.config.namespaces.contains(&namespace) {
                continue;
            }
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            let key = (namespace.clone(), name.clone());
            match node {
                None if pod.metadata.deletion_timestamp.is_none() && schedulable(&pod) => {
                    self.bind(&namespace, &name).await?;
                }
                Some(node) if node == self.config.node_name => {
                    seen.insert(key.clone());
                    if pod.metadata.deletion_timestamp.is_some() {
                        self.delete(&pod, &key, &uid).await?;
                    } else {
                        self.sync(&pod, key, uid).await?;
                    }
                }
                _ => {}
            }
        }
        let gone: Vec<PodKey> = self
            .running
            .keys()
            .filter(|key| !seen.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            if let Some(process) = self.running.remove(&key) {
                stop(process, self.config.max_grace, &key.0, &key.1).await;
            }
        }
        Ok(())
    }

    async fn bind(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            target: ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Node".to_owned()),
                name: Some(self.config.node_name.clone()),
                ..ObjectReference::default()
            },
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        match pods
            .create_subresource::<_, serde_json::Value>(
                "binding",
                name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => Ok(()),
            // Already bound (a stale list) or gone: nothing to do.
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => Ok(()),
            Err(err) => Err(err).with_context(|| format!("binding pod {namespace}/{name}")),
        }
    }

    /// The kubelet's part of graceful deletion: stop the container, then remove the pod.
    async fn delete(&mut self, pod: &Pod, key: &PodKey, uid: &str) -> anyhow::Result<()> {
        if let Some(process) = self.running.remove(key) {
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.max_grace, |s| {
                    Duration::from_secs(s).min(self.config.max_grace)
                });
            stop(process, grace, &key.0, &key.1).await;
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &key.0);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match pods.delete(&key.1, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(err) => Err(err).with_context(|| format!("deleting pod {}/{}", key.0, key.1)),
        }
    }

    /// Starts the pod's process if it has none, restarts it if it exited, and reports readiness.
    async fn sync(&mut self, pod: &Pod, key: PodKey, uid: String) -> anyhow::Result<()> {
        // A pod re-created under the same name is a new pod: its old process goes.
        if self.running.get(&key).is_some_and(|p| p.uid != uid)
            && let Some(old) = self.running.remove(&key)
        {
            stop(old, self.config.max_grace, &key.0, &key.1).await;
        }
        let exited = match self.running.get_mut(&key) {
            Some(process) => process
                .child
                .try_wait()
                .context("polling a worker process")?
                .is_some(),
            None => {
                if self.reported_errors.contains(&uid) {
                    return Ok(());
                }
                // Not reported as the pod's failure: the next round asks again.
                let credential = self.credential(pod).await?;
                self.write_secret_volumes(pod).await?;
                match self.start(pod, &key, &uid, 0, credential) {
                    Ok(process) => {
                        self.running.insert(key.clone(), process);
                        self.report(&key).await?;
                    }
                    Err(err) => {
                        self.reported_errors.insert(uid);
                        self.report_error(&key, &err).await?;
                    }
                }
                return Ok(());
            }
        };
        if exited {
            let process = self.running.get_mut(&key).context("process vanished")?;
            let exited_at = *process
                .exited_at
                .get_or_insert_with(std::time::Instant::now);
            if exited_at.elapsed() < self.config.restart_delay {
                // Down, as the kubelet would report it until the restart.
                if process.state.ready {
                    process.state.ready = false;
                    self.report(&key).await?;
                }
                return Ok(());
            }
            // restartPolicy Always (StatefulSet pods): start again, count the restart.
            let restarts = self.running.get(&key).map_or(0, |p| p.state.restarts + 1);
            let credential = self.credential(pod).await?;
            self.write_secret_volumes(pod).await?;
            self.running.remove(&key);
            let process = self.start(pod, &key, &uid, restarts, credential)?;
            self.running.insert(key.clone(), process);
            self.report(&key).await?;
            return Ok(());
        }
        let process = self.running.get_mut(&key).context("process vanished")?;
        let ready = match &process.check {
            Some(check) => probe(check).await,
            None => true,
        };
        if ready != process.state.ready {
            process.state.ready = ready;
            self.report(&key).await?;
        }
        Ok(())
    }

    /// Writes the pod's secret and configMap volumes as the kubelet mounts them: one file per
    /// key. A Secret or ConfigMap that does not exist (yet) keeps the pod from starting, as on a
    /// node; the next round asks again.
    async fn write_secret_volumes(&self, pod: &Pod) -> anyhow::Result<()> {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        for (dir, name) in crate::node_agent::secret_volumes(pod, &self.config.scratch_root) {
            let secret = secrets
                .get(&name)
                .await
                .with_context(|| format!("reading Secret {namespace}/{name} for a volume"))?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (key, value) in secret.data.into_iter().flatten() {
                let path = dir.join(&key);
                std::fs::write(&path, &value.0)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        for (dir, name) in crate::node_agent::config_map_volumes(pod, &self.config.scratch_root) {
            let config_map = config_maps
                .get(&name)
                .await
                .with_context(|| format!("reading ConfigMap {namespace}/{name} for a volume"))?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (key, value) in config_map.data.into_iter().flatten() {
                let path = dir.join(&key);
                std::fs::write(&path, value)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// The pod's API credential as a kubelet would mount it: a token of its ServiceAccount,
    /// bound to the pod, written into a kubeconfig; `KUBECONFIG=<path>` for its environment.
    /// `None` when the agent has no cluster access to give or the pod opts out.
    async fn credential(&self, pod: &Pod) -> anyhow::Result<Option<(String, String)>> {
        let (Some(cluster), Some(account)) =
            (&self.config.cluster, credentials::service_account_of(pod))
        else {
            return Ok(None);
        };
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let issued: TokenRequest = accounts
            .create_subresource(
                "token",
                &account,
                &PostParams::default(),
                &credentials::token_request(pod),
            )
            .await
            .with_context(|| {
                format!("requesting a token of ServiceAccount {namespace}/{account} for pod {name}")
            })?;
        let token = issued
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .with_context(|| {
                format!("the API server issued no token for pod {namespace}/{name}")
            })?;
        let dir = self
            .config
            .scratch_root
            .join(namespace)
            .join(name)
            .join("serviceaccount");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("kubeconfig");
        std::fs::write(&path, cluster.kubeconfig(&token, namespace))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Some((
            credentials::KUBECONFIG_ENV.to_owned(),
            path.display().to_string(),
        )))
    }

    fn start(
        &mut self,
        pod: &Pod,
        key: &PodKey,
        uid: &str,
        restarts: i32,
        credential: Option<(String, String)>,
    ) -> anyhow::Result<Process> {
        let placement = Placement {
            node_name: &self.config.node_name,
            host_ip: Ipv4Addr::LOCALHOST,
            scratch_root: &self.config.scratch_root,
            binaries: &self.config.binaries,
            host_paths: &self.config.host_paths,
        };
        let spec = process_for_pod(pod, &placement, &mut self.book)?;
        let check = readiness_check(pod, spec.pod_ip)?;
        for dir in &spec.scratch_dirs {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log = log_path(&self.config.scratch_root, &key.0, &key.1);
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(&spec.program)
            .args(&spec.args)
            .env_clear()
            .envs(self.config.base_env.iter().cloned())
            .envs(spec.env.iter().cloned())
            .envs(credential)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} for pod {}/{}",
                    spec.program.display(),
                    key.0,
                    key.1
                )
            })?;
        let container = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .context("pod without containers")?;
        Ok(Process {
            uid: uid.to_owned(),
            child,
            check,
            state: ContainerState {
                container: container.name.clone(),
                image: container.image.clone().unwrap_or_default(),
                ready: false,
                restarts,
                started_at: Timestamp::now(),
            },
            spec,
            exited_at: None,
        })
    }

    async fn report(&self, key: &PodKey) -> anyhow::Result<()> {
        let process = self.running.get(key).context("no process to report")?;
        let status = running_status(process.spec.pod_ip, &process.state, Timestamp::now());
        self.patch_status(key, status).await
    }

    async fn report_error(&self, key: &PodKey, err: &anyhow::Error) -> anyhow::Result<()> {
        eprintln!("node agent: cannot run pod {}/{}: {err:#}", key.0, key.1);
        let status = json!({"status": {
            "phase": "Pending",
            "hostIP": Ipv4Addr::LOCALHOST.to_string(),
            "conditions": [{"type": "PodScheduled", "status": "True"},
                           {"type": "Ready", "status": "False", "reason": "CreateContainerConfigError",
                            "message": format!("{err:#}")}],
        }});
        self.patch_status(key, status).await
    }

    async fn patch_status(&self, key: &PodKey, status: serde_json::Value) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &key.0);
        match pods
            .patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(err) => {
                Err(err).with_context(|| format!("writing the status of pod {}/{}", key.0, key.1))
            }
        }
    }
}

/// Pods the default scheduler would place (the agent is the only node).
fn schedulable(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.scheduler_name
            .as_deref()
            .is_none_or(|n| n == "default-scheduler")
    })
}

/// The status a kubelet reports for a running pod: Running with its address, one container
/// started, Ready and ContainersReady following the readiness check.
fn running_status(pod_ip: Ipv4Addr, state: &ContainerState, now: Timestamp) -> serde_json::Value {
    let ready = if state.ready { "True" } else { "False" };
    let started = Time(state.started_at);
    let now = Time(now);
    json!({"status": {
        "phase": "Running",
        "hostIP": Ipv4Addr::LOCALHOST.to_string(),
        "podIP": pod_ip.to_string(),
        "podIPs": [{"ip": pod_ip.to_string()}],
        "startTime": started,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
            {"type": "Initialized", "status": "True", "lastTransitionTime": started},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
            {"type": "Ready", "status": ready, "lastTransitionTime": now},
        ],
        "containerStatuses": [{
            "name": state.container,
            "image": state.image,
            "imageID": "",
            "ready": state.ready,
            "started": true,
            "restartCount": state.restarts,
            "state": {"running": {"startedAt": started}},
        }],
    }})
}

/// Runs one readiness check against the pod's own address, bounded to 2 s.
async fn probe(check: &ReadinessCheck) -> bool {
    let attempt = async {
        match check {
            ReadinessCheck::Tcp { address } => {
                tokio::net::TcpStream::connect(address).await.is_ok()
            }
            ReadinessCheck::Http { address, path } => http_ok(address, path).await.unwrap_or(false),
            ReadinessCheck::Grpc { address, service } => {
                grpc_serving(address, service).await.unwrap_or(false)
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .unwrap_or(false)
}

/// An HTTP/1.0 GET answered with a 2xx or 3xx status, as the kubelet's httpGet probe counts it.
async fn http_ok(address: &str, path: &str) -> anyhow::Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    // "HTTP/1.x NNN"
    let code: u16 = std::str::from_utf8(&head[9..12])?.parse()?;
    Ok((200..400).contains(&code))
}

/// The standard `grpc.health.v1.Health/Check` answers SERVING.
async fn grpc_serving(address: &str, service: &str) -> anyhow::Result<bool> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status == ServingStatus::Serving as i32)
}

/// SIGTERM, then SIGKILL once `grace` has passed.
async fn stop(mut process: Process, grace: Duration, namespace: &str, name: &str) {
    if let Some(pid) = process.child.id() {
        // The worker drains on SIGTERM; `kill` is the portable way to send it without libc.
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(grace, process.child.wait())
        .await
        .is_err()
    {
        eprintln!("node agent: pod {namespace}/{name} did not stop within {grace:?}; killing it");
        let _ = process.child.kill().await;
    }
}

async fn register_node(client: &Client, name: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(err) => return Err(err).context("registering the test node"),
    }
    heartbeat(client, name).await
}

/// The Node's status: Ready, with room for plenty of pods, heartbeat now.
async fn heartbeat(client: &Client, name: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let now = Time(Timestamp::now());
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "latentserve test node agent", "lastHeartbeatTime": now,
                        "lastTransitionTime": now}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
        "capacity": {"cpu": "64", "memory": "256Gi", "pods": "250"},
        "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "250"},
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("writing the test node's status")?;
    Ok(())
}

/// Waits until `condition` holds, polling every 100 ms, for at most `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if condition().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_pod_reports_its_address_restarts_and_readiness() {
        let started: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let status = |ready: bool, restarts: i32| {
            let state = ContainerState {
                container: "worker".to_owned(),
                image: "latentserve-worker:0.1.0".to_owned(),
                ready,
                restarts,
                started_at: started,
            };
            running_status(Ipv4Addr::new(127, 0, 0, 5), &state, now)
        };
        let not_ready = status(false, 0);
        let s = &not_ready["status"];
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["podIP"], "127.0.0.5");
        assert_eq!(s["podIPs"][0]["ip"], "127.0.0.5");
        assert_eq!(s["startTime"], "2026-01-01T00:00:00Z");
        assert_eq!(s["conditions"][3]["type"], "Ready");
        assert_eq!(s["conditions"][3]["status"], "False");
        assert_eq!(s["containerStatuses"][0]["ready"], false);

        let ready = status(true, 2);
        let s = &ready["status"];
        assert_eq!(s["conditions"][2]["status"], "True");
        assert_eq!(s["conditions"][3]["status"], "True");
        assert_eq!(
            s["conditions"][3]["lastTransitionTime"],
            "2026-01-01T00:01:00Z"
        );
        assert_eq!(s["containerStatuses"][0]["restartCount"], 2);
        assert_eq!(s["containerStatuses"][0]["name"], "worker");
    }

    #[test]
    fn only_pods_for_the_default_scheduler_are_bound() {
        let pod = |scheduler: Option<&str>| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "c"}], "schedulerName": scheduler},
            }))
            .unwrap()
        };
        assert!(schedulable(&pod(None)));
        assert!(schedulable(&pod(Some("default-scheduler"))));
        assert!(!schedulable(&pod(Some("volcano"))));
    }

    #[tokio::test]
    async fn http_probe_counts_2xx_and_3xx_as_ready() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            for answer in [
                "HTTP/1.0 200 OK\r\n\r\n",
                "HTTP/1.1 503 Service Unavailable\r\n\r\n",
                "HTTP/1.0 302 Found\r\n\r\n",
            ] {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 64];
                let n = stream.read(&mut request).await.unwrap();
                assert!(
                    std::str::from_utf8(&request[..n])
                        .unwrap()
                        .starts_with("GET /readyz HTTP/1.0")
                );
                stream.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let check = ReadinessCheck::Http {
            address: address.clone(),
            path: "/readyz".to_owned(),
        };
        assert!(probe(&check).await);
        assert!(!probe(&check).await);
        assert!(probe(&check).await);
        server.await.unwrap();
        // Nobody listens any more: not ready, and no hang.
        assert!(!probe(&check).await);
        assert!(!probe(&ReadinessCheck::Tcp { address }).await);
    }
}
