//! One PodDisruptionBudget per serving group. A group serves only while all its shards run, so
//! voluntary evictions (node drains) may take at most one shard of a group at a time; other
//! groups keep serving meanwhile. With two router pods or more, one more budget lets drains take
//! one router pod at a time; a single router pod gets none, since a budget that forbids evicting
//! it would block node drains for good.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{LABEL_GROUP, Owner, names};

pub fn disruption_budget(owner: &Owner, group: i32) -> PodDisruptionBudget {
    let mut selector = owner.pod_selector();
    selector.insert(LABEL_GROUP.to_owned(), group.to_string());
    let mut labels = owner.labels("worker");
    labels.insert(LABEL_GROUP.to_owned(), group.to_string());
    PodDisruptionBudget {
        metadata: owner.meta(names::group(&owner.name, group), labels),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

/// The router pods' budget, when there are at least two of them.
pub fn router_disruption_budget(
    owner: &Owner,
    router_replicas: i32,
) -> Option<PodDisruptionBudget> {
    (router_replicas >= 2).then(|| PodDisruptionBudget {
        metadata: owner.meta(names::router(&owner.name), owner.labels("router")),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(owner.router_selector()),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::demo;

    #[test]
    fn a_budget_covers_exactly_one_group() {
        let md = demo();
        let budget = disruption_budget(&Owner::of(&md), 3);
        assert_eq!(budget.metadata.name.as_deref(), Some("demo-3"));
        let spec = budget.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            spec.selector.unwrap().match_labels.unwrap()[LABEL_GROUP],
            "3"
        );
    }

    #[test]
    fn routers_get_a_budget_from_two_pods_on() {
        let owner = Owner::of(&demo());
        assert!(router_disruption_budget(&owner, 1).is_none());
        let budget = router_disruption_budget(&owner, 2).unwrap();
        assert_eq!(budget.metadata.name.as_deref(), Some("demo-router"));
        let spec = budget.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            spec.selector.unwrap().match_labels.unwrap(),
            owner.router_selector()
        );
    }
}
