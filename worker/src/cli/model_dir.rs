//! Where the model of `serve`, `generate` and `bench` comes from: `--model DIR`, or else the demo
//! model that ships with the project (`models/demo/` in the repository).
//!
//! The demo model is found, in this order, next to an installed binary
//! (`<prefix>/bin/latentserve-worker` -> `<prefix>/share/latentserve/models/demo`, the layout of
//! the container image) and in the source tree the binary was built from (so `cargo run` works
//! in a checkout). It is not embedded in the binary: the loader memory-maps files, and a
//! directory is what every other model is too.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// The demo model's directory below an installation prefix.
pub const DEMO_MODEL_SHARE_DIR: &str = "share/latentserve/models/demo";

/// The demo model's directory in the source tree this binary was built from.
fn source_tree_demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo")
}

/// The directories searched for the demo model, in order, for a binary at `exe`.
pub fn demo_model_candidates(exe: Option<&Path>) -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(prefix) = exe.and_then(Path::parent).and_then(Path::parent) {
        candidates.push(prefix.join(DEMO_MODEL_SHARE_DIR));
    }
    candidates.push(source_tree_demo_dir());
    candidates
}

/// The first candidate that holds a model (`config.json`), or an error naming every place looked.
pub fn find_demo_model(candidates: &[PathBuf]) -> anyhow::Result<PathBuf> {
    if let Some(dir) = candidates.iter().find(|d| d.join("config.json").is_file()) {
        // Canonical, so that logs and errors show a path without `..`.
        return Ok(dir.canonicalize().unwrap_or_else(|_| dir.clone()));
    }
    let looked: Vec<String> = candidates
        .iter()
        .map(|d| format!("  {}", d.display()))
        .collect();
    bail!(
        "no --model given and the demo model was not found; looked in:\n{}\n\
         pass --model DIR (a directory with config.json, *.safetensors and tokenizer.json)",
        looked.join("\n")
    )
}

/// `--model` if given, else the demo model.
pub fn resolve_model_dir(arg: Option<&Path>) -> anyhow::Result<PathBuf> {
    match arg {
        Some(dir) => Ok(dir.to_path_buf()),
        None => {
            let exe = std::env::current_exe().ok();
            let dir = find_demo_model(&demo_model_candidates(exe.as_deref()))?;
            tracing::info!(model = %dir.display(), "no --model given: using the demo model");
            Ok(dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_installed_binary_looks_under_its_prefix_first() {
        let candidates =
            demo_model_candidates(Some(Path::new("/usr/local/bin/latentserve-worker")));
        assert_eq!(
            candidates[0],
            Path::new("/usr/local/share/latentserve/models/demo")
        );
        assert_eq!(candidates.last(), Some(&source_tree_demo_dir()));
    }

    #[test]
    fn the_first_directory_with_a_config_wins() {
        let empty = tempfile::tempdir().unwrap();
        let model = tempfile::tempdir().unwrap();
        std::fs::write(model.path().join("config.json"), "{}").unwrap();
        let found =
            find_demo_model(&[empty.path().to_path_buf(), model.path().to_path_buf()]).unwrap();
        assert_eq!(found, model.path().canonicalize().unwrap());
    }

    #[test]
    fn a_missing_demo_model_names_every_place_looked() {
        let empty = tempfile::tempdir().unwrap();
        let missing = empty.path().join("nowhere");
        let err = find_demo_model(&[empty.path().to_path_buf(), missing.clone()]).unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );
        assert!(message.contains("--model DIR"), "{message}");
    }

    #[test]
    fn the_demo_model_ships_in_the_source_tree() {
        assert!(
            source_tree_demo_dir().join("config.json").is_file(),
            "models/demo/config.json is missing"
        );
    }
}
