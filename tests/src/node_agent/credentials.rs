//! The kubelet's part in a pod's API credential, for the node agent: a pod that uses a
//! ServiceAccount (`automountServiceAccountToken` not false) gets a token of that account from
//! the TokenRequest API, bound to the pod (it stops working once the pod is gone), as a kubelet
//! mounts one. A process cannot see the kubelet's mount path here, so the agent writes the token
//! into a kubeconfig for the test API server and passes it in `KUBECONFIG`, which
//! `kube::Config::infer()` reads first. The pod then talks to the API server with exactly the
//! rights RBAC gives its account.
//!
//! Pure: what to ask for and what to write; the runtime makes the request and writes the file.

use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::Pod;

/// The environment variable the credential is passed in.
pub const KUBECONFIG_ENV: &str = "KUBECONFIG";
/// Lifetime of a pod's token: longer than any test; a kubelet would refresh it.
pub const TOKEN_SECONDS: i64 = 3600;

/// Where and how to reach the API server, as the pods should: its URL and the CA that signed
/// its serving certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterAccess {
    pub server: String,
    pub certificate_authority: PathBuf,
}

impl ClusterAccess {
    /// The current context's cluster of a kubeconfig (the test control plane's admin one), whose
    /// relative CA path is taken relative to the kubeconfig's directory.
    pub fn from_kubeconfig(text: &str, dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let config: serde_yaml::Value = serde_yaml::from_str(text).context("not YAML")?;
        let current = config["current-context"].as_str();
        let contexts = config["contexts"].as_sequence().context("no contexts")?;
        let context = contexts
            .iter()
            .find(|c| current.is_none() || c["name"].as_str() == current)
            .context("no current context")?;
        let cluster_name = context["context"]["cluster"].as_str();
        let clusters = config["clusters"].as_sequence().context("no clusters")?;
        let cluster = clusters
            .iter()
            .find(|c| c["name"].as_str() == cluster_name)
            .context("the current context names no listed cluster")?;
        let server = cluster["cluster"]["server"]
            .as_str()
            .context("the cluster has no server")?;
        let ca = cluster["cluster"]["certificate-authority"]
            .as_str()
            .context("the cluster has no certificate-authority file")?;
        Ok(Self {
            server: server.to_owned(),
            certificate_authority: dir.join(ca),
        })
    }

    /// A kubeconfig that authenticates with `token` and defaults to `namespace`.
    pub fn kubeconfig(&self, token: &str, namespace: &str) -> String {
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": {
                "server": self.server,
                "certificate-authority": self.certificate_authority,
            }}],
            "users": [{"name": "pod", "user": {"token": token}}],
            "contexts": [{"name": "pod", "context": {
                "cluster": "cluster", "user": "pod", "namespace": namespace,
            }}],
            "current-context": "pod",
        });
        // JSON is YAML: no quoting rules to get wrong.
        serde_json::to_string_pretty(&config).expect("JSON values print")
    }
}

/// The ServiceAccount whose token the kubelet would give the pod: its `serviceAccountName`
/// (`default` when unset), unless the pod sets `automountServiceAccountToken: false`.
pub fn service_account_of(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if spec.automount_service_account_token == Some(false) {
        return None;
    }
    Some(
        spec.service_account_name
            .clone()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
    )
}

/// The TokenRequest for the pod's account, bound to the pod (by name and uid), with the API
/// server's own audience.
pub fn token_request(pod: &Pod) -> TokenRequest {
    TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(TOKEN_SECONDS),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "demo-router-7d9f-abcde", "namespace": "models", "uid": "u-1"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn pods_get_their_accounts_token_unless_they_opt_out() {
        let router = pod(
            json!({"containers": [], "serviceAccountName": "demo-router",
                               "automountServiceAccountToken": true}),
        );
        assert_eq!(service_account_of(&router).as_deref(), Some("demo-router"));
        let plain = pod(json!({"containers": []}));
        assert_eq!(service_account_of(&plain).as_deref(), Some("default"));
        let worker = pod(json!({"containers": [], "automountServiceAccountToken": false}));
        assert_eq!(service_account_of(&worker), None);
    }

    #[test]
    fn the_token_is_bound_to_the_pod() {
        let request = token_request(&pod(json!({"containers": []})));
        let bound = request.spec.bound_object_ref.unwrap();
        assert_eq!(bound.kind.as_deref(), Some("Pod"));
        assert_eq!(bound.name.as_deref(), Some("demo-router-7d9f-abcde"));
        assert_eq!(bound.uid.as_deref(), Some("u-1"));
        assert!(request.spec.audiences.is_empty(), "the API server's own");
        assert_eq!(request.spec.expiration_seconds, Some(TOKEN_SECONDS));
    }

    #[test]
    fn the_kubeconfig_reaches_the_admins_cluster_with_the_pods_token() {
        let admin = r#"
apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "https://127.0.0.1:16443", certificate-authority: "ca.crt"}}]
users: [{name: admin, user: {token: secret}}]
contexts: [{name: test, context: {cluster: test, user: admin, namespace: default}}]
current-context: test
"#;
        let access = ClusterAccess::from_kubeconfig(admin, Path::new("/tmp/k8s")).unwrap();
        assert_eq!(access.server, "https://127.0.0.1:16443");
        assert_eq!(
            access.certificate_authority,
            PathBuf::from("/tmp/k8s/ca.crt")
        );
        let text = access.kubeconfig("pod-token", "models");
        kube::config::Kubeconfig::from_yaml(&text).expect("kube reads it");
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(config["users"][0]["user"]["token"], "pod-token");
        assert!(
            !text.contains("secret"),
            "nothing of the admin's credential"
        );
        assert_eq!(config["contexts"][0]["context"]["namespace"], "models");
        assert_eq!(
            config["clusters"][0]["cluster"]["certificate-authority"],
            "/tmp/k8s/ca.crt"
        );
        assert_eq!(config["current-context"], "pod");
    }
}
