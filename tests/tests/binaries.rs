//! Every binary the project ships starts, parses its command line and reports the workspace version.

use latentserve_e2e::workspace_binary;

fn version_of(name: &str) -> String {
    let output = workspace_binary(name)
        .expect("binary is built")
        .arg("--version")
        .output()
        .expect("binary runs");
    assert!(
        output.status.success(),
        "{name} --version failed: {output:?}"
    );
    String::from_utf8(output.stdout).expect("version is UTF-8")
}

#[test]
fn worker_reports_the_workspace_version() {
    assert_eq!(
        version_of("latentserve-worker").trim(),
        format!("latentserve-worker {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn operator_reports_the_workspace_version() {
    assert_eq!(
        version_of("latentserve-operator").trim(),
        format!("latentserve-operator {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn router_reports_the_workspace_version() {
    assert_eq!(
        version_of("latentserve-router").trim(),
        format!("latentserve-router {}", env!("CARGO_PKG_VERSION"))
    );
}
