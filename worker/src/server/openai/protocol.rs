//! The JSON of OpenAI's Completions and Chat Completions APIs, as far as latentserve serves it.
//! Unknown request fields are ignored (clients send many); fields latentserve cannot honour are
//! kept as raw values so that [`super::translate`] can refuse them by name. The fields both
//! endpoints share ([`SamplingFields`]) are read from the same body by a second pass (see
//! [`super::parse_body`]) rather than through `#[serde(flatten)]`, which would lose the name of a
//! field that fails to parse.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A request that carries the shared [`SamplingFields`].
pub trait WithSampling {
    fn set_sampling(&mut self, sampling: SamplingFields);
}

impl WithSampling for CompletionRequest {
    fn set_sampling(&mut self, sampling: SamplingFields) {
        self.sampling = sampling;
    }
}

impl WithSampling for ChatCompletionRequest {
    fn set_sampling(&mut self, sampling: SamplingFields) {
        self.sampling = sampling;
    }
}

/// One string or a list of them (`stop`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

/// `prompt` of a completion: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct StreamOptions {
    /// Send one last chunk with the usage of the whole request (and `usage: null` before it).
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and stopping fields both endpoints share, with vLLM's common extensions
/// (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// An end-user id; checked, not used.
    pub user: Option<String>,
    /// As in vLLM: cached prefixes are shared only with requests of the same salt.
    pub cache_salt: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<PromptInput>,
    pub max_tokens: Option<u32>,
    /// Alternatives per token (OpenAI allows up to 5; latentserve up to 20).
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    #[serde(skip)]
    pub sampling: SamplingFields,
    // Refused when set: latentserve has no answer for them.
    pub suffix: Option<Value>,
    pub best_of: Option<Value>,
    pub logit_bias: Option<Value>,
}

/// `content` of a chat message: a string, or a list of typed parts of which only text is served.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message's content; `type` other than `text` is refused by name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessageInput {
    pub role: String,
    pub content: Option<MessageContent>,
    /// Refused when set: tool calls are not served yet.
    pub tool_calls: Option<Value>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    #[serde(default)]
    pub messages: Vec<ChatMessageInput>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    /// vLLM's extension: end the prompt with the assistant's turn opener (default true).
    pub add_generation_prompt: Option<bool>,
    #[serde(skip)]
    pub sampling: SamplingFields,
    // Refused when set (or, for response_format, when not plain text).
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<Value>,
    pub logit_bias: Option<Value>,
    pub audio: Option<Value>,
    pub prediction: Option<Value>,
}

/// `usage` of every answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose latent cache came from the prefix cache.
    pub cached_tokens: usize,
}

/// `logprobs` of a completion choice (the legacy format).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, Value>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The answer of `/v1/completions`, and (with `object` `text_completion` too) each streamed chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "UsageField::is_absent")]
    pub usage: UsageField,
}

/// `usage` where a chunk may carry it, carry `null`, or leave it out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UsageField {
    Absent,
    Null,
    Present(Usage),
}

impl UsageField {
    fn is_absent(&self) -> bool {
        matches!(self, UsageField::Absent)
    }
}

impl Serialize for UsageField {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            UsageField::Present(usage) => usage.serialize(serializer),
            _ => serializer.serialize_none(),
        }
    }
}

/// One alternative in a chat `logprobs` entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One token in a chat `logprobs.content` list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The answer of `/v1/chat/completions` without streaming.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// What a streamed chat chunk adds to its choice's message.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// One server-sent event of a streamed chat completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "UsageField::is_absent")]
    pub usage: UsageField,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Prompt plus new tokens one request may hold (vLLM reports the same field).
    pub max_model_len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_parse_in_every_form_openai_allows() {
        let parse = |json: &str| -> PromptInput { serde_json::from_str(json).unwrap() };
        assert_eq!(parse(r#""hi""#), PromptInput::Text("hi".into()));
        assert_eq!(
            parse(r#"["a", "b"]"#),
            PromptInput::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(parse("[1, 2]"), PromptInput::Ids(vec![1, 2]));
        assert_eq!(
            parse("[[1], [2, 3]]"),
            PromptInput::IdLists(vec![vec![1], vec![2, 3]])
        );
    }

    #[test]
    fn unknown_fields_are_ignored_and_shared_fields_read_from_the_same_body() {
        let json = r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                "temperature": 0, "stop": "\n", "stream": true, "stream_options": {"include_usage": true},
                "metadata": {"anything": 1}, "store": false}"#;
        let mut request: ChatCompletionRequest = serde_json::from_str(json).unwrap();
        request.set_sampling(serde_json::from_str(json).unwrap());
        assert_eq!(request.sampling.temperature, Some(0.0));
        assert_eq!(request.sampling.stop, Some(OneOrMany::One("\n".into())));
        assert!(request.sampling.stream);
        assert!(request.sampling.stream_options.unwrap().include_usage);
        assert_eq!(
            request.messages[0].content,
            Some(MessageContent::Parts(vec![ContentPart {
                kind: "text".into(),
                text: Some("x".into())
            }]))
        );
    }

    #[test]
    fn usage_is_left_out_null_or_present() {
        let chunk = |usage| ChatCompletionChunk {
            id: "c".into(),
            object: "chat.completion.chunk",
            created: 0,
            model: "m".into(),
            choices: vec![],
            usage,
        };
        let json = |usage| serde_json::to_value(chunk(usage)).unwrap();
        assert!(json(UsageField::Absent).get("usage").is_none());
        assert_eq!(json(UsageField::Null)["usage"], Value::Null);
        assert_eq!(
            json(UsageField::Present(Usage::default()))["usage"]["prompt_tokens_details"]["cached_tokens"],
            0
        );
    }
}
