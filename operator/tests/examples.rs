//! Every ModelDeployment in examples/ passes the operator's own validation on a current cluster
//! (the schema's server-side dry run is tests/helm/cluster-check.sh's).

use std::path::Path;

use latentserve_operator::crd::ModelDeployment;
use latentserve_operator::discovery::{Features, KubeVersion};
use latentserve_operator::validate::validate;
use serde::Deserialize;

#[test]
fn example_model_deployments_are_valid() {
    let features = Features::from_discovery(
        KubeVersion::new(1, 33),
        &["policy/v1".to_owned(), "networking.k8s.io/v1".to_owned()],
    );
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document).unwrap();
            if value.get("kind").and_then(|k| k.as_str()) != Some("ModelDeployment") {
                continue;
            }
            // Through JSON, as kubectl sends it (serde_yaml's Value reads enums as YAML tags).
            let mut md: ModelDeployment =
                serde_json::from_value(serde_json::to_value(value).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // As the API server would have it.
            md.metadata.namespace = Some("models".into());
            md.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
            validate(&md, &features).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 4, "only {seen} ModelDeployments in examples/");
}
