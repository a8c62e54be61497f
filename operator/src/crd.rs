//! The `ModelDeployment` custom resource (`latentserve.io/v1alpha1`): its spec, its status and
//! the CRD generated from them.
//!
//! The schema carries every check a cluster can enforce on its own (minimums, enums, required
//! fields, exactly one model source); cross-field rules are CEL `x-kubernetes-validations`, which
//! clusters before 1.25 drop. `validate.rs` repeats all of them so old clusters are protected too.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Flags the operator sets on the worker itself; `serving.extraArgs` must not repeat them.
pub const RESERVED_WORKER_FLAGS: &[&str] = crate::worker_args::RESERVED;

/// The most worker pods one ModelDeployment may ask for (`replicas x expertShards`).
pub const MAX_TOTAL_PODS: i32 = 1024;

/// A model served by a set of latentserve worker pods: `replicas` independent serving groups,
/// each a StatefulSet of `expertShards` pods that split the routed experts between them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "latentserve.io",
    version = "v1alpha1",
    kind = "ModelDeployment",
    namespaced,
    shortname = "mdep",
    category = "latentserve",
    status = "ModelDeploymentStatus",
    derive = "PartialEq",
    doc = "A DeepSeek-style model served by latentserve worker pods, with routed experts sharded across the pods of each serving group.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas", "description": "Serving groups whose every shard is ready"}"#,
    printcolumn = r#"{"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas", "description": "Serving groups asked for"}"#,
    printcolumn = r#"{"name": "Shards", "type": "integer", "jsonPath": ".spec.expertShards", "description": "Pods per serving group"}"#,
    printcolumn = r#"{"name": "Available", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Available\")].status"}"#,
    printcolumn = r#"{"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self.replicas * self.expertShards <= 1024").message("replicas x expertShards must be at most 1024 pods"),
    validation = Rule::new("!has(self.resources) || !has(self.resources.gpus) || self.resources.gpus == 0 || !has(self.resources.limits) || !((has(self.resources.gpuResourceName) ? self.resources.gpuResourceName : 'nvidia.com/gpu') in self.resources.limits)").message("resources.gpus and resources.limits must not both set the GPU resource"),
    validation = Rule::new("!has(self.autoscaling) || self.autoscaling.maxReplicas * self.expertShards <= 1024").message("autoscaling.maxReplicas x expertShards must be at most 1024 pods"),
    validation = Rule::new("!has(self.autoscaling) || !has(self.router) || self.router.replicas >= 1").message("autoscaling needs the router (router.replicas >= 1): the operator reads the signal from it, and it holds requests while no group runs"),
    validation = Rule::new("!has(self.expertPlacement) || self.expertShards > 1 || ((!has(self.expertPlacement.policy) || self.expertPlacement.policy == 'Contiguous') && (!has(self.expertPlacement.redundantExperts) || self.expertPlacement.redundantExperts == 0))").message("expertPlacement needs expertShards > 1: one shard holds every expert")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// Where the weights come from: exactly one of hostPath, pvc or image. Mounted read-only
    /// at /model in every worker.
    pub model: ModelSource,
    /// Independent serving groups (data parallel). The scale subresource sets this.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1024))]
    pub replicas: i32,
    /// Pods per serving group; the routed experts are split across them (expert parallel degree).
    #[serde(default = "default_expert_shards")]
    #[schemars(range(min = 1, max = 256))]
    pub expert_shards: i32,
    /// Worker image; defaults to the operator's `--worker-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Pull policy of the worker image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// CPU, memory and GPU resources of each worker pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<WorkerResources>,
    /// Engine settings passed to every worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingSpec>,
    /// Passed through to the worker pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Passed through to the worker pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Passed through to the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Passed through to the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// ServiceAccount of the worker pods (the namespace's `default` when unset). Its token is
    /// not mounted: workers never talk to the API server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,
    /// The client Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSpec>,
    /// The request router in front of the workers (on by default: one router pod). The client
    /// Service selects the router pods while it runs, the workers when `router.replicas` is 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterSpec>,
    /// While true the operator leaves the children as they are (no applies, no deletions) and
    /// only reports status.
    #[serde(default)]
    pub paused: bool,
    /// TLS on the client ports (gRPC and OpenAI HTTP) from a `kubernetes.io/tls` Secret, e.g. one
    /// that cert-manager keeps; unset: plain text. The metrics port stays plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// The operator sets the number of serving groups from what the router measures, between
    /// minReplicas and maxReplicas (0 allowed: the router holds requests while no group runs).
    /// While set, `replicas` and the scale subresource are ignored. Needs the router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Which shard of a group holds which routed expert: the fixed default layout, or balanced
    /// placements the operator computes from the experts' measured load and rolls out group by
    /// group. Needs `expertShards` > 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_placement: Option<ExpertPlacementSpec>,
}

/// `spec.expertPlacement`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.policy == 'Balanced' || !has(self.rebalance) || self.rebalance.mode == 'Off'").message("rebalance needs policy Balanced"))]
pub struct ExpertPlacementSpec {
    /// `Contiguous`: each shard holds whole expert groups (or a contiguous range of expert ids),
    /// the same in every layer. `Balanced`: the operator measures each expert's load and
    /// computes per-layer placements that even out the shards' load (DeepSeek's EPLB method).
    #[serde(default)]
    pub policy: PlacementPolicy,
    /// Extra expert slots per shard, for copies of other shards' experts: with `Contiguous`,
    /// shard r copies the experts of shard r + 1; with `Balanced`, the hottest experts get the
    /// copies. At least (routed experts / expertShards) of them put every expert on two
    /// shards, so a group keeps serving when one shard is lost.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1024))]
    pub redundant_experts: i32,
    /// When the operator computes a new balanced placement (policy `Balanced` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<RebalanceSpec>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PlacementPolicy {
    #[default]
    Contiguous,
    Balanced,
}

/// `spec.expertPlacement.rebalance`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceSpec {
    /// `Periodic`: measure over every `interval` and roll out a new placement when it pays.
    /// `Off`: keep the placement the groups run (a balanced one computed before stays).
    #[serde(default)]
    pub mode: RebalanceMode,
    /// The measurement window (a duration such as `30s`, `10m`, `1h`).
    #[serde(default = "default_rebalance_interval")]
    #[schemars(length(min = 2, max = 32), regex(pattern = r"^([0-9]+(h|m|s))+$"))]
    pub interval: String,
    /// Roll out a new placement only when the measured imbalance (slowest shard's expert load
    /// over the mean, summed over layers) is at least this, and the new placement is predicted
    /// to lower it.
    #[serde(default = "default_min_imbalance")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub min_imbalance: f64,
}

impl Default for RebalanceSpec {
    fn default() -> Self {
        Self {
            mode: RebalanceMode::default(),
            interval: default_rebalance_interval(),
            min_imbalance: default_min_imbalance(),
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RebalanceMode {
    #[default]
    Periodic,
    Off,
}

fn default_rebalance_interval() -> String {
    "10m".to_owned()
}

fn default_min_imbalance() -> f64 {
    1.15
}

/// `spec.autoscaling`: serving groups follow a per-group target, as the Kubernetes HPA does for
/// pods, with the signal read from the router.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must be at most maxReplicas"))]
pub struct AutoscalingSpec {
    /// The fewest serving groups; 0 lets the deployment scale to zero after `scaleToZeroAfter`
    /// without requests.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1024))]
    pub min_replicas: i32,
    /// The most serving groups (`maxReplicas x expertShards` pods at most 1024).
    #[schemars(range(min = 1, max = 1024))]
    pub max_replicas: i32,
    /// The per-group average the autoscaler keeps the chosen signal at.
    pub target: AutoscalingTarget,
    /// Scale up only to the lowest group count recommended within this window (a duration such
    /// as `0s`, `30s`, `5m`, `1h30m`).
    #[serde(default = "default_scale_up_stabilization")]
    #[schemars(length(min = 2, max = 32), regex(pattern = r"^([0-9]+(h|m|s))+$"))]
    pub scale_up_stabilization: String,
    /// Scale down only to the highest group count recommended within this window.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(length(min = 2, max = 32), regex(pattern = r"^([0-9]+(h|m|s))+$"))]
    pub scale_down_delay: String,
    /// With `minReplicas: 0`, the last group goes once no router has had a request in flight or
    /// held for this long.
    #[serde(default = "default_scale_to_zero_after")]
    #[schemars(length(min = 2, max = 32), regex(pattern = r"^([0-9]+(h|m|s))+$"))]
    pub scale_to_zero_after: String,
    /// No change while the signal is within this fraction of the target (0.1: 10%).
    #[serde(default = "default_tolerance")]
    #[schemars(range(min = 0.0, max = 0.99))]
    pub tolerance: f64,
}

/// The signal the autoscaler holds at `value` per serving group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.value > 0.0").message("target.value must be above 0"),
    validation = Rule::new("self.metric != 'CacheUtilization' || self.value <= 1.0").message("a CacheUtilization target is a fraction: at most 1")
)]
pub struct AutoscalingTarget {
    /// The per-group signal, as the router measures it.
    pub metric: AutoscalingMetric,
    /// The per-group average to keep: tokens, requests, a fraction (0-1] or seconds. Above 0.
    pub value: f64,
}

/// What the router measures per serving group.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AutoscalingMetric {
    /// Prompt tokens not yet prefilled (waiting requests and the rest of running ones).
    QueuedPromptTokens,
    /// Requests in flight to the group's workers.
    InFlightRequests,
    /// Used fraction of the group's latent cache blocks (0-1).
    CacheUtilization,
    /// p90 time to first token of the group's requests in the router's window, in seconds.
    TtftP90Seconds,
}

impl AutoscalingMetric {
    pub const ALL: [AutoscalingMetric; 4] = [
        AutoscalingMetric::QueuedPromptTokens,
        AutoscalingMetric::InFlightRequests,
        AutoscalingMetric::CacheUtilization,
        AutoscalingMetric::TtftP90Seconds,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AutoscalingMetric::QueuedPromptTokens => "QueuedPromptTokens",
            AutoscalingMetric::InFlightRequests => "InFlightRequests",
            AutoscalingMetric::CacheUtilization => "CacheUtilization",
            AutoscalingMetric::TtftP90Seconds => "TtftP90Seconds",
        }
    }
}

fn default_min_replicas() -> i32 {
    1
}

fn default_scale_up_stabilization() -> String {
    "0s".to_owned()
}

fn default_scale_down_delay() -> String {
    "5m".to_owned()
}

fn default_scale_to_zero_after() -> String {
    "10m".to_owned()
}

fn default_tolerance() -> f64 {
    0.1
}

/// TLS for clients of the workers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A Secret in the ModelDeployment's namespace with the keys `tls.crt` and `tls.key` (and
    /// `ca.crt` for `clientAuth: Required`), as cert-manager writes them. The workers reload the
    /// files when the Secret changes.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// `Required`: clients must present a certificate signed by the Secret's `ca.crt` (mutual
    /// TLS). `None` (the default): any client that trusts the server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
}

/// Whether clients must present a certificate.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClientAuth {
    #[default]
    None,
    Required,
}

impl TlsSpec {
    pub fn client_auth_required(&self) -> bool {
        self.client_auth == Some(ClientAuth::Required)
    }
}

fn default_replicas() -> i32 {
    1
}

fn default_expert_shards() -> i32 {
    1
}

/// The one source of the model weights.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum ModelSource {
    /// A directory on every node that may run a worker.
    HostPath(HostPathSource),
    /// A PersistentVolumeClaim in the ModelDeployment's namespace (ReadOnlyMany for more than
    /// one node).
    Pvc(PvcSource),
    /// An OCI image or artifact holding the model files (Kubernetes 1.31+ image volumes).
    Image(ImageSource),
}

/// A model directory on the node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    /// Absolute path of the model directory (config.json, *.safetensors, tokenizer.json).
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^/"))]
    pub path: String,
}

/// A model directory on a PersistentVolumeClaim.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of the claim.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Directory inside the volume that holds the model; the volume root when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096), regex(pattern = r"^[^/]"))]
    pub sub_path: Option<String>,
}

/// A model packaged as an OCI image.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    /// Image reference, e.g. `registry.example/models/dsv3:1`.
    #[schemars(length(min = 1, max = 512))]
    pub reference: String,
    /// Pull policy of the model image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

/// Kubernetes image pull policies.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Resources of each worker pod.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkerResources {
    /// GPUs per worker pod, set as both request and limit of `gpuResourceName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 64))]
    pub gpus: Option<i32>,
    /// Extended resource name of the GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub gpu_resource_name: Option<String>,
    /// Requests, as in a container's `resources.requests`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Quantity>,
    /// Limits, as in a container's `resources.limits`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Quantity>,
}

/// The GPU resource name used when `resources.gpuResourceName` is unset.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";

impl WorkerResources {
    pub fn gpu_resource_name(&self) -> &str {
        self.gpu_resource_name
            .as_deref()
            .unwrap_or(DEFAULT_GPU_RESOURCE)
    }
}

/// Engine settings; unset fields keep the worker's own defaults.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServingSpec {
    /// Most sequences decoded together in one step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_batch_size: Option<i32>,
    /// Longest sequence (prompt + generated tokens) a request may reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_seq_len: Option<i32>,
    /// Memory budget of the latent KV cache pool per worker, as a quantity (e.g. `8Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_memory: Option<Quantity>,
    /// Share cached prompt prefixes between requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_caching: Option<bool>,
    /// Weight dtype in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
    /// Extra worker flags, appended after the ones the operator sets. Reserved, and refused:
    /// the addresses and shard flags, `--expert-placement`, and the flags of the fields above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 1024)))]
    #[x_kube(validation = Rule::new(crate::worker_args::extra_args_cel_rule()).message("extraArgs must not name a reserved flag: the addresses, the shard plan and the limits of spec.serving are the operator's"))]
    pub extra_args: Vec<String>,
}

/// Weight dtypes the worker loads into memory.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
        }
    }
}

/// The client Service.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// gRPC port of the client Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Service type.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<ServiceType>,
    /// Annotations of the client Service (load balancer settings and the like).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Namespaces whose pods may reach the client ports (gRPC 50051, HTTP 8000) through the
    /// NetworkPolicy, besides the operator's own; unset: any source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<LabelSelector>,
}

/// Client Service types.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The router Deployment `NAME-router`: per-request balancing over the ready worker pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// Router pods; 0 turns the router off and the client Service selects the workers.
    #[serde(default = "default_router_replicas")]
    #[schemars(range(min = 0, max = 64))]
    pub replicas: i32,
    /// CPU and memory of each router pod; the operator's defaults when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<RouterResources>,
    /// How the router picks a worker for each request.
    #[serde(default)]
    pub policy: RoutingPolicy,
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            replicas: default_router_replicas(),
            resources: None,
            policy: RoutingPolicy::default(),
        }
    }
}

fn default_router_replicas() -> i32 {
    1
}

/// Resources of each router pod: `cpu` and `memory` only (the router holds no model).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouterResources {
    /// Requests, as in a container's `resources.requests`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Quantity>,
    /// Limits, as in a container's `resources.limits`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Quantity>,
}

/// The router's choice of worker per request.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RoutingPolicy {
    /// Requests that share a prompt prefix go where it is cached, spilling over under load.
    #[default]
    PrefixAware,
    /// The worker with the least outstanding work.
    LeastLoaded,
    /// Each ready worker in turn.
    RoundRobin,
}

impl RoutingPolicy {
    /// The value of the router's `--policy` flag.
    pub fn flag_value(self) -> &'static str {
        match self {
            RoutingPolicy::PrefixAware => "prefix-aware",
            RoutingPolicy::LeastLoaded => "least-loaded",
            RoutingPolicy::RoundRobin => "round-robin",
        }
    }
}

/// What the operator observed; written only through the status subresource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Serving groups that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Serving groups whose every shard is ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the worker pods (for the scale subresource and HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Available, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// `host:port` of the client Service (gRPC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Base URL of the OpenAI-compatible API through the client Service, as OpenAI clients take
    /// it (`http://NAME.NAMESPACE.svc:8000/v1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openai_endpoint: Option<String>,
    /// Cache capacity as reported by a ready worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    /// The router Deployment; absent while the router is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterStatus>,
    /// What the autoscaler saw and decided; absent without `spec.autoscaling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    /// The expert placement the groups run, and how even it keeps the shards (policy
    /// `Balanced`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_placement: Option<ExpertPlacementStatus>,
}

/// `status.expertPlacement`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ExpertPlacementStatus {
    /// The placement version the groups are rolled onto; 0 is the default layout. Version V
    /// lives in the immutable ConfigMap `NAME-placement-V`.
    pub version: i64,
    /// Serving groups running `version`.
    pub groups_on_version: i32,
    /// The group being moved onto `version` now (one at a time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_group: Option<i32>,
    /// Expert load imbalance over the last measurement window: the slowest shard's routed
    /// tokens over the mean, summed over MoE layers and groups (1.0 is even).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_imbalance: Option<f64>,
    /// Routed (token, expert) pairs the last window counted.
    #[serde(default)]
    pub window_tokens: i64,
    /// The imbalance measured when `version` was computed, and the one predicted for it on the
    /// same counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imbalance_before: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_imbalance: Option<f64>,
    /// When `version` was computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rebalance_time: Option<Time>,
    /// Groups serving with a shard down (their other shards hold copies of its experts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded_groups: Vec<i32>,
}

/// The autoscaler's view of one ModelDeployment.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Serving groups that exist and are not draining.
    pub current_replicas: i32,
    /// Serving groups the autoscaler wants.
    pub desired_replicas: i32,
    /// The signal (`spec.autoscaling.target.metric`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<AutoscalingMetric>,
    /// The signal's average over the ready groups; absent while there is none to measure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// `spec.autoscaling.target.value`.
    pub target: f64,
    /// Requests the routers hold because no group can take them.
    pub held_requests: i64,
    /// Groups (StatefulSet names) that get no new requests and go once they are idle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining_groups: Vec<String>,
    /// When the group count last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// The last change of the group count, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<ScalingDecision>,
}

/// One change of the group count.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingDecision {
    /// Serving groups before.
    pub from: i32,
    /// Serving groups after.
    pub to: i32,
    /// The signal, the target and the rule that decided.
    pub reason: String,
    pub time: Time,
}

/// The router pods as the operator observed them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouterStatus {
    /// Router pods asked for (`spec.router.replicas`).
    pub replicas: i32,
    /// Router pods that are ready (serving, not draining).
    pub ready_replicas: i32,
}

/// MLA-aware capacity figures of one worker, from its `GetModelInfo`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// Latent cache bytes per token over all layers.
    pub kv_cache_bytes_per_token: i64,
    /// Tokens that fit in one worker's cache pool.
    pub kv_cache_tokens: i64,
    /// Sequences of `maxContext` tokens that fit in the cache at once.
    pub concurrent_sequences_at_max_len: i64,
    /// The context length those sequences have.
    pub max_context: i64,
    /// The pod that reported the figures.
    pub reported_by: String,
}

impl ModelDeployment {
    pub fn serving(&self) -> ServingSpec {
        self.spec.serving.clone().unwrap_or_default()
    }

    pub fn resources(&self) -> WorkerResources {
        self.spec.resources.clone().unwrap_or_default()
    }

    pub fn service(&self) -> ServiceSpec {
        self.spec.service.clone().unwrap_or_default()
    }

    /// `spec.router` with its defaults: one router pod when the field is left out.
    pub fn router(&self) -> RouterSpec {
        self.spec.router.clone().unwrap_or_default()
    }
}

/// The CRD, with CEL rules that clusters from 1.25 enforce and older ones drop.
pub fn crd() -> CustomResourceDefinition {
    let mut value = serde_json::to_value(ModelDeployment::crd()).expect("a CRD serializes to JSON");
    drop_null_enum_values(&mut value);
    serde_json::from_value(value).expect("the CRD is still a CRD")
}

/// Optional enums come out of schemars as `enum: [..., null]`; `nullable: true` already admits
/// null, and API servers up to at least 1.20 refuse a CRD whose enum lists null.
fn drop_null_enum_values(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(values)) = map.get_mut("enum") {
                values.retain(|v| !v.is_null());
            }
            map.values_mut().for_each(drop_null_enum_values);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_null_enum_values),
        _ => {}
    }
}

/// The CRD without `x-kubernetes-validations`, for clusters before 1.25, where server-side apply
/// refuses the unknown field. The reconciler applies the same rules there.
pub fn crd_without_cel() -> CustomResourceDefinition {
    let mut value = serde_json::to_value(crd()).expect("a CRD serializes to JSON");
    strip_key(&mut value, "x-kubernetes-validations");
    serde_json::from_value(value).expect("a CRD without CEL rules is still a CRD")
}

fn strip_key(value: &mut serde_json::Value, key: &str) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove(key);
            map.values_mut().for_each(|v| strip_key(v, key));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| strip_key(v, key)),
        _ => {}
    }
}

/// The CRD as YAML, as `latentserve-operator crd` prints it and `crds/` holds it.
pub fn crd_yaml(with_cel: bool) -> String {
    let crd = if with_cel { crd() } else { crd_without_cel() };
    serde_yaml::to_string(&crd).expect("a CRD serializes to YAML")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_of(crd: &CustomResourceDefinition) -> serde_json::Value {
        serde_json::to_value(&crd.spec.versions[0].schema).unwrap()["openAPIV3Schema"].clone()
    }

    #[test]
    fn crd_has_the_names_scale_and_status_subresources() {
        let crd = crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("modeldeployments.latentserve.io")
        );
        assert_eq!(crd.spec.names.short_names, Some(vec!["mdep".to_owned()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        let subresources = version.subresources.as_ref().unwrap();
        assert!(subresources.status.is_some());
        let scale = subresources.scale.as_ref().unwrap();
        assert_eq!(scale.spec_replicas_path, ".spec.replicas");
        assert_eq!(scale.status_replicas_path, ".status.replicas");
        assert_eq!(
            scale.label_selector_path.as_deref(),
            Some(".status.selector")
        );
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            [
                "Ready",
                "Replicas",
                "Shards",
                "Available",
                "Endpoint",
                "Age"
            ]
        );
    }

    #[test]
    fn model_source_is_exactly_one_of_three() {
        let schema = schema_of(&crd());
        let model = &schema["properties"]["spec"]["properties"]["model"];
        let one_of = model["oneOf"].as_array().expect("model has oneOf");
        let required: Vec<_> = one_of.iter().map(|s| s["required"][0].clone()).collect();
        assert_eq!(required, ["hostPath", "pvc", "image"]);
        for source in ["hostPath", "pvc", "image"] {
            assert!(model["properties"][source].is_object(), "{source} missing");
        }
        assert_eq!(
            schema["properties"]["spec"]["required"],
            serde_json::json!(["model"])
        );
    }

    #[test]
    fn schema_carries_minimums_and_enums() {
        let schema = schema_of(&crd());
        let spec = &schema["properties"]["spec"]["properties"];
        assert_eq!(spec["replicas"]["minimum"], 0.0);
        assert_eq!(spec["expertShards"]["minimum"], 1.0);
        let service_type = &spec["service"]["properties"]["type"];
        assert_eq!(
            service_type["enum"],
            serde_json::json!(["ClusterIP", "NodePort", "LoadBalancer"])
        );
        assert_eq!(
            service_type["nullable"], true,
            "optional enums admit null through nullable"
        );
        assert_eq!(
            spec["serving"]["properties"]["dtype"]["enum"],
            serde_json::json!(["f32", "f16"])
        );
        let router = &spec["router"]["properties"];
        assert_eq!(router["replicas"]["minimum"], 0.0);
        assert_eq!(router["replicas"]["default"], 1);
        assert_eq!(
            router["policy"]["enum"],
            serde_json::json!(["PrefixAware", "LeastLoaded", "RoundRobin"])
        );
        assert_eq!(router["policy"]["default"], "PrefixAware");
    }

    #[test]
    fn cel_rules_are_present_and_can_be_left_out() {
        let with = serde_json::to_string(&crd()).unwrap();
        // The spec's, extraArgs', autoscaling's, its target's and expertPlacement's.
        assert_eq!(with.matches("x-kubernetes-validations").count(), 5);
        assert!(with.contains("rebalance needs policy Balanced"));
        assert!(with.contains("expertPlacement needs expertShards > 1"));
        assert!(with.contains("self.replicas * self.expertShards <= 1024"));
        assert!(with.contains("self.minReplicas <= self.maxReplicas"));
        assert!(with.contains("self.router.replicas >= 1"));
        let without = serde_json::to_string(&crd_without_cel()).unwrap();
        assert!(!without.contains("x-kubernetes-validations"));
        assert!(!crd_yaml(false).contains("x-kubernetes-validations"));
    }

    #[test]
    fn autoscaling_has_its_defaults_bounds_and_metrics_in_the_schema() {
        let schema = schema_of(&crd());
        let autoscaling = &schema["properties"]["spec"]["properties"]["autoscaling"];
        assert_eq!(
            autoscaling["required"],
            serde_json::json!(["maxReplicas", "target"])
        );
        let fields = &autoscaling["properties"];
        assert_eq!(fields["minReplicas"]["default"], 1);
        assert_eq!(fields["minReplicas"]["minimum"], 0.0);
        assert_eq!(fields["maxReplicas"]["minimum"], 1.0);
        assert_eq!(fields["scaleUpStabilization"]["default"], "0s");
        assert_eq!(fields["scaleDownDelay"]["default"], "5m");
        assert_eq!(fields["scaleToZeroAfter"]["default"], "10m");
        assert_eq!(fields["tolerance"]["default"], 0.1);
        assert_eq!(
            fields["target"]["properties"]["metric"]["enum"],
            serde_json::json!([
                "QueuedPromptTokens",
                "InFlightRequests",
                "CacheUtilization",
                "TtftP90Seconds"
            ])
        );
        let status = &schema["properties"]["status"]["properties"]["autoscaling"]["properties"];
        for field in [
            "currentReplicas",
            "desiredReplicas",
            "metric",
            "value",
            "target",
            "heldRequests",
            "drainingGroups",
            "lastScaleTime",
            "lastDecision",
        ] {
            assert!(status[field].is_object(), "status.autoscaling.{field}");
        }
    }

    #[test]
    fn defaults_apply_when_fields_are_left_out() {
        let md: ModelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "latentserve.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "demo"},
            "spec": {"model": {"hostPath": {"path": "/srv/models/demo"}}}
        }))
        .unwrap();
        assert_eq!(md.spec.replicas, 1);
        assert_eq!(md.spec.expert_shards, 1);
        assert!(!md.spec.paused);
        assert_eq!(md.spec.router, None);
        assert_eq!(md.spec.autoscaling, None);
        assert_eq!(
            md.router(),
            RouterSpec {
                replicas: 1,
                resources: None,
                policy: RoutingPolicy::PrefixAware
            },
            "a router runs unless turned off"
        );
        assert_eq!(md.resources().gpu_resource_name(), "nvidia.com/gpu");
        assert_eq!(
            md.spec.model,
            ModelSource::HostPath(HostPathSource {
                path: "/srv/models/demo".into()
            })
        );
    }
}
