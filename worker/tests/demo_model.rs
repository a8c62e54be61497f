//! The demo model that ships in `models/demo/` as a user meets it: `latentserve-worker generate`
//! without `--model` answers held-out questions it never saw in training, and does so as often as
//! its model card says.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

/// Questions sent through the binary: every STRIDE-th of the held-out file, so the sample spreads
/// over all templates and operand ranges.
const STRIDE: usize = 5;
/// The accuracy the model card promises at least.
const CARD_MINIMUM: f64 = 0.95;
/// How far a sample of ~200 may fall below the card's full-set figure (about 2 standard errors at
/// 97%) before the test calls it a regression rather than sampling noise.
const SAMPLE_TOLERANCE: f64 = 0.025;

fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo")
}

#[derive(Deserialize)]
struct Example {
    prompt: String,
    answer: String,
}

#[derive(Deserialize)]
struct ModelCardFigures {
    /// Exact-match accuracy of the worker on the whole held-out set (the model card's figure).
    worker_heldout_accuracy: f64,
}

#[derive(Deserialize)]
struct GenerateJson {
    text: String,
    finish_reason: String,
}

fn generate(prompt: &str) -> GenerateJson {
    // No --model: the demo model is the default.
    let out = Command::new(env!("CARGO_BIN_EXE_latentserve-worker"))
        .args([
            "generate",
            "--prompt",
            prompt,
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("the worker binary runs");
    assert!(
        out.status.success(),
        "generate {prompt:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("generate --json prints one JSON object")
}

#[test]
fn generate_without_model_answers_held_out_questions_as_the_card_says() {
    let dir = demo_dir();
    let heldout = std::fs::read_to_string(dir.join("heldout.jsonl")).unwrap();
    let examples: Vec<Example> = heldout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let card: ModelCardFigures =
        serde_json::from_str(&std::fs::read_to_string(dir.join("evaluation.json")).unwrap())
            .unwrap();
    assert!(
        card.worker_heldout_accuracy >= CARD_MINIMUM,
        "the model card's accuracy {} is below {CARD_MINIMUM}",
        card.worker_heldout_accuracy
    );

    let sample: Vec<&Example> = examples.iter().step_by(STRIDE).collect();
    let mut wrong = Vec::new();
    for example in &sample {
        let generation = generate(&example.prompt);
        if generation.text.trim() != example.answer.trim() {
            wrong.push(format!(
                "{:?}: expected {:?}, got {:?} ({})",
                example.prompt, example.answer, generation.text, generation.finish_reason
            ));
        } else {
            // A right answer ends the generation with EOS, not by running out of tokens.
            assert_eq!(generation.finish_reason, "eos", "{:?}", example.prompt);
        }
    }
    let accuracy = 1.0 - wrong.len() as f64 / sample.len() as f64;
    let floor = (card.worker_heldout_accuracy - SAMPLE_TOLERANCE).max(CARD_MINIMUM);
    assert!(
        accuracy >= floor,
        "{} of {} held-out answers right ({accuracy:.3}), below {floor:.3}; wrong:\n{}",
        sample.len() - wrong.len(),
        sample.len(),
        wrong.join("\n")
    );
}
