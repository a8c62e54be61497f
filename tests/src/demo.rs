//! The repository's demo model on the test control plane: the names the cluster scenarios look
//! for, and the node agent set up to run its worker and router pods.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::bin_dir;
use crate::k8s::kubeconfig_path;
use crate::node_agent::credentials::ClusterAccess;
use crate::node_agent::runtime::AgentConfig;

/// The ModelDeployment's name in the examples.
pub const MODEL: &str = "demo";
/// The examples' hostPath, mapped by the node agent to [`model_dir`].
pub const DEMO_MODEL_PATH: &str = "/srv/models/latentserve-demo";
/// The labels of the worker pods and of the router pods.
pub const WORKERS: &str = "app.kubernetes.io/instance=demo,app.kubernetes.io/component=worker";
pub const ROUTERS: &str = "app.kubernetes.io/instance=demo,app.kubernetes.io/component=router";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lies in the repository")
        .to_path_buf()
}

/// The model the pods serve: the demo model that ships in the repository (8 routed experts in 4
/// groups, so two shards hold two groups each).
pub fn model_dir() -> PathBuf {
    repo_root().join("models/demo")
}

/// A node agent for `namespace` that runs the workspace's worker and router binaries, maps the
/// demo model's hostPath, and gives pods with a ServiceAccount a token for the API server (the
/// router reads its EndpointSlices and routing ConfigMap with exactly its Role).
pub fn agent_config(namespace: &str, scratch: &Path) -> anyhow::Result<AgentConfig> {
    let mut config = AgentConfig::new(
        BTreeMap::from([
            (
                "latentserve-worker".to_owned(),
                bin_dir()?.join("latentserve-worker"),
            ),
            (
                "latentserve-router".to_owned(),
                bin_dir()?.join("latentserve-router"),
            ),
        ]),
        scratch.join("agent"),
    );
    config.namespaces = BTreeSet::from([namespace.to_owned()]);
    let admin_kubeconfig = kubeconfig_path();
    config.cluster = Some(ClusterAccess::from_kubeconfig(
        &std::fs::read_to_string(&admin_kubeconfig)
            .with_context(|| format!("reading {}", admin_kubeconfig.display()))?,
        admin_kubeconfig
            .parent()
            .context("the kubeconfig's folder")?,
    )?);
    config.host_paths = BTreeMap::from([(DEMO_MODEL_PATH.to_owned(), model_dir())]);
    config
        .base_env
        .push(("RUST_LOG".to_owned(), "info".to_owned()));
    Ok(config)
}
