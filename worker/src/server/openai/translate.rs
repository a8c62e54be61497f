//! OpenAI requests -> engine requests: every check, default and refusal of the HTTP API, as pure
//! functions of the request, the tokenizer, the limits and the chat template.

use std::time::Instant;

use serde_json::Value;

use super::error::ApiError;
use super::protocol::{
    ChatCompletionRequest, ChatMessageInput, CompletionRequest, MessageContent, PromptInput,
    SamplingFields,
};
use crate::engine::codec::TokenCodec;
use crate::engine::request::GenerationRequest;
use crate::engine::sampler::SamplingParams;
use crate::model::chat_template::{ChatMessage, ChatTemplate};
use crate::server::chat::render_conversation;
use crate::server::validate::{
    Invalid, RequestLimits, check_cache_salt, check_logprobs, check_prompt, check_request_id,
    check_stop_strings, max_new_tokens,
};

/// Most choices one request may ask for (prompts x `n`): each is a sequence in the engine.
pub const MAX_CHOICES: usize = 64;

/// New tokens of a completion whose request sets no `max_tokens` (OpenAI's and vLLM's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;

/// How an answer reports log-probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsFormat {
    None,
    /// Completions: `tokens`, `token_logprobs`, `top_logprobs` maps, `text_offset`.
    Completion {
        top: usize,
    },
    /// Chat: a `content` list of tokens, each with its `top_logprobs`.
    Chat {
        top: usize,
    },
}

/// The engine requests of one API request, and how to answer it.
#[derive(Debug)]
pub struct Plan {
    /// Choice `index` is `requests[index]`: prompt `index / n`, copy `index % n`.
    pub requests: Vec<GenerationRequest>,
    pub n: usize,
    /// Per prompt: text that goes before the completion (`echo`).
    pub echo: Vec<Option<String>>,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: LogprobsFormat,
}

/// What every translation needs besides the request.
pub struct Context<'a> {
    pub codec: &'a dyn TokenCodec,
    pub limits: &'a RequestLimits,
    /// The name the model is served under.
    pub model: &'a str,
    pub chat_template: Option<&'a ChatTemplate>,
    /// Response id (`cmpl-...`, `chatcmpl-...`), also the engine's request id in logs.
    pub id: &'a str,
    pub arrival: Instant,
}

fn invalid(error: Invalid) -> ApiError {
    ApiError::from_invalid(error)
}

/// Refuses a field latentserve cannot honour, naming it.
fn refuse_set(field: &str, value: &Option<Value>, why: &str) -> Result<(), ApiError> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(_) => Err(ApiError::invalid(
            field,
            format!("{field} is not supported: {why}"),
        )),
    }
}

fn check_model(asked: &Option<String>, served: &str) -> Result<(), ApiError> {
    match asked.as_deref() {
        // Clients that leave it out (curl by hand) mean the one model there is.
        None | Some("") => Ok(()),
        Some(name) if name == served => Ok(()),
        Some(name) => Err(ApiError::unknown_model(name, served)),
    }
}

/// Sampling, stopping and `n` fields shared by both endpoints, checked.
struct Shared {
    sampling: SamplingParams,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    cache_salt: Option<String>,
    n: usize,
    stream: bool,
    include_usage: bool,
}

fn shared(fields: SamplingFields, limits: &RequestLimits) -> Result<Shared, ApiError> {
    let n = fields.n.unwrap_or(1);
    if n == 0 || n as usize > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
        ));
    }
    let sampling = SamplingParams {
        temperature: fields.temperature.unwrap_or(1.0),
        // vLLM's convention: -1 (or 0) keeps every token.
        top_k: fields
            .top_k
            .map_or(0, |k| u32::try_from(k.max(0)).unwrap_or(u32::MAX)),
        top_p: fields.top_p.unwrap_or(1.0),
        min_p: fields.min_p.unwrap_or(0.0),
        repetition_penalty: fields.repetition_penalty.unwrap_or(1.0),
        presence_penalty: fields.presence_penalty.unwrap_or(0.0),
        frequency_penalty: fields.frequency_penalty.unwrap_or(0.0),
        // Seeds are 64-bit either way; a negative one is as good as any.
        seed: fields.seed.map(|seed| seed as u64),
    };
    sampling.validate().map_err(|message| {
        let param = message.split(' ').next().unwrap_or_default().to_owned();
        ApiError::invalid(param, message)
    })?;
    let stop = fields.stop.map(|stop| stop.into_vec()).unwrap_or_default();
    check_stop_strings(&stop, "stop").map_err(invalid)?;
    let stop_token_ids = fields.stop_token_ids.unwrap_or_default();
    if let Some((index, id)) = stop_token_ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= limits.vocab_size)
    {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!(
                "stop_token_ids[{index}] = {id} is outside the vocabulary of {} tokens",
                limits.vocab_size
            ),
        ));
    }
    if let Some(user) = &fields.user {
        check_request_id(user, "user").map_err(invalid)?;
    }
    let cache_salt = check_cache_salt(fields.cache_salt, "cache_salt").map_err(invalid)?;
    Ok(Shared {
        sampling,
        stop,
        stop_token_ids,
        ignore_eos: fields.ignore_eos,
        cache_salt,
        n: n as usize,
        stream: fields.stream,
        include_usage: fields.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// One engine request per prompt and copy. Copies of a seeded request get consecutive seeds, so
/// that `n` samples differ from each other and the request stays reproducible.
fn expand(
    prompts: Vec<Vec<u32>>,
    max_tokens: &[usize],
    shared: &Shared,
    engine_logprobs: usize,
    context: &Context<'_>,
) -> Result<Vec<GenerationRequest>, ApiError> {
    let choices = prompts.len() * shared.n;
    if choices > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts x n = {} asks for {choices} choices; at most {MAX_CHOICES} are allowed",
                prompts.len(),
                shared.n
            ),
        ));
    }
    let mut requests = Vec::with_capacity(choices);
    for (prompt, &max_tokens) in prompts.into_iter().zip(max_tokens) {
        for copy in 0..shared.n {
            let mut sampling = shared.sampling.clone();
            sampling.seed = sampling.seed.map(|seed| seed.wrapping_add(copy as u64));
            requests.push(GenerationRequest {
                request_id: context.id.to_owned(),
                prompt: prompt.clone(),
                sampling,
                max_tokens,
                stop: shared.stop.clone(),
                stop_token_ids: shared.stop_token_ids.clone(),
                ignore_eos: shared.ignore_eos,
                logprobs: engine_logprobs,
                cache_salt: shared.cache_salt.clone(),
                deadline: None,
                arrival: context.arrival,
            });
        }
    }
    Ok(requests)
}

/// `POST /v1/completions`.
pub fn completion(request: CompletionRequest, context: &Context<'_>) -> Result<Plan, ApiError> {
    check_model(&request.model, context.model)?;
    refuse_set(
        "suffix",
        &request.suffix,
        "latentserve does not fill in the middle",
    )?;
    refuse_logit_bias(&request.logit_bias)?;
    let shared = shared(request.sampling, context.limits)?;
    match &request.best_of {
        None | Some(Value::Null) => {}
        Some(Value::Number(best)) if best.as_u64() == Some(shared.n as u64) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "best_of",
                "best_of is not supported unless it equals n: ask for n choices and pick one",
            ));
        }
    }
    if let Some(count) = request.logprobs {
        check_logprobs(count, "logprobs").map_err(invalid)?;
        if request.echo {
            return Err(ApiError::invalid(
                "echo",
                "echo with logprobs needs the prompt's log-probabilities, which latentserve does not compute",
            ));
        }
    }
    let codec = context.codec;
    let encode = |text: &str, field: String| -> Result<Vec<u32>, ApiError> {
        if text.is_empty() {
            return Err(ApiError::invalid("prompt", format!("{field} is empty")));
        }
        codec.encode(text, true).map_err(|e| {
            ApiError::invalid("prompt", format!("{field} could not be tokenized: {e}"))
        })
    };
    let (prompts, texts): (Vec<Vec<u32>>, Vec<Option<String>>) = match request.prompt {
        None => return Err(ApiError::invalid("prompt", "prompt is required")),
        Some(PromptInput::Text(text)) => (vec![encode(&text, "prompt".into())?], vec![Some(text)]),
        Some(PromptInput::Texts(texts)) => {
            let ids = texts
                .iter()
                .enumerate()
                .map(|(i, text)| encode(text, format!("prompt[{i}]")))
                .collect::<Result<_, _>>()?;
            (ids, texts.into_iter().map(Some).collect())
        }
        Some(PromptInput::Ids(ids)) => (vec![ids], vec![None]),
        Some(PromptInput::IdLists(lists)) => {
            let count = lists.len();
            (lists, vec![None; count])
        }
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "prompt: the list is empty"));
    }
    let mut max_tokens = Vec::with_capacity(prompts.len());
    for (index, prompt) in prompts.iter().enumerate() {
        let field = if prompts.len() == 1 {
            "prompt".to_owned()
        } else {
            format!("prompt[{index}]")
        };
        check_prompt(prompt, context.limits, &field, &field).map_err(invalid)?;
        // OpenAI's default of 16, shortened where the context leaves less.
        let requested = request.max_tokens.unwrap_or_else(|| {
            let room = context.limits.context() - prompt.len();
            DEFAULT_COMPLETION_MAX_TOKENS.min(u32::try_from(room).unwrap_or(u32::MAX))
        });
        max_tokens.push(
            max_new_tokens(prompt.len(), Some(requested), context.limits, "max_tokens")
                .map_err(invalid)?,
        );
    }
    let echo = if request.echo {
        prompts
            .iter()
            .zip(texts)
            .map(|(ids, text)| match text {
                Some(text) => Ok(Some(text)),
                None => codec.decode(ids, true).map(Some).map_err(|e| {
                    ApiError::invalid("prompt", format!("prompt could not be decoded: {e}"))
                }),
            })
            .collect::<Result<_, _>>()?
    } else {
        vec![None; prompts.len()]
    };
    let (logprobs, engine_logprobs) = match request.logprobs {
        // The chosen token's logprob comes with the alternatives: ask for at least one.
        Some(top) => (
            LogprobsFormat::Completion { top: top as usize },
            (top as usize).max(1),
        ),
        None => (LogprobsFormat::None, 0),
    };
    let requests = expand(prompts, &max_tokens, &shared, engine_logprobs, context)?;
    Ok(Plan {
        requests,
        n: shared.n,
        echo,
        stream: shared.stream,
        include_usage: shared.include_usage,
        logprobs,
    })
}

fn refuse_logit_bias(value: &Option<Value>) -> Result<(), ApiError> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(map)) if map.is_empty() => Ok(()),
        Some(_) => Err(ApiError::invalid(
            "logit_bias",
            "logit_bias is not supported: latentserve samples without per-token biases",
        )),
    }
}

/// A message as the chat template sees it: content parts joined into one string.
pub fn chat_message(index: usize, message: ChatMessageInput) -> Result<ChatMessage, ApiError> {
    let field = format!("messages[{index}]");
    let role = match message.role.as_str() {
        // OpenAI's newer name for the system role.
        "developer" => "system".to_owned(),
        "system" | "user" | "assistant" => message.role,
        "tool" | "function" => {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "{field}.role '{}' is not supported: tool calling is not served yet",
                    message.role
                ),
            ));
        }
        other => {
            return Err(ApiError::invalid(
                "messages",
                format!("{field}.role '{other}' is not one of system, developer, user, assistant"),
            ));
        }
    };
    if !matches!(message.tool_calls, None | Some(Value::Null)) {
        return Err(ApiError::invalid(
            "messages",
            format!("{field}.tool_calls is not supported: tool calling is not served yet"),
        ));
    }
    let content = match message.content {
        None => String::new(),
        Some(MessageContent::Text(text)) => text,
        Some(MessageContent::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (part_index, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(text)) => texts.push(text),
                    ("text", None) => {
                        return Err(ApiError::invalid(
                            "messages",
                            format!("{field}.content[{part_index}] has type text but no text"),
                        ));
                    }
                    (other, _) => {
                        return Err(ApiError::invalid(
                            "messages",
                            format!(
                                "{field}.content[{part_index}].type '{other}' is not supported: the model takes text only"
                            ),
                        ));
                    }
                }
            }
            // As vLLM joins text parts for templates that expect a string.
            texts.join("\n")
        }
    };
    Ok(ChatMessage { role, content })
}

/// `POST /v1/chat/completions`.
pub fn chat_completion(
    request: ChatCompletionRequest,
    context: &Context<'_>,
) -> Result<Plan, ApiError> {
    check_model(&request.model, context.model)?;
    let tools_why = "tool calling is not served yet";
    refuse_set("tools", &request.tools, tools_why)?;
    refuse_set("functions", &request.functions, tools_why)?;
    refuse_set("function_call", &request.function_call, tools_why)?;
    match &request.tool_choice {
        None | Some(Value::Null) => {}
        Some(Value::String(choice)) if choice == "none" || choice == "auto" => {}
        Some(_) => refuse_set("tool_choice", &request.tool_choice, tools_why)?,
    }
    match &request.response_format {
        None | Some(Value::Null) => {}
        Some(format) if format.get("type").and_then(Value::as_str) == Some("text") => {}
        Some(format) => {
            let kind = format.get("type").and_then(Value::as_str).unwrap_or("?");
            return Err(ApiError::invalid(
                "response_format",
                format!(
                    "response_format type '{kind}' is not supported: latentserve generates plain text"
                ),
            ));
        }
    }
    refuse_logit_bias(&request.logit_bias)?;
    refuse_set("audio", &request.audio, "the model produces text only")?;
    refuse_set(
        "prediction",
        &request.prediction,
        "predicted outputs are not served",
    )?;
    let shared = shared(request.sampling, context.limits)?;
    let logprobs = match (request.logprobs, request.top_logprobs) {
        (false, Some(top)) if top > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ));
        }
        (false, _) => LogprobsFormat::None,
        (true, top) => {
            let top = top.unwrap_or(0);
            check_logprobs(top, "top_logprobs").map_err(invalid)?;
            LogprobsFormat::Chat { top: top as usize }
        }
    };
    let messages = request
        .messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| chat_message(index, message))
        .collect::<Result<Vec<_>, _>>()?;
    let prompt = render_conversation(
        context.chat_template,
        context.model,
        &messages,
        request.add_generation_prompt.unwrap_or(true),
        context.codec,
        "messages",
    )
    .map_err(invalid)?
    .ids;
    check_prompt(&prompt, context.limits, "messages", "messages").map_err(invalid)?;
    let (field, requested) = match (request.max_completion_tokens, request.max_tokens) {
        (Some(limit), _) => ("max_completion_tokens", Some(limit)),
        (None, limit) => ("max_tokens", limit),
    };
    let max_tokens =
        max_new_tokens(prompt.len(), requested, context.limits, field).map_err(invalid)?;
    let engine_logprobs = match logprobs {
        LogprobsFormat::Chat { top } => top.max(1),
        _ => 0,
    };
    let requests = expand(
        vec![prompt],
        &[max_tokens],
        &shared,
        engine_logprobs,
        context,
    )?;
    Ok(Plan {
        requests,
        n: shared.n,
        echo: vec![None],
        stream: shared.stream,
        include_usage: shared.include_usage,
        logprobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::codec::tests::ByteCodec;
    use crate::server::openai::protocol::WithSampling;

    const LIMITS: RequestLimits = RequestLimits {
        max_seq_len: 64,
        vocab_size: 300,
        cache_capacity_tokens: 1024,
    };

    fn context<'a>(template: Option<&'a ChatTemplate>) -> Context<'a> {
        Context {
            codec: &ByteCodec,
            limits: &LIMITS,
            model: "demo",
            chat_template: template,
            id: "cmpl-test",
            arrival: Instant::now(),
        }
    }

    /// A request as the server parses it: its own fields, then the shared ones.
    fn parse<T: serde::de::DeserializeOwned + WithSampling>(json: serde_json::Value) -> T {
        let mut request: T = serde_json::from_value(json.clone()).unwrap();
        request.set_sampling(serde_json::from_value(json).unwrap());
        request
    }

    fn completion_json(json: serde_json::Value) -> Result<Plan, ApiError> {
        completion(parse(json), &context(None))
    }

    #[test]
    fn a_text_prompt_gets_openais_defaults() {
        let plan =
            completion_json(serde_json::json!({"model": "demo", "prompt": "hello"})).unwrap();
        assert_eq!(plan.requests.len(), 1);
        let request = &plan.requests[0];
        assert_eq!(request.prompt, b"hello".map(u32::from).to_vec());
        assert_eq!(request.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS as usize);
        assert_eq!(request.sampling.temperature, 1.0);
        assert_eq!(plan.logprobs, LogprobsFormat::None);
        assert!(!plan.stream);
    }

    #[test]
    fn prompts_times_n_make_the_choices_with_consecutive_seeds() {
        let plan = completion_json(
            serde_json::json!({"prompt": ["ab", "cd"], "n": 3, "seed": 7, "max_tokens": 4}),
        )
        .unwrap();
        assert_eq!(plan.requests.len(), 6);
        assert_eq!(plan.requests[4].prompt, vec![99, 100]);
        let seeds: Vec<_> = plan.requests.iter().map(|r| r.sampling.seed).collect();
        assert_eq!(seeds, [7, 8, 9, 7, 8, 9].map(Some));
    }

    #[test]
    fn the_default_max_tokens_fits_the_context() {
        let prompt = vec![1u32; 60];
        let plan = completion_json(serde_json::json!({ "prompt": prompt })).unwrap();
        assert_eq!(plan.requests[0].max_tokens, 4);
    }

    #[test]
    fn every_refusal_names_its_field() {
        let cases = [
            (
                serde_json::json!({"model": "gpt-4", "prompt": "x"}),
                "model",
                404,
            ),
            (serde_json::json!({}), "prompt", 400),
            (serde_json::json!({"prompt": ""}), "prompt", 400),
            (serde_json::json!({"prompt": [1, 300]}), "prompt", 400),
            (
                serde_json::json!({"prompt": "x", "max_tokens": 0}),
                "max_tokens",
                400,
            ),
            (
                serde_json::json!({"prompt": "x", "max_tokens": 64}),
                "max_tokens",
                400,
            ),
            (
                serde_json::json!({"prompt": "x", "temperature": -1}),
                "temperature",
                400,
            ),
            (serde_json::json!({"prompt": "x", "top_p": 0}), "top_p", 400),
            (serde_json::json!({"prompt": "x", "n": 0}), "n", 400),
            (serde_json::json!({"prompt": "x", "n": 65}), "n", 400),
            (
                serde_json::json!({"prompt": "x", "stop": [""]}),
                "stop",
                400,
            ),
            (
                serde_json::json!({"prompt": "x", "logprobs": 21}),
                "logprobs",
                400,
            ),
            (
                serde_json::json!({"prompt": "x", "logprobs": 1, "echo": true}),
                "echo",
                400,
            ),
            (
                serde_json::json!({"prompt": "x", "suffix": "y"}),
                "suffix",
                400,
            ),
            (
                serde_json::json!({"prompt": "x", "best_of": 3}),
                "best_of",
                400,
            ),
            (
                serde_json::json!({"prompt": "x", "logit_bias": {"5": 1}}),
                "logit_bias",
                400,
            ),
            (
                serde_json::json!({"prompt": "x", "stop_token_ids": [300]}),
                "stop_token_ids",
                400,
            ),
        ];
        for (json, param, status) in cases {
            let error = completion_json(json.clone()).unwrap_err();
            assert_eq!(error.status.as_u16(), status, "{json}: {error:?}");
            assert_eq!(error.param.as_deref(), Some(param), "{json}: {error:?}");
        }
        // Harmless forms of refusable fields pass.
        completion_json(
            serde_json::json!({"prompt": "x", "best_of": 1, "logit_bias": {}, "suffix": null}),
        )
        .unwrap();
    }

    #[test]
    fn echo_returns_the_prompt_text_and_logprobs_ask_for_at_least_one_alternative() {
        let plan =
            completion_json(serde_json::json!({"prompt": [104, 105], "echo": true})).unwrap();
        assert_eq!(plan.echo, vec![Some("hi".to_owned())]);
        let plan = completion_json(serde_json::json!({"prompt": "x", "logprobs": 0})).unwrap();
        assert_eq!(plan.logprobs, LogprobsFormat::Completion { top: 0 });
        assert_eq!(plan.requests[0].logprobs, 1);
    }

    #[test]
    fn chat_without_a_template_says_how_to_get_one() {
        let request: ChatCompletionRequest =
            parse(serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}));
        let error = chat_completion(request, &context(None)).unwrap_err();
        assert_eq!(error.status.as_u16(), 400);
        assert!(
            error.message.contains("--chat-template"),
            "{}",
            error.message
        );
    }
}
