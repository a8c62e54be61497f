//! Engine outputs -> OpenAI answers: whole responses, and the chunks of a stream. Pure builders
//! over [`GenerationOutput`]s, so every shape is tested without a server.

use serde_json::{Map, Value};

use super::protocol::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
    ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionResponse, Delta, TokenLogprob,
    TopLogprob, Usage, UsageField,
};
use super::translate::LogprobsFormat;
use crate::engine::codec::TokenCodec;
use crate::engine::request::{self, FinishReason, GenerationOutput};

/// OpenAI's `finish_reason`: the end-of-sequence token is a `stop` there; a generation the server
/// cut short (draining past its timeout) is an `abort`, as vLLM calls it.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Eos => "stop",
        FinishReason::Cancelled => "abort",
    }
}

/// What identifies every answer of one request.
#[derive(Debug, Clone)]
pub struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// The usage of a finished request: prompts count once however many copies (`n`) ran them.
#[derive(Debug, Clone, Default)]
pub struct UsageTally {
    /// Per choice, its engine usage once finished.
    finished: Vec<Option<request::Usage>>,
    n: usize,
}

impl UsageTally {
    pub fn new(choices: usize, n: usize) -> Self {
        Self {
            finished: vec![None; choices],
            n: n.max(1),
        }
    }

    pub fn record(&mut self, choice: usize, usage: request::Usage) {
        if let Some(slot) = self.finished.get_mut(choice) {
            *slot = Some(usage);
        }
    }

    pub fn all_finished(&self) -> bool {
        self.finished.iter().all(Option::is_some)
    }

    pub fn total(&self) -> Usage {
        let mut usage = Usage::default();
        for copies in self.finished.chunks(self.n) {
            let done: Vec<_> = copies.iter().flatten().collect();
            if let Some(first) = done.first() {
                usage.prompt_tokens += first.prompt_tokens;
                // The copies share the prompt; what the cache held before any of them ran is the
                // least any of them found there.
                usage.prompt_tokens_details.cached_tokens += done
                    .iter()
                    .map(|u| u.cached_prompt_tokens)
                    .min()
                    .unwrap_or(0);
            }
            usage.completion_tokens += done.iter().map(|u| u.completion_tokens).sum::<usize>();
        }
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
        usage
    }
}

/// A token's text for logprobs: the token decoded alone (a piece of a multi-byte character shows
/// as U+FFFD, as in vLLM).
fn token_text(codec: &dyn TokenCodec, id: u32) -> String {
    codec.decode(&[id], false).unwrap_or_default()
}

/// The legacy `logprobs` of completions for `entries`; `offset` is the text length (in
/// characters) before their tokens and moves past them.
pub fn completion_logprobs(
    entries: &[request::TokenLogprob],
    top: usize,
    codec: &dyn TokenCodec,
    offset: &mut usize,
) -> CompletionLogprobs {
    let mut logprobs = CompletionLogprobs::default();
    for entry in entries {
        let text = token_text(codec, entry.token);
        logprobs.text_offset.push(*offset);
        *offset += text.chars().count();
        logprobs.tokens.push(text);
        logprobs.token_logprobs.push(entry.logprob);
        let alternatives: Map<String, Value> = entry
            .top
            .iter()
            .take(top)
            .map(|&(id, logprob)| (token_text(codec, id), Value::from(logprob)))
            .collect();
        logprobs.top_logprobs.push(alternatives);
    }
    logprobs
}

/// The chat `logprobs` for `entries`.
pub fn chat_logprobs(
    entries: &[request::TokenLogprob],
    top: usize,
    codec: &dyn TokenCodec,
) -> ChatLogprobs {
    let content = entries
        .iter()
        .map(|entry| {
            let token = token_text(codec, entry.token);
            TokenLogprob {
                bytes: token.as_bytes().to_vec(),
                token,
                logprob: entry.logprob,
                top_logprobs: entry
                    .top
                    .iter()
                    .take(top)
                    .map(|&(id, logprob)| {
                        let token = token_text(codec, id);
                        TopLogprob {
                            bytes: token.as_bytes().to_vec(),
                            token,
                            logprob,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    ChatLogprobs { content }
}

/// Everything one choice produced, gathered for a non-streamed answer.
#[derive(Debug, Clone, Default)]
pub struct ChoiceResult {
    pub text: String,
    pub logprobs: Vec<request::TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
}

impl ChoiceResult {
    /// Adds one streamed piece.
    pub fn push(&mut self, output: GenerationOutput) {
        self.text.push_str(&output.text);
        self.logprobs.extend(output.logprobs);
        if let Some(finished) = output.finished {
            self.finish_reason = Some(finished.reason);
        }
    }
}

/// The whole answer of `/v1/completions`.
pub fn completion_response(
    header: &Header,
    choices: Vec<ChoiceResult>,
    echo: &[Option<String>],
    n: usize,
    format: LogprobsFormat,
    usage: Usage,
    codec: &dyn TokenCodec,
) -> CompletionResponse {
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(index, choice)| {
            let prefix = echo.get(index / n.max(1)).cloned().flatten();
            let logprobs = match format {
                LogprobsFormat::Completion { top } => {
                    let mut offset = prefix.as_ref().map_or(0, |p| p.chars().count());
                    Some(completion_logprobs(
                        &choice.logprobs,
                        top,
                        codec,
                        &mut offset,
                    ))
                }
                _ => None,
            };
            CompletionChoice {
                index,
                text: prefix.unwrap_or_default() + &choice.text,
                logprobs,
                finish_reason: choice.finish_reason.map(finish_reason),
            }
        })
        .collect();
    CompletionResponse {
        id: header.id.clone(),
        object: "text_completion",
        created: header.created,
        model: header.model.clone(),
        choices,
        usage: UsageField::Present(usage),
    }
}

/// The whole answer of `/v1/chat/completions`.
pub fn chat_response(
    header: &Header,
    choices: Vec<ChoiceResult>,
    format: LogprobsFormat,
    usage: Usage,
    codec: &dyn TokenCodec,
) -> ChatCompletionResponse {
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(index, choice)| ChatChoice {
            index,
            logprobs: match format {
                LogprobsFormat::Chat { top } => Some(chat_logprobs(&choice.logprobs, top, codec)),
                _ => None,
            },
            finish_reason: choice.finish_reason.map(finish_reason),
            message: AssistantMessage {
                role: "assistant",
                content: choice.text,
            },
        })
        .collect();
    ChatCompletionResponse {
        id: header.id.clone(),
        object: "chat.completion",
        created: header.created,
        model: header.model.clone(),
        choices,
        usage,
    }
}

/// Turns the outputs of a streamed request, in the order they arrive, into event payloads.
pub struct StreamWriter {
    header: Header,
    chat: bool,
    format: LogprobsFormat,
    include_usage: bool,
    n: usize,
    echo: Vec<Option<String>>,
    /// Per choice: the first chunk went out (chat sends the role first, completions the echo).
    started: Vec<bool>,
    /// Per choice: characters streamed so far (completion logprobs' `text_offset`).
    offsets: Vec<usize>,
    usage: UsageTally,
}

impl StreamWriter {
    pub fn new(
        header: Header,
        chat: bool,
        format: LogprobsFormat,
        include_usage: bool,
        choices: usize,
        n: usize,
        echo: Vec<Option<String>>,
    ) -> Self {
        Self {
            header,
            chat,
            format,
            include_usage,
            n: n.max(1),
            echo,
            started: vec![false; choices],
            offsets: vec![0; choices],
            usage: UsageTally::new(choices, n),
        }
    }

    fn usage_field(&self) -> UsageField {
        if self.include_usage {
            UsageField::Null
        } else {
            UsageField::Absent
        }
    }

    /// Chunks that open the stream: chat's role announcement for every choice.
    pub fn opening(&mut self) -> Vec<String> {
        if !self.chat {
            return Vec::new();
        }
        let choices = (0..self.started.len())
            .map(|index| ChatChunkChoice {
                index,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
            })
            .collect();
        self.started.iter_mut().for_each(|s| *s = true);
        vec![self.chat_chunk(choices, self.usage_field())]
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: UsageField) -> String {
        serde_json::to_string(&ChatCompletionChunk {
            id: self.header.id.clone(),
            object: "chat.completion.chunk",
            created: self.header.created,
            model: self.header.model.clone(),
            choices,
            usage,
        })
        .unwrap_or_default()
    }

    fn completion_chunk(&self, choices: Vec<CompletionChoice>, usage: UsageField) -> String {
        serde_json::to_string(&CompletionResponse {
            id: self.header.id.clone(),
            object: "text_completion",
            created: self.header.created,
            model: self.header.model.clone(),
            choices,
            usage,
        })
        .unwrap_or_default()
    }

    /// The chunks for one output of choice `index`: none when it carries nothing to show.
    pub fn output(
        &mut self,
        index: usize,
        mut output: GenerationOutput,
        codec: &dyn TokenCodec,
    ) -> Vec<String> {
        let finished = output.finished.as_ref().map(|f| f.reason);
        if let Some(done) = &output.finished {
            self.usage.record(index, done.usage);
        }
        let mut text = std::mem::take(&mut output.text);
        if !self.chat && !self.started[index] {
            self.started[index] = true;
            if let Some(prefix) = self.echo.get(index / self.n).cloned().flatten() {
                self.offsets[index] = prefix.chars().count();
                text = prefix + &text;
            }
        }
        if text.is_empty() && output.logprobs.is_empty() && finished.is_none() {
            return Vec::new();
        }
        let mut chunks = Vec::with_capacity(2);
        if self.chat {
            let logprobs = match self.format {
                LogprobsFormat::Chat { top } => Some(chat_logprobs(&output.logprobs, top, codec)),
                _ => None,
            };
            let delta = Delta {
                role: None,
                content: (!text.is_empty()).then_some(text),
            };
            chunks.push(self.chat_chunk(
                vec![ChatChunkChoice {
                    index,
                    delta,
                    logprobs,
                    finish_reason: finished.map(finish_reason),
                }],
                self.usage_field(),
            ));
        } else {
            let logprobs = match self.format {
                LogprobsFormat::Completion { top } => Some(completion_logprobs(
                    &output.logprobs,
                    top,
                    codec,
                    &mut self.offsets[index],
                )),
                _ => None,
            };
            chunks.push(self.completion_chunk(
                vec![CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: finished.map(finish_reason),
                }],
                self.usage_field(),
            ));
        }
        if self.include_usage && self.usage.all_finished() && finished.is_some() {
            let usage = UsageField::Present(self.usage.total());
            chunks.push(if self.chat {
                self.chat_chunk(Vec::new(), usage)
            } else {
                self.completion_chunk(Vec::new(), usage)
            });
        }
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::codec::tests::ByteCodec;
    use crate::engine::request::{Finished, Timings};

    fn parsed(chunks: Vec<String>) -> Vec<Value> {
        chunks
            .iter()
            .map(|chunk| serde_json::from_str(chunk).unwrap())
            .collect()
    }

    fn header() -> Header {
        Header {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "demo".into(),
        }
    }

    fn piece(text: &str, finished: Option<(FinishReason, usize)>) -> GenerationOutput {
        GenerationOutput {
            token_ids: text.bytes().map(u32::from).collect(),
            text: text.into(),
            logprobs: text
                .bytes()
                .map(|b| request::TokenLogprob {
                    token: u32::from(b),
                    logprob: -0.5,
                    top: vec![(u32::from(b), -0.5), (u32::from(b'z'), -1.5)],
                })
                .collect(),
            finished: finished.map(|(reason, completion_tokens)| Finished {
                reason,
                usage: request::Usage {
                    prompt_tokens: 5,
                    completion_tokens,
                    cached_prompt_tokens: 2,
                },
                timings: Timings::default(),
            }),
        }
    }

    #[test]
    fn usage_counts_each_prompt_once_and_every_completion() {
        let mut tally = UsageTally::new(4, 2);
        for choice in 0..4 {
            tally.record(
                choice,
                request::Usage {
                    prompt_tokens: 10 + choice / 2,
                    completion_tokens: 3,
                    cached_prompt_tokens: if choice % 2 == 0 { 0 } else { 8 },
                },
            );
        }
        let usage = tally.total();
        assert_eq!(usage.prompt_tokens, 21);
        assert_eq!(usage.completion_tokens, 12);
        assert_eq!(usage.total_tokens, 33);
        assert_eq!(usage.prompt_tokens_details.cached_tokens, 0);
    }

    #[test]
    fn a_chat_stream_announces_the_role_then_content_then_finish_and_usage() {
        let mut writer =
            StreamWriter::new(header(), true, LogprobsFormat::None, true, 1, 1, vec![None]);
        let opening = parsed(writer.opening());
        assert_eq!(opening[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(opening[0]["usage"], Value::Null);
        let chunks = parsed(writer.output(0, piece("4", None), &ByteCodec));
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            serde_json::json!({"content": "4"})
        );
        assert_eq!(chunks[0]["choices"][0]["finish_reason"], Value::Null);
        assert!(
            writer
                .output(0, GenerationOutput::default(), &ByteCodec)
                .is_empty()
        );
        let chunks = parsed(writer.output(0, piece("2", Some((FinishReason::Eos, 2))), &ByteCodec));
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[1]["choices"], serde_json::json!([]));
        assert_eq!(chunks[1]["usage"]["completion_tokens"], 2);
        assert_eq!(
            chunks[1]["usage"]["prompt_tokens_details"]["cached_tokens"],
            2
        );
    }

    #[test]
    fn a_completion_stream_echoes_first_and_offsets_logprobs_past_the_echo() {
        let mut writer = StreamWriter::new(
            header(),
            false,
            LogprobsFormat::Completion { top: 1 },
            false,
            1,
            1,
            vec![Some("Q:".into())],
        );
        assert!(writer.opening().is_empty());
        let chunks = parsed(writer.output(0, piece("ab", None), &ByteCodec));
        let choice = &chunks[0]["choices"][0];
        assert_eq!(choice["text"], "Q:ab");
        assert_eq!(choice["logprobs"]["tokens"], serde_json::json!(["a", "b"]));
        assert_eq!(choice["logprobs"]["text_offset"], serde_json::json!([2, 3]));
        assert_eq!(
            choice["logprobs"]["top_logprobs"][0],
            serde_json::json!({"a": -0.5})
        );
        assert!(chunks[0].get("usage").is_none());
        let chunks =
            parsed(writer.output(0, piece("c", Some((FinishReason::Length, 3))), &ByteCodec));
        assert_eq!(chunks.len(), 1);
        assert_eq!(
            chunks[0]["choices"][0]["logprobs"]["text_offset"],
            serde_json::json!([4])
        );
        assert_eq!(chunks[0]["choices"][0]["finish_reason"], "length");
    }

    #[test]
    fn whole_answers_join_the_pieces() {
        let mut choice = ChoiceResult::default();
        choice.push(piece("4", None));
        choice.push(piece("2", Some((FinishReason::Stop, 2))));
        let usage = Usage::default();
        let chat = chat_response(
            &header(),
            vec![choice.clone()],
            LogprobsFormat::Chat { top: 0 },
            usage,
            &ByteCodec,
        );
        let json = serde_json::to_value(&chat).unwrap();
        assert_eq!(json["choices"][0]["message"]["content"], "42");
        assert_eq!(json["choices"][0]["finish_reason"], "stop");
        let tokens = &json["choices"][0]["logprobs"]["content"];
        assert_eq!(tokens[1]["token"], "2");
        assert_eq!(tokens[1]["bytes"], serde_json::json!([50]));
        assert_eq!(tokens[1]["top_logprobs"], serde_json::json!([]));
        let completion = completion_response(
            &header(),
            vec![choice],
            &[Some("6x7=".into())],
            1,
            LogprobsFormat::None,
            usage,
            &ByteCodec,
        );
        assert_eq!(completion.choices[0].text, "6x7=42");
        assert_eq!(completion.object, "text_completion");
    }
}
