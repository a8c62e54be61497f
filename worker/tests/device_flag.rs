//! `--device` on the built binary: `cuda` is refused at once, before any model is touched, with
//! exactly one line on stderr that says why (no `cuda` feature; or, with it, what the probe found
//! missing; or that the CUDA forward pass is not in this build yet).

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn worker(args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_latentserve-worker"))
        .args(args)
        // As a user would run it: default logging, no backtraces appended to the error.
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("the worker binary runs");
    (out, started.elapsed())
}

/// The single stderr line of a refused `--device cuda` start.
fn refusal(args: &[&str]) -> String {
    let (out, took) = worker(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got:\n{stderr}"
    );
    // At once: no model was loaded, no server started.
    assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
    lines[0].to_string()
}

#[cfg(not(feature = "cuda"))]
fn check_reason(line: &str) {
    assert!(line.contains("built without the `cuda` feature"), "{line}");
}

#[cfg(feature = "cuda")]
fn check_reason(line: &str) {
    use latentserve_kernels_cuda::{Library, libs};
    if libs::load(Library::Driver).is_err() {
        // This machine has no driver library: the line names it and the search.
        assert!(
            line.contains("CUDA driver library not found: no libcuda.so.1 could be loaded"),
            "{line}"
        );
        assert!(line.contains("LD_LIBRARY_PATH="), "{line}");
    } else {
        eprintln!("note: a CUDA driver library is installed here; the line was: {line}");
        assert!(
            line.contains("GPU")
                || line.contains("does not exist")
                || line.contains("not found")
                || line.contains("not in this build yet"),
            "{line}"
        );
    }
}

#[test]
fn generate_with_cuda_is_refused_in_one_line() {
    let line = refusal(&["generate", "--device", "cuda", "--prompt-ids", "1,2"]);
    assert!(line.starts_with("Error: --device cuda:0: "), "{line}");
    check_reason(&line);
}

#[test]
fn bench_and_serve_check_the_device_before_the_model() {
    // The model directory does not exist: the device is refused first.
    let line = refusal(&[
        "bench",
        "--model",
        "/nonexistent/model",
        "--device",
        "cuda:1",
    ]);
    assert!(line.starts_with("Error: --device cuda:1: "), "{line}");
    check_reason(&line);
    let line = refusal(&[
        "serve",
        "--model",
        "/nonexistent/model",
        "--device",
        "cuda:0",
        "--grpc-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--openai-addr",
        "",
    ]);
    assert!(line.starts_with("Error: --device cuda:0: "), "{line}");
    check_reason(&line);
}

#[test]
fn a_bad_device_string_names_the_accepted_forms() {
    let (out, _) = worker(&["generate", "--device", "gpu:0", "--prompt-ids", "1"]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid device \"gpu:0\": expected cpu, cuda or cuda:N"),
        "{stderr}"
    );
}

#[test]
fn cpu_stays_the_default_and_is_accepted_explicitly() {
    let (out, _) = worker(&["generate", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--device <DEVICE>"), "{help}");
    assert!(help.contains("[default: cpu]"), "{help}");
    // `--device cpu` gets past the device check to the model (which does not exist here).
    let (out, _) = worker(&["bench", "--model", "/nonexistent/model", "--device", "cpu"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("--device"), "{stderr}");
    assert!(stderr.contains("/nonexistent/model"), "{stderr}");
}
