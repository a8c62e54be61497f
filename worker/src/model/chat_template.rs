//! Chat templates: a model's Jinja `chat_template`, rendered the way Hugging Face transformers'
//! `apply_chat_template(..., tokenize=False)` renders it, so that a conversation becomes exactly
//! the prompt the model was trained on.
//!
//! transformers compiles a template in a sandboxed Jinja2 environment with `trim_blocks`,
//! `lstrip_blocks` and loop controls (`break`, `continue`), its own `tojson` filter (Python's
//! `json.dumps` with `ensure_ascii=False`), and the globals `raise_exception(message)` and
//! `strftime_now(format)`; it passes `messages`, `add_generation_prompt`, `tools` and `documents`
//! (`None` here) and the tokenizer's named special tokens (`bos_token`, `eos_token`, `unk_token`,
//! `sep_token`, `pad_token`, `cls_token`, `mask_token`, those that are set) as strings. This module
//! does the same with minijinja, plus minijinja-contrib's Python methods on strings, maps and lists
//! (`.strip()`, `.split()`, `.startswith()`, `.items()`, `.get()`, ...), and prints values as Python
//! does (`None`, `True`, `1e+20`, `['a', 1]`). The worker's tests compare it with transformers on
//! DeepSeek's templates (`worker/tests/chat_template.rs`).
//!
//! A template comes with the model and is trusted, but a render is still bounded: every render gets
//! a fuel budget ([`DEFAULT_FUEL`]), which limits both the instructions it executes and the bytes
//! it creates; a template that uses it up fails with [`ChatTemplateError::OutOfFuel`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State, Value};

use super::Tokenizer;

/// The template file of a model directory; it takes precedence over `tokenizer_config.json`.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// The tokenizer configuration: its `chat_template` and its special tokens.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// The named special tokens transformers passes to a template (`SPECIAL_TOKENS_ATTRIBUTES`).
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// The fuel each render gets unless [`ChatTemplate::with_fuel`] says otherwise. Fuel is minijinja's
/// unit of work: one per instruction plus about one per 64 bytes created. DeepSeek's templates use
/// 60 to 70 per message (80,000 for 1,000 messages of 500 bytes, a full 128k-token context), so
/// this is some 60 times more than the longest conversation a model can take, while a runaway
/// template stops after about 2 s in a debug build and at most some 300 MB of allocations.
pub const DEFAULT_FUEL: u64 = 5_000_000;

/// One message of a conversation, as the template sees it: `message['role']`,
/// `message['content']`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// The message as the template sees it: a map with Python's order, `role` then `content`.
    fn to_value(&self) -> Value {
        Value::from_pairs([
            ("role", self.role.as_str()),
            ("content", self.content.as_str()),
        ])
    }
}

/// What can go wrong loading or rendering a chat template; each message names the file, field or
/// template at fault.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {message}")]
    Json { path: PathBuf, message: String },
    /// A field of `tokenizer_config.json` has a shape transformers would not accept either.
    #[error("{path}: `{field}` {problem}")]
    Field {
        path: PathBuf,
        field: String,
        problem: String,
    },
    /// The template does not compile; `origin` is where it came from ([`ChatTemplate::source`]).
    #[error("{origin}: not a valid chat template: {message}")]
    Syntax { origin: String, message: String },
    /// The template called `raise_exception(message)`: it refuses this conversation (e.g. roles
    /// that do not alternate). The message is written for the user, so it is the whole display
    /// text; an API answers it as a bad request.
    #[error("{message}")]
    Raised { origin: String, message: String },
    /// The render used up its fuel (see [`DEFAULT_FUEL`]).
    #[error("the chat template {origin} used up its fuel budget of {fuel} for this conversation")]
    OutOfFuel { origin: String, fuel: u64 },
    /// Any other failure while rendering, e.g. an operation on a value of the wrong type.
    #[error("rendering the chat template {origin} failed: {message}")]
    Render { origin: String, message: String },
}

/// A compiled chat template with the special-token strings it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from; also its name in `env` (so minijinja's errors name it).
    origin: String,
    /// The template's text, as compiled.
    text: String,
    special_tokens: Vec<(String, String)>,
    fuel: Option<u64>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.origin)
            .field("special_tokens", &self.special_tokens)
            .field("fuel", &self.fuel)
            .finish()
    }
}

impl ChatTemplate {
    /// The model directory's template: `chat_template.jinja` if present, else `chat_template` of
    /// `tokenizer_config.json` (a string, or a list of `{name, template}` of which `default` is
    /// taken); `override_file` (the `--chat-template FILE` flag) replaces both. `Ok(None)`: the
    /// model has none.
    ///
    /// The special tokens come from `tokenizer_config.json` (a string, or an AddedToken object
    /// `{"content": ...}`); a `null` there means the tokenizer has no such token, as in
    /// transformers. Where the file is missing, or has no `bos_token` / `eos_token` key at all,
    /// those two are the token strings of the tokenizer's BOS id and first EOS id (from
    /// `generation_config.json` or `config.json`), so a model directory without a
    /// `tokenizer_config.json` (like the demo model) still gets them.
    pub fn load(
        dir: &Path,
        tokenizer: &Tokenizer,
        override_file: Option<&Path>,
    ) -> Result<Option<Self>, ChatTemplateError> {
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = read_json_object(&config_path)?;
        let template_file = dir.join(CHAT_TEMPLATE_FILE);
        let (source, origin) = if let Some(file) = override_file {
            (read_text(file)?, file.display().to_string())
        } else if template_file.exists() {
            (
                read_text(&template_file)?,
                template_file.display().to_string(),
            )
        } else {
            let Some(config) = &config else {
                return Ok(None);
            };
            match config_template(config, &config_path)? {
                Some(source) => (source, config_path.display().to_string()),
                None => return Ok(None),
            }
        };
        let special_tokens = special_tokens(config.as_ref(), &config_path, tokenizer)?;
        Self::new(source, origin, special_tokens).map(Some)
    }

    /// Compiles `source`, to be rendered with `special_tokens` (name, string) as variables.
    /// `origin` says where it came from, for errors and [`ChatTemplate::source`].
    pub fn new(
        source: impl Into<String>,
        origin: impl Into<String>,
        special_tokens: Vec<(String, String)>,
    ) -> Result<Self, ChatTemplateError> {
        let origin = origin.into();
        let text: String = source.into();
        let mut env = transformers_environment();
        env.set_fuel(Some(DEFAULT_FUEL));
        env.add_template_owned(origin.clone(), text.clone())
            .map_err(|err| ChatTemplateError::Syntax {
                origin: origin.clone(),
                message: err.to_string(),
            })?;
        Ok(Self {
            env,
            origin,
            text,
            special_tokens,
            fuel: Some(DEFAULT_FUEL),
        })
    }

    /// Replaces the fuel budget of each render ([`DEFAULT_FUEL`]); `None` renders without a bound.
    pub fn with_fuel(mut self, fuel: Option<u64>) -> Self {
        self.env.set_fuel(fuel);
        self.fuel = fuel;
        self
    }

    /// The prompt text for a conversation, as transformers' `apply_chat_template(tokenize=False)`.
    /// Tokenize it without adding special tokens: the template writes BOS itself.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(&self.origin)
            .expect("the template was added under its origin in new()");
        let variables = self
            .special_tokens
            .iter()
            .map(|(name, token)| (name.as_str(), Value::from(token.as_str())))
            .chain([
                (
                    "messages",
                    messages.iter().map(ChatMessage::to_value).collect(),
                ),
                ("add_generation_prompt", Value::from(add_generation_prompt)),
                ("tools", Value::from(())),
                ("documents", Value::from(())),
            ]);
        template
            .render(Value::from_pairs(variables))
            .map_err(|err| self.render_error(err))
    }

    /// Where it came from, for logs and docs: the path of `chat_template.jinja`,
    /// `tokenizer_config.json` or the `--chat-template` file.
    pub fn source(&self) -> &str {
        &self.origin
    }

    /// The template's text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The special tokens the template is rendered with, e.g. `("bos_token", "<s>")`.
    pub fn special_tokens(&self) -> &[(String, String)] {
        &self.special_tokens
    }

    fn render_error(&self, err: Error) -> ChatTemplateError {
        let origin = self.origin.clone();
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(current) = cause {
            if let Some(raised) = current.downcast_ref::<Raised>() {
                return ChatTemplateError::Raised {
                    origin,
                    message: raised.0.clone(),
                };
            }
            cause = current.source();
        }
        if err.kind() == ErrorKind::OutOfFuel {
            return ChatTemplateError::OutOfFuel {
                origin,
                fuel: self.fuel.unwrap_or_default(),
            };
        }
        ChatTemplateError::Render {
            origin,
            message: err.to_string(),
        }
    }
}

/// The message of a template's `raise_exception`, carried as the source of minijinja's error so
/// that [`ChatTemplate::render`] can tell it from other failures.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// minijinja set up as transformers sets up Jinja2 for chat templates
/// (`_compile_jinja_template` in transformers' `chat_template_utils.py`).
fn transformers_environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = env
        .syntax()
        .to_builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters with trim_blocks and lstrip_blocks are valid");
    env.set_syntax(syntax);
    // minijinja would escape by the template name's extension (`.json`: JSON); Jinja2's default
    // environment, and so transformers, never escapes.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", tojson);
    env.add_function(
        "raise_exception",
        |message: Value| -> Result<Value, Error> {
            let message = message.to_string();
            Err(Error::new(ErrorKind::InvalidOperation, message.clone())
                .with_source(Raised(message)))
        },
    );
    env.add_function("strftime_now", strftime_now);
    env
}

fn read_text(path: &Path) -> Result<String, ChatTemplateError> {
    std::fs::read_to_string(path).map_err(|source| ChatTemplateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The JSON object in `path`, or `None` when there is no such file.
fn read_json_object(
    path: &Path,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, ChatTemplateError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = read_text(path)?;
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(ChatTemplateError::Json {
            path: path.to_path_buf(),
            message: "expected an object".into(),
        }),
        Err(err) => Err(ChatTemplateError::Json {
            path: path.to_path_buf(),
            message: err.to_string(),
        }),
    }
}

/// `chat_template` of `tokenizer_config.json`: a string, or a list of `{name, template}` of which
/// transformers uses `default` (`tool_use` and the others are for requests with tools or named
/// templates, which the worker does not take).
fn config_template(
    config: &serde_json::Map<String, serde_json::Value>,
    path: &Path,
) -> Result<Option<String>, ChatTemplateError> {
    let field_error = |problem: String| ChatTemplateError::Field {
        path: path.to_path_buf(),
        field: "chat_template".into(),
        problem,
    };
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(template)) => Ok(Some(template.clone())),
        Some(serde_json::Value::Array(entries)) => {
            let mut names = Vec::new();
            for entry in entries {
                let name = entry.get("name").and_then(serde_json::Value::as_str);
                let template = entry.get("template").and_then(serde_json::Value::as_str);
                let (Some(name), Some(template)) = (name, template) else {
                    return Err(field_error(format!(
                        "must be a string or a list of {{\"name\", \"template\"}} objects, but has the entry {entry}"
                    )));
                };
                if name == "default" {
                    return Ok(Some(template.to_string()));
                }
                names.push(name);
            }
            Err(field_error(format!(
                "has no template named `default` (it has {names:?})"
            )))
        }
        Some(other) => Err(field_error(format!(
            "must be a string or a list of {{\"name\", \"template\"}} objects, not {other}"
        ))),
    }
}

/// The special-token strings (see [`ChatTemplate::load`]).
fn special_tokens(
    config: Option<&serde_json::Map<String, serde_json::Value>>,
    path: &Path,
    tokenizer: &Tokenizer,
) -> Result<Vec<(String, String)>, ChatTemplateError> {
    let mut tokens = Vec::new();
    for name in SPECIAL_TOKENS {
        let token = match config.and_then(|config| config.get(name)) {
            Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(token)) => Some(token.clone()),
            Some(serde_json::Value::Object(added)) => match added.get("content") {
                Some(serde_json::Value::String(content)) => Some(content.clone()),
                _ => {
                    return Err(ChatTemplateError::Field {
                        path: path.to_path_buf(),
                        field: name.into(),
                        problem: "is an object without a string `content`".into(),
                    });
                }
            },
            Some(other) => {
                return Err(ChatTemplateError::Field {
                    path: path.to_path_buf(),
                    field: name.into(),
                    problem: format!("must be a string or an AddedToken object, not {other}"),
                });
            }
            None => match name {
                "bos_token" => tokenizer.bos_id().and_then(|id| tokenizer.id_to_token(id)),
                "eos_token" => tokenizer
                    .eos_ids()
                    .first()
                    .and_then(|&id| tokenizer.id_to_token(id)),
                _ => None,
            },
        };
        if let Some(token) = token {
            tokens.push((name.to_string(), token));
        }
    }
    Ok(tokens)
}

/// `strftime_now(format)`: the local time formatted as Python's `datetime.now().strftime(format)`.
fn strftime_now(format: &str) -> Result<String, Error> {
    jiff::fmt::strtime::format(format, &jiff::Zoned::now()).map_err(|err| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now({format:?}): {err}"),
        )
    })
}

/// Prints `{{ value }}` as Jinja2 does, Python's `str(value)`. minijinja already prints `None`,
/// `True`, lists and maps as Python does; a float it writes positionally (`1e20` as
/// `100000000000000000000.0`), so a float is written here as Python's `repr` (`1e+20`).
fn python_formatter(out: &mut Output, state: &mut State, value: &Value) -> Result<(), Error> {
    if value.kind() == ValueKind::Number && !value.is_integer() {
        out.write_str(&python_number(value)).map_err(Error::from)
    } else {
        minijinja::escape_formatter(out, state, value)
    }
}

/// An integer as its digits, a float as Python's `repr(float)`.
fn python_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    let x = f64::try_from(value.clone()).unwrap_or(f64::NAN);
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        python_float_repr(x)
    }
}

/// Python's `repr` of a finite float: the shortest digits that read back to it, in positional
/// notation for exponents -4..16 (with at least one decimal, `1.0`), else as `1e+20`.
fn python_float_repr(x: f64) -> String {
    // `{:e}` gives the shortest round-trip digits: "-1.25e-7", "1e20", "0e0".
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific
        .split_once('e')
        .expect("{:e} always writes an exponent");
    let exponent: i32 = exponent.parse().expect("{:e} writes an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        if point <= 0 {
            let zeros = "0".repeat((-point) as usize);
            format!("{sign}0.{zeros}{digits}")
        } else {
            let point = point as usize;
            if digits.len() <= point {
                let zeros = "0".repeat(point - digits.len());
                format!("{sign}{digits}{zeros}.0")
            } else {
                format!("{sign}{}.{}", &digits[..point], &digits[point..])
            }
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        format!(
            "{sign}{first}{fraction}e{exponent_sign}{:02}",
            exponent.abs()
        )
    }
}

/// How `tojson` writes JSON: the arguments of Python's `json.dumps`.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// Python's `json.dumps` with those arguments (unlike Jinja2's own `tojson`, no HTML escaping).
fn tojson(value: &Value, positional: Rest<Value>, kwargs: Kwargs) -> Result<String, Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if positional.len() > NAMES.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments: ensure_ascii, indent, separators, sort_keys",
        ));
    }
    let mut args = [
        Value::UNDEFINED,
        Value::UNDEFINED,
        Value::UNDEFINED,
        Value::UNDEFINED,
    ];
    for (slot, arg) in args.iter_mut().zip(positional.iter()) {
        *slot = arg.clone();
    }
    for (slot, name) in args.iter_mut().zip(NAMES) {
        if let Some(arg) = kwargs.get::<Option<Value>>(name)? {
            *slot = arg;
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = args;
    let indent = match indent.kind() {
        ValueKind::Undefined | ValueKind::None => None,
        // Python: `' ' * indent`, so a negative indent is no indent but still new lines.
        ValueKind::Number => {
            Some(" ".repeat(usize::try_from(indent.as_i64().unwrap_or(0)).unwrap_or(0)))
        }
        ValueKind::String => Some(indent.as_str().unwrap_or_default().to_string()),
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: indent must be a number or a string, not {indent}"),
            ));
        }
    };
    let (item_separator, key_separator) = match separators.kind() {
        ValueKind::Undefined | ValueKind::None if indent.is_some() => (",".into(), ": ".into()),
        ValueKind::Undefined | ValueKind::None => (", ".into(), ": ".into()),
        _ => {
            let pair: Vec<Value> = separators.try_iter()?.collect();
            match pair.as_slice() {
                [item, key] if item.as_str().is_some() && key.as_str().is_some() => (
                    item.as_str().unwrap_or_default().to_string(),
                    key.as_str().unwrap_or_default().to_string(),
                ),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings (item, key)",
                    ));
                }
            }
        }
    };
    let style = JsonStyle {
        ensure_ascii: ensure_ascii.is_true(),
        indent,
        item_separator,
        key_separator,
        sort_keys: sort_keys.is_true(),
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(out)
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&json_number(value)),
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), style),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_json_container(out, '[', ']', &items, style, depth, |out, item, depth| {
                write_json(out, item, style, depth)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_json_container(
                out,
                '{',
                '}',
                &entries,
                style,
                depth,
                |out, (key, item), depth| {
                    write_json_string(out, key, style);
                    out.push_str(&style.key_separator);
                    write_json(out, item, style, depth)
                },
            )?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// `[a, b]` or `{...}` with Python's separators and indentation; empty ones stay `[]`, `{}`.
fn write_json_container<T>(
    out: &mut String,
    open: char,
    close: char,
    items: &[T],
    style: &JsonStyle,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, depth: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_separator);
        }
        newline(out, depth + 1);
        write_item(out, item, depth + 1)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// A JSON number as Python writes it: integers as digits, floats as `repr`, and the non-finite
/// ones as `NaN` / `Infinity` (Python's default `allow_nan=True`).
fn json_number(value: &Value) -> String {
    match python_number(value).as_str() {
        "nan" => "NaN".into(),
        "inf" => "Infinity".into(),
        "-inf" => "-Infinity".into(),
        other => other.into(),
    }
}

/// A map key as `json.dumps` turns it into a string.
fn json_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::Number => Ok(json_number(key)),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.into()),
        ValueKind::None => Ok("null".into()),
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

/// A JSON string as Python's encoder writes it: `"`, `\` and control characters escaped (short
/// forms where JSON has them, else `\u00XX`), and with `ensure_ascii` everything outside printable
/// ASCII as `\uXXXX` (surrogate pairs above U+FFFF).
fn write_json_string(out: &mut String, text: &str, style: &JsonStyle) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (style.ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_tokenizer() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo");
        Tokenizer::from_file(&dir.join("tokenizer.json"), vec![1], Some(0)).unwrap()
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn user(content: &str) -> Vec<ChatMessage> {
        vec![ChatMessage::new("user", content)]
    }

    fn render_str(source: &str, messages: &[ChatMessage]) -> Result<String, ChatTemplateError> {
        ChatTemplate::new(source, "test", vec![("bos_token".into(), "<s>".into())])?
            .render(messages, true)
    }

    #[test]
    fn a_directory_without_a_template_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = demo_tokenizer();
        assert!(
            ChatTemplate::load(dir.path(), &tokenizer, None)
                .unwrap()
                .is_none()
        );
        write(dir.path(), TOKENIZER_CONFIG_FILE, r#"{"bos_token": "<s>"}"#);
        assert!(
            ChatTemplate::load(dir.path(), &tokenizer, None)
                .unwrap()
                .is_none()
        );
        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            r#"{"chat_template": null}"#,
        );
        assert!(
            ChatTemplate::load(dir.path(), &tokenizer, None)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_config_template_may_be_a_string_or_a_named_list() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = demo_tokenizer();
        let config = write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            r#"{"chat_template": "{{ bos_token }}{{ messages[0].content }}", "bos_token": "<B>"}"#,
        );
        let template = ChatTemplate::load(dir.path(), &tokenizer, None)
            .unwrap()
            .unwrap();
        assert_eq!(template.source(), config.display().to_string());
        assert_eq!(template.render(&user("hi"), true).unwrap(), "<B>hi");

        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            r#"{"chat_template": [{"name": "tool_use", "template": "tools"},
                                  {"name": "default", "template": "default {{ messages|length }}"}]}"#,
        );
        let template = ChatTemplate::load(dir.path(), &tokenizer, None)
            .unwrap()
            .unwrap();
        assert_eq!(template.render(&user("hi"), true).unwrap(), "default 1");

        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            r#"{"chat_template": [{"name": "rag", "template": "x"}]}"#,
        );
        let err = ChatTemplate::load(dir.path(), &tokenizer, None).unwrap_err();
        assert!(
            matches!(err, ChatTemplateError::Field { ref field, .. } if field == "chat_template"),
            "{err}"
        );
        assert!(
            err.to_string().contains("no template named `default`"),
            "{err}"
        );
        assert!(err.to_string().contains("\"rag\""), "{err}");

        write(dir.path(), TOKENIZER_CONFIG_FILE, r#"{"chat_template": 3}"#);
        let err = ChatTemplate::load(dir.path(), &tokenizer, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("tokenizer_config.json: `chat_template` must be"),
            "{err}"
        );

        write(dir.path(), TOKENIZER_CONFIG_FILE, "{not json");
        let err = ChatTemplate::load(dir.path(), &tokenizer, None).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Json { .. }), "{err}");
    }

    #[test]
    fn special_tokens_are_strings_or_added_token_objects() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = demo_tokenizer();
        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            r#"{"chat_template": "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}",
                "bos_token": {"__type": "AddedToken", "content": "<｜begin▁of▁sentence｜>", "lstrip": false},
                "eos_token": "</eos>",
                "pad_token": {"content": "<pad>", "special": true},
                "unk_token": null}"#,
        );
        let template = ChatTemplate::load(dir.path(), &tokenizer, None)
            .unwrap()
            .unwrap();
        assert_eq!(
            template.render(&user("x"), false).unwrap(),
            "<｜begin▁of▁sentence｜>|</eos>|<pad>|False"
        );

        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            r#"{"chat_template": "x", "eos_token": {"id": 3}}"#,
        );
        let err = ChatTemplate::load(dir.path(), &tokenizer, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("`eos_token` is an object without a string `content`"),
            "{err}"
        );
        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            r#"{"chat_template": "x", "bos_token": 0}"#,
        );
        let err = ChatTemplate::load(dir.path(), &tokenizer, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("`bos_token` must be a string or an AddedToken object"),
            "{err}"
        );
    }

    #[test]
    fn bos_and_eos_fall_back_to_the_tokenizer_ids_unless_the_config_says_null() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = demo_tokenizer(); // BOS 0 = <s>, EOS 1 = </s>
        write(
            dir.path(),
            CHAT_TEMPLATE_FILE,
            "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}",
        );
        let template = ChatTemplate::load(dir.path(), &tokenizer, None)
            .unwrap()
            .unwrap();
        assert_eq!(template.render(&user("x"), false).unwrap(), "<s>|</s>|");

        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            r#"{"bos_token": null, "pad_token": "<pad>"}"#,
        );
        let template = ChatTemplate::load(dir.path(), &tokenizer, None)
            .unwrap()
            .unwrap();
        assert_eq!(template.render(&user("x"), false).unwrap(), "|</s>|<pad>");
    }

    #[test]
    fn chat_template_jinja_wins_and_the_override_file_wins_over_both() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = demo_tokenizer();
        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            r#"{"chat_template": "config", "bos_token": "<B>"}"#,
        );
        let file = write(dir.path(), CHAT_TEMPLATE_FILE, "file {{ bos_token }}\n");
        let template = ChatTemplate::load(dir.path(), &tokenizer, None)
            .unwrap()
            .unwrap();
        assert_eq!(template.source(), file.display().to_string());
        // Jinja2 drops a template's final newline (keep_trailing_newline=False), so does this.
        assert_eq!(template.render(&user("x"), false).unwrap(), "file <B>");

        let other = tempfile::tempdir().unwrap();
        let flag = write(other.path(), "mine.jinja", "override {{ bos_token }}");
        let template = ChatTemplate::load(dir.path(), &tokenizer, Some(&flag))
            .unwrap()
            .unwrap();
        assert_eq!(template.source(), flag.display().to_string());
        assert_eq!(template.render(&user("x"), false).unwrap(), "override <B>");

        // An override works for a model without any template of its own, too.
        let bare = tempfile::tempdir().unwrap();
        let template = ChatTemplate::load(bare.path(), &tokenizer, Some(&flag))
            .unwrap()
            .unwrap();
        assert_eq!(template.render(&user("x"), false).unwrap(), "override <s>");

        let missing = other.path().join("missing.jinja");
        let err = ChatTemplate::load(dir.path(), &tokenizer, Some(&missing)).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Io { .. }), "{err}");
        assert!(err.to_string().contains("missing.jinja"), "{err}");
    }

    #[test]
    fn bad_jinja_is_an_error_that_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = demo_tokenizer();
        let file = write(
            dir.path(),
            CHAT_TEMPLATE_FILE,
            "{% for m in messages %}\n{{ m.content }\n",
        );
        let err = ChatTemplate::load(dir.path(), &tokenizer, None).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Syntax { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("{}: not a valid chat template", file.display())),
            "{text}"
        );
        assert!(text.contains(":2"), "names the line: {text}");
    }

    #[test]
    fn raise_exception_is_its_own_error_with_the_templates_message() {
        let template = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user message, not ' + messages[0].role) }}{% endif %}ok",
            "t.jinja",
            Vec::new(),
        )
        .unwrap();
        assert_eq!(template.render(&user("x"), true).unwrap(), "ok");
        let err = template
            .render(&[ChatMessage::new("system", "s")], true)
            .unwrap_err();
        match &err {
            ChatTemplateError::Raised { origin, message } => {
                assert_eq!(origin, "t.jinja");
                assert_eq!(
                    message,
                    "Conversations must start with a user message, not system"
                );
            }
            other => panic!("expected Raised, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "Conversations must start with a user message, not system"
        );

        // From inside a macro and a captured block, as larger templates do.
        let template = ChatTemplate::new(
            "{% macro check(m) %}{% if m.role == 'tool' %}{{ raise_exception('no tools: ' ~ m.content) }}{% endif %}{% endmacro %}{% set out %}{% for m in messages %}{{ check(m) }}{% endfor %}{% endset %}{{ out }}",
            "macro.jinja",
            Vec::new(),
        )
        .unwrap();
        let err = template
            .render(&[ChatMessage::new("tool", "42")], false)
            .unwrap_err();
        assert!(
            matches!(&err, ChatTemplateError::Raised { message, .. } if message == "no tools: 42"),
            "{err:?}"
        );
    }

    #[test]
    fn other_render_failures_name_the_template() {
        let err = render_str("{{ messages[0].content.no_such_method() }}", &user("x")).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("rendering the chat template test failed"),
            "{err}"
        );
    }

    #[test]
    fn a_render_is_bounded_by_its_fuel() {
        let source = "{% for i in range(100000) %}{% for j in range(100000) %}{{ messages[0].content }}{% endfor %}{% endfor %}";
        let template = ChatTemplate::new(source, "loop.jinja", Vec::new()).unwrap();
        assert_eq!(template.fuel, Some(DEFAULT_FUEL));
        let template = template.with_fuel(Some(10_000));
        let err = template.render(&user("spin"), true).unwrap_err();
        assert!(
            matches!(err, ChatTemplateError::OutOfFuel { fuel: 10_000, .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "the chat template loop.jinja used up its fuel budget of 10000 for this conversation"
        );
        let ok = ChatTemplate::new("{{ messages[0].content }}", "small", Vec::new())
            .unwrap()
            .with_fuel(Some(100));
        assert_eq!(ok.render(&user("fits"), true).unwrap(), "fits");
    }

    #[test]
    fn transformers_whitespace_loop_controls_and_namespaces() {
        let source = "{% set ns = namespace(n=0) %}\n{% for m in messages %}\n  {% if m.role == 'skip' %}{% continue %}{% endif %}\n  {% set ns.n = ns.n + 1 %}\n  [{{ m.content }}]\n  {% if ns.n == 2 %}{% break %}{% endif %}\n{% endfor %}\nn={{ ns.n }}";
        let messages = [
            ChatMessage::new("user", "a"),
            ChatMessage::new("skip", "b"),
            ChatMessage::new("user", "c"),
            ChatMessage::new("user", "d"),
        ];
        assert_eq!(render_str(source, &messages).unwrap(), "  [a]\n  [c]\nn=2");
    }

    #[test]
    fn python_string_methods_and_values() {
        let out = render_str(
            "{{ messages[0].content.strip().split(',') }} {{ messages[0].content.startswith(' a') }} {{ none }} {{ 1.5e20 }} {{ 0.00001 }} {{ 3.0 }} {{ (1,) }} {{ {'k': \"it's\"} }} {{ 2 / 4 }}",
            &user(" a,b "),
        )
        .unwrap();
        assert_eq!(
            out,
            "['a', 'b'] True None 1.5e+20 1e-05 3.0 (1,) {'k': \"it's\"} 0.5"
        );
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let out = render_str(
            r#"{{ {'a': [1, 2.5, none, true], 'é': "q\"\n", 'e': {}} | tojson }}|{{ 'ü' | tojson(ensure_ascii=true) }}|{{ [1, [2]] | tojson(indent=2) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=(',', ':')) }}|{{ '<&>' | tojson }}"#,
            &user("x"),
        )
        .unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, 2.5, null, true], \"é\": \"q\\\"\\n\", \"e\": {}}|\"\\u00fc\"|[\n  1,\n  [\n    2\n  ]\n]|{\"a\":2,\"b\":1}|\"<&>\""
        );
        let err = render_str("{{ 1 | tojson(indent=[]) }}", &user("x")).unwrap_err();
        assert!(err.to_string().contains("indent must be"), "{err}");
    }

    #[test]
    fn python_float_repr_matches_python() {
        for (x, expected) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123456789.125, "123456789.125"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e300, "1.5e+300"),
            (-2.5e-10, "-2.5e-10"),
            (0.30000000000000004, "0.30000000000000004"),
        ] {
            assert_eq!(python_float_repr(x), expected, "{x:e}");
        }
    }

    #[test]
    fn strftime_now_formats_the_local_time() {
        let out = render_str("{{ strftime_now('%Y-%m-%d') }}", &user("x")).unwrap();
        assert_eq!(out.len(), 10, "{out}");
        assert!(out.starts_with("20"), "{out}");
    }

    #[test]
    fn a_template_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }
}
