//! The `latentserve-worker` binary as a user runs it: `generate` against a fixture, `init-random`,
//! and bad input (missing/truncated files, wrong shapes, missing tensors, unsupported dtypes, a
//! prompt longer than the context) giving a clear message and a non-zero exit, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latentserve-worker"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the worker binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a failed run whose stderr names every one of `needles`, without a panic.
fn assert_fails_with(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
}

fn reference_ids(name: &str, key: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(fixture_dir(name).join("reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn join_ids(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn generate_json_matches_reference_greedy_tokens() {
    let name = "v2-lite-f16";
    let dir = fixture_dir(name);
    let prompt = reference_ids(name, "prompt_ids");
    let greedy = reference_ids(name, "greedy_ids");
    let out = worker(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &join_ids(&prompt),
        "--max-new-tokens",
        &greedy.len().to_string(),
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--logits",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let generated: Vec<u64> = v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(generated, greedy);
    assert_eq!(v["prompt_ids"].as_array().unwrap().len(), prompt.len());
    assert_eq!(v["first_logits"].as_array().unwrap().len(), 512);
    assert!(v["text"].is_string());
}

#[test]
fn generate_from_text_uses_the_tokenizer() {
    let dir = fixture_dir("v3-tiny-f32");
    let out = worker(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "The cache holds the latent",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0.8",
        "--seed",
        "5",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_ids"][0], 0, "BOS first");
    assert!(!v["generated_ids"].as_array().unwrap().is_empty());
}

#[test]
fn generate_with_missing_model_dir_fails_clearly() {
    let out = worker(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt-ids",
        "1,2",
    ]);
    assert_fails_with(&out, &["/nonexistent/model/config.json"]);
}

#[test]
fn prompt_longer_than_context_is_rejected() {
    let dir = fixture_dir("v3-tiny-f32");
    let ids = vec![5u64; 300];
    let out = worker(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &join_ids(&ids),
    ]);
    assert_fails_with(
        &out,
        &["prompt of 300 tokens exceeds the model context of 128"],
    );
}

/// A copy of a single-file f32 fixture whose safetensors is rewritten by `edit`.
fn edited_fixture(
    edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let src = fixture_dir("v3-tiny-f32");
    let tmp = tempfile::tempdir().unwrap();
    for file in ["config.json", "generation_config.json", "tokenizer.json"] {
        std::fs::copy(src.join(file), tmp.path().join(file)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            )
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();
    tmp
}

fn generate_in(dir: &Path) -> Output {
    worker(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "0,5,6",
        "--max-new-tokens",
        "2",
    ])
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited_fixture(|t| {
        t.remove("model.layers.1.self_attn.o_proj.weight");
    });
    assert_fails_with(
        &generate_in(dir.path()),
        &["tensor `model.layers.1.self_attn.o_proj.weight` not found"],
    );
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let dir = edited_fixture(|t| {
        let entry = t.get_mut("model.norm.weight").unwrap();
        let n = entry.1[0];
        entry.1 = vec![n / 2, 2];
    });
    assert_fails_with(
        &generate_in(dir.path()),
        &["model.norm.weight", "has shape [32, 2]", "expected [64]"],
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = edited_fixture(|t| {
        let entry = t.get_mut("model.norm.weight").unwrap();
        entry.0 = Dtype::I32;
    });
    assert_fails_with(
        &generate_in(dir.path()),
        &["model.norm.weight", "unsupported dtype I32"],
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = edited_fixture(|_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails_with(
        &generate_in(dir.path()),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn unsupported_config_value_is_named() {
    let dir = edited_fixture(|_| {});
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"noaux_tc\"", "\"fancy_routing\"");
    std::fs::write(&path, text).unwrap();
    assert_fails_with(
        &generate_in(dir.path()),
        &["topk_method = \"fancy_routing\""],
    );
}

#[test]
fn init_random_writes_a_model_that_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    std::fs::copy(fixture_dir("v3-tiny-f32").join("config.json"), &config).unwrap();
    let out_dir = tmp.path().join("model");
    let out = worker(&[
        "init-random",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--seed",
        "3",
        "--dtype",
        "f16",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out_dir.join(file).exists(), "{file}");
    }
    let out = worker(&[
        "generate",
        "--model",
        out_dir.to_str().unwrap(),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 3);
}

#[test]
fn bench_with_random_weights_prints_json() {
    let config = fixture_dir("v2-lite-f16").join("config.json");
    let out = worker(&[
        "bench",
        "--random-weights",
        "--config",
        config.to_str().unwrap(),
        "--dtype",
        "f16",
        "--seed",
        "7",
        "--prefill-tokens",
        "16",
        "--depths",
        "8",
        "--decode-tokens",
        "3",
        "--batch-sizes",
        "1,4",
        "--batch-depth",
        "8",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The fields of a bench on a model directory are all there.
    for key in [
        "model",
        "dtype",
        "load_seconds",
        "prefill",
        "decode",
        "decode_at_depth",
        "kv_bytes_per_token",
        "weight_bytes_per_decode_token",
    ] {
        assert!(!v[key].is_null(), "{key} missing: {v}");
    }
    assert_eq!(v["prefill"]["tokens"], 16);
    let batches: Vec<u64> = v["batch_decode"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            assert!(b["tokens_per_second"].as_f64().unwrap() > 0.0);
            b["batch"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(batches, [1, 4]);
    assert_eq!(v["random_weights"]["seed"], 7);
    assert_eq!(v["random_weights"]["storage_dtype"], "f16");
    assert!(v["random_weights"]["bytes"].as_u64().unwrap() > 0);

    // --random-weights needs --config, and excludes --model.
    assert_fails_with(&worker(&["bench", "--random-weights"]), &["--config"]);
    assert_fails_with(
        &worker(&[
            "bench",
            "--random-weights",
            "--config",
            config.to_str().unwrap(),
            "--model",
            "x",
        ]),
        &["--model"],
    );
}

/// A worker's expert counters as `/metrics` shows them: `counts[layer - 1][expert]`.
fn exposition(counts: &[&[u64]]) -> String {
    let mut text = String::from(
        "# HELP latentserve_expert_tokens_total Tokens run by this shard's experts\n\
         # TYPE latentserve_expert_tokens_total counter\n",
    );
    for (i, layer) in counts.iter().enumerate() {
        for (expert, n) in layer.iter().enumerate() {
            if *n > 0 {
                text.push_str(&format!(
                    "latentserve_expert_tokens_total{{expert=\"{expert}\",layer=\"{}\",model=\"demo\"}} {n}\n",
                    i + 1
                ));
            }
        }
    }
    text
}

#[test]
fn plan_placement_spreads_the_hot_experts_of_a_skewed_group() {
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo");
    // The demo model: 8 experts, MoE layers 1-3. Default layout over 2 shards: 0-3 and 4-7.
    // Experts 0 and 1 are hot, so shard 0 does almost all the work.
    let hot: &[u64] = &[900, 800, 10, 10];
    let rank0 = dir.path().join("rank0.txt");
    let rank1 = dir.path().join("rank1.txt");
    std::fs::write(&rank0, exposition(&[hot, hot, hot])).unwrap();
    let cold: &[u64] = &[0, 0, 0, 0, 10, 10, 10, 10];
    std::fs::write(&rank1, exposition(&[cold, cold, cold])).unwrap();
    let out = dir.path().join("placement.json");
    let result = worker(&[
        "plan-placement",
        "--model",
        model.to_str().unwrap(),
        "--shard-count",
        "2",
        "--redundant-experts",
        "1",
        "--version",
        "1",
        "--output",
        out.to_str().unwrap(),
        rank0.to_str().unwrap(),
        rank1.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(
        stderr(&result).contains("imbalance measured"),
        "{}",
        stderr(&result)
    );
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(file["version"], "1");
    assert_eq!(file["shardCount"], 2);
    for layer in ["1", "2", "3"] {
        let entries = file["layers"][layer].as_array().unwrap();
        assert_eq!(entries.len(), 8, "every expert has an entry");
        // The two hot experts do not share a shard (or one is on both).
        let shards = |e: usize| entries[e].as_array().unwrap().clone();
        assert!(
            shards(0) != shards(1) || shards(0).len() == 2,
            "layer {layer}: {entries:?}"
        );
    }
    // The file is what serve accepts: it is checked against the model at start; here the
    // per-layer entries name only layers 1-3, the demo's MoE layers.
    assert!(file["layers"].get("0").is_none());

    // A file that is not an exposition, and a count of files that is not whole groups.
    let junk = dir.path().join("junk.txt");
    std::fs::write(&junk, "latentserve_expert_tokens_total{layer=\"x\"} 1\n").unwrap();
    let result = worker(&[
        "plan-placement",
        "--model",
        model.to_str().unwrap(),
        "--shard-count",
        "2",
        rank0.to_str().unwrap(),
        junk.to_str().unwrap(),
    ]);
    assert_fails_with(&result, &["junk.txt"]);
    let result = worker(&[
        "plan-placement",
        "--model",
        model.to_str().unwrap(),
        "--shard-count",
        "2",
        rank0.to_str().unwrap(),
    ]);
    assert_fails_with(&result, &["not whole groups of --shard-count 2"]);
}
