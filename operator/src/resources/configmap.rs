//! `NAME-config`: the shard plan and serving settings, for people and tools that inspect a
//! deployment (the workers get the same facts on their command line). `NAME-routing`: the
//! groups the routers must stop sending new requests to, written by the autoscaler before it
//! removes a group (the contract of issue 19). `NAME-placement-V`: expert placement version V
//! (`spec.expertPlacement`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::json;

use super::{COMPONENT_PLACEMENT, COMPONENT_ROUTER, Owner, names};
use crate::placement;
use crate::validate::ValidatedSpec;

/// The key of `NAME-routing` the routers read: a JSON object mapping group name (`NAME-G`) to the
/// RFC 3339 time its drain began; `{}` when no group drains.
pub const DRAINING_GROUPS_KEY: &str = "draining-groups.json";

pub fn config_map(spec: &ValidatedSpec<'_>) -> ConfigMap {
    let owner = spec.owner();
    let plan = spec.plan();
    let groups: Vec<_> = plan
        .groups()
        .map(|group| {
            json!({
                "statefulSet": names::group(&owner.name, group),
                "draining": plan.draining().contains_key(&group),
                "pods": plan
                    .ranks()
                    .map(|rank| json!({
                        "rank": rank,
                        "pod": names::pod(&owner.name, group, rank),
                        "peerAddress": owner.peer_address(group, rank),
                    }))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    let plan = json!({
        "replicas": plan.replicas(),
        "expertShards": plan.expert_shards,
        "groups": groups,
    });
    let serving = serde_json::to_value(spec.serving()).expect("serving settings serialize");
    ConfigMap {
        metadata: owner.meta(names::config_map(&owner.name), owner.labels("config")),
        data: Some(
            [
                ("shard-plan.json".to_owned(), pretty(&plan)),
                ("serving.json".to_owned(), pretty(&serving)),
            ]
            .into(),
        ),
        ..ConfigMap::default()
    }
}

/// `NAME-routing`, always built while the router runs (`{}` when nothing drains), so that a
/// drain ends by rewriting it rather than by deleting it.
pub fn routing_config_map(spec: &ValidatedSpec<'_>) -> ConfigMap {
    let owner = spec.owner();
    let draining: BTreeMap<String, String> = spec
        .plan()
        .draining()
        .iter()
        .map(|(group, since)| (names::group(&owner.name, *group), since.to_string()))
        .collect();
    ConfigMap {
        metadata: owner.meta(
            names::routing_config_map(&owner.name),
            owner.labels(COMPONENT_ROUTER),
        ),
        data: Some(BTreeMap::from([(
            DRAINING_GROUPS_KEY.to_owned(),
            serde_json::to_string(&draining).expect("a map of strings serializes"),
        )])),
        ..ConfigMap::default()
    }
}

/// `NAME-placement-V`: placement version V as the workers read it (`--expert-placement`).
/// Immutable: a version never changes, a new placement is a new version.
pub fn placement_config_map(owner: &Owner, version: i64, file: &str) -> ConfigMap {
    let mut metadata = owner.meta(
        placement::config_map_name(&owner.name, version),
        owner.labels(COMPONENT_PLACEMENT),
    );
    metadata.annotations = Some(BTreeMap::from([(
        placement::VERSION_ANNOTATION.to_owned(),
        version.to_string(),
    )]));
    ConfigMap {
        metadata,
        data: Some(BTreeMap::from([(
            placement::PLACEMENT_KEY.to_owned(),
            file.to_owned(),
        )])),
        immutable: Some(true),
        ..ConfigMap::default()
    }
}

/// The draining groups of a `NAME-routing` ConfigMap as the operator wrote it: group index ->
/// start of the drain. Entries that are not groups of `name` or not times are left out (and
/// logged): the autoscaler then treats them as not draining, the safe side.
pub fn parse_draining(
    name: &str,
    config_map: &ConfigMap,
) -> BTreeMap<i32, k8s_openapi::jiff::Timestamp> {
    let Some(text) = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(DRAINING_GROUPS_KEY))
    else {
        return BTreeMap::new();
    };
    let entries: BTreeMap<String, String> = match serde_json::from_str(text) {
        Ok(entries) => entries,
        Err(err) => {
            tracing::warn!(error = %err, "the routing ConfigMap's {DRAINING_GROUPS_KEY} is not a map of group names to times; no group counts as draining");
            return BTreeMap::new();
        }
    };
    entries
        .into_iter()
        .filter_map(|(group, since)| {
            let index = crate::autoscaling::signal::group_index(name, &group);
            let since = since.parse::<k8s_openapi::jiff::Timestamp>().ok();
            if index.is_none() || since.is_none() {
                tracing::warn!(group = %group, "ignoring an unreadable entry of the routing ConfigMap");
            }
            Some((index?, since?))
        })
        .collect()
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).expect("JSON values print")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{demo, features_latest};
    use crate::validate::validate;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn the_plan_lists_every_rank_of_every_group() {
        let mut md = demo();
        md.spec.replicas = 2;
        let config = config_map(&validate(&md, &features_latest()).unwrap());
        assert_eq!(config.metadata.name.as_deref(), Some("demo-config"));
        let data = config.data.unwrap();
        let plan: serde_json::Value = serde_json::from_str(&data["shard-plan.json"]).unwrap();
        assert_eq!(plan["replicas"], 2);
        assert_eq!(plan["groups"][1]["pods"][1]["pod"], "demo-1-1");
        assert_eq!(plan["groups"][1]["pods"][1]["rank"], 1);
        assert_eq!(plan["groups"][1]["draining"], false);
        assert_eq!(
            plan["groups"][1]["pods"][1]["peerAddress"],
            "demo-1-1.demo-peers.models.svc:50052"
        );
        let serving: serde_json::Value = serde_json::from_str(&data["serving.json"]).unwrap();
        assert_eq!(serving["maxBatchSize"], 64);
    }

    #[test]
    fn the_routing_config_map_lists_the_draining_groups_and_reads_back() {
        let md = demo();
        let spec = validate(&md, &features_latest()).unwrap();
        let idle = routing_config_map(&spec);
        assert_eq!(idle.metadata.name.as_deref(), Some("demo-routing"));
        assert_eq!(idle.data.as_ref().unwrap()[DRAINING_GROUPS_KEY], "{}");
        assert!(parse_draining("demo", &idle).is_empty());

        let since = Timestamp::from_second(1_796_171_400).unwrap();
        let spec = spec.with_groups([0, 1], BTreeMap::from([(2, since)]));
        let draining = routing_config_map(&spec);
        let text = &draining.data.as_ref().unwrap()[DRAINING_GROUPS_KEY];
        assert_eq!(text, r#"{"demo-2":"2026-12-02T00:30:00Z"}"#);
        assert_eq!(
            parse_draining("demo", &draining),
            BTreeMap::from([(2, since)])
        );
        let plan: serde_json::Value =
            serde_json::from_str(&config_map(&spec).data.unwrap()["shard-plan.json"]).unwrap();
        assert_eq!(plan["replicas"], 2, "draining groups do not serve");
        assert_eq!(plan["groups"][2]["draining"], true);
    }

    #[test]
    fn unreadable_routing_entries_count_as_not_draining() {
        let with = |text: &str| ConfigMap {
            data: Some(BTreeMap::from([(
                DRAINING_GROUPS_KEY.to_owned(),
                text.to_owned(),
            )])),
            ..ConfigMap::default()
        };
        assert!(parse_draining("demo", &with("[1, 2]")).is_empty());
        assert!(parse_draining("demo", &ConfigMap::default()).is_empty());
        let parsed = parse_draining(
            "demo",
            &with(
                r#"{"demo-1": "yesterday", "other-2": "2026-12-02T00:30:00Z", "demo-3": "2026-12-02T00:30:00Z"}"#,
            ),
        );
        assert_eq!(parsed.keys().copied().collect::<Vec<_>>(), [3]);
    }
}
