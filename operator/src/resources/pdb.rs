//! One PodDisruptionBudget per serving group. A group serves only while all its shards run, so
//! voluntary evictions (node drains) may take at most one shard of a group at a time; other
//! groups keep serving meanwhile.

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
}
