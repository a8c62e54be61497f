//! The reconciler against an in-process fake API server: what it applies, patches, deletes and
//! reports, in milliseconds. The real-API-server tests are in `tests/tests/operator_cluster.rs`.

use std::future::Future;
use std::pin::Pin;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use latentserve_proto::v1::ModelInfo;
use serde_json::{Value, json};

use super::*;
use crate::autoscaling::fetch::FetchError;
use crate::autoscaling::signal::{GroupReport, RouterReport};
use crate::capacity::ModelInfoError;
use crate::resources::LABEL_GROUP;
use crate::test_support::build_context;
use crate::test_support::demo;
use crate::test_support::fake_api::{FakeApi, Recorded};

const MODEL_DEPLOYMENTS: &str = "/apis/latentserve.io/v1alpha1/namespaces/models/modeldeployments";
const STATEFUL_SETS: &str = "/apis/apps/v1/namespaces/models/statefulsets";
const SERVICES: &str = "/api/v1/namespaces/models/services";
const CONFIG_MAPS: &str = "/api/v1/namespaces/models/configmaps";
const NETWORK_POLICIES: &str = "/apis/networking.k8s.io/v1/namespaces/models/networkpolicies";
const BUDGETS: &str = "/apis/policy/v1/namespaces/models/poddisruptionbudgets";
const SECRETS: &str = "/api/v1/namespaces/models/secrets";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/models/events";
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/models/deployments";
const SERVICE_ACCOUNTS: &str = "/api/v1/namespaces/models/serviceaccounts";
const ROLES: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/models/roles";
const ROLE_BINDINGS: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/models/rolebindings";

/// No worker answers: these tests have no ready pods to ask.
struct NoWorkers;

impl ModelInfoSource for NoWorkers {
    fn model_info<'a>(
        &'a self,
        address: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<ModelInfo, ModelInfoError>> + Send + 'a>> {
        Box::pin(async move {
            Err(ModelInfoError::Call {
                address: address.to_owned(),
                source: tonic::Status::unavailable("no workers in this test"),
            })
        })
    }
}

/// The fake API holding the ModelDeployment, and a context whose client talks to it.
fn setup(md: &ModelDeployment) -> (FakeApi, Arc<Context>) {
    let fake = FakeApi::new();
    fake.insert(MODEL_DEPLOYMENTS, serde_json::to_value(md).unwrap());
    let ctx = Context::new(
        fake.client(),
        build_context(),
        Arc::new(Metrics::new()),
        Arc::new(NoWorkers),
    );
    (fake, Arc::new(ctx))
}

async fn reconcile_once(md: &ModelDeployment, ctx: &Arc<Context>) -> Result<Action, Error> {
    reconcile(Arc::new(DeserializeGuard(Ok(md.clone()))), ctx.clone()).await
}

/// The ModelDeployment as the fake stores it now (with the status the operator wrote).
fn stored(fake: &FakeApi) -> ModelDeployment {
    serde_json::from_value(fake.get(MODEL_DEPLOYMENTS, "demo").unwrap()).unwrap()
}

/// Whether the reconcile posted an Event with this reason.
fn event_posted(requests: &[Recorded], reason: &str) -> bool {
    requests
        .iter()
        .any(|r| r.is("POST", EVENTS) && r.body["reason"] == reason)
}

fn paths<'a>(requests: &'a [Recorded], method: &str) -> Vec<&'a str> {
    requests
        .iter()
        .filter(|r| r.method == method && !r.path.starts_with(EVENTS))
        .map(|r| r.path.as_str())
        .collect()
}

/// The paths of every request that writes, Events aside.
fn writes_of(requests: &[Recorded]) -> Vec<&str> {
    requests
        .iter()
        .filter(|r| r.method != "GET" && !r.path.starts_with(EVENTS))
        .map(|r| r.path.as_str())
        .collect()
}

fn args_of(sts: &Value) -> Vec<String> {
    serde_json::from_value(sts["spec"]["template"]["spec"]["containers"][0]["args"].clone())
        .unwrap()
}

/// A child of `demo` as an older operator (or an earlier spec) may have left it.
fn owned_child(kind: &str, api_version: &str, name: &str, group: Option<i32>) -> Value {
    let md = demo();
    let mut labels = json!({
        "app.kubernetes.io/name": "latentserve-worker",
        "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "latentserve-operator",
    });
    if let Some(group) = group {
        labels[LABEL_GROUP] = json!(group.to_string());
    }
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": "models",
            "labels": labels,
            "ownerReferences": [md.controller_owner_ref(&()).unwrap()],
        },
    })
}

#[tokio::test]
async fn create_applies_every_child_under_the_field_manager() {
    let md = demo();
    let (fake, ctx) = setup(&md);
    let action = reconcile_once(&md, &ctx).await.unwrap();
    assert_eq!(action, Action::requeue(RESYNC));

    let requests = fake.take_requests();
    let applied: Vec<&Recorded> = requests
        .iter()
        .filter(|r| r.method == "PATCH" && !r.path.ends_with("/status"))
        .collect();
    let applied_paths: Vec<&str> = applied.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        applied_paths,
        [
            // The experts token first: the pods mount it.
            format!("{SECRETS}/demo-experts-token"),
            format!("{CONFIG_MAPS}/demo-config"),
            format!("{SERVICES}/demo-peers"),
            format!("{SERVICES}/demo-workers"),
            format!("{CONFIG_MAPS}/demo-routing"),
            format!("{SERVICE_ACCOUNTS}/demo-router"),
            format!("{ROLES}/demo-router"),
            format!("{ROLE_BINDINGS}/demo-router"),
            format!("{NETWORK_POLICIES}/demo-router"),
            format!("{DEPLOYMENTS}/demo-router"),
            format!("{SERVICES}/demo"),
            format!("{NETWORK_POLICIES}/demo"),
            format!("{NETWORK_POLICIES}/demo-0"),
            format!("{STATEFUL_SETS}/demo-0"),
            format!("{BUDGETS}/demo-0"),
        ]
    );
    for request in &applied {
        assert_eq!(
            request.content_type.as_deref(),
            Some("application/apply-patch+yaml"),
            "{}",
            request.path
        );
        assert!(
            request.query.contains("fieldManager=latentserve-operator")
                && request.query.contains("force=true"),
            "{}?{}",
            request.path,
            request.query
        );
    }
    assert!(paths(&requests, "DELETE").is_empty());
    let sts = fake.get(STATEFUL_SETS, "demo-0").unwrap();
    let args = args_of(&sts);
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--kv-cache-memory" && w[1] == "8589934592"),
        "{args:?}"
    );
    assert!(event_posted(&requests, "Created"), "a Created event");
    assert_eq!(
        ctx.metrics.reconciles.with_label_values(&["ok"]).get(),
        1,
        "the reconcile is counted"
    );
}

#[tokio::test]
async fn a_changed_spec_is_patched_into_the_statefulsets() {
    let md = demo();
    let (fake, ctx) = setup(&md);
    reconcile_once(&md, &ctx).await.unwrap();
    fake.take_requests();

    let mut changed = stored(&fake);
    changed.spec.serving.as_mut().unwrap().max_batch_size = Some(32);
    changed.metadata.generation = Some(4);
    reconcile_once(&changed, &ctx).await.unwrap();

    let requests = fake.take_requests();
    let apply = requests
        .iter()
        .find(|r| r.is("PATCH", &format!("{STATEFUL_SETS}/demo-0")))
        .expect("the StatefulSet is applied again");
    let args = args_of(&apply.body);
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--max-batch-size" && w[1] == "32"),
        "{args:?}"
    );
    let sts = fake.get(STATEFUL_SETS, "demo-0").unwrap();
    assert_eq!(args_of(&sts), args);
    assert!(paths(&requests, "DELETE").is_empty());
    assert_eq!(stored(&fake).status.unwrap().observed_generation, Some(4));
}

#[tokio::test]
async fn owned_children_no_longer_desired_are_deleted_and_others_kept() {
    let md = demo();
    let (fake, ctx) = setup(&md);
    // Left over: a NetworkPolicy under a name no longer built, and group 1 after a scale-down
    // to one group, with its budget.
    fake.insert(
        NETWORK_POLICIES,
        owned_child(
            "NetworkPolicy",
            "networking.k8s.io/v1",
            "demo-experts",
            None,
        ),
    );
    fake.insert(
        STATEFUL_SETS,
        owned_child("StatefulSet", "apps/v1", "demo-1", Some(1)),
    );
    fake.insert(
        BUDGETS,
        owned_child("PodDisruptionBudget", "policy/v1", "demo-1", Some(1)),
    );
    // Not ours to delete: another ModelDeployment's child, and one with our labels that a
    // different owner holds.
    let mut foreign = owned_child("NetworkPolicy", "networking.k8s.io/v1", "other", None);
    foreign["metadata"]["labels"]["app.kubernetes.io/instance"] = json!("other");
    fake.insert(NETWORK_POLICIES, foreign);
    let mut adopted = owned_child("ConfigMap", "v1", "demo-notes", None);
    adopted["metadata"]["ownerReferences"][0]["uid"] = json!("another-uid");
    fake.insert(CONFIG_MAPS, adopted);

    reconcile_once(&md, &ctx).await.unwrap();

    let requests = fake.take_requests();
    assert_eq!(
        paths(&requests, "DELETE"),
        [
            format!("{NETWORK_POLICIES}/demo-experts"),
            format!("{STATEFUL_SETS}/demo-1"),
            format!("{BUDGETS}/demo-1"),
        ]
    );
    let delete = requests.iter().find(|r| r.method == "DELETE").unwrap();
    assert_eq!(delete.body["propagationPolicy"], "Background");
    assert!(fake.get(NETWORK_POLICIES, "demo").is_some());
    assert!(fake.get(NETWORK_POLICIES, "other").is_some());
    assert!(fake.get(CONFIG_MAPS, "demo-notes").is_some());
    assert!(fake.get(STATEFUL_SETS, "demo-0").is_some());
    assert!(fake.get(STATEFUL_SETS, "demo-1").is_none());
    assert!(
        !event_posted(&requests, "Scaled"),
        "one group existed and one is wanted: no scale event"
    );
}

#[tokio::test]
async fn the_status_is_applied_with_conditions_and_not_rewritten_when_unchanged() {
    let md = demo();
    let (fake, ctx) = setup(&md);
    reconcile_once(&md, &ctx).await.unwrap();
    let requests = fake.take_requests();
    let status_path = format!("{MODEL_DEPLOYMENTS}/demo/status");
    let write = requests
        .iter()
        .find(|r| r.is("PATCH", &status_path))
        .expect("the status is written");
    assert_eq!(
        write.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert!(write.query.contains("fieldManager=latentserve-operator"));
    let status = stored(&fake).status.unwrap();
    let conditions: Vec<_> = status
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
        .collect();
    assert_eq!(
        conditions,
        [
            ("Available", "False", "NoGroupReady"),
            // The StatefulSet reports no rolled-out pods yet.
            ("Progressing", "True", "RollingOut"),
            ("Degraded", "False", "AsExpected"),
            ("RouterReady", "False", "NoRouterReady"),
        ]
    );
    assert_eq!(status.observed_generation, Some(3));
    assert_eq!(status.endpoint.as_deref(), Some("demo.models.svc:50051"));
    assert_eq!(
        status.router,
        Some(crate::crd::RouterStatus {
            replicas: 1,
            ready_replicas: 0
        })
    );

    // The same observations again: the status is current, so nothing is written.
    reconcile_once(&stored(&fake), &ctx).await.unwrap();
    let requests = fake.take_requests();
    assert!(
        !requests.iter().any(|r| r.is("PATCH", &status_path)),
        "steady state writes no status"
    );
}

#[tokio::test]
async fn paused_and_invalid_specs_write_only_the_status() {
    let mut md = demo();
    md.spec.paused = true;
    let (fake, ctx) = setup(&md);
    reconcile_once(&md, &ctx).await.unwrap();
    let requests = fake.take_requests();
    let writes = writes_of(&requests);
    assert_eq!(writes, [format!("{MODEL_DEPLOYMENTS}/demo/status")]);

    md.spec.paused = false;
    md.spec.serving.as_mut().unwrap().extra_args = vec!["--peers=evil:1".into()];
    reconcile_once(&md, &ctx).await.unwrap();
    let requests = fake.take_requests();
    assert!(paths(&requests, "DELETE").is_empty());
    let writes = writes_of(&requests);
    assert_eq!(writes, [format!("{MODEL_DEPLOYMENTS}/demo/status")]);
    let degraded = stored(&fake)
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.reason, "InvalidSpec");
    assert!(degraded.message.contains("spec.serving.extraArgs[0]"));
}

#[tokio::test]
async fn an_api_error_is_a_typed_error_with_its_metric_label() {
    let md = demo();
    let (fake, ctx) = setup(&md);
    fake.fail("PATCH", "/statefulsets/", 403);
    let guard = Arc::new(DeserializeGuard(Ok(md.clone())));
    let err = reconcile(guard.clone(), ctx.clone()).await.unwrap_err();
    match &err {
        Error::Apply {
            kind: crate::resources::OwnedKind::StatefulSet,
            name,
            source: kube::Error::Api(status),
        } => {
            assert_eq!(name, "demo-0");
            assert_eq!(status.code, 403);
        }
        other => panic!("expected an apply error, got {other:?}"),
    }
    assert_eq!(err.metric_label(), "apply");
    assert_eq!(
        error_policy(guard.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        error_policy(guard, &err, ctx.clone()),
        Action::requeue(Duration::from_secs(2)),
        "backoff doubles"
    );
    assert_eq!(
        ctx.metrics
            .reconcile_errors
            .with_label_values(&["apply"])
            .get(),
        2
    );
    // The failure is in the status and in an Event.
    let degraded = stored(&fake)
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.reason, "ReconcileFailed");
    assert!(degraded.message.contains("applying StatefulSet demo-0"));
    let requests = fake.take_requests();
    assert!(event_posted(&requests, "ReconcileFailed"));

    let (fake, ctx) = setup(&md);
    fake.fail("GET", "/pods", 500);
    let err = reconcile_once(&md, &ctx).await.unwrap_err();
    assert!(matches!(err, Error::List { what: "Pods", .. }), "{err:?}");
    assert_eq!(err.metric_label(), "list");

    let (fake, ctx) = setup(&md);
    fake.fail("DELETE", "/networkpolicies/", 500);
    fake.insert(
        NETWORK_POLICIES,
        owned_child(
            "NetworkPolicy",
            "networking.k8s.io/v1",
            "demo-experts",
            None,
        ),
    );
    let err = reconcile_once(&md, &ctx).await.unwrap_err();
    assert_eq!(err.metric_label(), "delete");
}

#[tokio::test]
async fn a_malformed_object_fails_alone_and_waits_for_a_change() {
    let (_fake, ctx) = setup(&demo());
    let guard = Arc::new(DeserializeGuard(Err(InvalidObject {
        error: "spec.replicas: invalid type: string".into(),
        metadata: ObjectMeta {
            name: Some("broken".into()),
            namespace: Some("models".into()),
            ..ObjectMeta::default()
        },
    })));
    let err = reconcile(guard.clone(), ctx.clone()).await.unwrap_err();
    assert_eq!(err.metric_label(), "malformed");
    assert_eq!(error_policy(guard, &err, ctx), Action::await_change());
}

/// The Degraded condition as the operator stored it.
fn degraded(fake: &FakeApi) -> Condition {
    stored(fake)
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
}

#[tokio::test]
async fn host_paths_and_images_outside_the_allow_lists_create_nothing() {
    for (change, reason, field) in [
        (
            (|md: &mut ModelDeployment| {
                md.spec.model = crate::crd::ModelSource::HostPath(crate::crd::HostPathSource {
                    path: "/var/lib/kubelet".into(),
                })
            }) as fn(&mut ModelDeployment),
            "HostPathNotAllowed",
            "spec.model.hostPath.path",
        ),
        (
            |md: &mut ModelDeployment| md.spec.image = Some("evil.example/shell:1".into()),
            "ImageNotAllowed",
            "spec.image",
        ),
    ] {
        let mut md = demo();
        change(&mut md);
        let (fake, ctx) = setup(&md);
        reconcile_once(&md, &ctx).await.unwrap();
        let requests = fake.take_requests();
        let writes = writes_of(&requests);
        assert_eq!(
            writes,
            [format!("{MODEL_DEPLOYMENTS}/demo/status")],
            "{reason}"
        );
        assert!(
            fake.get(STATEFUL_SETS, "demo-0").is_none(),
            "{reason}: no pods"
        );
        let condition = degraded(&fake);
        assert_eq!(condition.reason, reason);
        assert!(condition.message.contains(field), "{}", condition.message);
        let event = requests
            .iter()
            .find(|r| r.is("POST", EVENTS) && r.body["reason"] == reason)
            .unwrap_or_else(|| panic!("a {reason} event"));
        let note = event.body["note"].as_str().unwrap();
        assert!(note.contains(field), "{note}");
    }
}

#[tokio::test]
async fn objects_of_our_names_that_we_do_not_control_are_left_alone() {
    let md = demo();
    let (fake, ctx) = setup(&md);
    let theirs = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "demo", "namespace": "models", "labels": {"team": "billing"}},
        "spec": {"ports": [{"port": 443}]},
    });
    fake.insert(SERVICES, theirs.clone());
    let err = reconcile_once(&md, &ctx).await.unwrap_err();
    assert_eq!(err.metric_label(), "conflict");
    let requests = fake.take_requests();
    let applies: Vec<_> = paths(&requests, "PATCH")
        .into_iter()
        .filter(|p| !p.ends_with("/status"))
        .collect();
    assert!(applies.is_empty(), "nothing is applied: {applies:?}");
    let service = fake.get(SERVICES, "demo").unwrap();
    assert_eq!(service["spec"], theirs["spec"]);
    assert_eq!(service["metadata"]["labels"], theirs["metadata"]["labels"]);
    assert!(fake.get(STATEFUL_SETS, "demo-0").is_none(), "no pods");
    let condition = degraded(&fake);
    assert_eq!(condition.reason, "ResourceConflict");
    assert!(
        condition.message.contains("Service demo"),
        "{}",
        condition.message
    );
    let event = requests
        .iter()
        .find(|r| r.is("POST", EVENTS) && r.body["reason"] == "ResourceConflict")
        .expect("a ResourceConflict event");
    assert!(
        event.body["note"]
            .as_str()
            .unwrap()
            .contains("Service demo")
    );

    // An owner reference without `controller: true` is not control either.
    let mut shared = owned_child("Service", "v1", "demo", None);
    shared["metadata"]["ownerReferences"][0]["controller"] = json!(false);
    fake.insert(SERVICES, shared);
    assert_eq!(
        reconcile_once(&md, &ctx).await.unwrap_err().metric_label(),
        "conflict"
    );
}

#[tokio::test]
async fn turning_the_router_off_deletes_its_objects_and_points_the_service_at_the_workers() {
    let md = demo();
    let (fake, ctx) = setup(&md);
    reconcile_once(&md, &ctx).await.unwrap();
    let service = fake.get(SERVICES, "demo").unwrap();
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/component"],
        "router"
    );
    let role = fake.get(ROLES, "demo-router").unwrap();
    assert_eq!(role["rules"][0]["resources"], json!(["endpointslices"]));
    fake.take_requests();

    let mut off = stored(&fake);
    off.spec.router = Some(crate::crd::RouterSpec {
        replicas: 0,
        ..crate::crd::RouterSpec::default()
    });
    off.metadata.generation = Some(4);
    reconcile_once(&off, &ctx).await.unwrap();
    let requests = fake.take_requests();
    let mut deleted = paths(&requests, "DELETE");
    deleted.sort_unstable();
    let mut expected = vec![
        format!("{CONFIG_MAPS}/demo-routing"),
        format!("{DEPLOYMENTS}/demo-router"),
        format!("{NETWORK_POLICIES}/demo-router"),
        format!("{ROLES}/demo-router"),
        format!("{ROLE_BINDINGS}/demo-router"),
        format!("{SERVICE_ACCOUNTS}/demo-router"),
        format!("{SERVICES}/demo-workers"),
    ];
    expected.sort_unstable();
    assert_eq!(deleted, expected);
    let service = fake.get(SERVICES, "demo").unwrap();
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/component"],
        "worker"
    );
    let status = stored(&fake).status.unwrap();
    assert_eq!(status.router, None);
    assert!(status.conditions.iter().all(|c| c.type_ != "RouterReady"));
}

#[tokio::test]
async fn a_service_account_of_the_routers_name_that_we_do_not_control_stops_the_apply() {
    let md = demo();
    let (fake, ctx) = setup(&md);
    fake.insert(
        SERVICE_ACCOUNTS,
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "demo-router", "namespace": "models"},
        }),
    );
    let err = reconcile_once(&md, &ctx).await.unwrap_err();
    assert_eq!(err.metric_label(), "conflict");
    assert!(
        err.to_string().contains("ServiceAccount demo-router"),
        "{err}"
    );
    let requests = fake.take_requests();
    let applies: Vec<_> = paths(&requests, "PATCH")
        .into_iter()
        .filter(|p| !p.ends_with("/status"))
        .collect();
    assert!(applies.is_empty(), "nothing is applied: {applies:?}");
    assert!(fake.get(ROLE_BINDINGS, "demo-router").is_none());
}

fn secret_value(secret: &Value, key: &str) -> Option<String> {
    let encoded = secret["data"][key].as_str()?;
    let bytes: k8s_openapi::ByteString =
        serde_json::from_value(json!(encoded)).expect("base64 data");
    String::from_utf8(bytes.0).ok()
}

#[tokio::test]
async fn a_sharded_deployment_gets_a_token_secret_kept_until_rotated() {
    use super::experts_token::{PREVIOUS_KEY, ROTATE_ANNOTATION, TOKEN_KEY};
    let md = demo();
    let (fake, ctx) = setup(&md);
    reconcile_once(&md, &ctx).await.unwrap();
    let secret = fake
        .get(SECRETS, "demo-experts-token")
        .expect("the token Secret");
    let first = secret_value(&secret, TOKEN_KEY).unwrap();
    assert_eq!(first.len(), 64);
    assert_eq!(secret["metadata"]["ownerReferences"][0]["controller"], true);
    assert!(secret_value(&secret, PREVIOUS_KEY).is_none());
    fake.take_requests();

    // Steady state: read, never rewritten.
    reconcile_once(&stored(&fake), &ctx).await.unwrap();
    let requests = fake.take_requests();
    assert!(
        !writes_of(&requests).iter().any(|p| p.starts_with(SECRETS)),
        "{:?}",
        writes_of(&requests)
    );

    // The rotation annotation: a new token, the old one kept as `previous`, once.
    let mut rotate = stored(&fake);
    rotate
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(ROTATE_ANNOTATION.into(), "1".into());
    reconcile_once(&rotate, &ctx).await.unwrap();
    let secret = fake.get(SECRETS, "demo-experts-token").unwrap();
    let second = secret_value(&secret, TOKEN_KEY).unwrap();
    assert_ne!(second, first);
    assert_eq!(secret_value(&secret, PREVIOUS_KEY), Some(first));
    fake.take_requests();
    reconcile_once(&rotate, &ctx).await.unwrap();
    assert_eq!(
        secret_value(&fake.get(SECRETS, "demo-experts-token").unwrap(), TOKEN_KEY),
        Some(second.clone())
    );

    // Deleted: made again at the next reconcile (the watch on Secrets triggers it), with a new
    // token and no previous one.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(ctx.client.clone(), "models");
    secrets
        .delete("demo-experts-token", &Default::default())
        .await
        .unwrap();
    assert!(fake.get(SECRETS, "demo-experts-token").is_none());
    reconcile_once(&rotate, &ctx).await.unwrap();
    let secret = fake.get(SECRETS, "demo-experts-token").expect("made again");
    let third = secret_value(&secret, TOKEN_KEY).unwrap();
    assert_ne!(third, second);
    assert!(secret_value(&secret, PREVIOUS_KEY).is_none());
}

#[tokio::test]
async fn a_single_shard_deployment_has_no_token_and_a_foreign_secret_is_a_conflict() {
    let mut single = demo();
    single.spec.expert_shards = 1;
    let (fake, ctx) = setup(&single);
    reconcile_once(&single, &ctx).await.unwrap();
    assert!(fake.get(SECRETS, "demo-experts-token").is_none());

    let md = demo();
    let (fake, ctx) = setup(&md);
    fake.insert(
        SECRETS,
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "demo-experts-token", "namespace": "models"},
            "data": {"token": "c2VjcmV0"},
        }),
    );
    let err = reconcile_once(&md, &ctx).await.unwrap_err();
    assert_eq!(err.metric_label(), "conflict");
    let secret = fake.get(SECRETS, "demo-experts-token").unwrap();
    assert_eq!(secret["data"]["token"], "c2VjcmV0", "left as it was");
    assert!(fake.get(STATEFUL_SETS, "demo-0").is_none(), "no pods");
}

// --- spec.autoscaling ---------------------------------------------------------------------------

const PODS: &str = "/api/v1/namespaces/models/pods";
/// The one router pod of these tests, and where its report is read.
const ROUTER_ADDRESS: &str = "10.0.0.9:9090";

/// Router reports by address; an address without one does not answer.
#[derive(Default)]
struct FakeRouters {
    reports: std::sync::Mutex<std::collections::HashMap<String, RouterReport>>,
    /// Reports asked for so far.
    calls: std::sync::atomic::AtomicUsize,
}

impl FakeRouters {
    fn answer(&self, report: RouterReport) {
        self.reports
            .lock()
            .unwrap()
            .insert(ROUTER_ADDRESS.to_owned(), report);
    }
}

impl ReportSource for FakeRouters {
    fn report<'a>(
        &'a self,
        address: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<RouterReport, FetchError>> + Send + 'a>> {
        Box::pin(async move {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.reports
                .lock()
                .unwrap()
                .get(address)
                .cloned()
                .ok_or_else(|| FetchError::Http {
                    address: address.to_owned(),
                    message: "connection refused".into(),
                })
        })
    }
}

/// `demo` autoscaled on in-flight requests, 4 per group, between 1 and 4 groups.
fn autoscaled_demo() -> ModelDeployment {
    let mut md = demo();
    md.spec.autoscaling = Some(
        serde_json::from_value(json!({
            "minReplicas": 1,
            "maxReplicas": 4,
            "target": {"metric": "InFlightRequests", "value": 4},
        }))
        .unwrap(),
    );
    md
}

/// The fake API with `md`, `groups` ready serving groups (StatefulSets and ready pods) and one
/// ready router pod, and a context that reads the routers from `routers` on every reconcile.
fn setup_autoscaled(
    md: &ModelDeployment,
    groups: &[i32],
    routers: Arc<FakeRouters>,
) -> (FakeApi, Arc<Context>) {
    setup_autoscaled_every(md, groups, routers, Duration::ZERO)
}

/// As [`setup_autoscaled`], with one pass per `interval`.
fn setup_autoscaled_every(
    md: &ModelDeployment,
    groups: &[i32],
    routers: Arc<FakeRouters>,
    interval: Duration,
) -> (FakeApi, Arc<Context>) {
    let fake = FakeApi::new();
    fake.insert(MODEL_DEPLOYMENTS, serde_json::to_value(md).unwrap());
    for &group in groups {
        let mut sts = owned_child(
            "StatefulSet",
            "apps/v1",
            &format!("demo-{group}"),
            Some(group),
        );
        sts["spec"] = json!({"replicas": 2});
        fake.insert(STATEFUL_SETS, sts);
        for rank in 0..2 {
            let mut pod = owned_child("Pod", "v1", &format!("demo-{group}-{rank}"), Some(group));
            pod["status"] = json!({"conditions": [{"type": "Ready", "status": "True"}]});
            fake.insert(PODS, pod);
        }
    }
    let mut router = owned_child("Pod", "v1", "demo-router-abc", None);
    router["metadata"]["labels"]["app.kubernetes.io/component"] = json!("router");
    router["status"] = json!({
        "podIP": "10.0.0.9",
        "conditions": [{"type": "Ready", "status": "True"}],
    });
    fake.insert(PODS, router);
    let ctx = Context::new(
        fake.client(),
        build_context(),
        Arc::new(Metrics::new()),
        Arc::new(NoWorkers),
    )
    .with_autoscaler(interval, routers);
    (fake, Arc::new(ctx))
}

fn report(held: u64, idle: f64, in_flight: &[(i32, u64)]) -> RouterReport {
    RouterReport {
        held_requests: held,
        idle_seconds: idle,
        groups: in_flight
            .iter()
            .map(|&(group, n)| GroupReport {
                group: format!("demo-{group}"),
                endpoints: 2,
                reporting_endpoints: 2,
                in_flight_requests: n,
                ..GroupReport::default()
            })
            .collect(),
        ..RouterReport::default()
    }
}

fn draining_groups(fake: &FakeApi) -> Value {
    let config = fake
        .get(CONFIG_MAPS, "demo-routing")
        .expect("the routing ConfigMap");
    serde_json::from_str(config["data"]["draining-groups.json"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn scale_up_applies_new_group_statefulsets() {
    let md = autoscaled_demo();
    let routers = Arc::new(FakeRouters::default());
    // 10 requests in flight to the one group, 4 per group wanted: 3 groups.
    routers.answer(report(0, 0.0, &[(0, 10)]));
    let (fake, ctx) = setup_autoscaled(&md, &[0], routers);
    let action = reconcile_once(&md, &ctx).await.unwrap();
    assert_eq!(
        action,
        Action::requeue(Duration::ZERO),
        "the autoscaler's interval"
    );

    let requests = fake.take_requests();
    let applied = paths(&requests, "PATCH");
    for group in ["demo-0", "demo-1", "demo-2"] {
        assert!(
            applied.contains(&format!("{STATEFUL_SETS}/{group}").as_str()),
            "{group}: {applied:?}"
        );
    }
    assert!(fake.get(STATEFUL_SETS, "demo-3").is_none());
    assert!(paths(&requests, "DELETE").is_empty());
    assert!(event_posted(&requests, "ScaledUp"));
    assert!(
        !event_posted(&requests, "Scaled"),
        "the autoscaler's own event only"
    );
    assert_eq!(draining_groups(&fake), json!({}));
    let sts = fake.get(STATEFUL_SETS, "demo-2").unwrap();
    assert_eq!(sts["metadata"]["labels"][LABEL_GROUP], "2");

    let status = stored(&fake).status.unwrap();
    let autoscaling = status.autoscaling.unwrap();
    assert_eq!(
        (autoscaling.current_replicas, autoscaling.desired_replicas),
        (1, 3)
    );
    assert_eq!(autoscaling.value, Some(10.0));
    assert_eq!(autoscaling.target, 4.0);
    let decision = autoscaling.last_decision.unwrap();
    assert_eq!((decision.from, decision.to), (1, 3));
    assert!(
        decision.reason.contains("InFlightRequests"),
        "{}",
        decision.reason
    );
    let active = status
        .conditions
        .iter()
        .find(|c| c.type_ == "AutoscalingActive")
        .unwrap();
    assert_eq!(
        (active.status.as_str(), active.reason.as_str()),
        ("True", "ManualScaleIgnored"),
        "spec.replicas is 1, the autoscaler wants 3"
    );
    assert!(
        active.message.contains("kubectl scale"),
        "{}",
        active.message
    );
    assert_eq!(
        ctx.metrics
            .render()
            .lines()
            .find(|l| l.starts_with("latentserve_operator_autoscaler_desired_groups{"))
            .unwrap(),
        r#"latentserve_operator_autoscaler_desired_groups{name="demo",namespace="models"} 3"#
    );
}

#[tokio::test]
async fn scale_down_writes_the_routing_config_map_and_keeps_the_statefulset() {
    let md = autoscaled_demo();
    let routers = Arc::new(FakeRouters::default());
    routers.answer(report(0, 5.0, &[(0, 0), (1, 0)]));
    let (fake, ctx) = setup_autoscaled(&md, &[0, 1], routers);
    reconcile_once(&md, &ctx).await.unwrap();

    let requests = fake.take_requests();
    let draining = draining_groups(&fake);
    let since = draining["demo-1"].as_str().expect("demo-1 drains");
    assert!(
        since.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
        "{since}"
    );
    assert_eq!(draining.as_object().unwrap().len(), 1);
    assert!(
        paths(&requests, "DELETE").is_empty(),
        "the StatefulSet stays"
    );
    assert!(fake.get(STATEFUL_SETS, "demo-1").is_some());
    assert!(event_posted(&requests, "ScaledDown"));
    assert!(event_posted(&requests, "DrainingGroup"));
    let status = stored(&fake).status.unwrap();
    assert_eq!(status.replicas, 2, "both groups exist");
    let autoscaling = status.autoscaling.unwrap();
    assert_eq!(autoscaling.draining_groups, ["demo-1"]);
    assert_eq!(autoscaling.desired_replicas, 1);
    let active = status
        .conditions
        .iter()
        .find(|c| c.type_ == "AutoscalingActive")
        .unwrap();
    assert_eq!(active.reason, "ReplicasManaged");
}

#[tokio::test]
async fn a_drained_group_loses_its_statefulset_once_idle() {
    let md = autoscaled_demo();
    let routers = Arc::new(FakeRouters::default());
    let (fake, ctx) = setup_autoscaled(&md, &[0, 1], routers.clone());
    // demo-1 began draining 30 s ago, as an earlier pass wrote.
    let since = k8s_openapi::jiff::Timestamp::from_second(
        k8s_openapi::jiff::Timestamp::now().as_second() - 30,
    )
    .unwrap();
    let mut routing = owned_child("ConfigMap", "v1", "demo-routing", None);
    routing["data"] =
        json!({"draining-groups.json": json!({"demo-1": since.to_string()}).to_string()});
    fake.insert(CONFIG_MAPS, routing);

    // A request still runs there: the group stays, and keeps draining.
    routers.answer(report(0, 0.0, &[(0, 4), (1, 1)]));
    reconcile_once(&md, &ctx).await.unwrap();
    let requests = fake.take_requests();
    assert!(paths(&requests, "DELETE").is_empty());
    assert_eq!(draining_groups(&fake), json!({"demo-1": since.to_string()}));
    assert!(
        !event_posted(&requests, "ScaledUp"),
        "a draining group is not capacity"
    );

    // Idle: the StatefulSet (and the group's budget and policy) go, and the drain list empties.
    routers.answer(report(0, 0.0, &[(0, 4), (1, 0)]));
    reconcile_once(&stored(&fake), &ctx).await.unwrap();
    let requests = fake.take_requests();
    let mut deleted = paths(&requests, "DELETE");
    deleted.sort_unstable();
    assert_eq!(
        deleted,
        [
            format!("{STATEFUL_SETS}/demo-1"),
            format!("{NETWORK_POLICIES}/demo-1"),
            format!("{BUDGETS}/demo-1"),
        ]
    );
    assert!(fake.get(STATEFUL_SETS, "demo-0").is_some());
    assert_eq!(draining_groups(&fake), json!({}));
    assert!(
        stored(&fake)
            .status
            .unwrap()
            .autoscaling
            .unwrap()
            .draining_groups
            .is_empty()
    );
}

#[tokio::test]
async fn without_a_readable_router_nothing_changes() {
    let md = autoscaled_demo();
    let (fake, ctx) = setup_autoscaled(&md, &[0, 1], Arc::new(FakeRouters::default()));
    reconcile_once(&md, &ctx).await.unwrap();
    let requests = fake.take_requests();
    assert!(paths(&requests, "DELETE").is_empty());
    assert_eq!(draining_groups(&fake), json!({}));
    let autoscaling = stored(&fake).status.unwrap().autoscaling.unwrap();
    assert_eq!(
        (autoscaling.current_replicas, autoscaling.desired_replicas),
        (2, 2)
    );
    assert_eq!(autoscaling.value, None);
    assert!(autoscaling.last_decision.is_none());
    assert!(
        ctx.metrics.render().contains(
            r#"latentserve_operator_autoscaler_signal_errors_total{name="demo",namespace="models"} 1"#
        ),
        "the unreadable router is counted"
    );
}

#[tokio::test]
async fn held_requests_scale_from_zero() {
    let mut md = autoscaled_demo();
    md.spec.autoscaling.as_mut().unwrap().min_replicas = 0;
    let routers = Arc::new(FakeRouters::default());
    routers.answer(report(2, 0.0, &[]));
    let (fake, ctx) = setup_autoscaled(&md, &[], routers);
    reconcile_once(&md, &ctx).await.unwrap();
    assert!(fake.get(STATEFUL_SETS, "demo-0").is_some());
    let autoscaling = stored(&fake).status.unwrap().autoscaling.unwrap();
    assert_eq!(autoscaling.held_requests, 2);
    assert_eq!(autoscaling.desired_replicas, 1);
}

#[tokio::test]
async fn reconciles_within_the_interval_reuse_the_last_pass() {
    let md = autoscaled_demo();
    let routers = Arc::new(FakeRouters::default());
    routers.answer(report(0, 0.0, &[(0, 10)]));
    let interval = Duration::from_secs(3600);
    let (fake, ctx) = setup_autoscaled_every(&md, &[0], routers.clone(), interval);
    let first = reconcile_once(&md, &ctx).await.unwrap();
    assert_eq!(first, Action::requeue(interval));
    assert_eq!(routers.calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    fake.take_requests();

    // A watch event (here: the status the first pass wrote) within the interval: the same groups,
    // no second read of the routers, no second Event, and the requeue keeps the pass's schedule.
    routers.answer(report(0, 0.0, &[(0, 0)]));
    let again = reconcile_once(&stored(&fake), &ctx).await.unwrap();
    assert_eq!(routers.calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    let requests = fake.take_requests();
    assert!(!event_posted(&requests, "ScaledUp") && !event_posted(&requests, "ScaledDown"));
    assert!(paths(&requests, "DELETE").is_empty());
    assert!(fake.get(STATEFUL_SETS, "demo-2").is_some());
    assert_ne!(
        again,
        Action::requeue(interval),
        "the pass's schedule, not a new one"
    );

    // A new generation is looked at at once.
    let mut changed = stored(&fake);
    changed.metadata.generation = Some(4);
    reconcile_once(&changed, &ctx).await.unwrap();
    assert_eq!(routers.calls.load(std::sync::atomic::Ordering::Relaxed), 2);
}

/// Expert counters that grow by the same step on every read: rank 0 of every group runs
/// experts 0 and 1 (hot), rank 1 experts 2 and 3 (cold), as the default layout of 4 experts
/// over 2 shards puts them.
#[derive(Default)]
struct SkewedLoads {
    reads: std::sync::Mutex<HashMap<String, u32>>,
}

impl crate::placement::fetch::LoadSource for SkewedLoads {
    fn expert_load<'a>(
        &'a self,
        address: &'a str,
    ) -> Pin<
        Box<
            dyn Future<
                    Output = Result<
                        latentserve_placement::load::ExpertLoad,
                        crate::placement::fetch::FetchError,
                    >,
                > + Send
                + 'a,
        >,
    > {
        Box::pin(async move {
            let reads = {
                let mut reads = self.reads.lock().unwrap();
                let n = reads.entry(address.to_owned()).or_default();
                *n += 1;
                f64::from(*n)
            };
            let rank1 = address.starts_with("10.1.");
            let counts = if rank1 {
                vec![0.0, 0.0, reads, reads]
            } else {
                vec![100.0 * reads, 100.0 * reads]
            };
            Ok(latentserve_placement::load::ExpertLoad {
                layers: [(1, counts.clone()), (2, counts)].into(),
            })
        })
    }
}

/// Every worker serves a model of 4 routed experts in 2 groups.
struct FourExperts;

impl ModelInfoSource for FourExperts {
    fn model_info<'a>(
        &'a self,
        _address: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<ModelInfo, ModelInfoError>> + Send + 'a>> {
        Box::pin(async move {
            Ok(ModelInfo {
                num_routed_experts: 4,
                num_expert_groups: 2,
                ..ModelInfo::default()
            })
        })
    }
}

/// Two settled groups of two shards on placement `version`, pods with addresses 10.RANK.GROUP.1.
fn setup_balanced(md: &ModelDeployment, version: i64) -> (FakeApi, Arc<Context>) {
    let fake = FakeApi::new();
    fake.insert(MODEL_DEPLOYMENTS, serde_json::to_value(md).unwrap());
    for group in 0..2 {
        let mut sts = owned_child(
            "StatefulSet",
            "apps/v1",
            &format!("demo-{group}"),
            Some(group),
        );
        sts["metadata"]["annotations"] =
            json!({crate::placement::VERSION_ANNOTATION: version.to_string()});
        sts["spec"] = json!({"replicas": 2});
        sts["status"] = json!({
            "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2,
            "currentRevision": "r1", "updateRevision": "r1", "observedGeneration": 1,
        });
        fake.insert(STATEFUL_SETS, sts);
        for rank in 0..2 {
            let mut pod = owned_child("Pod", "v1", &format!("demo-{group}-{rank}"), Some(group));
            pod["metadata"]["uid"] = json!(format!("uid-{group}-{rank}"));
            pod["metadata"]["annotations"] =
                json!({crate::placement::VERSION_ANNOTATION: version.to_string()});
            pod["status"] = json!({
                "podIP": format!("10.{rank}.{group}.1"),
                "conditions": [{"type": "Ready", "status": "True"}],
            });
            fake.insert(PODS, pod);
        }
    }
    let ctx = Context::new(
        fake.client(),
        build_context(),
        Arc::new(Metrics::new()),
        Arc::new(FourExperts),
    )
    .with_loads(Arc::new(SkewedLoads::default()));
    (fake, Arc::new(ctx))
}

fn balanced_demo() -> ModelDeployment {
    let mut md = demo();
    md.spec.replicas = 2;
    md.spec.expert_placement = Some(
        serde_json::from_value(json!({
            "policy": "Balanced",
            "rebalance": {"interval": "10s", "minImbalance": 1.1},
        }))
        .unwrap(),
    );
    md
}

#[tokio::test]
async fn skewed_expert_load_makes_a_placement_version_and_groups_move_one_at_a_time() {
    let md = balanced_demo();
    let (fake, ctx) = setup_balanced(&md, 0);
    // Pass 1 opens the window: the first counters, nothing decided.
    let action = reconcile_once(&md, &ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    assert!(fake.get(CONFIG_MAPS, "demo-placement-1").is_none());
    let sts = fake.get(STATEFUL_SETS, "demo-0").unwrap();
    assert!(args_of(&sts).iter().all(|a| a != "--expert-placement"));

    // Pass 2, after the window: rank 0 ran 200 pairs per layer, rank 1 2 -> imbalance 1.98.
    placement::age_windows(&ctx, Duration::from_secs(11));
    reconcile_once(&md, &ctx).await.unwrap();
    let requests = fake.take_requests();
    assert!(event_posted(&requests, "Rebalanced"));
    let config_map = fake
        .get(CONFIG_MAPS, "demo-placement-1")
        .expect("a new placement version");
    assert_eq!(config_map["immutable"], true);
    let file = latentserve_placement::file::PlacementFile::parse(
        config_map["data"]["placement.json"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(file.version.as_deref(), Some("1"));
    let shape = latentserve_placement::file::ModelShape {
        n_experts: 4,
        moe_layers: &[1, 2],
        shard_count: 2,
    };
    let placement = file.resolve(shape).unwrap();
    // The two hot experts end up on different shards.
    let layer = &placement.layers[&1];
    assert_ne!(layer.replicas(0), layer.replicas(1));
    let status = stored(&fake).status.unwrap().expert_placement.unwrap();
    assert_eq!(status.version, 1);
    assert_eq!(status.groups_on_version, 0);
    assert!((status.imbalance_before.unwrap() - 200.0 / 101.0).abs() < 1e-3);
    assert!(status.predicted_imbalance.unwrap() < 1.05, "{status:?}");
    assert_eq!(status.window_tokens, 2 * 2 * 202);
    let metrics = ctx.metrics.render();
    for line in [
        r#"latentserve_operator_expert_placement_version{name="demo",namespace="models"} 1"#,
        r#"latentserve_operator_expert_rebalances_total{name="demo",namespace="models"} 1"#,
        r#"latentserve_operator_expert_imbalance{name="demo",namespace="models"} 1.98"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    // Pass 3: both groups settled, so group 0 (only) moves onto version 1.
    reconcile_once(&md, &ctx).await.unwrap();
    let group0 = fake.get(STATEFUL_SETS, "demo-0").unwrap();
    let args = args_of(&group0);
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--expert-placement"
                && w[1] == "/etc/latentserve/placement/placement.json"),
        "{args:?}"
    );
    let volumes = group0["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["configMap"]["name"] == "demo-placement-1")
    );
    let group1 = fake.get(STATEFUL_SETS, "demo-1").unwrap();
    assert!(args_of(&group1).iter().all(|a| a != "--expert-placement"));
    let status = stored(&fake).status.unwrap().expert_placement.unwrap();
    assert_eq!(status.rolling_group, Some(0));

    // Pass 4: the StatefulSet of group 0 names version 1 and its pods run version 0: they are
    // replaced together; group 1 waits for group 0 to be back.
    fake.take_requests();
    reconcile_once(&md, &ctx).await.unwrap();
    let requests = fake.take_requests();
    let deleted = paths(&requests, "DELETE");
    assert!(
        deleted.contains(&format!("{PODS}/demo-0-0").as_str()),
        "{deleted:?}"
    );
    assert!(
        deleted.contains(&format!("{PODS}/demo-0-1").as_str()),
        "{deleted:?}"
    );
    assert!(
        !deleted.iter().any(|p| p.contains("demo-1-")),
        "{deleted:?}"
    );
    assert!(
        !deleted.iter().any(|p| p.contains("placement")),
        "{deleted:?}"
    );
    let group1 = fake.get(STATEFUL_SETS, "demo-1").unwrap();
    assert!(args_of(&group1).iter().all(|a| a != "--expert-placement"));
}

#[tokio::test]
async fn redundant_experts_reach_the_workers_and_a_group_with_a_shard_down_still_serves() {
    let mut md = demo();
    md.spec.expert_placement =
        Some(serde_json::from_value(json!({"redundantExperts": 4})).unwrap());
    let (fake, ctx) = setup_balanced(&md, 0);
    // Group 0 lost a pod.
    let mut pod = fake.get(PODS, "demo-0-1").unwrap();
    pod["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    fake.insert(PODS, pod);
    reconcile_once(&md, &ctx).await.unwrap();
    let sts = fake.get(STATEFUL_SETS, "demo-0").unwrap();
    let args = args_of(&sts);
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--redundant-experts" && w[1] == "4"),
        "{args:?}"
    );
    let status = stored(&fake).status.unwrap();
    assert_eq!(status.ready_replicas, 1, "group 0 serves on the copies");
    let placement = status.expert_placement.unwrap();
    assert_eq!(placement.degraded_groups, vec![0]);
    assert_eq!(placement.version, 0);
    assert!(fake.get(CONFIG_MAPS, "demo-placement-1").is_none());
}

#[tokio::test]
async fn without_expert_placement_groups_on_a_balanced_version_move_back_one_at_a_time() {
    let mut md = demo();
    md.spec.replicas = 2;
    let (fake, ctx) = setup_balanced(&md, 1);
    let mut version = owned_child("ConfigMap", "v1", "demo-placement-1", None);
    version["metadata"]["labels"]["app.kubernetes.io/component"] = json!("placement");
    version["data"] = json!({"placement.json": r#"{"experts": [[0], [1], [0], [1]]}"#});
    fake.insert(CONFIG_MAPS, version);
    reconcile_once(&md, &ctx).await.unwrap();
    let group0 = fake.get(STATEFUL_SETS, "demo-0").unwrap();
    assert!(args_of(&group0).iter().all(|a| a != "--expert-placement"));
    let group1 = fake.get(STATEFUL_SETS, "demo-1").unwrap();
    assert!(
        args_of(&group1).iter().any(|a| a == "--expert-placement"),
        "group 1 waits for group 0"
    );
    assert!(
        fake.get(CONFIG_MAPS, "demo-placement-1").is_some(),
        "kept while group 1 runs it"
    );
    assert!(stored(&fake).status.unwrap().expert_placement.is_none());
}
