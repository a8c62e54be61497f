//! Chat templates against Hugging Face transformers: every case of
//! `fixtures/chat_templates/cases.json` (made by `generate.py` there with transformers'
//! `apply_chat_template`) is loaded with the real loader (`ChatTemplate::load`, from the same files)
//! and rendered, and the text and the token ids (`Tokenizer::encode(text, false)`, as
//! `apply_chat_template(tokenize=True)` encodes) must be identical; where transformers raised the
//! template's `raise_exception`, the worker must raise the same message.
//!
//! The DeepSeek-V3 tokenizer (7.8 MB, with the V3 template in its `tokenizer_config.json`) is not
//! in the repository: `scripts/install-deps` fetches it and `scripts/test` points
//! LATENTSERVE_DEEPSEEK_V3_TOKENIZER at it. Without it the cases that need it print a SKIPPED line
//! and pass, unless LATENTSERVE_REQUIRE_TEST_DATA=1 or CI=true, where they fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use latentserve_worker::model::{
    ChatMessage, ChatTemplate, ChatTemplateError, ModelConfig, Tokenizer,
};
use serde::Deserialize;

const DEEPSEEK_V3_ENV: &str = "LATENTSERVE_DEEPSEEK_V3_TOKENIZER";
/// The placeholder cases.json writes for that directory.
const DEEPSEEK_V3_DIR: &str = "$LATENTSERVE_DEEPSEEK_V3_TOKENIZER";

#[derive(Deserialize)]
struct Cases {
    templates: BTreeMap<String, TemplateSpec>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct TemplateSpec {
    model_dir: String,
    chat_template_file: Option<String>,
    /// The directory whose tokenizer.json gives the ids; `None`: text only.
    tokenizer: Option<String>,
}

#[derive(Deserialize)]
struct Case {
    template: String,
    conversation: String,
    add_generation_prompt: bool,
    messages: Vec<Message>,
    text: Option<String>,
    ids: Option<Vec<u32>>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the worker crate sits in the repository root")
        .to_path_buf()
}

fn cases() -> Cases {
    let path = repo_root().join("worker/tests/fixtures/chat_templates/cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The DeepSeek-V3 tokenizer directory, or why there is none (a skip, or under
/// LATENTSERVE_REQUIRE_TEST_DATA=1 / CI=true a failure).
fn deepseek_v3_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os(DEEPSEEK_V3_ENV).map(PathBuf::from);
    let why = match &dir {
        Some(dir) if dir.join("tokenizer.json").exists() => return dir.clone().into(),
        Some(dir) => format!("{}/tokenizer.json does not exist", dir.display()),
        None => format!("{DEEPSEEK_V3_ENV} is not set"),
    };
    let required = std::env::var("LATENTSERVE_REQUIRE_TEST_DATA").as_deref() == Ok("1")
        || std::env::var("CI").as_deref() == Ok("true");
    assert!(
        !required,
        "{test}: the DeepSeek-V3 tokenizer is required (LATENTSERVE_REQUIRE_TEST_DATA=1 or CI=true) but {why}; run scripts/install-deps"
    );
    eprintln!(
        "SKIPPED {test}: {why}. Run scripts/install-deps and set {DEEPSEEK_V3_ENV} (scripts/test does both) to run it."
    );
    None
}

/// A path of cases.json: relative to the repository root, or in the DeepSeek-V3 directory.
fn resolve(path: &str, deepseek_v3: Option<&Path>) -> Option<PathBuf> {
    match path.strip_prefix(DEEPSEEK_V3_DIR) {
        Some(rest) => deepseek_v3.map(|dir| dir.join(rest.trim_start_matches('/'))),
        None => Some(repo_root().join(path)),
    }
}

/// A model directory's tokenizer: through `Tokenizer::load` where the directory is a model
/// (config.json), else its tokenizer.json alone.
fn load_tokenizer(dir: &Path) -> Tokenizer {
    let config_path = dir.join("config.json");
    if config_path.exists() {
        let config = ModelConfig::from_file(&config_path).unwrap();
        Tokenizer::load(dir, &config).unwrap()
    } else {
        Tokenizer::from_file(&dir.join("tokenizer.json"), Vec::new(), None).unwrap()
    }
}

/// Checks every case of the named templates; the demo tokenizer stands in where a template's
/// ids are not checked (the loader needs one for special tokens a config may lack).
fn check_templates(test: &str, names: &[&str], deepseek_v3: Option<&Path>) {
    let cases = cases();
    let demo = load_tokenizer(&repo_root().join("models/demo"));
    // The DeepSeek-V3 tokenizer takes a while to load in a debug build: once per directory.
    let mut tokenizers: BTreeMap<PathBuf, Tokenizer> = BTreeMap::new();
    for name in names {
        let spec = &cases.templates[*name];
        let model_dir =
            resolve(&spec.model_dir, deepseek_v3).expect("the caller checked the directory");
        let override_file = spec
            .chat_template_file
            .as_deref()
            .map(|file| resolve(file, deepseek_v3).unwrap());
        let ids_dir = spec
            .tokenizer
            .as_deref()
            .and_then(|dir| resolve(dir, deepseek_v3));
        if let Some(dir) = &ids_dir {
            tokenizers
                .entry(dir.clone())
                .or_insert_with(|| load_tokenizer(dir));
        }
        let ids_tokenizer = ids_dir.as_ref().map(|dir| &tokenizers[dir]);
        if spec.tokenizer.is_some() && ids_tokenizer.is_none() {
            // Only the features template gets here: its text is checked, its ids need DeepSeek-V3.
            let _ = deepseek_v3_dir(&format!("{test} ({name} ids)"));
        }
        let template = ChatTemplate::load(
            &model_dir,
            ids_tokenizer.unwrap_or(&demo),
            override_file.as_deref(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .unwrap_or_else(|| panic!("{name}: {} has no chat template", model_dir.display()));
        let mut checked = 0;
        for case in cases.cases.iter().filter(|case| case.template == *name) {
            let label = format!(
                "{name} / {} / add_generation_prompt={}",
                case.conversation, case.add_generation_prompt
            );
            let messages: Vec<ChatMessage> = case
                .messages
                .iter()
                .map(|m| ChatMessage::new(&m.role, &m.content))
                .collect();
            let rendered = template.render(&messages, case.add_generation_prompt);
            match (&case.text, &case.error) {
                (Some(expected), None) => {
                    let text = rendered.unwrap_or_else(|e| panic!("{label}: {e}"));
                    assert_eq!(&text, expected, "{label}: text differs from transformers");
                    if let (Some(tokenizer), Some(expected_ids)) = (ids_tokenizer, &case.ids) {
                        let ids = tokenizer.encode(&text, false).unwrap();
                        assert_eq!(&ids, expected_ids, "{label}: ids differ from transformers");
                    }
                }
                (None, Some(expected)) => match rendered {
                    Err(ChatTemplateError::Raised { message, .. }) => {
                        assert_eq!(&message, expected, "{label}: raise_exception message")
                    }
                    other => panic!(
                        "{label}: transformers raised {expected:?}, the worker gave {other:?}"
                    ),
                },
                _ => panic!("{label}: a case has either text or error"),
            }
            checked += 1;
        }
        assert!(checked >= 16, "{name}: only {checked} cases");
        eprintln!(
            "{test}: {name}: {checked} cases equal to transformers ({})",
            template.source()
        );
    }
}

#[test]
fn every_template_in_cases_json_is_tested() {
    let cases = cases();
    let tested = [
        "demo",
        "deepseek-v2",
        "features",
        "deepseek-v3",
        "deepseek-r1",
        "deepseek-v3.1",
    ];
    let mut names: Vec<&str> = cases.templates.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut expected = tested.to_vec();
    expected.sort_unstable();
    assert_eq!(names, expected);
}

#[test]
fn demo_template_matches_transformers() {
    check_templates("demo_template_matches_transformers", &["demo"], None);
}

#[test]
fn deepseek_v2_template_text_matches_transformers() {
    check_templates(
        "deepseek_v2_template_text_matches_transformers",
        &["deepseek-v2"],
        None,
    );
}

#[test]
fn jinja_features_match_transformers() {
    let test = "jinja_features_match_transformers";
    let deepseek_v3 = std::env::var_os(DEEPSEEK_V3_ENV).map(PathBuf::from);
    let deepseek_v3 = deepseek_v3.filter(|dir| dir.join("tokenizer.json").exists());
    check_templates(test, &["features"], deepseek_v3.as_deref());
}

#[test]
fn deepseek_v3_r1_and_v3_1_templates_match_transformers() {
    let test = "deepseek_v3_r1_and_v3_1_templates_match_transformers";
    let Some(dir) = deepseek_v3_dir(test) else {
        return;
    };
    check_templates(
        test,
        &["deepseek-v3", "deepseek-r1", "deepseek-v3.1"],
        Some(&dir),
    );
}

/// The demo template's promise: one user message with the generation prompt is exactly the
/// plain prompt with BOS, so chat and `generate --prompt` give the model the same tokens.
#[test]
fn demo_chat_is_the_plain_prompt_with_bos() {
    let dir = repo_root().join("models/demo");
    let tokenizer = load_tokenizer(&dir);
    let template = ChatTemplate::load(&dir, &tokenizer, None).unwrap().unwrap();
    assert!(
        template.source().ends_with("chat_template.jinja"),
        "{}",
        template.source()
    );
    for question in [
        "What is 37 plus 48?",
        "Subtract 12 from 40.",
        "How much is 9 minus 3?",
    ] {
        let text = template
            .render(&[ChatMessage::new("user", question)], true)
            .unwrap();
        assert_eq!(
            tokenizer.encode(&text, false).unwrap(),
            tokenizer.encode(question, true).unwrap(),
            "{question}"
        );
    }
    let err = template
        .render(
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "What is 1 plus 1?"),
            ],
            true,
        )
        .unwrap_err();
    assert!(matches!(err, ChatTemplateError::Raised { .. }), "{err:?}");
}
