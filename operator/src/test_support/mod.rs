//! Fixtures shared by the unit tests, and [`fake_api`], an in-process Kubernetes API for the
//! reconciler tests.

pub mod fake_api;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::crd::{HostPathSource, ModelDeployment, ModelDeploymentSpec, ModelSource, ServingSpec};
use crate::discovery::{Features, KubeVersion};
use crate::resources::BuildContext;

/// The example ModelDeployment of the docs: `demo` in `models`, one group of two shards.
pub fn demo() -> ModelDeployment {
    let mut md = ModelDeployment::new(
        "demo",
        ModelDeploymentSpec {
            model: ModelSource::HostPath(HostPathSource {
                path: "/srv/models/demo".into(),
            }),
            replicas: 1,
            expert_shards: 2,
            image: Some("latentserve-worker:0.1.0".into()),
            image_pull_policy: None,
            resources: None,
            serving: Some(ServingSpec {
                max_batch_size: Some(64),
                max_seq_len: Some(8192),
                kv_cache_memory: Some(Quantity("8Gi".into())),
                prefix_caching: Some(true),
                dtype: None,
                extra_args: vec![],
            }),
            node_selector: Default::default(),
            tolerations: vec![],
            affinity: None,
            priority_class_name: None,
            service_account_name: None,
            service: None,
            router: None,
            paused: false,
            tls: None,
            autoscaling: None,
            expert_placement: None,
        },
    );
    md.metadata.namespace = Some("models".into());
    md.metadata.uid = Some("0c7a4f4e-5b1e-4a39-9c1e-8d1d2b7f0a11".into());
    md.metadata.generation = Some(3);
    md
}

fn with_groups(version: KubeVersion, groups: &[&str]) -> Features {
    let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
    Features::from_discovery(version, &groups)
}

/// What the project's test control plane (v1.20.2) serves.
pub fn features_1_20() -> Features {
    with_groups(
        KubeVersion::new(1, 20),
        &["policy/v1beta1", "networking.k8s.io/v1", "events.k8s.io/v1"],
    )
}

/// A current cluster.
pub fn features_latest() -> Features {
    with_groups(
        KubeVersion::new(1, 33),
        &["policy/v1", "networking.k8s.io/v1", "events.k8s.io/v1"],
    )
}

pub fn build_context() -> BuildContext {
    BuildContext {
        worker_image: "latentserve-worker:test".into(),
        router_image: "latentserve-router:test".into(),
        features: features_latest(),
        policy: crate::policy::Policy::default(),
    }
}
