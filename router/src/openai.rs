//! The OpenAI-compatible API in front of the workers' own: completions and chat completions are
//! routed like gRPC `Generate` (the body is read once, keyed, and sent on unchanged); a worker
//! that cannot take a request (unreachable, 503, 429) before answering is replaced by the next.
//! The answer, streamed or whole, is passed through as the worker writes it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

use crate::grpc::MAX_ATTEMPTS;
use crate::hold::HoldError;
use crate::pool::{Endpoint, InFlight, Pool};
use crate::prefix::{RouteKey, openai_fallback};

/// The largest request body, as on the workers.
pub const MAX_BODY_BYTES: usize = latentserve_worker::server::openai::MAX_BODY_BYTES;

/// Request headers passed on to the worker.
const FORWARDED_HEADERS: &[header::HeaderName] = &[
    header::CONTENT_TYPE,
    header::ACCEPT,
    header::AUTHORIZATION,
    header::USER_AGENT,
];

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Clone)]
struct Proxy {
    pool: Arc<Pool>,
    client: HttpClient,
    ready: Arc<AtomicBool>,
}

/// The router's OpenAI API; `ready` false answers 503 (draining).
pub fn router(pool: Arc<Pool>, ready: Arc<AtomicBool>) -> Router {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(crate::pool::CONNECT_TIMEOUT));
    let client = Client::builder(TokioExecutor::new()).build(connector);
    let proxy = Proxy {
        pool,
        client,
        ready,
    };
    Router::new()
        .route("/v1/completions", post(generate))
        .route("/v1/chat/completions", post(generate))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(proxy)
}

/// OpenAI's error shape.
fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}

/// The answer to a request that found no usable worker and was not (or no longer) held.
fn not_held(err: &HoldError) -> Response {
    match err {
        HoldError::Full { .. } => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                err.to_string(),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        HoldError::Off | HoldError::TimedOut(_) | HoldError::Deadline => {
            unavailable(&err.to_string())
        }
    }
}

fn unavailable(message: &str) -> Response {
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        message,
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

async fn not_found(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("{} is not served (see docs/openai-api.md)", uri.path()),
    )
}

async fn health(State(proxy): State<Proxy>) -> Response {
    if proxy.ready.load(Ordering::SeqCst) {
        StatusCode::OK.into_response()
    } else {
        unavailable("the router is draining")
    }
}

/// Whether a worker's answer means "try another worker" (it did not start on the request).
fn worth_retrying(status: StatusCode) -> Option<&'static str> {
    match status {
        StatusCode::SERVICE_UNAVAILABLE => Some("unavailable"),
        StatusCode::TOO_MANY_REQUESTS => Some("queue_full"),
        _ => None,
    }
}

async fn generate(
    State(proxy): State<Proxy>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrival = Instant::now();
    if !proxy.ready.load(Ordering::SeqCst) {
        return unavailable("the router is draining");
    }
    let metrics = proxy.pool.metrics().clone();
    // Held before keying: at zero the prompt files arrive with the first worker. HTTP clients
    // send no deadline; --hold-timeout bounds the wait.
    let held_since = match proxy.pool.wait_for_endpoint(arrival, None).await {
        Ok(held) => held.then_some(arrival),
        Err(err) => {
            metrics
                .requests
                .with_label_values(&["openai", "none", "none", "unavailable"])
                .inc();
            return not_held(&err);
        }
    };
    let routed = Instant::now();
    let key = route_key(&proxy.pool, &body).await;
    let Some(route) = proxy.pool.route(&key) else {
        metrics
            .requests
            .with_label_values(&["openai", "none", "none", "unavailable"])
            .inc();
        return unavailable(&HoldError::Off.to_string());
    };
    let block_size = proxy.pool.prompter().map_or(0, |p| p.block_size());
    metrics
        .prefix_match_tokens
        .with_label_values(&["openai"])
        .observe((route.matched_blocks * block_size) as f64);
    let reason = route.reason.as_str();
    let mut last: Option<Response> = None;
    let with_openai = route.endpoints.iter().filter(|e| e.addr.openai.is_some());
    for endpoint in with_openai.take(MAX_ATTEMPTS) {
        let in_flight = endpoint.begin(&key, &metrics);
        metrics
            .queue_seconds
            .with_label_values(&["openai"])
            .observe(routed.elapsed().as_secs_f64());
        let sent = Instant::now();
        match forward(
            &proxy.client,
            endpoint,
            &method,
            &uri,
            &headers,
            body.clone(),
        )
        .await
        {
            Ok(response) => {
                metrics
                    .upstream_seconds
                    .with_label_values(&["openai"])
                    .observe(sent.elapsed().as_secs_f64());
                if let Some(why) = worth_retrying(response.status()) {
                    endpoint.mark_failed();
                    metrics.retries.with_label_values(&["openai", why]).inc();
                    last = Some(passthrough(response, None));
                    continue;
                }
                if !response.status().is_success() {
                    // The worker's refusal of the request itself: the client's answer.
                    endpoint.mark_ok();
                    metrics
                        .requests
                        .with_label_values(&["openai", endpoint.name(), reason, "error"])
                        .inc();
                    return passthrough(response, Some(in_flight));
                }
                // Wait for the first chunk (the first token of a stream, or the whole answer):
                // a worker that dies before it is still replaced by the next.
                let (parts, mut body) = response.into_parts();
                match body.frame().await {
                    Some(Err(err)) => {
                        tracing::debug!(endpoint = %endpoint.name(), error = %err, "retrying on another worker");
                        endpoint.mark_failed();
                        metrics
                            .retries
                            .with_label_values(&["openai", "transport"])
                            .inc();
                        continue;
                    }
                    first => {
                        in_flight.answered();
                        endpoint.mark_ok();
                        metrics
                            .requests
                            .with_label_values(&["openai", endpoint.name(), reason, "ok"])
                            .inc();
                        let first = first.and_then(Result::ok);
                        let mut probe = None;
                        if is_event_stream(&parts.headers) {
                            let mut watch = TokenProbe::new(
                                uri.path() == "/v1/chat/completions",
                                FirstToken {
                                    pool: proxy.pool.clone(),
                                    endpoint: endpoint.clone(),
                                    routed,
                                    held_since,
                                },
                            );
                            if let Some(data) = first.as_ref().and_then(Frame::data_ref) {
                                watch.see(data);
                            }
                            probe = Some(watch);
                        } else if let Some(arrival) = held_since {
                            // A whole answer: its first token is not visible, the answer is.
                            metrics
                                .cold_start_seconds
                                .observe(arrival.elapsed().as_secs_f64());
                        }
                        let response = hyper::Response::from_parts(parts, body);
                        return passthrough_from(response, first, Some(in_flight), probe);
                    }
                }
            }
            Err(err) => {
                tracing::debug!(endpoint = %endpoint.name(), error = %err, "retrying on another worker");
                endpoint.mark_failed();
                metrics
                    .retries
                    .with_label_values(&["openai", "connect"])
                    .inc();
            }
        }
    }
    metrics
        .requests
        .with_label_values(&["openai", "none", reason, "unavailable"])
        .inc();
    last.unwrap_or_else(|| unavailable("no worker could take the request; retry later"))
}

async fn route_key(pool: &Pool, body: &Bytes) -> RouteKey {
    let Some(prompter) = pool.prompter().cloned() else {
        return openai_fallback(body);
    };
    if body.len() < crate::grpc::INLINE_KEY_BYTES {
        return prompter.key_for_openai(body);
    }
    let body = body.clone();
    tokio::task::spawn_blocking(move || prompter.key_for_openai(&body))
        .await
        .unwrap_or_default()
}

async fn models(
    State(proxy): State<Proxy>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    // Held like completions: a client's first call at zero may well list the models.
    if let Err(err) = proxy.pool.wait_for_endpoint(Instant::now(), None).await {
        return not_held(&err);
    }
    for endpoint in proxy
        .pool
        .least_loaded()
        .iter()
        .filter(|e| e.addr.openai.is_some())
        .take(MAX_ATTEMPTS)
    {
        match forward(
            &proxy.client,
            endpoint,
            &method,
            &uri,
            &headers,
            Bytes::new(),
        )
        .await
        {
            Ok(response) if worth_retrying(response.status()).is_none() => {
                return passthrough(response, None);
            }
            _ => endpoint.mark_failed(),
        }
    }
    unavailable("no worker is ready; retry later")
}

async fn forward(
    client: &HttpClient,
    endpoint: &Endpoint,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<hyper::Response<Incoming>, hyper_util::client::legacy::Error> {
    let authority = endpoint.addr.openai.as_deref().unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = hyper::Request::builder()
        .method(method.clone())
        .uri(format!("http://{authority}{path}"));
    for name in FORWARDED_HEADERS {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value);
        }
    }
    let request = request
        .body(Full::new(body))
        .expect("a request of valid parts builds");
    client.request(request).await
}

/// The worker's answer as the client's, its body streamed; the request counts as in flight on
/// the worker until the body has been read or dropped.
fn passthrough(response: hyper::Response<Incoming>, in_flight: Option<InFlight>) -> Response {
    passthrough_from(response, None, in_flight, None)
}

/// Whether a worker's answer is streamed (server-sent events).
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"))
}

/// Where a streamed request's first token is recorded (the group's TTFT, a cold start).
struct FirstToken {
    pool: Arc<Pool>,
    endpoint: Arc<Endpoint>,
    routed: Instant,
    held_since: Option<Instant>,
}

/// Finds the first token of a streamed answer in its server-sent events as they pass: the first
/// event of a completion stream, the second of a chat stream (its first announces the role).
struct TokenProbe {
    /// Events that come before the first token's.
    skip: usize,
    /// Events seen whole.
    events: usize,
    /// The last byte seen ended a line (an event ends with an empty line, which may start in the
    /// next frame).
    newline: bool,
    first_token: Option<FirstToken>,
}

impl TokenProbe {
    fn new(chat: bool, first_token: FirstToken) -> Self {
        Self {
            skip: usize::from(chat),
            events: 0,
            newline: false,
            first_token: Some(first_token),
        }
    }

    /// Reads a body frame's bytes; records the first token when its event is complete.
    fn see(&mut self, data: &[u8]) {
        if self.first_token.is_none() {
            return;
        }
        for &byte in data {
            match byte {
                b'\n' if self.newline => {
                    self.newline = false;
                    self.events += 1;
                    if self.events > self.skip {
                        if let Some(first) = self.first_token.take() {
                            first
                                .pool
                                .first_token(&first.endpoint, first.routed, first.held_since);
                        }
                        return;
                    }
                }
                b'\n' => self.newline = true,
                b'\r' => {}
                _ => self.newline = false,
            }
        }
    }
}

/// [`passthrough`] of a response whose first body frame has been read already.
fn passthrough_from(
    response: hyper::Response<Incoming>,
    first: Option<Frame<Bytes>>,
    in_flight: Option<InFlight>,
    probe: Option<TokenProbe>,
) -> Response {
    let (parts, body) = response.into_parts();
    let mut out = Response::new(Body::new(Guarded {
        first,
        inner: body,
        _in_flight: in_flight,
        probe,
    }));
    *out.status_mut() = parts.status;
    for name in [
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        header::RETRY_AFTER,
    ] {
        if let Some(value) = parts.headers.get(&name) {
            out.headers_mut().insert(name, value.clone());
        }
    }
    out
}

/// A worker's response body (after its `first` frame, when that was read to see the worker
/// answer) that holds the request's [`InFlight`] guard.
struct Guarded {
    first: Option<Frame<Bytes>>,
    inner: Incoming,
    _in_flight: Option<InFlight>,
    /// Looks for the first token of a streamed answer.
    probe: Option<TokenProbe>,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Some(probe), Poll::Ready(Some(Ok(frame)))) = (&mut this.probe, &polled)
            && let Some(data) = frame.data_ref()
        {
            probe.see(data);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.first {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_that_say_the_worker_could_not_start_are_retried() {
        assert!(worth_retrying(StatusCode::SERVICE_UNAVAILABLE).is_some());
        assert!(worth_retrying(StatusCode::TOO_MANY_REQUESTS).is_some());
        assert!(worth_retrying(StatusCode::BAD_REQUEST).is_none());
        assert!(worth_retrying(StatusCode::INTERNAL_SERVER_ERROR).is_none());
        assert!(worth_retrying(StatusCode::OK).is_none());
    }

    #[tokio::test]
    async fn the_first_token_of_a_stream_is_its_first_event_or_a_chats_second() {
        use crate::hold::HoldConfig;
        use crate::metrics::RouterMetrics;
        use crate::policy::Policy;
        use crate::pool::EndpointAddr;

        let metrics = Arc::new(RouterMetrics::new().unwrap());
        let pool = Pool::new(Policy::PrefixAware, HoldConfig::default(), metrics);
        pool.set_endpoints([EndpointAddr {
            grpc: "127.0.0.1:1".into(),
            openai: Some("127.0.0.1:2".into()),
            group: "demo-0".into(),
        }]);
        let samples = || pool.signal().groups[0].ttft_samples;
        let first_token = || FirstToken {
            pool: pool.clone(),
            endpoint: pool.endpoints()[0].clone(),
            routed: Instant::now(),
            held_since: None,
        };
        // Chat: the role announcement, then the first token's event, split across frames.
        let mut chat = TokenProbe::new(true, first_token());
        chat.see(b"data: {\"role\":\"assistant\"}\n\n");
        chat.see(b"data: {\"content\":\"Hel\"}\n");
        assert_eq!(samples(), 0);
        chat.see(b"\ndata: {\"content\":\"lo\"}\n\n");
        assert_eq!(samples(), 1, "one sample per request");
        let mut completion = TokenProbe::new(false, first_token());
        completion.see(b"data: {\"text\":\"Hi\"}\r\n\r\n");
        assert_eq!(samples(), 2);
    }
}
