//! The operator's metrics against docs/metrics.md (its `latentserve_operator_*` rows name exactly
//! the families the operator renders, so a new or renamed metric cannot leave the docs behind),
//! and through `promtool check metrics` where promtool is installed (as in
//! worker/tests/metrics_lint.rs: without it the test prints SKIPPED, unless CI=true or
//! LATENTSERVE_REQUIRE_PROMTOOL=1).

use std::collections::BTreeSet;
use std::io::{ErrorKind, Write};
use std::process::{Command, Stdio};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use latentserve_operator::crd::{AutoscalingMetric, ModelDeploymentStatus};
use latentserve_operator::metrics::{AutoscalerPass, Metrics};

/// Every family with a series. A family added to `Metrics` but not here renders nothing; the docs
/// test then names it.
fn populated() -> Metrics {
    let metrics = Metrics::new();
    metrics.reconciles.with_label_values(&["ok"]).inc();
    metrics.reconcile_errors.with_label_values(&["apply"]).inc();
    metrics
        .reconcile_duration
        .with_label_values(&["ok"])
        .observe(0.01);
    metrics.leader.set(1);
    let status = ModelDeploymentStatus {
        conditions: vec![Condition {
            type_: "Available".into(),
            status: "True".into(),
            reason: "GroupsReady".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        }],
        ..ModelDeploymentStatus::default()
    };
    metrics.set_conditions("models/demo", Some(&status));
    metrics.record_autoscaler(
        "models",
        "demo",
        &AutoscalerPass {
            current: 1,
            desired: 2,
            metric: AutoscalingMetric::QueuedPromptTokens,
            value: Some(5000.0),
            direction: Some("up"),
        },
    );
    metrics.autoscaler_signal_error("models", "demo");
    metrics.record_placement(
        "models",
        "demo",
        Some(&latentserve_operator::crd::ExpertPlacementStatus {
            version: 2,
            measured_imbalance: Some(1.4),
            degraded_groups: vec![1],
            ..Default::default()
        }),
    );
    metrics.placement_rebalanced("models", "demo");
    metrics
}

fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn docs_name_exactly_the_families_the_operator_renders() {
    let rendered = families(&populated().render());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    let docs = std::fs::read_to_string(&path).unwrap();
    let described: BTreeSet<String> = docs
        .lines()
        .filter_map(|line| line.strip_prefix("| `latentserve_operator_"))
        .map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            format!("latentserve_operator_{name}")
        })
        .collect();
    assert_eq!(
        described, rendered,
        "docs/metrics.md operator table vs /metrics"
    );
    for word in docs.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("latentserve_operator_") {
            continue;
        }
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| word.strip_suffix(suffix))
            .filter(|base| rendered.contains(*base))
            .unwrap_or(word);
        assert!(
            rendered.contains(family),
            "docs/metrics.md names {word}, which the operator does not export"
        );
    }
}

#[test]
fn promtool_finds_nothing_to_fix() {
    let text = populated().render();
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) if error.kind() == ErrorKind::NotFound => {
            let required = std::env::var("LATENTSERVE_REQUIRE_PROMTOOL").as_deref() == Ok("1")
                || std::env::var("CI").as_deref() == Ok("true");
            assert!(
                !required,
                "promtool is required here (LATENTSERVE_REQUIRE_PROMTOOL=1 or CI=true) but is not on PATH"
            );
            eprintln!("SKIPPED promtool_finds_nothing_to_fix: promtool is not on PATH");
            return;
        }
        Err(error) => panic!("starting promtool: {error}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics ({}):\n{report}\nfor:\n{text}",
        out.status
    );
}
