//! The kinds of object the operator owns, and one desired object of any of them, typed. Apply
//! writes every [`Desired`] object; prune lists every [`OwnedKind`] and deletes what carries
//! the ModelDeployment's labels and owner reference but is no longer desired. A new kind of
//! child is a variant in both enums and its builder in `build_all`.

use std::fmt;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::{ApiResource, GroupVersionKind};

use crate::discovery::{Features, PdbApi};

/// A kind of child of a ModelDeployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OwnedKind {
    ConfigMap,
    Service,
    NetworkPolicy,
    StatefulSet,
    PodDisruptionBudget,
    ServiceAccount,
    Role,
    RoleBinding,
    Deployment,
}

impl OwnedKind {
    /// Every kind the operator may create, so every kind prune looks at.
    pub const ALL: [OwnedKind; 9] = [
        OwnedKind::ConfigMap,
        OwnedKind::Service,
        OwnedKind::NetworkPolicy,
        OwnedKind::StatefulSet,
        OwnedKind::PodDisruptionBudget,
        OwnedKind::ServiceAccount,
        OwnedKind::Role,
        OwnedKind::RoleBinding,
        OwnedKind::Deployment,
    ];

    /// The API this cluster serves the kind under; `None` where it serves none (no
    /// NetworkPolicy API, no PodDisruptionBudget API), and then the kind is neither built nor
    /// pruned. Budgets use `policy/v1beta1` (same schema) on clusters before 1.21.
    pub fn api(self, features: &Features) -> Option<ApiResource> {
        match self {
            OwnedKind::ConfigMap => Some(ApiResource::erase::<ConfigMap>(&())),
            OwnedKind::Service => Some(ApiResource::erase::<Service>(&())),
            OwnedKind::StatefulSet => Some(ApiResource::erase::<StatefulSet>(&())),
            OwnedKind::ServiceAccount => Some(ApiResource::erase::<ServiceAccount>(&())),
            OwnedKind::Role => Some(ApiResource::erase::<Role>(&())),
            OwnedKind::RoleBinding => Some(ApiResource::erase::<RoleBinding>(&())),
            OwnedKind::Deployment => Some(ApiResource::erase::<Deployment>(&())),
            OwnedKind::NetworkPolicy => features
                .network_policies
                .then(|| ApiResource::erase::<NetworkPolicy>(&())),
            OwnedKind::PodDisruptionBudget => match features.pdb {
                PdbApi::V1 => Some(ApiResource::erase::<PodDisruptionBudget>(&())),
                PdbApi::V1beta1 => Some(ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"),
                    "poddisruptionbudgets",
                )),
                PdbApi::None => None,
            },
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OwnedKind::ConfigMap => "ConfigMap",
            OwnedKind::Service => "Service",
            OwnedKind::NetworkPolicy => "NetworkPolicy",
            OwnedKind::StatefulSet => "StatefulSet",
            OwnedKind::PodDisruptionBudget => "PodDisruptionBudget",
            OwnedKind::ServiceAccount => "ServiceAccount",
            OwnedKind::Role => "Role",
            OwnedKind::RoleBinding => "RoleBinding",
            OwnedKind::Deployment => "Deployment",
        }
    }
}

impl OwnedKind {
    /// The kind's name in the plural, for messages about lists.
    pub fn plural(self) -> &'static str {
        match self {
            OwnedKind::ConfigMap => "ConfigMaps",
            OwnedKind::Service => "Services",
            OwnedKind::NetworkPolicy => "NetworkPolicies",
            OwnedKind::StatefulSet => "StatefulSets",
            OwnedKind::PodDisruptionBudget => "PodDisruptionBudgets",
            OwnedKind::ServiceAccount => "ServiceAccounts",
            OwnedKind::Role => "Roles",
            OwnedKind::RoleBinding => "RoleBindings",
            OwnedKind::Deployment => "Deployments",
        }
    }
}

impl fmt::Display for OwnedKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One child to apply, whole.
#[derive(Debug, Clone, PartialEq)]
pub enum Desired {
    ConfigMap(ConfigMap),
    Service(Service),
    NetworkPolicy(NetworkPolicy),
    StatefulSet(StatefulSet),
    PodDisruptionBudget(PodDisruptionBudget),
    ServiceAccount(ServiceAccount),
    Role(Role),
    RoleBinding(RoleBinding),
    Deployment(Deployment),
}

impl Desired {
    pub fn kind(&self) -> OwnedKind {
        match self {
            Desired::ConfigMap(_) => OwnedKind::ConfigMap,
            Desired::Service(_) => OwnedKind::Service,
            Desired::NetworkPolicy(_) => OwnedKind::NetworkPolicy,
            Desired::StatefulSet(_) => OwnedKind::StatefulSet,
            Desired::PodDisruptionBudget(_) => OwnedKind::PodDisruptionBudget,
            Desired::ServiceAccount(_) => OwnedKind::ServiceAccount,
            Desired::Role(_) => OwnedKind::Role,
            Desired::RoleBinding(_) => OwnedKind::RoleBinding,
            Desired::Deployment(_) => OwnedKind::Deployment,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Desired::ConfigMap(o) => o.meta(),
            Desired::Service(o) => o.meta(),
            Desired::NetworkPolicy(o) => o.meta(),
            Desired::StatefulSet(o) => o.meta(),
            Desired::PodDisruptionBudget(o) => o.meta(),
            Desired::ServiceAccount(o) => o.meta(),
            Desired::Role(o) => o.meta(),
            Desired::RoleBinding(o) => o.meta(),
            Desired::Deployment(o) => o.meta(),
        }
    }

    pub fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or_default()
    }

    /// The apply body under `api`, the kind's API in this cluster (which names its version).
    pub fn body(&self, api: &ApiResource) -> serde_json::Value {
        let mut body = match self {
            Desired::ConfigMap(o) => serde_json::to_value(o),
            Desired::Service(o) => serde_json::to_value(o),
            Desired::NetworkPolicy(o) => serde_json::to_value(o),
            Desired::StatefulSet(o) => serde_json::to_value(o),
            Desired::PodDisruptionBudget(o) => serde_json::to_value(o),
            Desired::ServiceAccount(o) => serde_json::to_value(o),
            Desired::Role(o) => serde_json::to_value(o),
            Desired::RoleBinding(o) => serde_json::to_value(o),
            Desired::Deployment(o) => serde_json::to_value(o),
        }
        .expect("Kubernetes objects serialize to JSON");
        body["apiVersion"] = serde_json::Value::String(api.api_version.clone());
        body
    }
}
