//! The router's ports: gRPC (`latentserve.v1.Inference`, health, reflection), the OpenAI HTTP API,
//! and `/metrics`, `/healthz`, `/readyz`, `/v1/autoscaling`; and the SIGTERM drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use latentserve_proto::v1::inference_server::InferenceServer;
use latentserve_worker::server::connections::{
    self, CappedListener, ConnectionLimits, HttpLimits, TrackRequestsLayer,
};
use latentserve_worker::server::tls::{ALPN_GRPC, ALPN_HTTP, ReloadingTls, TlsError, TlsFiles};
use latentserve_worker::server::{
    HTTP2_KEEPALIVE, INFERENCE_SERVICE_NAME, MAX_STREAMS_PER_CONNECTION,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::grpc::RouterService;
use crate::pool::Pool;

/// Where the router listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterAddrs {
    pub grpc: SocketAddr,
    /// `None`: no OpenAI API.
    pub openai: Option<SocketAddr>,
    pub metrics: SocketAddr,
    /// Limits of every connection on the gRPC and OpenAI ports, as on the workers.
    pub connections: ConnectionLimits,
    /// How long an HTTP/1 client of the OpenAI port has to send a request's headers.
    pub http_header_timeout: Duration,
    /// TLS on the gRPC and OpenAI ports (the metrics port stays plain HTTP for probes).
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The running router's servers.
pub struct RunningRouter {
    pub grpc_addr: SocketAddr,
    pub openai_addr: Option<SocketAddr>,
    pub metrics_addr: SocketAddr,
    pool: Arc<Pool>,
    ready: Arc<AtomicBool>,
    health: HealthReporter,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(
    addr: SocketAddr,
    what: &'static str,
) -> Result<(TcpListener, SocketAddr), ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { what, addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { what, addr, source })?;
    Ok((listener, bound))
}

impl RunningRouter {
    /// Binds every port (0 picks a free one) and serves; ready at once (with no worker yet,
    /// requests are held until one is, see [`crate::hold`]).
    pub async fn start(addrs: &RouterAddrs, pool: Arc<Pool>) -> Result<Self, ServerError> {
        let (grpc_listener, grpc_addr) = bind(addrs.grpc, "the gRPC port").await?;
        let (metrics_listener, metrics_addr) = bind(addrs.metrics, "the metrics port").await?;
        let openai = match addrs.openai {
            Some(addr) => Some(bind(addr, "the OpenAI API port").await?),
            None => None,
        };
        let openai_addr = openai.as_ref().map(|(_, addr)| *addr);
        // Loaded before anything is served: never start with a certificate that cannot be used.
        let tls = |alpn| -> Result<Option<Arc<ReloadingTls>>, ServerError> {
            Ok(match &addrs.tls {
                Some(files) => Some(Arc::new(ReloadingTls::new(files.clone(), alpn)?)),
                None => None,
            })
        };
        let (grpc_tls, openai_tls) = (tls(ALPN_GRPC)?, tls(ALPN_HTTP)?);
        let capped = |listener, what, addr, tls| {
            CappedListener::new(listener, addrs.connections, tls)
                .map_err(|source| ServerError::Bind { what, addr, source })
        };
        let grpc_incoming = capped(grpc_listener, "the gRPC port", grpc_addr, grpc_tls)?;
        let ready = Arc::new(AtomicBool::new(true));
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(latentserve_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(INFERENCE_SERVICE_NAME)
            .with_service_name("grpc.health.v1.Health")
            .build_v1()?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let wait_for = |mut receiver: watch::Receiver<bool>| async move {
            let _ = receiver.wait_for(|stop| *stop).await;
        };
        let mut tasks = Vec::new();
        let grpc = tonic::transport::Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE.0))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE.1))
            .layer(TrackRequestsLayer)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(InferenceServer::new(RouterService::new(pool.clone())))
            .serve_with_incoming_shutdown(
                grpc_incoming.into_incoming(),
                wait_for(shutdown_rx.clone()),
            );
        tasks.push(tokio::spawn(async move {
            if let Err(err) = grpc.await {
                tracing::error!(error = %err, "gRPC server failed");
            }
        }));
        if let Some((listener, addr)) = openai {
            let app = crate::openai::router(pool.clone(), ready.clone());
            let listener = capped(listener, "the OpenAI API port", addr, openai_tls)?;
            let limits = HttpLimits {
                header_read_timeout: addrs.http_header_timeout,
                max_concurrent_streams: MAX_STREAMS_PER_CONNECTION,
            };
            let server =
                connections::serve_http(listener, app, limits, wait_for(shutdown_rx.clone()));
            tasks.push(tokio::spawn(async move {
                if let Err(err) = server.await {
                    tracing::error!(error = %err, "OpenAI API server failed");
                }
            }));
        }
        let probes = probes(pool.clone(), ready.clone());
        let server = axum::serve(metrics_listener, probes)
            .with_graceful_shutdown(wait_for(shutdown_rx.clone()));
        tasks.push(tokio::spawn(async move {
            if let Err(err) = server.await {
                tracing::error!(error = %err, "metrics server failed");
            }
        }));
        let gauges = pool.clone();
        let mut stop = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => gauges.update_gauges(),
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
        }));
        let tls = addrs.tls.is_some();
        tracing::info!(%grpc_addr, ?openai_addr, %metrics_addr, tls, "router serving");
        Ok(Self {
            grpc_addr,
            openai_addr,
            metrics_addr,
            pool,
            ready,
            health,
            shutdown,
            tasks,
        })
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Stops taking requests (readiness 503, health NOT_SERVING, new requests UNAVAILABLE / 503),
    /// waits up to `grace` for the requests in flight or held, then closes every port.
    pub async fn drain(self, grace: Duration) {
        self.ready.store(false, Ordering::SeqCst);
        set_health(&self.health, ServingStatus::NotServing).await;
        let started = Instant::now();
        while in_flight(&self.pool) > 0 && started.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = in_flight(&self.pool);
        if left > 0 {
            tracing::warn!(
                requests = left,
                "drain grace over; closing with requests in flight"
            );
        }
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

fn in_flight(pool: &Pool) -> usize {
    pool.busy()
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(INFERENCE_SERVICE_NAME, status)
        .await;
}

#[derive(Clone)]
struct ProbeState {
    pool: Arc<Pool>,
    ready: Arc<AtomicBool>,
}

fn probes(pool: Arc<Pool>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(state): State<ProbeState>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    state.pool.metrics().render(),
                )
            }),
        )
        // The autoscaling signal (docs/router.md): 200 as long as the router runs, also with no
        // worker at all, which is when the operator needs it most.
        .route(
            "/v1/autoscaling",
            get(|State(state): State<ProbeState>| async move { axum::Json(state.pool.signal()) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(state): State<ProbeState>| async move {
                if state.ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready\n").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
                }
            }),
        )
        .with_state(ProbeState { pool, ready })
}
