//! Expert placement as a control loop (`spec.expertPlacement`): measure how evenly the shards of
//! each group carry their routed experts' load, compute a balanced placement (DeepSeek's EPLB,
//! in `latentserve-placement`), store it as an immutable, versioned ConfigMap, and move the
//! groups onto it one at a time.
//!
//! - [`rollout`]: which version each group runs, and which group moves next (pure);
//! - [`measure`]: expert load per group and rank from the workers' counters, and the decision
//!   to rebalance (pure);
//! - [`topology`]: how the shards sit on nodes, for the hierarchical policy (pure);
//! - [`fetch`]: reads the workers' `/metrics` (I/O).
//!
//! The reconcile stage that wires them together is `reconcile::placement`.

pub mod fetch;
pub mod measure;
pub mod rollout;
pub mod topology;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::crd::PlacementPolicy;

/// The shortest measurement window `rebalance.interval` accepts: shorter windows count too few
/// tokens to tell a hot expert from noise, and each rollout restarts a group.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);

/// The annotation on a group's StatefulSet and on its pods: the placement version they run.
pub const VERSION_ANNOTATION: &str = "latentserve.io/placement-version";
/// The ConfigMap key the workers read (`--expert-placement`).
pub const PLACEMENT_KEY: &str = "placement.json";
/// Where the placement ConfigMap is mounted in the workers.
pub const PLACEMENT_MOUNT: &str = "/etc/latentserve/placement";

/// `spec.expertPlacement`, checked and parsed by `validate`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub policy: PlacementPolicy,
    /// Extra expert slots per shard.
    pub redundant_experts: usize,
    /// `None`: the operator computes no new placement.
    pub rebalance: Option<Rebalance>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rebalance {
    pub interval: Duration,
    pub min_imbalance: f64,
}

/// Which placement each group runs, and the ConfigMaps that hold the versions in use.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PlacementPlan {
    /// Version per group; groups not named run version 0, the worker's default layout.
    pub versions: BTreeMap<i32, i64>,
    /// Placement file (JSON) per version above 0 that some group runs or is moving to.
    pub files: BTreeMap<i64, String>,
}

impl PlacementPlan {
    pub fn version_of(&self, group: i32) -> i64 {
        self.versions.get(&group).copied().unwrap_or(0)
    }
}

/// `NAME-placement-V`.
pub fn config_map_name(name: &str, version: i64) -> String {
    format!("{name}-placement-{version}")
}

/// The version of a ConfigMap named `NAME-placement-V`, if it is one of `name`'s.
pub fn version_of_config_map(name: &str, config_map: &str) -> Option<i64> {
    config_map
        .strip_prefix(name)?
        .strip_prefix("-placement-")?
        .parse()
        .ok()
        .filter(|v| *v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_map_names_carry_the_version() {
        assert_eq!(config_map_name("demo", 3), "demo-placement-3");
        assert_eq!(version_of_config_map("demo", "demo-placement-3"), Some(3));
        assert_eq!(version_of_config_map("demo", "demo-x-placement-3"), None);
        assert_eq!(version_of_config_map("demo", "demo-placement-0"), None);
        assert_eq!(version_of_config_map("demo", "demo-placement-x"), None);
        assert_eq!(version_of_config_map("demo", "demo-config"), None);
    }
}
