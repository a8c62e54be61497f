//! The worker's metrics as Prometheus' own linter sees them: every family populated (the labelled
//! ones too, which render nothing until they have a series), rendered, and piped through
//! `promtool check metrics`, which holds the names to Prometheus' conventions (`_total` on
//! counters and only there, base units, snake case, help text). And docs/metrics.md names
//! exactly the families the worker renders, so a renamed metric cannot leave the docs behind
//! (the router's `latentserve_router_*` rows are router/tests/metrics_lint.rs's).
//!
//! promtool comes with Debian's `prometheus` package (scripts/install-deps installs it). Without
//! it the promtool test prints a SKIPPED line and passes, unless LATENTSERVE_REQUIRE_PROMTOOL=1
//! (scripts/test sets it under CI=true) or CI=true, so a broken setup fails instead of skipping.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use latentserve_worker::metrics::Metrics;

/// Names the worker exported before, which docs/metrics.md mentions only to say what replaced them.
const RETIRED: &[&str] = &["latentserve_kv_cache_blocks_total"];

/// Every family with at least one series, as a worker with traffic and expert parallelism has.
/// A family added to `Metrics` but not here renders nothing; the docs test then names it.
fn populated() -> Metrics {
    let metrics = Metrics::new("demo").unwrap();
    metrics.requests_running.set(3);
    metrics.requests_waiting.set(5);
    metrics.kv_cache_usage_ratio.set(0.42);
    metrics.kv_cache_bytes_per_token.set(31_104);
    metrics.set_cache_config(16, 4096);
    metrics.model_load_seconds.set(12.5);
    metrics.prefix_cache_queries_total.inc_by(128);
    metrics.prefix_cache_hits_total.inc_by(64);
    metrics.preemptions_total.inc();
    metrics.prompt_tokens_total.inc_by(128);
    metrics.generation_tokens_total.inc_by(40);
    for reason in ["length", "stop", "eos", "cancelled"] {
        metrics.record_finish(reason);
    }
    metrics.time_to_first_token_seconds.observe(0.08);
    metrics.inter_token_latency_seconds.observe(0.012);
    metrics.e2e_request_latency_seconds.observe(1.3);
    metrics.request_queue_time_seconds.observe(0.004);
    metrics.request_prefill_time_seconds.observe(0.07);
    metrics.request_decode_time_seconds.observe(1.2);
    metrics.batch_size.observe(8.0);
    metrics.step_duration_seconds.observe(0.011);
    metrics.record_expert_tokens(1, 7, 12);
    metrics.record_expert_dispatch("demo-0-1.demo-peers.models.svc:50052", 65_536);
    metrics.record_expert_rpc("demo-0-1.demo-peers.models.svc:50052", 0.002);
    metrics.record_expert_rpc_error("demo-0-1.demo-peers.models.svc:50052", "Unavailable");
    metrics.set_expert_shard(0, 2);
    metrics.record_expert_retry("demo-0-1.demo-peers.models.svc:50052");
    metrics.set_expert_peers_usable(1);
    metrics.set_expert_group_degraded(false);
    metrics.set_expert_placement_version("3");
    metrics
}

/// The families in a text exposition, from its `# TYPE` lines.
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
            assert!(
                !required,
                "promtool is required here (LATENTSERVE_REQUIRE_PROMTOOL=1 or CI=true) but is not on PATH"
            );
            eprintln!(
                "SKIPPED promtool_finds_nothing_to_fix: promtool is not on PATH \
                 (apt-get install --no-install-recommends prometheus, or scripts/install-deps)"
            );
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

#[test]
fn docs_name_exactly_the_families_the_worker_renders() {
    let rendered = families(&populated().render());
    let docs_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    let docs = std::fs::read_to_string(&docs_path).unwrap();
    // The tables: one row per family, its name first.
    let described: BTreeSet<String> = docs
        .lines()
        .filter_map(|line| line.strip_prefix("| `latentserve_"))
        .filter(|rest| !rest.starts_with("router_") && !rest.starts_with("operator_"))
        .map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            format!("latentserve_{name}")
        })
        .collect();
    assert_eq!(described, rendered, "docs/metrics.md tables vs /metrics");
    // Anywhere else on the page (queries, the endpoint picker's configuration), a name must be
    // one the worker renders, a histogram's series included, or a retired name in its rename
    // note.
    for word in docs.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        // (The bare prefix `latentserve_` is named too, in the introduction.)
        if !word.starts_with("latentserve_")
            || word == "latentserve_"
            || word.starts_with("latentserve_operator_")
            || word.starts_with("latentserve_router_")
            || RETIRED.contains(&word)
        {
            continue;
        }
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| word.strip_suffix(suffix))
            .filter(|base| rendered.contains(*base))
            .unwrap_or(word);
        assert!(
            rendered.contains(family),
            "docs/metrics.md names {word}, which the worker does not export"
        );
    }
}
