//! The expert placement stage, after autoscale and before build (`spec.expertPlacement`):
//! read the placement versions stored as ConfigMaps and the version each group runs, move the
//! groups onto the newest one by one ([`crate::placement::rollout`]), replace the pods a move
//! left on the old version, and under `rebalance` measure the experts' load over each window
//! and store a new balanced version when it pays ([`crate::placement::measure`]).
//!
//! Placement versions are immutable ConfigMaps (`NAME-placement-V`), so that what a group runs is
//! named by its StatefulSet and a placement never changes under a running pod.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::events::EventType;
use latentserve_placement::eplb::{self, BalanceOptions};
use latentserve_placement::file::PlacementFile;
use latentserve_placement::load::{ExpertLoad, predicted_imbalance};
use tracing::instrument;

use super::{Context, Error, events, key};
use crate::crd::{ExpertPlacementStatus, ModelDeployment, PlacementPolicy};
use crate::placement::measure::{self, Decision, PodLoad};
use crate::placement::rollout::{self, GroupState};
use crate::placement::topology;
use crate::placement::{
    self, PLACEMENT_KEY, PlacementPlan, Rebalance, Settings, VERSION_ANNOTATION,
};
use crate::resources::configmap::placement_config_map;
use crate::resources::{
    COMPONENT_PLACEMENT, GRPC_PORT, LABEL_COMPONENT, METRICS_PORT, OwnedKind, Owner,
};
use crate::status::{self, GroupObservation};
use crate::validate::ValidatedSpec;

/// What the builders get and what the status reports.
#[derive(Debug, Clone, Default)]
pub struct Placed {
    pub plan: PlacementPlan,
    pub view: Option<ExpertPlacementStatus>,
    /// When the current measurement window ends (the reconcile requeues then).
    pub next_pass: Option<Duration>,
}

/// What the stage remembers of one object between reconciles.
#[derive(Debug, Default)]
pub struct Memory {
    window: Option<Window>,
    /// The last window's result: imbalance and tokens.
    measured: Option<(f64, f64)>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// The version every group ran when the window began; a move ends the window.
    version: i64,
    /// Each pod's counters (by pod uid) when the window began.
    start: HashMap<String, ExpertLoad>,
}

/// Forgets a deleted object.
pub fn forget(md: &ModelDeployment, ctx: &Context) {
    ctx.metrics.record_placement(
        md.namespace().as_deref().unwrap_or_default(),
        &md.name_any(),
        None,
    );
    ctx.placements
        .lock()
        .expect("placement memory is never poisoned")
        .remove(&key(md));
}

#[instrument(skip_all)]
pub async fn place(
    spec: &ValidatedSpec<'_>,
    ctx: &Context,
    existing: &[StatefulSet],
) -> Result<Placed, Error> {
    if spec.plan().expert_shards < 2 {
        return Ok(Placed::default());
    }
    // Without spec.expertPlacement: the default layout, and groups still on a balanced version
    // (the field was removed) move back to it one at a time like any other move.
    let default_settings = Settings {
        policy: PlacementPolicy::Contiguous,
        redundant_experts: 0,
        rebalance: None,
    };
    let settings = spec.placement().unwrap_or(&default_settings);
    let owner = spec.owner();
    let mut stored = stored_versions(ctx, owner).await?;
    let pods = super::list_pods(ctx, &owner.namespace, &owner.selector_string()).await?;
    let observed = status::observe_groups(existing, &pods);
    let target = match settings.policy {
        PlacementPolicy::Balanced => stored.keys().copied().max().unwrap_or(0),
        PlacementPolicy::Contiguous => 0,
    };
    // Draining groups (the autoscaler's) keep what they run: they are about to go.
    let states: Vec<GroupState> = spec
        .plan()
        .serving_groups()
        .map(|group| group_state(group, existing, &observed, &pods, spec.plan().expert_shards))
        .collect();
    let mut rollout = rollout::next(target, &states);
    for group in spec.plan().draining().keys() {
        let state = group_state(
            *group,
            existing,
            &observed,
            &pods,
            spec.plan().expert_shards,
        );
        rollout
            .versions
            .insert(*group, state.version.unwrap_or(target));
    }
    replace_stale_pods(ctx, owner, existing, &pods).await?;

    let mut view = ExpertPlacementStatus {
        version: target,
        groups_on_version: rollout.versions.values().filter(|v| **v == target).count() as i32,
        rolling_group: rollout.rolling,
        ..previous_view(spec.model_deployment(), target)
    };
    let settled = rollout.rolling.is_none()
        && states
            .iter()
            .all(|s| s.settled && s.version == Some(target));
    let mut next_pass = None;
    if let (Some(rebalance), true) = (&settings.rebalance, settled) {
        let (next, made) =
            measure_window(spec, settings, rebalance, ctx, &pods, target, &mut view).await?;
        next_pass = Some(next);
        stored.extend(made);
    } else {
        // Measure again once every group runs the target version.
        memory(ctx, spec.model_deployment(), |m| m.window = None);
    }
    if let Some((imbalance, tokens)) = memory(ctx, spec.model_deployment(), |m| m.measured) {
        view.measured_imbalance = Some(round(imbalance));
        view.window_tokens = tokens as i64;
    }
    // The versions in use and the newest one (which no group may run yet): the rest are pruned.
    let mut files = BTreeMap::new();
    let newest = stored
        .keys()
        .copied()
        .max()
        .filter(|_| settings.policy == PlacementPolicy::Balanced);
    for version in rollout
        .versions
        .values()
        .copied()
        .chain(newest)
        .filter(|v| *v > 0)
    {
        if let Some(file) = stored.get(&version) {
            files.insert(version, file.clone());
        }
    }
    // A version in use whose ConfigMap is gone (deleted by hand) cannot be rebuilt: those
    // groups go back to the default layout rather than mount a missing ConfigMap.
    let versions = rollout
        .versions
        .into_iter()
        .map(|(g, v)| (g, if files.contains_key(&v) { v } else { 0 }))
        .collect();
    Ok(Placed {
        plan: PlacementPlan { versions, files },
        view: Some(view),
        next_pass,
    })
}

/// The stored versions: `NAME-placement-V` ConfigMaps owned by this ModelDeployment.
async fn stored_versions(ctx: &Context, owner: &Owner) -> Result<BTreeMap<i64, String>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let selector = format!(
        "{},{LABEL_COMPONENT}={COMPONENT_PLACEMENT}",
        owner.children_selector()
    );
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::List {
            what: "ConfigMaps",
            source,
        })?;
    Ok(list
        .items
        .into_iter()
        .filter(|cm| owner.owns(&cm.metadata))
        .filter_map(|cm| {
            let version = placement::version_of_config_map(&owner.name, &cm.name_any())?;
            let file = cm.data?.remove(PLACEMENT_KEY)?;
            Some((version, file))
        })
        .collect())
}

fn version_annotation(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> i64 {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(VERSION_ANNOTATION))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A group is settled when every shard is ready, on its StatefulSet's current template, and
/// on the StatefulSet's placement version (the StatefulSet's status lags behind a new
/// template; the pods' annotations do not).
fn group_state(
    group: i32,
    existing: &[StatefulSet],
    observed: &[GroupObservation],
    pods: &[Pod],
    shards: i32,
) -> GroupState {
    let sts = existing.iter().find(|s| super::group_of(s) == Some(group));
    let version = sts.map(|s| version_annotation(&s.metadata));
    let on_version = pods
        .iter()
        .filter(|p| status::pod_group(p) == Some(group))
        .all(|p| Some(version_annotation(&p.metadata)) == version);
    let settled = on_version
        && observed
            .iter()
            .find(|o| o.group == group)
            .is_some_and(|o| o.ready_pods >= shards && o.rolled_out);
    GroupState {
        group,
        version,
        settled,
    }
}

/// Shards with different placements refuse each other, so a StatefulSet's rolling update
/// (one pod at a time, each waiting for the last to be ready) would never finish: once the
/// StatefulSet has seen its new template, the pods still on another version go all at once.
async fn replace_stale_pods(
    ctx: &Context,
    owner: &Owner,
    existing: &[StatefulSet],
    pods: &[Pod],
) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    for sts in existing {
        let seen = sts
            .status
            .as_ref()
            .and_then(|s| s.observed_generation)
            .is_some_and(|g| Some(g) >= sts.metadata.generation);
        let Some(group) = super::group_of(sts).filter(|_| seen) else {
            continue;
        };
        let version = version_annotation(&sts.metadata);
        let stale = pods.iter().filter(|pod| {
            pod.metadata.deletion_timestamp.is_none()
                && status::pod_group(pod) == Some(group)
                && version_annotation(&pod.metadata) != version
        });
        for pod in stale {
            let name = pod.name_any();
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(
                    pod = name,
                    version,
                    "replacing a pod on another placement version"
                ),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(source) => return Err(Error::DeletePod { name, source }),
            }
        }
    }
    Ok(())
}

/// The figures of the version the status reported before (they are not in memory after an
/// operator restart).
fn previous_view(md: &ModelDeployment, version: i64) -> ExpertPlacementStatus {
    md.status
        .as_ref()
        .and_then(|s| s.expert_placement.clone())
        .filter(|p| p.version == version)
        .map(|p| ExpertPlacementStatus {
            imbalance_before: p.imbalance_before,
            predicted_imbalance: p.predicted_imbalance,
            last_rebalance_time: p.last_rebalance_time,
            measured_imbalance: p.measured_imbalance,
            window_tokens: p.window_tokens,
            ..ExpertPlacementStatus::default()
        })
        .unwrap_or_default()
}

fn memory<T>(ctx: &Context, md: &ModelDeployment, f: impl FnOnce(&mut Memory) -> T) -> T {
    let mut memories = ctx
        .placements
        .lock()
        .expect("placement memory is never poisoned");
    f(memories.entry(key(md)).or_default())
}

/// Runs the measurement window: starts one, or ends it and decides. Returns when the window
/// ends, and the version it stored (number and file), if it stored one.
async fn measure_window(
    spec: &ValidatedSpec<'_>,
    settings: &Settings,
    rebalance: &Rebalance,
    ctx: &Context,
    pods: &[Pod],
    version: i64,
    view: &mut ExpertPlacementStatus,
) -> Result<(Duration, Option<(i64, String)>), Error> {
    let md = spec.model_deployment();
    let elapsed = memory(ctx, md, |m| {
        m.window
            .as_ref()
            .filter(|w| w.version == version)
            .map(|w| w.started.elapsed())
    });
    if let Some(elapsed) = elapsed
        && elapsed < rebalance.interval
    {
        return Ok((rebalance.interval - elapsed, None));
    }
    let counters = scrape(ctx, pods).await;
    let Some(counters) = counters else {
        // A worker did not answer: its rank would look idle. Start over.
        memory(ctx, md, |m| m.window = None);
        return Ok((rebalance.interval.min(Duration::from_secs(30)), None));
    };
    let start = memory(ctx, md, |m| {
        let previous = m.window.take().filter(|w| w.version == version);
        m.window = Some(Window {
            started: Instant::now(),
            version,
            start: counters
                .iter()
                .map(|(uid, (_, _, load))| (uid.clone(), load.clone()))
                .collect(),
        });
        previous.map(|w| w.start)
    });
    let Some(start) = start else {
        return Ok((rebalance.interval, None));
    };
    let loads: Vec<PodLoad> = counters
        .into_iter()
        .map(|(uid, (group, rank, load))| PodLoad {
            group,
            rank,
            load: match start.get(&uid) {
                Some(earlier) => load.since(earlier),
                None => load,
            },
        })
        .collect();
    let shards = spec.plan().expert_shards as usize;
    let measured = measure::measure(&loads, shards);
    let Some(imbalance) = measured.imbalance else {
        memory(ctx, md, |m| m.measured = Some((1.0, 0.0)));
        return Ok((rebalance.interval, None));
    };
    memory(ctx, md, |m| m.measured = Some((imbalance, measured.tokens)));
    let Some((n_experts, n_group)) = model_shape(ctx, pods, &measured.total).await else {
        // The counters name only experts that ran: a file sized from them could miss the
        // model's last experts, and the workers would refuse it.
        tracing::info!(
            deployment = key(md),
            "no ready worker answered GetModelInfo; the placement waits for the next window"
        );
        return Ok((rebalance.interval, None));
    };
    let total = measured.total.with_experts(n_experts);
    let options = BalanceOptions {
        shard_count: shards,
        redundant: settings.redundant_experts,
        n_group,
        nodes: topology::nodes(&rank_nodes(pods), shards),
        // Enough slots for every expert twice: keep the group alive without any one shard.
        min_replicas: if settings.redundant_experts * shards >= n_experts {
            2
        } else {
            1
        },
    };
    let balanced = match eplb::balanced(&total, &options) {
        Ok(balanced) => balanced,
        Err(err) => {
            tracing::warn!(deployment = key(md), error = %err, "no balanced placement");
            return Ok((rebalance.interval, None));
        }
    };
    let predicted = predicted_imbalance(&balanced, &total);
    let entries = total.layers.len() * n_experts;
    let decision = measure::decide(
        imbalance,
        predicted,
        measured.tokens,
        entries,
        rebalance.min_imbalance,
    );
    tracing::info!(deployment = key(md), ?decision, "expert placement window");
    let Decision::Rebalance {
        measured,
        predicted,
    } = decision
    else {
        return Ok((rebalance.interval, None));
    };
    let new_version = version + 1;
    let file = PlacementFile::from_placement(&balanced, Some(new_version.to_string())).to_json();
    let config_map = placement_config_map(spec.owner(), new_version, &file);
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &spec.owner().namespace);
    match api
        .create(
            &PostParams {
                field_manager: Some(crate::resources::FIELD_MANAGER.to_owned()),
                ..PostParams::default()
            },
            &config_map,
        )
        .await
    {
        Ok(_) => {}
        // Another pass made it first (a second operator during a leader change).
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(source) => {
            return Err(Error::Apply {
                kind: OwnedKind::ConfigMap,
                name: config_map.name_any(),
                source,
            });
        }
    }
    ctx.metrics.placement_rebalanced(
        md.namespace().as_deref().unwrap_or_default(),
        &md.name_any(),
    );
    view.version = new_version;
    view.groups_on_version = 0;
    view.imbalance_before = Some(round(measured));
    view.predicted_imbalance = Some(round(predicted));
    view.last_rebalance_time = Some(Time(
        Timestamp::from_second(Timestamp::now().as_second()).expect("the clock is in range"),
    ));
    events::publish(
        md,
        ctx,
        EventType::Normal,
        "Rebalanced",
        "Rebalance",
        format!(
            "expert placement version {new_version}: imbalance {measured:.3} measured, \
             {predicted:.3} predicted; groups move onto it one at a time"
        ),
    )
    .await;
    Ok((rebalance.interval, Some((new_version, file))))
}

/// Every worker pod's counters: uid -> (group, rank, counts); `None` when a running pod did
/// not answer.
async fn scrape(ctx: &Context, pods: &[Pod]) -> Option<HashMap<String, (i32, usize, ExpertLoad)>> {
    let targets: Vec<_> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && status::pod_ready(p))
        .filter_map(|p| {
            let group = status::pod_group(p)?;
            let rank = measure::rank_of_pod(&p.name_any())?;
            let address = status::pod_address(p, METRICS_PORT)?;
            Some((p.uid()?, group, rank, address))
        })
        .collect();
    let answers = futures::future::join_all(
        targets
            .iter()
            .map(|(_, _, _, address)| ctx.loads.expert_load(address)),
    )
    .await;
    let mut counters = HashMap::new();
    for ((uid, group, rank, _), answer) in targets.into_iter().zip(answers) {
        match answer {
            Ok(load) => {
                counters.insert(uid, (group, rank, load));
            }
            Err(err) => {
                tracing::info!(error = %err, "expert counters unavailable; measuring again");
                return None;
            }
        }
    }
    Some(counters)
}

/// The model's routed experts per layer and expert groups, from a ready worker (the counters
/// only name experts that ran); `None` when no worker answers.
async fn model_shape(ctx: &Context, pods: &[Pod], load: &ExpertLoad) -> Option<(usize, usize)> {
    let seen = load.layers.values().map(Vec::len).max().unwrap_or(0);
    for pod in pods.iter().filter(|p| status::pod_ready(p)) {
        let Some(address) = status::pod_address(pod, GRPC_PORT) else {
            continue;
        };
        if let Ok(info) = ctx.model_info.model_info(&address).await {
            let n_experts = (info.num_routed_experts as usize).max(seen);
            let n_group = (info.num_expert_groups as usize).max(1);
            // A worker before num_expert_groups, or groups that do not divide: none.
            let n_group = if n_experts.is_multiple_of(n_group) {
                n_group
            } else {
                1
            };
            return Some((n_experts, n_group));
        }
    }
    None
}

/// Per group, rank -> the node its pod runs on (pods not scheduled yet left out).
fn rank_nodes(pods: &[Pod]) -> Vec<BTreeMap<usize, String>> {
    let mut groups: BTreeMap<i32, BTreeMap<usize, String>> = BTreeMap::new();
    for pod in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let group = status::pod_group(pod);
        let rank = measure::rank_of_pod(&pod.name_any());
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        if let (Some(group), Some(rank), Some(node)) = (group, rank, node) {
            groups.entry(group).or_default().insert(rank, node);
        }
    }
    groups.into_values().collect()
}

/// Three decimals: the status changes only when the figure does.
fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Makes every open measurement window `by` older (the reconciler tests cannot wait).
#[cfg(test)]
pub(super) fn age_windows(ctx: &Context, by: Duration) {
    for memory in ctx.placements.lock().unwrap().values_mut() {
        if let Some(window) = &mut memory.window {
            window.started -= by;
        }
    }
}
