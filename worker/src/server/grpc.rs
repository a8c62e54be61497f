//! `latentserve.v1.Inference`: validates and translates requests, hands them to the engine and
//! streams its outputs back. A dropped response stream drops the engine's receiver, which cancels
//! the request.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::Stream;
use latentserve_proto::v1::{
    self as pb, DetokenizeRequest, DetokenizeResponse, GenerateRequest, GenerateResponse,
    GetModelInfoRequest, ModelInfo, TokenizeRequest, TokenizeResponse, generate_request,
    inference_server::Inference,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::engine::SubmitError;
use crate::engine::codec::TokenCodec;
use crate::engine::request::{
    FinishReason, GenerationError, GenerationOutput, GenerationRequest, OutputReceiver,
};
use crate::engine::sampler::SamplingParams;
use crate::model::chat_template::{ChatMessage, ChatTemplate};
use crate::server::LoadedModel;
use crate::server::chat::render_conversation;
use crate::server::validate::{
    Invalid, RequestLimits, check_cache_salt, check_logprobs, check_prompt, check_request_id,
    check_stop_strings, max_new_tokens,
};

/// The gRPC service; it answers UNAVAILABLE until the model is loaded.
pub struct InferenceService {
    loaded: Arc<OnceLock<LoadedModel>>,
}

impl InferenceService {
    /// A service that starts serving once `loaded` is set.
    pub fn new(loaded: Arc<OnceLock<LoadedModel>>) -> Self {
        Self { loaded }
    }

    fn loaded(&self) -> Result<&LoadedModel, Status> {
        self.loaded
            .get()
            .ok_or_else(|| Status::unavailable("the model is still loading"))
    }
}

/// What turning text or a conversation into token ids takes.
#[derive(Clone, Copy)]
pub struct Prompting<'a> {
    pub codec: &'a dyn TokenCodec,
    pub chat_template: Option<&'a ChatTemplate>,
    /// The served model's name, for errors.
    pub model: &'a str,
}

/// A conversation of the API as the chat template takes it.
fn conversation(chat: pb::Conversation) -> (Vec<ChatMessage>, bool) {
    let messages = chat
        .messages
        .into_iter()
        .map(|m| ChatMessage {
            role: m.role,
            content: m.content,
        })
        .collect();
    (messages, chat.add_generation_prompt.unwrap_or(true))
}

/// Turns a `GenerateRequest` into an engine request, or INVALID_ARGUMENT naming the problem.
pub fn validate_generate(
    request: GenerateRequest,
    prompting: Prompting<'_>,
    limits: &RequestLimits,
    deadline: Option<Instant>,
    arrival: Instant,
) -> Result<GenerationRequest, Status> {
    let codec = prompting.codec;
    let invalid = |error: Invalid| Status::invalid_argument(error.0);
    check_request_id(&request.request_id, "request_id").map_err(invalid)?;
    let prompt = match request.prompt {
        Some(generate_request::Prompt::Text(text)) => {
            if text.is_empty() {
                return Err(Status::invalid_argument("prompt: text is empty"));
            }
            codec.encode(&text, true).map_err(|e| {
                Status::invalid_argument(format!("prompt: text could not be tokenized: {e}"))
            })?
        }
        Some(generate_request::Prompt::TokenIds(ids)) => ids.ids,
        Some(generate_request::Prompt::Chat(chat)) => {
            let (messages, add_generation_prompt) = conversation(chat);
            render_conversation(
                prompting.chat_template,
                prompting.model,
                &messages,
                add_generation_prompt,
                codec,
                "prompt: chat.messages",
            )
            .map_err(invalid)?
            .ids
        }
        None => {
            return Err(Status::invalid_argument(
                "prompt: set one of text, token_ids or chat",
            ));
        }
    };
    check_prompt(&prompt, limits, "prompt", "prompt: token_ids").map_err(invalid)?;
    let stopping = request.stopping.unwrap_or_default();
    let max_tokens = max_new_tokens(
        prompt.len(),
        stopping.max_tokens,
        limits,
        "stopping.max_tokens",
    )
    .map_err(invalid)?;
    check_stop_strings(&stopping.stop, "stopping.stop").map_err(invalid)?;
    check_logprobs(request.logprobs, "logprobs").map_err(invalid)?;
    let cache_salt = check_cache_salt(Some(request.cache_salt), "cache_salt").map_err(invalid)?;
    let sampling = request.sampling.unwrap_or_default();
    let params = SamplingParams {
        temperature: sampling.temperature.unwrap_or(1.0),
        top_k: sampling.top_k,
        top_p: sampling.top_p.unwrap_or(1.0),
        min_p: sampling.min_p,
        repetition_penalty: sampling.repetition_penalty.unwrap_or(1.0),
        presence_penalty: sampling.presence_penalty,
        frequency_penalty: sampling.frequency_penalty,
        seed: sampling.seed,
    };
    params
        .validate()
        .map_err(|e| Status::invalid_argument(format!("sampling.{e}")))?;
    Ok(GenerationRequest {
        request_id: request.request_id,
        prompt,
        sampling: params,
        max_tokens,
        stop: stopping.stop,
        stop_token_ids: stopping.stop_token_ids,
        ignore_eos: stopping.ignore_eos,
        logprobs: request.logprobs as usize,
        cache_salt,
        deadline,
        arrival,
    })
}

/// Runs tokenizer work on tokio's blocking pool. It costs CPU time in proportion to the input
/// (a 4 MB prompt takes about a second), and run inline it would stall every other task of the
/// runtime, the HTTP probes included, past the kubelet's 1 s probe timeout.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Status::internal(format!("the tokenizer task failed: {e}")))?
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn to_proto(request_id: &str, output: GenerationOutput) -> GenerateResponse {
    let finished = output.finished;
    GenerateResponse {
        request_id: request_id.to_owned(),
        token_ids: output.token_ids,
        text: output.text,
        logprobs: output
            .logprobs
            .into_iter()
            .map(|lp| pb::TokenLogprobs {
                token_id: lp.token,
                logprob: lp.logprob,
                top: lp
                    .top
                    .into_iter()
                    .map(|(token_id, logprob)| pb::TopLogprob { token_id, logprob })
                    .collect(),
            })
            .collect(),
        finish_reason: finished
            .as_ref()
            .map_or(pb::FinishReason::Unspecified, |f| match f.reason {
                FinishReason::Length => pb::FinishReason::Length,
                FinishReason::Stop => pb::FinishReason::Stop,
                FinishReason::Eos => pb::FinishReason::Eos,
                FinishReason::Cancelled => pb::FinishReason::Cancelled,
            }) as i32,
        usage: finished.as_ref().map(|f| pb::Usage {
            prompt_tokens: f.usage.prompt_tokens as u32,
            completion_tokens: f.usage.completion_tokens as u32,
            cached_prompt_tokens: f.usage.cached_prompt_tokens as u32,
        }),
        timings: finished.as_ref().map(|f| pb::Timings {
            queue_seconds: f.timings.queue.as_secs_f64(),
            time_to_first_token_seconds: f.timings.time_to_first_token.as_secs_f64(),
            total_seconds: f.timings.total.as_secs_f64(),
        }),
    }
}

fn generation_status(error: GenerationError) -> Status {
    match error {
        GenerationError::DeadlineExceeded { .. } => Status::deadline_exceeded(error.to_string()),
        GenerationError::TooLongForCache { .. } => Status::invalid_argument(error.to_string()),
        GenerationError::Model(_) => Status::internal(error.to_string()),
        GenerationError::Unavailable(_) => Status::unavailable(error.to_string()),
    }
}

fn submit_status(error: SubmitError) -> Status {
    match error {
        SubmitError::QueueFull { .. } => Status::resource_exhausted(error.to_string()),
        SubmitError::Draining | SubmitError::Stopped => Status::unavailable(error.to_string()),
    }
}

struct OutputStream {
    request_id: String,
    receiver: OutputReceiver,
    deadline: Option<Instant>,
    done: bool,
    /// Tokens streamed so far, for the deadline error.
    generated: usize,
    /// The request's `generate` span: what the stream logs belongs to it.
    span: tracing::Span,
}

/// The response stream: engine outputs until the finish, or DEADLINE_EXCEEDED when the client's
/// deadline passes first (dropping the receiver then cancels the request in the engine).
fn response_stream(
    state: OutputStream,
) -> impl Stream<Item = Result<GenerateResponse, Status>> + Send {
    futures::stream::unfold(state, |state| {
        let span = state.span.clone();
        next_response(state).instrument(span)
    })
}

/// The next item of a response stream, and the state for the one after.
async fn next_response(
    mut state: OutputStream,
) -> Option<(Result<GenerateResponse, Status>, OutputStream)> {
    if state.done {
        return None;
    }
    let next = match state.deadline {
        Some(deadline) => {
            match tokio::time::timeout_at(deadline.into(), state.receiver.recv()).await {
                Ok(next) => next,
                Err(_) => Some(Err(GenerationError::DeadlineExceeded {
                    generated: state.generated,
                })),
            }
        }
        None => state.receiver.recv().await,
    };
    state.done = true;
    let item = match next {
        Some(Ok(output)) => {
            state.done = output.finished.is_some();
            state.generated += output.token_ids.len();
            if let Some(finished) = &output.finished {
                tracing::debug!(
                    finish_reason = finished.reason.as_str(),
                    completion_tokens = finished.usage.completion_tokens,
                    "finished"
                );
            }
            Ok(to_proto(&state.request_id, output))
        }
        Some(Err(error)) => {
            tracing::info!(%error, "failed");
            Err(generation_status(error))
        }
        None => Err(Status::unavailable("the engine stopped")),
    };
    Some((item, state))
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let arrival = Instant::now();
        let model = self.loaded()?;
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|timeout| arrival + timeout);
        let (codec, limits, inner) = (model.codec.clone(), model.limits, request.into_inner());
        let (template, name) = (model.chat_template.clone(), model.info.model.clone());
        let request = off_runtime(move || {
            let prompting = Prompting {
                codec: codec.as_ref(),
                chat_template: template.as_deref(),
                model: &name,
            };
            validate_generate(inner, prompting, &limits, deadline, arrival)
        })
        .await?;
        let request_id = request.request_id.clone();
        let span = tracing::info_span!(
            "generate",
            request_id = %request_id,
            prompt_tokens = request.prompt.len(),
            max_tokens = request.max_tokens,
        );
        let receiver = span
            .in_scope(|| model.engine.submit(request))
            .map_err(submit_status)?;
        let stream = response_stream(OutputStream {
            request_id,
            receiver,
            deadline,
            done: false,
            generated: 0,
            span,
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let request = request.into_inner();
        let model = self.loaded()?;
        let (codec, template, name) = (
            model.codec.clone(),
            model.chat_template.clone(),
            model.info.model.clone(),
        );
        let response = off_runtime(move || match request.chat {
            Some(chat) => {
                if !request.text.is_empty() {
                    return Err(Status::invalid_argument(
                        "set either text or chat, not both",
                    ));
                }
                let (messages, add_generation_prompt) = conversation(chat);
                let prompt = render_conversation(
                    template.as_deref(),
                    &name,
                    &messages,
                    add_generation_prompt,
                    codec.as_ref(),
                    "chat.messages",
                )
                .map_err(|e| Status::invalid_argument(e.0))?;
                Ok(TokenizeResponse {
                    ids: prompt.ids,
                    prompt_text: prompt.text,
                })
            }
            None => codec
                .encode(&request.text, request.add_special_tokens)
                .map(|ids| TokenizeResponse {
                    ids,
                    prompt_text: String::new(),
                })
                .map_err(|e| Status::invalid_argument(format!("text could not be tokenized: {e}"))),
        })
        .await?;
        Ok(Response::new(response))
    }

    async fn detokenize(
        &self,
        request: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        let request = request.into_inner();
        let model = self.loaded()?;
        if let Some((index, id)) = request
            .ids
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= model.limits.vocab_size)
        {
            return Err(Status::invalid_argument(format!(
                "ids[{index}] = {id} is outside the vocabulary of {} tokens",
                model.limits.vocab_size
            )));
        }
        let codec = model.codec.clone();
        let text = off_runtime(move || {
            codec
                .decode(&request.ids, request.skip_special_tokens)
                .map_err(|e| Status::invalid_argument(format!("ids could not be decoded: {e}")))
        })
        .await?;
        Ok(Response::new(DetokenizeResponse { text }))
    }

    async fn get_model_info(
        &self,
        _: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        Ok(Response::new(self.loaded()?.info.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::codec::tests::ByteCodec;
    use crate::engine::detokenizer::{MAX_STOP_STRING_BYTES, MAX_STOP_STRINGS};
    use crate::server::validate::MAX_REQUEST_ID_BYTES;
    use latentserve_proto::v1::{SamplingParams as PbSampling, StoppingCriteria, TokenIds};

    const LIMITS: RequestLimits = RequestLimits {
        max_seq_len: 64,
        vocab_size: 300,
        cache_capacity_tokens: 1024,
    };

    fn text(prompt: &str) -> GenerateRequest {
        GenerateRequest {
            prompt: Some(generate_request::Prompt::Text(prompt.into())),
            ..GenerateRequest::default()
        }
    }

    fn check(request: GenerateRequest) -> Result<GenerationRequest, String> {
        let prompting = Prompting {
            codec: &ByteCodec,
            chat_template: None,
            model: "test",
        };
        validate_generate(request, prompting, &LIMITS, None, Instant::now()).map_err(|status| {
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            status.message().to_owned()
        })
    }

    #[test]
    fn defaults_fill_the_context() {
        let request = check(text("hello")).unwrap();
        assert_eq!(request.prompt.len(), 5);
        assert_eq!(request.max_tokens, 59);
        assert_eq!(request.sampling.temperature, 1.0);
        assert_eq!(request.sampling.top_p, 1.0);
    }

    #[test]
    fn errors_name_the_field_or_limit() {
        let cases: Vec<(GenerateRequest, &str)> = vec![
            (GenerateRequest::default(), "prompt: set one of"),
            (text(""), "prompt: text is empty"),
            (
                GenerateRequest {
                    prompt: Some(generate_request::Prompt::TokenIds(TokenIds { ids: vec![] })),
                    ..GenerateRequest::default()
                },
                "prompt: no tokens",
            ),
            (
                GenerateRequest {
                    prompt: Some(generate_request::Prompt::TokenIds(TokenIds {
                        ids: vec![1, 999],
                    })),
                    ..GenerateRequest::default()
                },
                "token_ids[1] = 999 is outside the vocabulary of 300",
            ),
            (
                GenerateRequest {
                    stopping: Some(StoppingCriteria {
                        max_tokens: Some(60),
                        ..StoppingCriteria::default()
                    }),
                    ..text("hello")
                },
                "exceeds the context limit of 64 tokens",
            ),
            (text(&"x".repeat(64)), "leave no room"),
            (
                GenerateRequest {
                    logprobs: 21,
                    ..text("hi")
                },
                "logprobs must be at most 20",
            ),
            (
                GenerateRequest {
                    sampling: Some(PbSampling {
                        top_p: Some(1.5),
                        ..PbSampling::default()
                    }),
                    ..text("hi")
                },
                "sampling.top_p must be in (0, 1]",
            ),
            (
                GenerateRequest {
                    stopping: Some(StoppingCriteria {
                        stop: vec!["ok".into(), String::new()],
                        ..StoppingCriteria::default()
                    }),
                    ..text("hi")
                },
                "stopping.stop[1] is empty",
            ),
            (
                GenerateRequest {
                    stopping: Some(StoppingCriteria {
                        stop: vec!["s".into(); MAX_STOP_STRINGS + 1],
                        ..StoppingCriteria::default()
                    }),
                    ..text("hi")
                },
                "stopping.stop has 17 strings; at most 16",
            ),
            (
                GenerateRequest {
                    stopping: Some(StoppingCriteria {
                        stop: vec!["ok".into(), "y".repeat(MAX_STOP_STRING_BYTES + 1)],
                        ..StoppingCriteria::default()
                    }),
                    ..text("hi")
                },
                "stopping.stop[1] is 257 bytes; at most 256",
            ),
            (
                GenerateRequest {
                    request_id: "x".repeat(MAX_REQUEST_ID_BYTES + 1),
                    ..text("hi")
                },
                "request_id is 257 bytes; at most 256",
            ),
        ];
        for (request, expected) in cases {
            let message = check(request).unwrap_err();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("10u"), Some(Duration::from_micros(10)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[tokio::test]
    async fn the_deadline_error_counts_the_tokens_already_streamed() {
        use futures::StreamExt;

        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        for token in [7, 8] {
            sender
                .send(Ok(GenerationOutput {
                    token_ids: vec![token],
                    ..GenerationOutput::default()
                }))
                .unwrap();
        }
        let stream = response_stream(OutputStream {
            request_id: String::new(),
            receiver,
            deadline: Some(Instant::now() + Duration::from_millis(50)),
            done: false,
            generated: 0,
            span: tracing::Span::none(),
        });
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 3, "two tokens, then the deadline");
        let status = items[2].as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(
            status.message().contains("after 2 generated tokens"),
            "{}",
            status.message()
        );
        drop(sender);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tokenizer_work_leaves_the_runtime_free() {
        use std::sync::atomic::{AtomicBool, Ordering};

        // The work waits (bounded) for a flag that only another task of this one-thread runtime
        // can set: run inline, it would hold the only thread and never see the flag.
        let released = Arc::new(AtomicBool::new(false));
        let seen = released.clone();
        let work = off_runtime(move || {
            let until = Instant::now() + Duration::from_secs(10);
            while !seen.load(Ordering::SeqCst) {
                if Instant::now() > until {
                    return Err(Status::internal("the runtime never ran the other task"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(42)
        });
        let release = async {
            tokio::task::yield_now().await;
            released.store(true, Ordering::SeqCst);
        };
        let (result, ()) = tokio::join!(work, release);
        assert_eq!(result.unwrap(), 42);
    }
}
