//! Moving groups onto a placement version one at a time. Pure.
//!
//! A group that moves restarts all its pods at once (shards with different placements refuse
//! each other), so it stops serving until its pods are back; moving one group at a time, and
//! only while every other group is settled, keeps the rest serving throughout.

use std::collections::BTreeMap;

/// What the rollout needs to know of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    pub group: i32,
    /// The version its StatefulSet runs; `None` for a group that has no StatefulSet yet.
    pub version: Option<i64>,
    /// Every pod ready and on the StatefulSet's current template.
    pub settled: bool,
}

/// The version each group gets this pass, and the group that moves (if any).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rollout {
    pub versions: BTreeMap<i32, i64>,
    /// The group moved onto `target` in this pass, or still settling on it.
    pub rolling: Option<i32>,
}

/// New groups start on `target`. Otherwise, while any group is unsettled nothing moves (it is
/// the group moving now, a new group, or a group in trouble: moving another would take a second
/// group out of service); once all are settled, the lowest group not on `target` moves.
pub fn next(target: i64, groups: &[GroupState]) -> Rollout {
    let mut versions = BTreeMap::new();
    let mut rolling = None;
    for state in groups {
        let version = state.version.unwrap_or(target);
        versions.insert(state.group, version);
        if state.version.is_some() && !state.settled && version == target && rolling.is_none() {
            rolling = Some(state.group);
        }
    }
    // A new group is not settled either: it does not serve yet.
    let all_settled = groups.iter().all(|g| g.settled && g.version.is_some());
    if all_settled
        && let Some(behind) = groups
            .iter()
            .filter(|g| g.version != Some(target))
            .map(|g| g.group)
            .min()
    {
        versions.insert(behind, target);
        rolling = Some(behind);
    }
    Rollout { versions, rolling }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(group: i32, version: Option<i64>, settled: bool) -> GroupState {
        GroupState {
            group,
            version,
            settled,
        }
    }

    #[test]
    fn groups_move_one_at_a_time_and_only_when_the_others_are_settled() {
        // Three settled groups on version 1, target 2: group 0 moves.
        let groups = [
            group(0, Some(1), true),
            group(1, Some(1), true),
            group(2, Some(1), true),
        ];
        let r = next(2, &groups);
        assert_eq!(r.versions, BTreeMap::from([(0, 2), (1, 1), (2, 1)]));
        assert_eq!(r.rolling, Some(0));
        // Group 0 restarting: nothing else moves.
        let groups = [
            group(0, Some(2), false),
            group(1, Some(1), true),
            group(2, Some(1), true),
        ];
        let r = next(2, &groups);
        assert_eq!(r.versions, BTreeMap::from([(0, 2), (1, 1), (2, 1)]));
        assert_eq!(r.rolling, Some(0));
        // Group 0 settled: group 1 moves.
        let groups = [
            group(0, Some(2), true),
            group(1, Some(1), true),
            group(2, Some(1), true),
        ];
        assert_eq!(next(2, &groups).rolling, Some(1));
        // All there: nothing moves.
        let groups = [group(0, Some(2), true), group(1, Some(2), true)];
        assert_eq!(next(2, &groups).rolling, None);
    }

    #[test]
    fn a_group_in_trouble_holds_the_rollout_and_new_groups_start_on_target() {
        // Group 1 lost a pod (unsettled, old version): group 0 must not go down too.
        let groups = [group(0, Some(1), true), group(1, Some(1), false)];
        let r = next(2, &groups);
        assert_eq!(r.versions, BTreeMap::from([(0, 1), (1, 1)]));
        assert_eq!(r.rolling, None);
        // A new group (the autoscaler's) starts on the target at once.
        let groups = [group(0, Some(1), true), group(1, None, false)];
        let r = next(2, &groups);
        assert_eq!(r.versions, BTreeMap::from([(0, 1), (1, 2)]));
        assert_eq!(r.rolling, None, "group 0 waits until the new group serves");
        // Back to the default layout (policy Contiguous): the same path to version 0.
        let groups = [group(0, Some(2), true), group(1, Some(2), true)];
        assert_eq!(next(0, &groups).versions, BTreeMap::from([(0, 0), (1, 2)]));
    }
}
