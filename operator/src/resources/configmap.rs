//! `NAME-config`: the shard plan and serving settings, for people and tools that inspect a
//! deployment (the workers get the same facts on their command line).

use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::json;

use super::names;
use crate::validate::ValidatedSpec;

pub fn config_map(spec: &ValidatedSpec<'_>) -> ConfigMap {
    let owner = spec.owner();
    let plan = spec.plan();
    let groups: Vec<_> = plan
        .groups()
        .map(|group| {
            json!({
                "statefulSet": names::group(&owner.name, group),
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
        "replicas": plan.replicas,
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

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).expect("JSON values print")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{demo, features_latest};
    use crate::validate::validate;

    #[test]
    fn the_plan_lists_every_rank_of_every_group() {
        let mut md = demo();
        md.spec.replicas = 2;
        let config = config_map(&validate(&md, &features_latest()).unwrap());
        assert_eq!(config.metadata.name.as_deref(), Some("demo-config"));
        let data = config.data.unwrap();
        let plan: serde_json::Value = serde_json::from_str(&data["shard-plan.json"]).unwrap();
        assert_eq!(plan["groups"][1]["pods"][1]["pod"], "demo-1-1");
        assert_eq!(plan["groups"][1]["pods"][1]["rank"], 1);
        assert_eq!(
            plan["groups"][1]["pods"][1]["peerAddress"],
            "demo-1-1.demo-peers.models.svc:50052"
        );
        let serving: serde_json::Value = serde_json::from_str(&data["serving.json"]).unwrap();
        assert_eq!(serving["maxBatchSize"], 64);
    }
}
