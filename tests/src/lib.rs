//! Shared helpers for the end-to-end tests: finding the workspace's binaries and running them.

pub mod demo;
pub mod k8s;
pub mod node_agent;
pub mod pods;
pub mod scenario;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// The directory that holds the workspace's built binaries (`target/debug` for `cargo test`).
///
/// Test executables live in `<profile>/deps/`, so the binaries are one level up.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the running test executable")?;
    let deps = exe
        .parent()
        .context("test executable has no parent directory")?;
    let profile = deps
        .parent()
        .context("test executable is not under <target>/<profile>/deps")?;
    Ok(profile.to_path_buf())
}

/// A `Command` for one of the workspace's binaries, failing clearly when it has not been built.
pub fn workspace_binary(name: &str) -> anyhow::Result<Command> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} is not built; run `cargo build --workspace --bins` first (scripts/test does)",
            path.display()
        );
    }
    Ok(Command::new(path))
}
