//! The CRD checked in under `crds/` is exactly what the code generates.

use std::path::Path;

#[test]
fn crd_file_matches_the_generated_crd() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/modeldeployments.latentserve.io.yaml");
    let checked_in = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        checked_in == latentserve_operator::crd::crd_yaml(true),
        "{} is out of date; regenerate it with\n  cargo run -p latentserve-operator -- crd > crds/modeldeployments.latentserve.io.yaml",
        path.display()
    );
}

#[test]
fn crd_subcommand_prints_the_crd() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_latentserve-operator"))
        .arg("crd")
        .output()
        .expect("latentserve-operator runs");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        latentserve_operator::crd::crd_yaml(true)
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_latentserve-operator"))
        .args(["crd", "--without-cel"])
        .output()
        .expect("latentserve-operator runs");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("kind: CustomResourceDefinition")
            && !text.contains("x-kubernetes-validations")
    );
}
