//! What the cluster supports, found once at start through API discovery, so that the builders
//! can downgrade cleanly on old clusters (PDB `policy/v1beta1`, HTTP readiness instead of gRPC
//! probes) and skip what is missing (NetworkPolicy, image volumes).

use std::fmt;

use kube::Client;

/// A Kubernetes minor version such as 1.20.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubeVersion {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl KubeVersion {
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Parses `/version`'s `major` and `minor`, which some distributions suffix (`"27+"`).
    pub fn parse(major: &str, minor: &str) -> Option<Self> {
        let digits = |s: &str| -> Option<u32> {
            s.trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .ok()
        };
        Some(Self::new(digits(major)?, digits(minor)?))
    }
}

/// Which PodDisruptionBudget API the cluster serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdbApi {
    V1,
    V1beta1,
    None,
}

/// The features the builders and the reconciler adapt to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    pub version: KubeVersion,
    pub pdb: PdbApi,
    pub network_policies: bool,
    /// `grpc` container probes (1.24+).
    pub grpc_probes: bool,
    /// `image` volumes (1.31+).
    pub image_volumes: bool,
    /// CEL rules in CRD schemas are enforced (1.25+).
    pub cel_validation: bool,
    /// `events.k8s.io/v1`.
    pub events_v1: bool,
}

impl Features {
    /// What a cluster of this version serves, given the API group versions it lists.
    pub fn from_discovery(version: KubeVersion, group_versions: &[String]) -> Self {
        let serves = |gv: &str| group_versions.iter().any(|g| g == gv);
        let pdb = if serves("policy/v1") {
            PdbApi::V1
        } else if serves("policy/v1beta1") {
            PdbApi::V1beta1
        } else {
            PdbApi::None
        };
        Self {
            version,
            pdb,
            network_policies: serves("networking.k8s.io/v1"),
            grpc_probes: version >= KubeVersion::new(1, 24),
            image_volumes: version >= KubeVersion::new(1, 31),
            cel_validation: version >= KubeVersion::new(1, 25),
            events_v1: serves("events.k8s.io/v1"),
        }
    }

    /// One line per feature that is skipped or downgraded on this cluster.
    pub fn downgrades(&self) -> Vec<String> {
        let mut notes = Vec::new();
        match self.pdb {
            PdbApi::V1 => {}
            PdbApi::V1beta1 => notes.push(
                "PodDisruptionBudgets use policy/v1beta1 (policy/v1 is not served)".to_owned(),
            ),
            PdbApi::None => {
                notes.push("no PodDisruptionBudgets (policy API not served)".to_owned())
            }
        }
        if !self.network_policies {
            notes.push("no NetworkPolicy (networking.k8s.io/v1 not served)".to_owned());
        }
        if !self.grpc_probes {
            notes.push(format!(
                "readiness uses the worker's HTTP /readyz: gRPC probes need Kubernetes 1.24, the cluster runs {}",
                self.version
            ));
        }
        if !self.image_volumes {
            notes
                .push("spec.model.image is refused: image volumes need Kubernetes 1.31".to_owned());
        }
        if !self.cel_validation {
            notes.push("the CRD's CEL rules are not enforced by this cluster (1.25+); the operator checks them".to_owned());
        }
        if !self.events_v1 {
            notes.push("no Events (events.k8s.io/v1 not served)".to_owned());
        }
        notes
    }

    /// Asks the API server.
    pub async fn discover(client: &Client) -> Result<Self, kube::Error> {
        let info = client.apiserver_version().await?;
        let version =
            KubeVersion::parse(&info.major, &info.minor).unwrap_or(KubeVersion::new(1, 0));
        let groups = client.list_api_groups().await?;
        let group_versions: Vec<String> = groups
            .groups
            .iter()
            .flat_map(|g| g.versions.iter().map(|v| v.group_version.clone()))
            .collect();
        Ok(Self::from_discovery(version, &group_versions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_with_vendor_suffixes() {
        assert_eq!(KubeVersion::parse("1", "20"), Some(KubeVersion::new(1, 20)));
        assert_eq!(
            KubeVersion::parse("1", "27+"),
            Some(KubeVersion::new(1, 27))
        );
        assert_eq!(KubeVersion::parse("", "27"), None);
    }

    #[test]
    fn an_old_cluster_is_downgraded_and_says_so() {
        let features = Features::from_discovery(
            KubeVersion::new(1, 20),
            &[
                "policy/v1beta1".into(),
                "networking.k8s.io/v1".into(),
                "events.k8s.io/v1".into(),
            ],
        );
        assert_eq!(features.pdb, PdbApi::V1beta1);
        assert!(!features.grpc_probes && !features.image_volumes && !features.cel_validation);
        let notes = features.downgrades().join("\n");
        assert!(
            notes.contains("policy/v1beta1") && notes.contains("/readyz"),
            "{notes}"
        );
    }

    #[test]
    fn a_current_cluster_needs_no_downgrade() {
        let features = Features::from_discovery(
            KubeVersion::new(1, 33),
            &[
                "policy/v1".into(),
                "networking.k8s.io/v1".into(),
                "events.k8s.io/v1".into(),
            ],
        );
        assert_eq!(features.pdb, PdbApi::V1);
        assert!(
            features.downgrades().is_empty(),
            "{:?}",
            features.downgrades()
        );
    }
}
