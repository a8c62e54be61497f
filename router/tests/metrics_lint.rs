//! The router's metrics as Prometheus' linter sees them (every family populated, piped through
//! `promtool check metrics`), and docs/metrics.md's router table naming exactly the families the
//! router renders. Without promtool the first test prints SKIPPED, unless CI=true or
//! LATENTSERVE_REQUIRE_PROMTOOL=1.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Write as _};
use std::process::{Command, Stdio};

use latentserve_router::metrics::RouterMetrics;

fn populated() -> RouterMetrics {
    let metrics = RouterMetrics::new().unwrap();
    metrics
        .requests
        .with_label_values(&["grpc", "10.0.0.1:50051", "prefix", "ok"])
        .inc();
    metrics
        .retries
        .with_label_values(&["openai", "unavailable"])
        .inc();
    metrics
        .prefix_match_tokens
        .with_label_values(&["grpc"])
        .observe(512.0);
    metrics
        .queue_seconds
        .with_label_values(&["grpc"])
        .observe(0.0003);
    metrics
        .upstream_seconds
        .with_label_values(&["grpc"])
        .observe(0.2);
    metrics.endpoints.with_label_values(&["ready"]).set(4);
    metrics
        .in_flight
        .with_label_values(&["10.0.0.1:50051"])
        .set(2);
    metrics.held.set(3);
    metrics.hold_rejected.with_label_values(&["full"]).inc();
    metrics.cold_start_seconds.observe(42.0);
    metrics
        .group_in_flight
        .with_label_values(&["demo-0"])
        .set(5);
    metrics
        .group_queued_prompt_tokens
        .with_label_values(&["demo-0"])
        .set(1200);
    metrics
        .group_cache_utilization
        .with_label_values(&["demo-0"])
        .set(0.42);
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
            assert!(!required, "promtool is required here but is not on PATH");
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
        "promtool check metrics:\n{report}\nfor:\n{text}"
    );
}

#[test]
fn docs_name_exactly_the_families_the_router_renders() {
    let rendered = families(&populated().render());
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"),
    )
    .unwrap();
    let described: BTreeSet<String> = docs
        .lines()
        .filter_map(|line| line.strip_prefix("| `latentserve_router_"))
        .map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            format!("latentserve_router_{name}")
        })
        .collect();
    assert_eq!(
        described, rendered,
        "docs/metrics.md router table vs /metrics"
    );
    for word in docs.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("latentserve_router_") {
            continue;
        }
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| word.strip_suffix(suffix))
            .filter(|base| rendered.contains(*base))
            .unwrap_or(word);
        assert!(
            rendered.contains(family),
            "docs/metrics.md names {word}, which the router does not export"
        );
    }
}
