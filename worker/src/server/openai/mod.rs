//! OpenAI's HTTP API over the same engine as gRPC: `/v1/completions`, `/v1/chat/completions`
//! (whole answers or server-sent events), `/v1/models` and `/health`.
//!
//! - [`protocol`]: the JSON shapes; [`translate`]: request -> engine requests (every check);
//! - [`respond`]: engine outputs -> answers and stream chunks; [`error`]: OpenAI's error shape.
//!
//! A request with `n` choices (or several prompts) becomes one engine request per choice; they
//! share the prompt's cache blocks through the prefix cache. A dropped connection drops the
//! engine receivers, which cancels the generations.

pub mod error;
pub mod protocol;
pub mod respond;
pub mod translate;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tracing::Instrument;

use self::error::ApiError;
use self::protocol::{ModelCard, ModelList, WithSampling};
use self::respond::{ChoiceResult, Header, StreamWriter, UsageTally};
use self::translate::{Context, Plan};
use super::LoadedModel;
use crate::engine::request::OutputReceiver;

/// Largest request body: a prompt of a few million characters, with room for its JSON.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// Events a stream may hold for a slow client before the engine's outputs wait for it.
const STREAM_BUFFER: usize = 64;

#[derive(Clone)]
struct ApiState {
    loaded: Arc<OnceLock<LoadedModel>>,
    ready: Arc<AtomicBool>,
    /// When the server started, as `/v1/models` reports `created`.
    started: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// The routes of the OpenAI port. Inference answers 503 until `loaded` is set, and while
/// draining; `/health` follows `ready`, like the gRPC health service.
pub fn router(loaded: Arc<OnceLock<LoadedModel>>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(ApiState {
            loaded,
            ready,
            started: unix_now(),
        })
}

impl ApiState {
    fn model(&self) -> Result<&LoadedModel, ApiError> {
        self.loaded
            .get()
            .ok_or_else(|| ApiError::unavailable("the model is still loading"))
    }
}

async fn health(State(state): State<ApiState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn models(State(state): State<ApiState>) -> Result<Json<ModelList>, ApiError> {
    let model = state.model()?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: model.info.model.clone(),
            object: "model",
            created: state.started,
            owned_by: "latentserve",
            max_model_len: model.limits.context(),
        }],
    }))
}

/// Parses a body, naming the field at fault (`temperature: invalid type: ...`): the request's own
/// fields, then the shared sampling fields from the same JSON.
fn parse_body<T: DeserializeOwned + WithSampling>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| ApiError {
        status: rejection.status(),
        message: format!(
            "{} (the body limit is {MAX_BODY_BYTES} bytes)",
            rejection.body_text()
        ),
        param: None,
    })?;
    parse_json(&bytes)
}

/// A request body as the handlers read it: JSON, an object, the request's own fields and then
/// the shared sampling fields, errors naming the field. Public for the fuzz targets.
pub fn parse_json<T: DeserializeOwned + WithSampling>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_body(format!("the body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_body("the body must be a JSON object"));
    }
    let mut request: T = from_value(&value)?;
    request.set_sampling(from_value(&value)?);
    Ok(request)
}

fn from_value<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let field = path.split(['.', '[']).next().unwrap_or_default().to_owned();
        ApiError::invalid(field, format!("{path}: {}", error.inner()))
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

async fn completions(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(state, body, Endpoint::Completions).await
}

async fn chat_completions(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(state, body, Endpoint::Chat).await
}

async fn serve(
    state: ApiState,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Response {
    let arrival = Instant::now();
    let id = format!("{}-{:032x}", endpoint.id_prefix(), rand::random::<u128>());
    let span = tracing::info_span!("openai", path = endpoint.path(), id = %id);
    match generate(state, body, endpoint, id, arrival)
        .instrument(span.clone())
        .await
    {
        Ok(response) => response,
        Err(error) => {
            span.in_scope(
                || tracing::info!(status = %error.status, error = %error.message, "refused"),
            );
            error.into_response()
        }
    }
}

async fn generate(
    state: ApiState,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
    id: String,
    arrival: Instant,
) -> Result<Response, ApiError> {
    let model = state.model()?;
    if model.engine.is_draining() {
        return Err(ApiError::unavailable(
            "the server is draining and accepts no new requests",
        ));
    }
    let codec = model.codec.clone();
    let template = model.chat_template.clone();
    let limits = model.limits;
    let served = model.info.model.clone();
    let plan_id = id.clone();
    // Parsing and tokenizing cost CPU time in proportion to the body: off the async runtime.
    let plan = tokio::task::spawn_blocking(move || -> Result<Plan, ApiError> {
        let context = Context {
            codec: codec.as_ref(),
            limits: &limits,
            model: &served,
            chat_template: template.as_deref(),
            id: &plan_id,
            arrival,
        };
        match endpoint {
            Endpoint::Completions => translate::completion(parse_body(body)?, &context),
            Endpoint::Chat => translate::chat_completion(parse_body(body)?, &context),
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("the request task failed: {e}")))??;

    let choices = plan.requests.len();
    tracing::debug!(
        choices,
        prompt_tokens = plan.requests.first().map_or(0, |r| r.prompt.len()),
        stream = plan.stream,
        "accepted"
    );
    let mut receivers = Vec::with_capacity(choices);
    for request in plan.requests {
        // On a refusal the receivers already made are dropped, which cancels them.
        receivers.push(model.engine.submit(request)?);
    }
    let header = Header {
        id,
        created: unix_now(),
        model: model.info.model.clone(),
    };
    let chat = endpoint == Endpoint::Chat;
    if plan.stream {
        let writer = StreamWriter::new(
            header,
            chat,
            plan.logprobs,
            plan.include_usage,
            choices,
            plan.n,
            plan.echo,
        );
        return Ok(stream_response(receivers, writer, model.codec.clone()));
    }
    let mut results = vec![ChoiceResult::default(); choices];
    let mut usage = UsageTally::new(choices, plan.n);
    for (index, mut receiver) in receivers.into_iter().enumerate() {
        loop {
            match receiver.recv().await {
                Some(Ok(output)) => {
                    let finished = output.finished.as_ref().map(|f| f.usage);
                    results[index].push(output);
                    if let Some(finished) = finished {
                        usage.record(index, finished);
                        break;
                    }
                }
                Some(Err(error)) => return Err(error.into()),
                None => return Err(ApiError::unavailable("the engine stopped")),
            }
        }
    }
    let codec = model.codec.as_ref();
    let response = if chat {
        Json(respond::chat_response(
            &header,
            results,
            plan.logprobs,
            usage.total(),
            codec,
        ))
        .into_response()
    } else {
        Json(respond::completion_response(
            &header,
            results,
            &plan.echo,
            plan.n,
            plan.logprobs,
            usage.total(),
            codec,
        ))
        .into_response()
    };
    tracing::debug!("finished");
    Ok(response)
}

/// Server-sent events: a task merges the choices' outputs into chunks and ends with
/// `data: [DONE]`. When the client goes away the event channel closes, the task ends and drops
/// the engine receivers, which cancels the generations.
fn stream_response(
    receivers: Vec<OutputReceiver>,
    mut writer: StreamWriter,
    codec: Arc<dyn crate::engine::codec::TokenCodec>,
) -> Response {
    let (events, outgoing) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(STREAM_BUFFER);
    let choices = receivers.len();
    let mut merged =
        futures::stream::select_all(receivers.into_iter().enumerate().map(|(index, receiver)| {
            UnboundedReceiverStream::new(receiver)
                .map(move |item| (index, Some(item)))
                // A stream that ends says so, so that an engine that stops is an error, not a hang.
                .chain(futures::stream::once(async move { (index, None) }))
                .boxed()
        }));
    let pump = async move {
        let send = |payload: String| {
            let events = events.clone();
            async move {
                events
                    .send(Ok(Event::default().data(payload)))
                    .await
                    .is_ok()
            }
        };
        for chunk in writer.opening() {
            if !send(chunk).await {
                return;
            }
        }
        let mut done = vec![false; choices];
        let mut failed = None;
        while done.iter().any(|d| !d) {
            let Some((index, item)) = merged.next().await else {
                break;
            };
            let chunks = match item {
                Some(Ok(output)) => {
                    done[index] |= output.finished.is_some();
                    writer.output(index, output, codec.as_ref())
                }
                Some(Err(error)) => {
                    failed = Some(ApiError::from(error));
                    break;
                }
                // A receiver that ends before its finish: the engine stopped.
                None if !done[index] => {
                    failed = Some(ApiError::unavailable("the engine stopped"));
                    break;
                }
                None => continue,
            };
            for chunk in chunks {
                if !send(chunk).await {
                    tracing::debug!("the client went away");
                    return;
                }
            }
        }
        match failed {
            Some(error) => {
                tracing::info!(error = %error.message, "failed");
                let _ = send(error.body().to_string()).await;
            }
            None => tracing::debug!("finished"),
        }
        let _ = send("[DONE]".to_owned()).await;
    };
    tokio::spawn(pump.in_current_span());
    Sse::new(ReceiverStream::new(outgoing)).into_response()
}
