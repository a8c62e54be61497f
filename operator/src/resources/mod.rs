//! The desired children of a `ModelDeployment`, built as pure functions of its spec and the
//! cluster's features: no client, no clock. The reconciler applies whatever these return.

pub mod configmap;
pub mod networkpolicy;
pub mod owned;
pub mod pdb;
pub mod router;
pub mod service;
pub mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

pub use self::owned::{Desired, OwnedKind};
use crate::crd::ModelDeployment;
use crate::discovery::Features;
use crate::validate::ValidatedSpec;

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "latentserve-operator";

/// Label keys on every child.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The serving group a StatefulSet, PDB or pod belongs to.
pub const LABEL_GROUP: &str = "latentserve.io/group";

pub const APP_NAME: &str = "latentserve-worker";
/// The component label of the router's objects and pods.
pub const COMPONENT_ROUTER: &str = "router";
/// The expert placement ConfigMaps (`NAME-placement-V`).
pub const COMPONENT_PLACEMENT: &str = "placement";
pub const MANAGED_BY: &str = "latentserve-operator";

/// Worker container ports. Clients and probes use `grpc`; OpenAI-compatible clients (and the
/// Gateway API Inference Extension, which parses OpenAI requests) use `http`; the expert exchange
/// between the shards of a group has its own port so the NetworkPolicy can admit it from sibling
/// pods only.
pub const GRPC_PORT: i32 = 50051;
pub const HTTP_PORT: i32 = 8000;
pub const EXPERTS_PORT: i32 = 50052;
pub const METRICS_PORT: i32 = 9090;
/// Client Service port when `spec.service.port` is unset.
pub const DEFAULT_SERVICE_PORT: i32 = 50051;

/// Names of the children of the ModelDeployment `name`.
pub mod names {
    pub fn group(name: &str, group: i32) -> String {
        format!("{name}-{group}")
    }

    pub fn pod(name: &str, group: i32, rank: i32) -> String {
        format!("{name}-{group}-{rank}")
    }

    pub fn peers_service(name: &str) -> String {
        format!("{name}-peers")
    }

    pub fn client_service(name: &str) -> String {
        name.to_owned()
    }

    pub fn config_map(name: &str) -> String {
        format!("{name}-config")
    }

    /// The groups the routers must stop sending to (`draining-groups.json`), which the operator
    /// writes and the routers watch (`--routing-configmap`).
    pub fn routing_config_map(name: &str) -> String {
        format!("{name}-routing")
    }

    pub fn network_policy(name: &str) -> String {
        name.to_owned()
    }

    /// The router's Deployment, ServiceAccount, Role, RoleBinding and NetworkPolicy.
    pub fn router(name: &str) -> String {
        format!("{name}-router")
    }

    /// The headless Service over the worker pods that the router discovers them through.
    pub fn workers_service(name: &str) -> String {
        format!("{name}-workers")
    }

    /// The expert exchange's shared token (groups of more than one shard).
    pub fn experts_token(name: &str) -> String {
        format!("{name}-experts-token")
    }
}

/// The identity of the ModelDeployment that the builders need.
#[derive(Debug, Clone)]
pub struct Owner {
    pub name: String,
    pub namespace: String,
    reference: OwnerReference,
}

impl Owner {
    pub fn of(md: &ModelDeployment) -> Self {
        let reference = md
            .controller_owner_ref(&())
            .expect("a ModelDeployment from the API server has a name and a uid");
        Self {
            name: md.metadata.name.clone().unwrap_or_default(),
            namespace: md.metadata.namespace.clone().unwrap_or_default(),
            reference,
        }
    }

    /// Labels shared by every child of this ModelDeployment.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_NAME.to_owned(), APP_NAME.to_owned()),
            (LABEL_INSTANCE.to_owned(), self.name.clone()),
            (LABEL_COMPONENT.to_owned(), component.to_owned()),
            (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        ])
    }

    /// Labels that select every worker pod of this ModelDeployment.
    pub fn pod_selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_NAME.to_owned(), APP_NAME.to_owned()),
            (LABEL_INSTANCE.to_owned(), self.name.clone()),
            (LABEL_COMPONENT.to_owned(), "worker".to_owned()),
        ])
    }

    /// Labels that select every router pod of this ModelDeployment.
    pub fn router_selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_NAME.to_owned(), APP_NAME.to_owned()),
            (LABEL_INSTANCE.to_owned(), self.name.clone()),
            (LABEL_COMPONENT.to_owned(), COMPONENT_ROUTER.to_owned()),
        ])
    }

    /// `status.selector`: the pod selector as a label-selector string.
    pub fn selector_string(&self) -> String {
        selector_string(&self.pod_selector())
    }

    /// Metadata of a child: name, namespace, labels and the controller owner reference.
    pub fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }

    /// `host:port` of the expert exchange of rank `rank` in group `group`, through the peers
    /// Service.
    pub fn peer_address(&self, group: i32, rank: i32) -> String {
        format!(
            "{}.{}.{}.svc:{EXPERTS_PORT}",
            names::pod(&self.name, group, rank),
            names::peers_service(&self.name),
            self.namespace
        )
    }

    /// Label selector of every child of this ModelDeployment, whatever its component.
    pub fn children_selector(&self) -> String {
        format!(
            "{LABEL_INSTANCE}={},{LABEL_MANAGED_BY}={MANAGED_BY}",
            self.name
        )
    }

    /// Whether `meta` names this ModelDeployment among its owners.
    /// Whether this ModelDeployment is the object's controller (the owner reference the
    /// operator writes), not merely one of its owners.
    pub fn controls(&self, meta: &ObjectMeta) -> bool {
        meta.owner_references
            .iter()
            .flatten()
            .any(|r| r.uid == self.reference.uid && r.controller == Some(true))
    }

    pub fn owns(&self, meta: &ObjectMeta) -> bool {
        meta.owner_references
            .iter()
            .flatten()
            .any(|r| r.uid == self.reference.uid)
    }

    /// `host:port` of the client Service.
    pub fn endpoint(&self, port: i32) -> String {
        format!(
            "{}.{}.svc:{port}",
            names::client_service(&self.name),
            self.namespace
        )
    }
}

pub fn selector_string(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// What the builders need besides the ModelDeployment.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// Worker image when the spec names none.
    pub worker_image: String,
    /// Image of the router pods.
    pub router_image: String,
    pub features: Features,
    /// The installer's allow-lists and network rules.
    pub policy: crate::policy::Policy,
}

/// Whether the workers serve the OpenAI-compatible HTTP API (their `--openai-addr`), so whether
/// the client Service and the router have an `http` port.
pub fn serves_openai(spec: &ValidatedSpec<'_>) -> bool {
    !statefulset::serve_args(spec, 0).openai_addr.is_empty()
}

/// Every child of a valid ModelDeployment, in apply order (Services and ConfigMap before the
/// StatefulSets whose pods use them; the router's account and rights before its pods; its
/// NetworkPolicy before the client Service sends clients to it), leaving out kinds this
/// cluster does not serve.
pub fn build_all(spec: &ValidatedSpec<'_>, ctx: &BuildContext) -> Vec<Desired> {
    let owner = spec.owner();
    let mut desired = vec![
        Desired::ConfigMap(configmap::config_map(spec)),
        Desired::Service(service::peers_service(owner)),
    ];
    if spec.router_enabled() {
        desired.extend([
            Desired::Service(service::workers_service(spec)),
            // Before the router pods that watch it.
            Desired::ConfigMap(configmap::routing_config_map(spec)),
            Desired::ServiceAccount(router::service_account(owner)),
            Desired::Role(router::role(owner)),
            Desired::RoleBinding(router::role_binding(owner)),
            Desired::NetworkPolicy(networkpolicy::router_network_policy(spec, &ctx.policy)),
            Desired::Deployment(router::deployment(spec, ctx)),
        ]);
        desired.extend(
            pdb::router_disruption_budget(owner, spec.router().replicas)
                .map(Desired::PodDisruptionBudget),
        );
    }
    desired.extend([
        Desired::Service(service::client_service(spec)),
        Desired::NetworkPolicy(networkpolicy::network_policy(spec, &ctx.policy)),
    ]);
    // Before the StatefulSets whose pods mount them.
    for (version, file) in &spec.placement_plan().files {
        desired.push(Desired::ConfigMap(configmap::placement_config_map(
            owner, *version, file,
        )));
    }
    for group in spec.plan().groups() {
        // Before the pods: `NAME` alone closes the expert port.
        desired.push(Desired::NetworkPolicy(
            networkpolicy::experts_network_policy(owner, group),
        ));
        desired.push(Desired::StatefulSet(statefulset::stateful_set(
            spec, group, ctx,
        )));
        desired.push(Desired::PodDisruptionBudget(pdb::disruption_budget(
            owner, group,
        )));
    }
    desired.retain(|d| d.kind().api(&ctx.features).is_some());
    desired
}

/// A named TCP port of a container.
pub(crate) fn container_port(name: &str, number: i32) -> k8s_openapi::api::core::v1::ContainerPort {
    k8s_openapi::api::core::v1::ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }
}

/// An environment variable from the downward API (`metadata.name`, `metadata.namespace`, ...).
pub(crate) fn field_env(name: &str, path: &str) -> k8s_openapi::api::core::v1::EnvVar {
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector};
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{build_context, demo, features_1_20};
    use crate::validate::validate;

    fn build(md: &ModelDeployment, ctx: &BuildContext) -> Vec<Desired> {
        build_all(&validate(md, &ctx.features).unwrap(), ctx)
    }

    #[test]
    fn child_names_derive_from_the_deployment_name() {
        assert_eq!(names::group("demo", 0), "demo-0");
        assert_eq!(names::pod("demo", 0, 1), "demo-0-1");
        assert_eq!(names::peers_service("demo"), "demo-peers");
        assert_eq!(names::client_service("demo"), "demo");
        assert_eq!(names::config_map("demo"), "demo-config");
        assert_eq!(names::routing_config_map("demo"), "demo-routing");
        assert_eq!(names::router("demo"), "demo-router");
        assert_eq!(names::workers_service("demo"), "demo-workers");
    }

    #[test]
    fn every_child_is_owned_and_labelled() {
        let mut md = demo();
        md.spec.replicas = 2;
        let ctx = build_context();
        let desired = build(&md, &ctx);
        let kinds: Vec<_> = desired
            .iter()
            .map(|d| (d.kind().as_str(), d.name()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("ConfigMap", "demo-config"),
                ("Service", "demo-peers"),
                ("Service", "demo-workers"),
                ("ConfigMap", "demo-routing"),
                ("ServiceAccount", "demo-router"),
                ("Role", "demo-router"),
                ("RoleBinding", "demo-router"),
                ("NetworkPolicy", "demo-router"),
                ("Deployment", "demo-router"),
                ("Service", "demo"),
                ("NetworkPolicy", "demo"),
                ("NetworkPolicy", "demo-0"),
                ("StatefulSet", "demo-0"),
                ("PodDisruptionBudget", "demo-0"),
                ("NetworkPolicy", "demo-1"),
                ("StatefulSet", "demo-1"),
                ("PodDisruptionBudget", "demo-1"),
            ]
        );
        let owner = Owner::of(&md);
        for object in &desired {
            let body = object.body(&object.kind().api(&ctx.features).unwrap());
            let meta = &body["metadata"];
            assert_eq!(meta["namespace"], "models");
            assert_eq!(meta["ownerReferences"][0]["kind"], "ModelDeployment");
            assert_eq!(meta["ownerReferences"][0]["controller"], true);
            assert_eq!(meta["labels"][LABEL_INSTANCE], "demo");
            assert_eq!(meta["labels"][LABEL_MANAGED_BY], MANAGED_BY);
            assert_eq!(meta["labels"][LABEL_NAME], APP_NAME);
            assert!(meta["labels"][LABEL_COMPONENT].is_string());
            assert_eq!(body["kind"], object.kind().as_str());
            assert!(owner.owns(object.meta()));
        }
    }

    #[test]
    fn old_clusters_get_v1beta1_budgets() {
        let mut ctx = build_context();
        ctx.features = features_1_20();
        let desired = build(&demo(), &ctx);
        let pdb = desired
            .iter()
            .find(|d| d.kind() == OwnedKind::PodDisruptionBudget)
            .unwrap();
        let api = pdb.kind().api(&ctx.features).unwrap();
        assert_eq!(pdb.body(&api)["apiVersion"], "policy/v1beta1");
        assert_eq!(api.version, "v1beta1");
        assert_eq!(api.plural, "poddisruptionbudgets");
    }

    #[test]
    fn kinds_the_cluster_does_not_serve_are_left_out() {
        let mut ctx = build_context();
        ctx.features.network_policies = false;
        ctx.features.pdb = crate::discovery::PdbApi::None;
        let kinds: Vec<_> = build(&demo(), &ctx).iter().map(Desired::kind).collect();
        assert_eq!(
            kinds,
            [
                OwnedKind::ConfigMap,
                OwnedKind::Service,
                OwnedKind::Service,
                OwnedKind::ConfigMap,
                OwnedKind::ServiceAccount,
                OwnedKind::Role,
                OwnedKind::RoleBinding,
                OwnedKind::Deployment,
                OwnedKind::Service,
                OwnedKind::StatefulSet
            ]
        );
    }

    #[test]
    fn a_router_turned_off_builds_none_of_its_objects() {
        let mut md = demo();
        md.spec.router = Some(crate::crd::RouterSpec {
            replicas: 0,
            ..crate::crd::RouterSpec::default()
        });
        let desired = build(&md, &build_context());
        let names: Vec<_> = desired.iter().map(|d| (d.kind(), d.name())).collect();
        assert!(
            names.iter().all(|(_, name)| !name.ends_with("-router")
                && !name.ends_with("-workers")
                && !name.ends_with("-routing")),
            "{names:?}"
        );
        assert!(names.contains(&(OwnedKind::Service, "demo")));
        assert!(desired.iter().all(|d| !matches!(
            d.kind(),
            OwnedKind::Deployment
                | OwnedKind::ServiceAccount
                | OwnedKind::Role
                | OwnedKind::RoleBinding
        )));
    }

    #[test]
    fn zero_replicas_keep_services_but_no_groups() {
        let mut md = demo();
        md.spec.replicas = 0;
        let desired = build(&md, &build_context());
        assert!(desired.iter().all(|d| d.kind() != OwnedKind::StatefulSet));
        assert!(desired.iter().any(|d| d.name() == "demo-peers"));
    }

    #[test]
    fn autoscaled_groups_are_built_as_chosen_draining_ones_included() {
        let md = demo();
        let ctx = build_context();
        let since = k8s_openapi::jiff::Timestamp::from_second(1_796_171_400).unwrap();
        let spec = crate::validate::validate(&md, &ctx.features)
            .unwrap()
            .with_groups([0, 3], BTreeMap::from([(1, since)]));
        let desired = build_all(&spec, &ctx);
        let stateful_sets: Vec<_> = desired
            .iter()
            .filter(|d| d.kind() == OwnedKind::StatefulSet)
            .map(Desired::name)
            .collect();
        assert_eq!(stateful_sets, ["demo-0", "demo-1", "demo-3"]);
        let Some(Desired::ConfigMap(routing)) = desired.iter().find(|d| d.name() == "demo-routing")
        else {
            panic!("no routing ConfigMap");
        };
        assert_eq!(
            routing.data.as_ref().unwrap()[configmap::DRAINING_GROUPS_KEY],
            r#"{"demo-1":"2026-12-02T00:30:00Z"}"#
        );
    }

    #[test]
    fn peer_addresses_go_through_the_peers_service() {
        let owner = Owner::of(&demo());
        assert_eq!(
            owner.peer_address(1, 0),
            "demo-1-0.demo-peers.models.svc:50052"
        );
    }
}
