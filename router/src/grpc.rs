//! `latentserve.v1.Inference` in front of the workers: each `Generate` goes to the endpoint the
//! policy picks; one that fails before its first message is retried on the next (within the
//! client's deadline), after the first message the worker's stream is the client's.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt as _};
use latentserve_proto::v1::inference_client::InferenceClient;
use latentserve_proto::v1::inference_server::Inference;
use latentserve_proto::v1::{
    DetokenizeRequest, DetokenizeResponse, GenerateRequest, GenerateResponse, GetModelInfoRequest,
    ModelInfo, TokenizeRequest, TokenizeResponse,
};
use tonic::{Code, Request, Response, Status};

use crate::hold::HoldError;
use crate::pool::{Endpoint, Pool};
use crate::prefix::{RouteKey, generate_fallback};

/// Endpoints one request tries before the router gives up.
pub const MAX_ATTEMPTS: usize = 3;

/// The router's gRPC inference service.
pub struct RouterService {
    pool: Arc<Pool>,
}

impl RouterService {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self { pool }
    }
}

/// Whether a worker's answer means "try another worker": it could not take the request at all
/// (unreachable, loading, draining, queue full, shard lost), as opposed to refusing the request.
pub fn worth_retrying(status: &Status) -> Option<&'static str> {
    match status.code() {
        Code::Unavailable => Some("unavailable"),
        Code::ResourceExhausted => Some("queue_full"),
        // Workers never answer UNKNOWN themselves: it is the transport's (a connection refused,
        // reset, or torn down by a worker that died before its first message).
        Code::Unknown => Some("transport"),
        _ => None,
    }
}

/// An error after the first message: the worker's own status as it is, a broken connection as
/// UNAVAILABLE that says what happened (the tokens so far were delivered; the request is not
/// retried, since the client has seen part of the answer).
fn lost_mid_stream(status: Status, endpoint: &Endpoint) -> Status {
    if status.code() != Code::Unknown {
        return status;
    }
    endpoint.mark_failed();
    Status::unavailable(format!(
        "the worker serving this request failed after it had started answering ({}); the tokens sent so far are all there is: retry the request",
        status.message()
    ))
}

/// The client's deadline, from its `grpc-timeout` header.
fn deadline_of<T>(request: &Request<T>, arrival: Instant) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Some(arrival + timeout)
}

/// A copy of the client's request for one upstream attempt: the same message, the remaining
/// deadline, and the metadata a worker reads (never the hop-by-hop headers).
fn upstream<T: Clone>(
    message: &T,
    metadata: &tonic::metadata::MetadataMap,
    deadline: Option<Instant>,
) -> Result<Request<T>, Status> {
    let mut request = Request::new(message.clone());
    for key in ["x-request-id", "traceparent", "tracestate", "authorization"] {
        if let Some(value) = metadata.get(key) {
            request.metadata_mut().insert(key, value.clone());
        }
    }
    if let Some(deadline) = deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Status::deadline_exceeded(
                "the deadline passed before a worker could take the request",
            ));
        }
        request.set_timeout(left);
    }
    Ok(request)
}

fn no_endpoint() -> Status {
    Status::unavailable(HoldError::Off.to_string())
}

/// The status of a request that found no usable worker and was not (or no longer) held.
fn not_held(err: &HoldError) -> Status {
    let message = err.to_string();
    match err {
        HoldError::Off | HoldError::TimedOut(_) => Status::unavailable(message),
        HoldError::Full { .. } => Status::resource_exhausted(message),
        HoldError::Deadline => Status::deadline_exceeded(message),
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for RouterService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let arrival = Instant::now();
        let deadline = deadline_of(&request, arrival);
        let metadata = request.metadata().clone();
        let message = request.into_inner();
        let metrics = self.pool.metrics().clone();
        // Held before keying: at zero the prompt files arrive with the first worker.
        let held_since = match self.pool.wait_for_endpoint(arrival, deadline).await {
            Ok(held) => held.then_some(arrival),
            Err(err) => {
                metrics
                    .requests
                    .with_label_values(&["grpc", "none", "none", "unavailable"])
                    .inc();
                return Err(not_held(&err));
            }
        };
        let routed = Instant::now();
        let key = route_key(&self.pool, &message).await;
        let Some(route) = self.pool.route(&key) else {
            metrics
                .requests
                .with_label_values(&["grpc", "none", "none", "unavailable"])
                .inc();
            return Err(no_endpoint());
        };
        let block_size = self.pool.prompter().map_or(0, |p| p.block_size());
        metrics
            .prefix_match_tokens
            .with_label_values(&["grpc"])
            .observe((route.matched_blocks * block_size) as f64);
        let reason = route.reason.as_str();
        let mut last_error = no_endpoint();
        for endpoint in route.endpoints.iter().take(MAX_ATTEMPTS) {
            let upstream_request = upstream(&message, &metadata, deadline)?;
            let in_flight = endpoint.begin(&key, &metrics);
            metrics
                .queue_seconds
                .with_label_values(&["grpc"])
                .observe(routed.elapsed().as_secs_f64());
            let sent = Instant::now();
            match first_message(endpoint, upstream_request).await {
                Ok((first, rest)) => {
                    in_flight.answered();
                    endpoint.mark_ok();
                    if first.is_some() {
                        self.pool.first_token(endpoint, routed, held_since);
                    }
                    metrics
                        .upstream_seconds
                        .with_label_values(&["grpc"])
                        .observe(sent.elapsed().as_secs_f64());
                    let name = endpoint.name().to_owned();
                    let counted = metrics.clone();
                    let mut outcome = Outcome::new(counted, name, reason);
                    let stream =
                        futures::stream::iter(first.map(Ok))
                            .chain(rest)
                            .map(move |item| {
                                // The guard lives as long as the client reads the stream.
                                outcome.see(&item);
                                item.map_err(|status| lost_mid_stream(status, in_flight.endpoint()))
                            });
                    return Ok(Response::new(Box::pin(stream)));
                }
                Err(status) => match worth_retrying(&status) {
                    Some(why) => {
                        tracing::debug!(endpoint = %endpoint.name(), %status, "retrying on another worker");
                        endpoint.mark_failed();
                        metrics.retries.with_label_values(&["grpc", why]).inc();
                        last_error = status;
                    }
                    None => {
                        metrics
                            .requests
                            .with_label_values(&["grpc", endpoint.name(), reason, "error"])
                            .inc();
                        return Err(status);
                    }
                },
            }
        }
        metrics
            .requests
            .with_label_values(&["grpc", "none", reason, "unavailable"])
            .inc();
        Err(last_error)
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let pool = self.pool.clone();
        any_worker(&pool, request, |channel, request| async move {
            InferenceClient::new(channel).tokenize(request).await
        })
        .await
    }

    async fn detokenize(
        &self,
        request: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        let pool = self.pool.clone();
        any_worker(&pool, request, |channel, request| async move {
            InferenceClient::new(channel).detokenize(request).await
        })
        .await
    }

    async fn get_model_info(
        &self,
        request: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        let pool = self.pool.clone();
        any_worker(&pool, request, |channel, request| async move {
            InferenceClient::new(channel).get_model_info(request).await
        })
        .await
    }
}

/// The request's routing key; long prompts are keyed off the async runtime.
async fn route_key(pool: &Pool, request: &GenerateRequest) -> RouteKey {
    let Some(prompter) = pool.prompter().cloned() else {
        return generate_fallback(request);
    };
    let size = match &request.prompt {
        Some(latentserve_proto::v1::generate_request::Prompt::Text(text)) => text.len(),
        Some(latentserve_proto::v1::generate_request::Prompt::Chat(chat)) => {
            chat.messages.iter().map(|m| m.content.len()).sum()
        }
        _ => 0,
    };
    if size < INLINE_KEY_BYTES {
        return prompter.key_for_generate(request);
    }
    let request = request.clone();
    tokio::task::spawn_blocking(move || prompter.key_for_generate(&request))
        .await
        .unwrap_or_default()
}

/// Prompts up to this size are tokenized on the async runtime (well under a millisecond).
pub const INLINE_KEY_BYTES: usize = 8 << 10;

/// Calls `Generate` and waits for its first message, so that a worker that fails before
/// answering can be replaced. `Ok((None, _))`: the stream ended without a message.
async fn first_message(
    endpoint: &Endpoint,
    request: Request<GenerateRequest>,
) -> Result<(Option<GenerateResponse>, tonic::Streaming<GenerateResponse>), Status> {
    let mut stream = InferenceClient::new(endpoint.channel())
        .generate(request)
        .await?
        .into_inner();
    let first = stream.message().await?;
    Ok((first, stream))
}

/// Sends a unary call to the least-loaded usable worker (held while there is none), retrying on
/// others when one cannot take it.
async fn any_worker<T, R, F, Fut>(
    pool: &Pool,
    request: Request<T>,
    call: F,
) -> Result<Response<R>, Status>
where
    T: Clone,
    F: Fn(tonic::transport::Channel, Request<T>) -> Fut,
    Fut: std::future::Future<Output = Result<Response<R>, Status>>,
{
    let arrival = Instant::now();
    let deadline = deadline_of(&request, arrival);
    let metadata = request.metadata().clone();
    let message = request.into_inner();
    // Held like Generate: a client's first call at zero may well be GetModelInfo.
    pool.wait_for_endpoint(arrival, deadline)
        .await
        .map_err(|err| not_held(&err))?;
    let mut last_error = no_endpoint();
    for endpoint in pool.least_loaded().iter().take(MAX_ATTEMPTS) {
        match call(endpoint.channel(), upstream(&message, &metadata, deadline)?).await {
            Ok(response) => {
                endpoint.mark_ok();
                return Ok(Response::new(response.into_inner()));
            }
            Err(status) if worth_retrying(&status).is_some() => {
                endpoint.mark_failed();
                last_error = status;
            }
            Err(status) => return Err(status),
        }
    }
    Err(last_error)
}

/// Counts a streamed request once, by how it ended.
struct Outcome {
    metrics: Arc<crate::metrics::RouterMetrics>,
    endpoint: String,
    reason: &'static str,
    done: bool,
}

impl Outcome {
    fn new(
        metrics: Arc<crate::metrics::RouterMetrics>,
        endpoint: String,
        reason: &'static str,
    ) -> Self {
        Self {
            metrics,
            endpoint,
            reason,
            done: false,
        }
    }

    fn see(&mut self, item: &Result<GenerateResponse, Status>) {
        match item {
            Ok(message) if message.finish_reason != 0 => self.finish("ok"),
            Ok(_) => {}
            Err(_) => self.finish("error"),
        }
    }

    fn finish(&mut self, outcome: &str) {
        if !self.done {
            self.done = true;
            self.metrics
                .requests
                .with_label_values(&["grpc", &self.endpoint, self.reason, outcome])
                .inc();
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.finish("cancelled");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_follow_the_grpc_timeout_header() {
        let now = Instant::now();
        let mut request = Request::new(());
        assert_eq!(deadline_of(&request, now), None);
        for (header, expected) in [
            ("5S", Duration::from_secs(5)),
            ("250m", Duration::from_millis(250)),
            ("2M", Duration::from_secs(120)),
            ("7u", Duration::from_micros(7)),
        ] {
            request
                .metadata_mut()
                .insert("grpc-timeout", header.parse().unwrap());
            assert_eq!(deadline_of(&request, now), Some(now + expected), "{header}");
        }
        request
            .metadata_mut()
            .insert("grpc-timeout", "soon".parse().unwrap());
        assert_eq!(deadline_of(&request, now), None);
    }

    #[test]
    fn only_answers_that_say_the_worker_could_not_take_the_request_are_retried() {
        assert!(worth_retrying(&Status::unavailable("draining")).is_some());
        assert!(worth_retrying(&Status::resource_exhausted("queue full")).is_some());
        assert!(worth_retrying(&Status::invalid_argument("prompt")).is_none());
        assert!(worth_retrying(&Status::internal("step failed")).is_none());
        assert!(worth_retrying(&Status::deadline_exceeded("late")).is_none());
        // What a worker that dies before its first message leaves behind.
        let broken = Status::unknown("h2 protocol error: error reading a body from connection");
        assert_eq!(worth_retrying(&broken), Some("transport"));
    }

    #[test]
    fn a_request_not_held_gets_the_status_that_says_why() {
        let cases = [
            (HoldError::Off, Code::Unavailable),
            (HoldError::Full { capacity: 8 }, Code::ResourceExhausted),
            (
                HoldError::TimedOut(Duration::from_secs(300)),
                Code::Unavailable,
            ),
            (HoldError::Deadline, Code::DeadlineExceeded),
        ];
        for (err, code) in cases {
            assert_eq!(not_held(&err).code(), code, "{err}");
        }
        assert!(
            not_held(&HoldError::Full { capacity: 8 })
                .message()
                .contains("--hold-queue")
        );
    }

    #[test]
    fn a_passed_deadline_is_not_sent_on() {
        let metadata = tonic::metadata::MetadataMap::new();
        let past = Instant::now() - Duration::from_millis(1);
        let err = upstream(&(), &metadata, Some(past)).unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded);
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("x-request-id", "abc".parse().unwrap());
        metadata.insert("te", "trailers".parse().unwrap());
        let request = upstream(&(), &metadata, None).unwrap();
        assert_eq!(request.metadata().get("x-request-id").unwrap(), "abc");
        assert!(request.metadata().get("te").is_none());
    }
}
