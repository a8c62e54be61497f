//! The first stage of a reconcile: the checks of the CRD schema and its CEL rules, repeated so
//! that clusters which skip them (CEL before 1.25, an object stored before the CRD was updated)
//! are protected too. Pure: a `ModelDeployment` and the cluster's features in; out comes either
//! the first bad field or a [`ValidatedSpec`], the only input the builders take, holding every
//! parsed quantity so that nothing parses the spec a second time.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::jiff::Timestamp;

use crate::autoscaling::{self, Settings};
use crate::crd::{
    AutoscalingMetric, AutoscalingSpec, ExpertPlacementSpec, MAX_TOTAL_PODS, ModelDeployment,
    ModelDeploymentSpec, ModelSource, PlacementPolicy, RESERVED_WORKER_FLAGS, RebalanceMode,
    RouterSpec, ServiceSpec, ServingSpec, TlsSpec, WorkerResources,
};
use crate::discovery::Features;
use crate::placement::{self, PlacementPlan};
use crate::policy::{Policy, host_path_allowed, image_allowed};
use crate::resources::{HTTP_PORT, Owner};
use crate::worker_args::flag_of;

/// The longest ModelDeployment name: `NAME-<group>` must leave room for the StatefulSet
/// controller's `controller-revision-hash` label (63 characters in all) with up to four group
/// digits, and `NAME-peers` must be a DNS label.
pub const MAX_NAME_LEN: usize = 40;
/// Group indices have at most four digits (see [`MAX_NAME_LEN`]).
pub const MAX_GROUP_INDEX: i32 = 10_000;

/// A field that makes the spec unusable, named by its path in the object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSpec {
    /// The reason of the Degraded condition and of the Event: [`INVALID_SPEC`], or what the
    /// operator's policy refused.
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

/// The most router pods one ModelDeployment may ask for.
pub const MAX_ROUTER_REPLICAS: i32 = 64;
/// The resources a router pod may ask for: it holds no model and needs no accelerator.
pub const ROUTER_RESOURCE_NAMES: &[&str] = &["cpu", "memory"];

/// The reason of a spec that breaks the schema's rules.
pub const INVALID_SPEC: &str = "InvalidSpec";
/// The reason of a hostPath outside the operator's allowed prefixes.
pub const HOST_PATH_NOT_ALLOWED: &str = "HostPathNotAllowed";
/// The reason of a worker image outside the operator's allowed images.
pub const IMAGE_NOT_ALLOWED: &str = "ImageNotAllowed";

fn invalid(field: &str, message: impl Into<String>) -> InvalidSpec {
    InvalidSpec {
        reason: INVALID_SPEC,
        field: field.to_owned(),
        message: message.into(),
    }
}

/// The second check, after [`validate`]: the operator-wide allow-lists that the installer set
/// (see [`Policy`]). A spec that passes the schema may still be refused here.
pub fn check_allowed(spec: &ValidatedSpec<'_>, policy: &Policy) -> Result<(), InvalidSpec> {
    if let ModelSource::HostPath(source) = &spec.spec().model
        && !host_path_allowed(&source.path, &policy.allowed_host_path_prefixes)
    {
        return Err(InvalidSpec {
            reason: HOST_PATH_NOT_ALLOWED,
            field: "spec.model.hostPath.path".to_owned(),
            message: format!(
                "{:?} is not under a host path prefix the operator allows ({}); \
                 use a PVC or an image, or ask the operator's installer",
                source.path,
                shown(&policy.allowed_host_path_prefixes)
            ),
        });
    }
    if let Some(image) = spec.spec().image.as_deref()
        && !image_allowed(image, &policy.allowed_images)
    {
        return Err(InvalidSpec {
            reason: IMAGE_NOT_ALLOWED,
            field: "spec.image".to_owned(),
            message: format!(
                "{image:?} is not an image the operator allows ({}); \
                 leave spec.image unset for the default worker image",
                shown(&policy.allowed_images)
            ),
        });
    }
    Ok(())
}

/// An allow-list for a message.
fn shown(list: &[String]) -> String {
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(", ")
    }
}

/// The serving groups, by index, of `expert_shards` ranks each. Without autoscaling the groups
/// are `0..replicas`; the autoscaler picks any set (it removes the least-loaded group, not the
/// last), and some of them may be draining: their StatefulSets stay until the routers have let
/// them go idle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub expert_shards: i32,
    /// Every group with a StatefulSet, draining ones included.
    groups: BTreeSet<i32>,
    /// The draining groups (a subset of `groups`) and when their drain began.
    draining: BTreeMap<i32, Timestamp>,
}

impl ShardPlan {
    /// Groups `0..replicas`, none draining.
    pub fn contiguous(replicas: i32, expert_shards: i32) -> Self {
        Self {
            expert_shards,
            groups: (0..replicas).collect(),
            draining: BTreeMap::new(),
        }
    }

    /// Every group that has a StatefulSet (serving and draining), ascending.
    pub fn groups(&self) -> impl Iterator<Item = i32> + '_ {
        self.groups.iter().copied()
    }

    /// The groups that serve (not draining), ascending.
    pub fn serving_groups(&self) -> impl Iterator<Item = i32> + '_ {
        self.groups().filter(|g| !self.draining.contains_key(g))
    }

    /// Serving groups: what `replicas` means.
    pub fn replicas(&self) -> i32 {
        self.serving_groups().count() as i32
    }

    /// The draining groups and when their drain began.
    pub fn draining(&self) -> &BTreeMap<i32, Timestamp> {
        &self.draining
    }

    /// The shard ranks of one group.
    pub fn ranks(&self) -> Range<i32> {
        0..self.expert_shards
    }
}

/// A `ModelDeployment` that passed [`validate`]: the builders' only input. Its fields are
/// private so that only `validate` makes one; what had to be parsed is here parsed.
#[derive(Debug, Clone)]
pub struct ValidatedSpec<'a> {
    md: &'a ModelDeployment,
    owner: Owner,
    plan: ShardPlan,
    serving: ServingSpec,
    kv_cache_bytes: Option<u64>,
    resources: WorkerResources,
    service: ServiceSpec,
    router: RouterSpec,
    autoscaling: Option<Settings>,
    placement: Option<placement::Settings>,
    placement_plan: PlacementPlan,
}

impl<'a> ValidatedSpec<'a> {
    /// The object as the API server sent it, for the fields that pass through unchanged.
    pub fn model_deployment(&self) -> &'a ModelDeployment {
        self.md
    }

    pub fn spec(&self) -> &'a ModelDeploymentSpec {
        &self.md.spec
    }

    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The same spec with the groups the autoscaler chose: `serving` and `draining` (with the
    /// start of each drain) get StatefulSets. Indices outside `0..10000` (beyond the names'
    /// room, see [`MAX_NAME_LEN`]) are left out.
    pub fn with_groups(
        mut self,
        serving: impl IntoIterator<Item = i32>,
        draining: BTreeMap<i32, Timestamp>,
    ) -> Self {
        let in_range = |g: &i32| (0..MAX_GROUP_INDEX).contains(g);
        let draining: BTreeMap<i32, Timestamp> =
            draining.into_iter().filter(|(g, _)| in_range(g)).collect();
        let groups = serving
            .into_iter()
            .filter(in_range)
            .chain(draining.keys().copied())
            .collect();
        self.plan = ShardPlan {
            expert_shards: self.plan.expert_shards,
            groups,
            draining,
        };
        self
    }

    /// The same spec with the placement version of every group (and the files of the versions
    /// in use), as the placement stage chose them.
    pub fn with_placement(mut self, plan: PlacementPlan) -> Self {
        self.placement_plan = plan;
        self
    }

    /// `spec.expertPlacement`, parsed; `None` when unset (the default layout, no copies).
    pub fn placement(&self) -> Option<&placement::Settings> {
        self.placement.as_ref()
    }

    /// Which placement version each group runs; all on version 0 until the placement stage
    /// says otherwise.
    pub fn placement_plan(&self) -> &PlacementPlan {
        &self.placement_plan
    }

    /// `spec.expertPlacement.redundantExperts` (0 when unset).
    pub fn redundant_experts(&self) -> usize {
        self.placement.as_ref().map_or(0, |p| p.redundant_experts)
    }

    /// `spec.autoscaling`, parsed; `None` when the scale subresource sets the groups.
    pub fn autoscaling(&self) -> Option<&Settings> {
        self.autoscaling.as_ref()
    }

    /// `spec.serving` with its defaults. Its `kvCacheMemory` is the quantity as written; the
    /// worker gets [`Self::kv_cache_bytes`].
    pub fn serving(&self) -> &ServingSpec {
        &self.serving
    }

    /// `spec.serving.kvCacheMemory` in bytes.
    pub fn kv_cache_bytes(&self) -> Option<u64> {
        self.kv_cache_bytes
    }

    pub fn resources(&self) -> &WorkerResources {
        &self.resources
    }

    pub fn service(&self) -> &ServiceSpec {
        &self.service
    }

    /// `spec.router` with its defaults.
    pub fn router(&self) -> &RouterSpec {
        &self.router
    }

    /// Whether the router runs: the client Service then selects the router pods.
    pub fn router_enabled(&self) -> bool {
        self.router.replicas > 0
    }

    /// `spec.tls` where clients connect: the router while it runs (TLS ends there; the hop to
    /// the workers stays inside the cluster, admitted from the router pods only), else the
    /// workers.
    pub fn router_tls(&self) -> Option<&TlsSpec> {
        self.spec().tls.as_ref().filter(|_| self.router_enabled())
    }

    /// `spec.tls` on the workers' client ports: only while no router runs in front of them.
    pub fn worker_tls(&self) -> Option<&TlsSpec> {
        self.spec().tls.as_ref().filter(|_| !self.router_enabled())
    }
}

/// Checks everything the builders rely on, and parses it once.
pub fn validate<'a>(
    md: &'a ModelDeployment,
    features: &Features,
) -> Result<ValidatedSpec<'a>, InvalidSpec> {
    let name = md.metadata.name.as_deref().unwrap_or_default();
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            "metadata.name",
            format!(
                "is {} characters long; at most {MAX_NAME_LEN} leave room for the names of the StatefulSets and pods",
                name.len()
            ),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(invalid(
            "metadata.name",
            "must start with a lowercase letter, as Service names do",
        ));
    }
    let spec = &md.spec;
    if spec.replicas < 0 {
        return Err(invalid("spec.replicas", "must be at least 0"));
    }
    if spec.expert_shards < 1 {
        return Err(invalid("spec.expertShards", "must be at least 1"));
    }
    if i64::from(spec.replicas) * i64::from(spec.expert_shards) > i64::from(MAX_TOTAL_PODS) {
        return Err(invalid(
            "spec.replicas",
            format!("replicas x expertShards must be at most {MAX_TOTAL_PODS} pods"),
        ));
    }
    match &spec.model {
        ModelSource::HostPath(source) if !source.path.starts_with('/') => {
            return Err(invalid(
                "spec.model.hostPath.path",
                "must be an absolute path",
            ));
        }
        ModelSource::Pvc(source) => {
            if source.claim_name.is_empty() {
                return Err(invalid("spec.model.pvc.claimName", "must not be empty"));
            }
            if let Some(sub_path) = &source.sub_path
                && (sub_path.starts_with('/') || sub_path.split('/').any(|part| part == ".."))
            {
                return Err(invalid(
                    "spec.model.pvc.subPath",
                    "must be a relative path without '..'",
                ));
            }
        }
        ModelSource::Image(_) if !features.image_volumes => {
            return Err(invalid(
                "spec.model.image",
                format!(
                    "image volumes need Kubernetes 1.31 or later; this cluster runs {}",
                    features.version
                ),
            ));
        }
        _ => {}
    }
    if md.spec.image.as_deref() == Some("") {
        return Err(invalid("spec.image", "must not be empty"));
    }
    let resources = md.resources();
    if let Some(gpus) = resources.gpus {
        if gpus < 0 {
            return Err(invalid("spec.resources.gpus", "must be at least 0"));
        }
        if gpus > 0 && resources.limits.contains_key(resources.gpu_resource_name()) {
            return Err(invalid(
                "spec.resources.limits",
                format!(
                    "sets {} while resources.gpus does too; use one of them",
                    resources.gpu_resource_name()
                ),
            ));
        }
    }
    check_quantities("spec.resources", &resources.requests, &resources.limits)?;
    let serving = md.serving();
    if let Some(n) = serving.max_batch_size
        && n < 1
    {
        return Err(invalid("spec.serving.maxBatchSize", "must be at least 1"));
    }
    if let Some(n) = serving.max_seq_len
        && n < 1
    {
        return Err(invalid("spec.serving.maxSeqLen", "must be at least 1"));
    }
    let kv_cache_bytes = serving
        .kv_cache_memory
        .as_ref()
        .map(kv_cache_bytes)
        .transpose()?;
    for (i, arg) in serving.extra_args.iter().enumerate() {
        let flag = flag_of(arg);
        if RESERVED_WORKER_FLAGS.contains(&flag) {
            return Err(invalid(
                &format!("spec.serving.extraArgs[{i}]"),
                format!(
                    "{flag} is reserved: the operator sets it from the spec or the shard plan \
                     (set spec.serving and the other spec fields instead)"
                ),
            ));
        }
    }
    if let Some(tls) = &md.spec.tls
        && !is_dns_subdomain(&tls.secret_name)
    {
        return Err(invalid(
            "spec.tls.secretName",
            format!(
                "{:?} is not a Secret name (lowercase letters, digits, '-' and '.', at most 253)",
                tls.secret_name
            ),
        ));
    }
    let service = md.service();
    if let Some(port) = service.port
        && !(1..=65535).contains(&port)
    {
        return Err(invalid("spec.service.port", "must be between 1 and 65535"));
    }
    // Not in the CRD's schema: the API server would refuse the Service's duplicate port at
    // apply time; this names the field instead.
    if let Some(port) = service.port
        && port == HTTP_PORT
    {
        return Err(invalid(
            "spec.service.port",
            format!("{port} is the client Service's http port"),
        ));
    }
    let router = md.router();
    if !(0..=MAX_ROUTER_REPLICAS).contains(&router.replicas) {
        return Err(invalid(
            "spec.router.replicas",
            format!("must be between 0 and {MAX_ROUTER_REPLICAS}"),
        ));
    }
    if let Some(resources) = &router.resources {
        for (which, map) in [
            ("requests", &resources.requests),
            ("limits", &resources.limits),
        ] {
            if let Some(resource) = map
                .keys()
                .find(|name| !ROUTER_RESOURCE_NAMES.contains(&name.as_str()))
            {
                return Err(invalid(
                    &format!("spec.router.resources.{which}.{resource}"),
                    "a router pod asks only for cpu and memory",
                ));
            }
        }
        check_quantities(
            "spec.router.resources",
            &resources.requests,
            &resources.limits,
        )?;
    }
    let autoscaling = spec
        .autoscaling
        .as_ref()
        .map(|autoscaling| check_autoscaling(autoscaling, &router, spec.expert_shards))
        .transpose()?;
    let placement = spec
        .expert_placement
        .as_ref()
        .map(|placement| check_expert_placement(placement, spec.expert_shards))
        .transpose()?;
    Ok(ValidatedSpec {
        md,
        owner: Owner::of(md),
        plan: ShardPlan::contiguous(spec.replicas, spec.expert_shards),
        serving,
        kv_cache_bytes,
        resources,
        service,
        router,
        autoscaling,
        placement,
        placement_plan: PlacementPlan::default(),
    })
}

/// `spec.expertPlacement`: copies and balancing need more than one shard; rebalancing needs the
/// `Balanced` policy; the window must parse.
fn check_expert_placement(
    spec: &ExpertPlacementSpec,
    expert_shards: i32,
) -> Result<placement::Settings, InvalidSpec> {
    if spec.redundant_experts < 0 {
        return Err(invalid(
            "spec.expertPlacement.redundantExperts",
            "must be at least 0",
        ));
    }
    if expert_shards < 2 && spec.redundant_experts > 0 {
        return Err(invalid(
            "spec.expertPlacement.redundantExperts",
            "needs expertShards > 1: one shard holds every expert already",
        ));
    }
    if expert_shards < 2 && spec.policy == PlacementPolicy::Balanced {
        return Err(invalid(
            "spec.expertPlacement.policy",
            "Balanced needs expertShards > 1: one shard holds every expert",
        ));
    }
    let rebalance = match (&spec.rebalance, spec.policy) {
        (Some(r), _) if r.mode == RebalanceMode::Off => None,
        (Some(_), PlacementPolicy::Contiguous) => {
            return Err(invalid(
                "spec.expertPlacement.rebalance",
                "needs policy Balanced (or mode Off)",
            ));
        }
        (None, PlacementPolicy::Contiguous) => None,
        (rebalance, PlacementPolicy::Balanced) => {
            let rebalance = rebalance.clone().unwrap_or_default();
            let interval = autoscaling::parse_duration(&rebalance.interval)
                .filter(|d| *d >= placement::MIN_INTERVAL)
                .ok_or_else(|| {
                    invalid(
                        "spec.expertPlacement.rebalance.interval",
                        format!(
                            "{:?} is not a duration between {}s and 24h such as 30s, 10m or 1h",
                            rebalance.interval,
                            placement::MIN_INTERVAL.as_secs()
                        ),
                    )
                })?;
            if !(rebalance.min_imbalance.is_finite() && rebalance.min_imbalance >= 1.0) {
                return Err(invalid(
                    "spec.expertPlacement.rebalance.minImbalance",
                    "must be at least 1.0 (1.0: shards exactly even)",
                ));
            }
            Some(placement::Rebalance {
                interval,
                min_imbalance: rebalance.min_imbalance,
            })
        }
    };
    Ok(placement::Settings {
        policy: spec.policy,
        redundant_experts: spec.redundant_experts as usize,
        rebalance,
    })
}

/// `spec.autoscaling`: the bounds, the target, the windows, and the router it reads from.
fn check_autoscaling(
    autoscaling: &AutoscalingSpec,
    router: &RouterSpec,
    expert_shards: i32,
) -> Result<Settings, InvalidSpec> {
    if router.replicas < 1 {
        return Err(invalid(
            "spec.autoscaling",
            "needs the router (spec.router.replicas at least 1): the operator reads the signal \
             from it, and it holds requests while no group runs; remove spec.autoscaling or \
             turn the router on",
        ));
    }
    let (min, max) = (autoscaling.min_replicas, autoscaling.max_replicas);
    if min < 0 {
        return Err(invalid(
            "spec.autoscaling.minReplicas",
            "must be at least 0",
        ));
    }
    if max < 1 {
        return Err(invalid(
            "spec.autoscaling.maxReplicas",
            "must be at least 1",
        ));
    }
    if max < min {
        return Err(invalid(
            "spec.autoscaling.maxReplicas",
            format!("{max} is below minReplicas ({min})"),
        ));
    }
    if i64::from(max) * i64::from(expert_shards) > i64::from(MAX_TOTAL_PODS) {
        return Err(invalid(
            "spec.autoscaling.maxReplicas",
            format!("maxReplicas x expertShards must be at most {MAX_TOTAL_PODS} pods"),
        ));
    }
    let target = &autoscaling.target;
    if !(target.value.is_finite() && target.value > 0.0) {
        return Err(invalid("spec.autoscaling.target.value", "must be above 0"));
    }
    if target.metric == AutoscalingMetric::CacheUtilization && target.value > 1.0 {
        return Err(invalid(
            "spec.autoscaling.target.value",
            "a CacheUtilization target is a fraction of the cache: at most 1",
        ));
    }
    let duration = |field: &str, text: &str| {
        autoscaling::parse_duration(text).ok_or_else(|| {
            invalid(
                &format!("spec.autoscaling.{field}"),
                format!(
                    "{text:?} is not a duration such as 0s, 30s, 5m or 1h30m (hours, minutes, \
                     seconds; at most 24h)"
                ),
            )
        })
    };
    let scale_up_stabilization =
        duration("scaleUpStabilization", &autoscaling.scale_up_stabilization)?;
    let scale_down_delay = duration("scaleDownDelay", &autoscaling.scale_down_delay)?;
    let scale_to_zero_after = duration("scaleToZeroAfter", &autoscaling.scale_to_zero_after)?;
    if !(autoscaling.tolerance.is_finite() && (0.0..1.0).contains(&autoscaling.tolerance)) {
        return Err(invalid(
            "spec.autoscaling.tolerance",
            "must be at least 0 and below 1 (0.1: no change within 10% of the target)",
        ));
    }
    Ok(Settings {
        min_groups: min,
        max_groups: max,
        metric: target.metric,
        target: target.value,
        scale_up_stabilization,
        scale_down_delay,
        scale_to_zero_after,
        tolerance: autoscaling.tolerance,
    })
}

/// Every request and limit under `field` parses as a quantity, and no limit is below its request.
fn check_quantities(
    field: &str,
    requests: &BTreeMap<String, Quantity>,
    limits: &BTreeMap<String, Quantity>,
) -> Result<(), InvalidSpec> {
    for (which, map) in [("requests", requests), ("limits", limits)] {
        for (resource, quantity) in map {
            if parse_quantity(quantity).is_none() {
                return Err(invalid(
                    &format!("{field}.{which}.{resource}"),
                    format!("{:?} is not a quantity", quantity.0),
                ));
            }
        }
    }
    for (resource, limit) in limits {
        if let Some(request) = requests.get(resource)
            && parse_quantity(limit) < parse_quantity(request)
        {
            return Err(invalid(
                &format!("{field}.limits.{resource}"),
                format!(
                    "{:?} is below the request {:?}; the API server refuses such a pod",
                    limit.0, request.0
                ),
            ));
        }
    }
    Ok(())
}

/// `serving.kvCacheMemory` in bytes, for the worker's `--kv-cache-memory`.
fn kv_cache_bytes(memory: &Quantity) -> Result<u64, InvalidSpec> {
    match parse_quantity(memory) {
        Some(bytes) if bytes >= 1.0 => Ok(bytes as u64),
        _ => Err(invalid(
            "spec.serving.kvCacheMemory",
            format!(
                "{:?} is not a positive memory quantity such as 8Gi",
                memory.0
            ),
        )),
    }
}

/// A Kubernetes quantity (`8Gi`, `500M`, `1.5`, `100m`, `1e9`) as a number.
pub fn parse_quantity(quantity: &Quantity) -> Option<f64> {
    let text = quantity.0.trim();
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Pi", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Ei", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(suffix, factor)| text.strip_suffix(suffix).map(|n| (n, *factor)))
        .unwrap_or((text, 1.0));
    if number.is_empty()
        || !number
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '+' | '-' | 'e' | 'E'))
    {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    value.is_finite().then_some(value * factor)
}

/// A DNS-1123 subdomain, as the names of Secrets are.
fn is_dns_subdomain(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.starts_with(alnum)
                && label.ends_with(alnum)
                && label.chars().all(|c| alnum(c) || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{demo, features_1_20, features_latest};

    fn field_of(md: &ModelDeployment) -> String {
        validate(md, &features_latest()).unwrap_err().field
    }

    #[test]
    fn a_tls_secret_name_must_be_a_secret_name() {
        let mut md = demo();
        for good in ["demo-tls", "a.b-c", "x"] {
            md.spec.tls = Some(crate::crd::TlsSpec {
                secret_name: good.into(),
                client_auth: None,
            });
            validate(&md, &features_latest()).unwrap();
        }
        for bad in ["", "Demo", "-x", "a..b", "a_b", &"a".repeat(254)] {
            md.spec.tls = Some(crate::crd::TlsSpec {
                secret_name: bad.into(),
                client_auth: None,
            });
            assert_eq!(field_of(&md), "spec.tls.secretName", "{bad:?}");
        }
    }

    #[test]
    fn the_demo_spec_is_valid() {
        validate(&demo(), &features_latest()).unwrap();
        validate(&demo(), &features_1_20()).unwrap();
    }

    #[test]
    fn the_validated_spec_holds_the_parsed_values() {
        let md = demo();
        let spec = validate(&md, &features_latest()).unwrap();
        assert_eq!(spec.kv_cache_bytes(), Some(8 << 30));
        assert_eq!(spec.plan(), &ShardPlan::contiguous(1, 2));
        assert_eq!(spec.plan().groups().collect::<Vec<_>>(), [0]);
        assert_eq!(spec.plan().ranks(), 0..2);
        assert_eq!(spec.autoscaling(), None);
        assert_eq!(spec.owner().name, "demo");
    }

    #[test]
    fn long_and_badly_started_names_are_rejected() {
        let mut md = demo();
        md.metadata.name = Some("a".repeat(MAX_NAME_LEN + 1));
        assert_eq!(field_of(&md), "metadata.name");
        md.metadata.name = Some("9lives".into());
        assert_eq!(field_of(&md), "metadata.name");
    }

    #[test]
    fn too_many_pods_are_rejected() {
        let mut md = demo();
        md.spec.replicas = 33;
        md.spec.expert_shards = 32;
        assert_eq!(field_of(&md), "spec.replicas");
        md.spec.replicas = 32;
        validate(&md, &features_latest()).unwrap();
    }

    #[test]
    fn reserved_flags_in_extra_args_are_rejected_with_their_index() {
        let mut md = demo();
        md.spec.serving.as_mut().unwrap().extra_args =
            vec!["--log-format=json".into(), "--peers=a:1".into()];
        let err = validate(&md, &features_latest()).unwrap_err();
        assert_eq!(err.field, "spec.serving.extraArgs[1]");
        assert!(err.message.contains("--peers"), "{err}");
    }

    #[test]
    fn extra_args_cannot_override_the_limits_and_the_placement() {
        for arg in [
            "--max-seq-len=1048576",
            "--max-batch-size",
            "--kv-cache-memory=1Ti",
            "--no-prefix-caching",
            "--dtype=f16",
            "--expert-placement=/tmp/p.json",
        ] {
            let mut md = demo();
            md.spec.serving.as_mut().unwrap().extra_args = vec![arg.into()];
            let err = validate(&md, &features_latest()).unwrap_err();
            assert_eq!(err.field, "spec.serving.extraArgs[0]", "{arg}");
            assert!(err.message.contains("reserved"), "{err}");
        }
        let mut md = demo();
        md.spec.serving.as_mut().unwrap().extra_args =
            vec!["--model-name=chat".into(), "--max-queue=16".into()];
        validate(&md, &features_latest()).unwrap();
    }

    #[test]
    fn host_paths_and_images_outside_the_allow_lists_are_refused() {
        let policy = Policy::default();
        let check = |md: &ModelDeployment| {
            check_allowed(&validate(md, &features_latest()).unwrap(), &policy)
        };
        check(&demo()).unwrap();
        let mut md = demo();
        md.spec.model = ModelSource::HostPath(crate::crd::HostPathSource {
            path: "/etc".into(),
        });
        let err = check(&md).unwrap_err();
        assert_eq!(
            (err.reason, err.field.as_str()),
            (HOST_PATH_NOT_ALLOWED, "spec.model.hostPath.path")
        );
        assert!(err.message.contains("/srv/models/"), "{err}");

        let mut md = demo();
        md.spec.image = Some("evil.example/shell:1".into());
        let err = check(&md).unwrap_err();
        assert_eq!(
            (err.reason, err.field.as_str()),
            (IMAGE_NOT_ALLOWED, "spec.image")
        );
        assert!(err.message.contains("latentserve-worker"), "{err}");
        md.spec.image = None;
        check(&md).unwrap();
    }

    #[test]
    fn the_grpc_service_port_must_not_take_another_client_port() {
        let mut md = demo();
        for (port, valid) in [(8000, false), (9090, true), (8443, true), (50051, true)] {
            md.spec.service = Some(ServiceSpec {
                port: Some(port),
                ..ServiceSpec::default()
            });
            match validate(&md, &features_latest()) {
                Ok(_) => assert!(valid, "{port} accepted"),
                Err(err) => {
                    assert!(!valid, "{port}: {err}");
                    assert_eq!(err.field, "spec.service.port");
                }
            }
        }
    }

    #[test]
    fn the_router_is_on_by_default_and_its_fields_are_checked() {
        let md = demo();
        let spec = validate(&md, &features_latest()).unwrap();
        assert!(spec.router_enabled());
        assert_eq!(spec.router().replicas, 1);

        let with_router = |router: RouterSpec| {
            let mut md = demo();
            md.spec.router = Some(router);
            md
        };
        let off = with_router(RouterSpec {
            replicas: 0,
            ..RouterSpec::default()
        });
        assert!(!validate(&off, &features_latest()).unwrap().router_enabled());
        let too_many = with_router(RouterSpec {
            replicas: MAX_ROUTER_REPLICAS + 1,
            ..RouterSpec::default()
        });
        assert_eq!(field_of(&too_many), "spec.router.replicas");

        let resources = |requests: &[(&str, &str)], limits: &[(&str, &str)]| {
            let map = |pairs: &[(&str, &str)]| {
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
                    .collect()
            };
            with_router(RouterSpec {
                resources: Some(crate::crd::RouterResources {
                    requests: map(requests),
                    limits: map(limits),
                }),
                ..RouterSpec::default()
            })
        };
        validate(
            &resources(
                &[("cpu", "500m"), ("memory", "256Mi")],
                &[("memory", "1Gi")],
            ),
            &features_latest(),
        )
        .unwrap();
        assert_eq!(
            field_of(&resources(&[("nvidia.com/gpu", "1")], &[])),
            "spec.router.resources.requests.nvidia.com/gpu"
        );
        assert_eq!(
            field_of(&resources(&[("cpu", "lots")], &[])),
            "spec.router.resources.requests.cpu"
        );
        let err = validate(
            &resources(&[("memory", "2Gi")], &[("memory", "1Gi")]),
            &features_latest(),
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.router.resources.limits.memory");
        assert!(err.message.contains("below the request"), "{err}");
    }

    fn autoscaled(change: impl FnOnce(&mut AutoscalingSpec)) -> ModelDeployment {
        let mut md = demo();
        let mut autoscaling: AutoscalingSpec = serde_json::from_value(serde_json::json!({
            "maxReplicas": 4,
            "target": {"metric": "InFlightRequests", "value": 8},
        }))
        .unwrap();
        change(&mut autoscaling);
        md.spec.autoscaling = Some(autoscaling);
        md
    }

    #[test]
    fn autoscaling_defaults_parse_into_settings() {
        let md = autoscaled(|_| {});
        let spec = validate(&md, &features_latest()).unwrap();
        let settings = spec.autoscaling().unwrap();
        assert_eq!(
            settings,
            &Settings {
                min_groups: 1,
                max_groups: 4,
                metric: AutoscalingMetric::InFlightRequests,
                target: 8.0,
                scale_up_stabilization: std::time::Duration::ZERO,
                scale_down_delay: std::time::Duration::from_secs(300),
                scale_to_zero_after: std::time::Duration::from_secs(600),
                tolerance: 0.1,
            }
        );
    }

    #[test]
    fn autoscaling_fields_are_checked_and_named() {
        /// A change to a valid autoscaling spec, the field it breaks, and what the error says.
        type Case = (fn(&mut AutoscalingSpec), &'static str, &'static str);
        let cases: [Case; 10] = [
            (
                |a| a.min_replicas = -1,
                "spec.autoscaling.minReplicas",
                "at least 0",
            ),
            (
                |a| a.max_replicas = 0,
                "spec.autoscaling.maxReplicas",
                "at least 1",
            ),
            (
                |a| a.min_replicas = 5,
                "spec.autoscaling.maxReplicas",
                "below minReplicas (5)",
            ),
            (
                |a| a.max_replicas = 513,
                "spec.autoscaling.maxReplicas",
                "1024 pods",
            ),
            (
                |a| a.target.value = 0.0,
                "spec.autoscaling.target.value",
                "above 0",
            ),
            (
                |a| a.target.value = f64::NAN,
                "spec.autoscaling.target.value",
                "above 0",
            ),
            (
                |a| {
                    a.target.metric = AutoscalingMetric::CacheUtilization;
                    a.target.value = 1.5;
                },
                "spec.autoscaling.target.value",
                "at most 1",
            ),
            (
                |a| a.scale_down_delay = "5 minutes".into(),
                "spec.autoscaling.scaleDownDelay",
                "\"5 minutes\" is not a duration",
            ),
            (
                |a| a.scale_to_zero_after = "48h".into(),
                "spec.autoscaling.scaleToZeroAfter",
                "at most 24h",
            ),
            (
                |a| a.tolerance = 1.0,
                "spec.autoscaling.tolerance",
                "below 1",
            ),
        ];
        for (change, field, message) in cases {
            let err = validate(&autoscaled(change), &features_latest()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.message.contains(message), "{err}");
        }
        let ok = autoscaled(|a| {
            a.min_replicas = 0;
            a.max_replicas = 512;
            a.target.metric = AutoscalingMetric::CacheUtilization;
            a.target.value = 1.0;
            a.scale_up_stabilization = "1m30s".into();
        });
        validate(&ok, &features_latest()).unwrap();
    }

    #[test]
    fn autoscaling_needs_the_router() {
        let mut md = autoscaled(|_| {});
        md.spec.router = Some(RouterSpec {
            replicas: 0,
            ..RouterSpec::default()
        });
        let err = validate(&md, &features_latest()).unwrap_err();
        assert_eq!(err.field, "spec.autoscaling");
        assert!(err.message.contains("spec.router.replicas"), "{err}");
    }

    #[test]
    fn the_autoscaler_picks_any_set_of_groups_and_some_drain() {
        let md = autoscaled(|_| {});
        let at = Timestamp::from_second(1_800_000_000).unwrap();
        let spec = validate(&md, &features_latest())
            .unwrap()
            .with_groups([0, 3, 20_000], BTreeMap::from([(2, at), (-1, at)]));
        let plan = spec.plan();
        assert_eq!(plan.groups().collect::<Vec<_>>(), [0, 2, 3]);
        assert_eq!(plan.serving_groups().collect::<Vec<_>>(), [0, 3]);
        assert_eq!(plan.replicas(), 2);
        assert_eq!(plan.draining().keys().copied().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn gpu_count_and_gpu_limit_conflict() {
        let mut md = demo();
        let resources = md.spec.resources.get_or_insert_default();
        resources.gpus = Some(1);
        resources
            .limits
            .insert("nvidia.com/gpu".into(), Quantity("1".into()));
        assert_eq!(field_of(&md), "spec.resources.limits");
    }

    #[test]
    fn image_volumes_need_a_new_cluster() {
        let mut md = demo();
        md.spec.model = ModelSource::Image(crate::crd::ImageSource {
            reference: "registry.example/models/demo:1".into(),
            pull_policy: None,
        });
        validate(&md, &features_latest()).unwrap();
        let err = validate(&md, &features_1_20()).unwrap_err();
        assert_eq!(err.field, "spec.model.image");
        assert!(err.message.contains("1.31"), "{err}");
    }

    #[test]
    fn pvc_sub_paths_stay_inside_the_volume() {
        let mut md = demo();
        md.spec.model = ModelSource::Pvc(crate::crd::PvcSource {
            claim_name: "weights".into(),
            sub_path: Some("models/../../etc".into()),
        });
        assert_eq!(field_of(&md), "spec.model.pvc.subPath");
    }

    #[test]
    fn kv_cache_memory_must_be_a_quantity() {
        let mut md = demo();
        md.spec.serving.as_mut().unwrap().kv_cache_memory = Some(Quantity("lots".into()));
        assert_eq!(field_of(&md), "spec.serving.kvCacheMemory");
        assert_eq!(kv_cache_bytes(&Quantity("8Gi".into())).unwrap(), 8 << 30);
        assert_eq!(
            kv_cache_bytes(&Quantity("500M".into())).unwrap(),
            500_000_000
        );
        assert!(kv_cache_bytes(&Quantity("0".into())).is_err());
    }

    #[test]
    fn quantities_parse_like_kubernetes() {
        let q = |s: &str| parse_quantity(&Quantity(s.into()));
        assert_eq!(q("1Ki"), Some(1024.0));
        assert_eq!(q("100m"), Some(0.1));
        assert_eq!(q("1e3"), Some(1000.0));
        assert_eq!(q("2"), Some(2.0));
        assert_eq!(q("Gi"), None);
        assert_eq!(q("1 Gi"), None);
    }
}
