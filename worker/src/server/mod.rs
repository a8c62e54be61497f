//! The worker's network face: the gRPC API over the engine (with health and reflection), the
//! OpenAI-compatible HTTP API over the same engine, Prometheus metrics and HTTP probes, and the
//! SIGTERM drain.

pub mod chat;
pub mod connections;
pub mod grpc;
pub mod http;
pub mod openai;
pub mod status;
pub mod tls;
pub mod validate;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use latentserve_proto::v1::experts_server::ExpertsServer;
use latentserve_proto::v1::inference_server::InferenceServer;
use latentserve_proto::v1::worker_status_server::WorkerStatusServer;
use latentserve_proto::v1::{ModelInfo, PromptFiles};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::engine::EngineHandle;
use crate::engine::codec::TokenCodec;
use crate::experts::EXPERTS_SERVICE_NAME;
use crate::experts::auth::{ExpertsAuth, RequireToken};
use crate::experts::peers::GroupHealth;
use crate::experts::service::{ExpertsService, PeerActivity};
use crate::metrics::Metrics;
use crate::model::chat_template::ChatTemplate;
use connections::{CappedListener, ConnectionLimits, HttpLimits, TrackRequestsLayer};
use grpc::InferenceService;
use tls::{ALPN_GRPC, ALPN_HTTP, ReloadingTls, TlsFiles};
use validate::RequestLimits;

/// What both APIs serve once the model is loaded and warmed up.
pub struct LoadedModel {
    pub engine: EngineHandle,
    pub codec: Arc<dyn TokenCodec>,
    pub info: ModelInfo,
    pub limits: RequestLimits,
    /// The model's chat template, for chat requests; `None` refuses them.
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// What a request router needs to compute the same cache blocks as this worker.
    pub prompt_files: Arc<PromptFiles>,
}

/// The health service name of the inference API.
pub const INFERENCE_SERVICE_NAME: &str = "latentserve.v1.Inference";

/// The services the gRPC port's reflection lists.
const CLIENT_SERVICES: &[&str] = &[
    INFERENCE_SERVICE_NAME,
    status::WORKER_STATUS_SERVICE_NAME,
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Errors starting the servers.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    #[error("server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The gRPC and HTTP servers, running on the current tokio runtime.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    loaded: Arc<OnceLock<LoadedModel>>,
    readiness: Arc<Readiness>,
    shutdown: watch::Sender<bool>,
    /// Set when the drain begins: the status streams to routers end with a last "draining".
    draining: watch::Sender<bool>,
    grpc_task: JoinHandle<Result<(), tonic::transport::Error>>,
    experts_task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// The exchange's own shutdown, after the client ports' (see [`PEER_QUIET`]).
    experts_shutdown: watch::Sender<bool>,
    peer_activity: Option<Arc<PeerActivity>>,
    http_task: JoinHandle<std::io::Result<()>>,
    openai_task: Option<JoinHandle<std::io::Result<()>>>,
    /// Where the expert exchange listens when it has a port of its own.
    pub experts_addr: Option<SocketAddr>,
    /// Where the OpenAI-compatible API listens, when it is served.
    pub openai_addr: Option<SocketAddr>,
}

/// Where the servers listen, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddrs {
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    /// The OpenAI-compatible HTTP API; `None` serves none.
    pub openai: Option<SocketAddr>,
    /// Connection cap, TLS handshake and idle timeouts of each port (gRPC, OpenAI, expert
    /// exchange).
    pub connections: ConnectionLimits,
    /// How long an HTTP/1 client of the OpenAI port has to send a request's headers.
    pub http_header_timeout: Duration,
    /// TLS on the client ports (gRPC and OpenAI); the metrics port stays plain HTTP for the
    /// kubelet's probes, and the expert exchange has its token.
    pub tls: Option<TlsFiles>,
}

impl ListenAddrs {
    /// Plain ports with the default limits.
    pub fn new(grpc: SocketAddr, metrics: SocketAddr, openai: Option<SocketAddr>) -> Self {
        Self {
            grpc,
            metrics,
            openai,
            connections: ConnectionLimits::default(),
            http_header_timeout: connections::DEFAULT_HEADER_READ_TIMEOUT,
            tls: None,
        }
    }
}

/// Requests one HTTP/2 connection may have in flight on the gRPC port (hyper's default is
/// unbounded); a client that needs more opens another connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Interval and timeout of the HTTP/2 pings that find dead gRPC clients and peers.
pub const HTTP2_KEEPALIVE: (Duration, Duration) =
    (Duration::from_secs(30), Duration::from_secs(20));

/// Where a sharded worker serves the expert exchange (`latentserve.v1.Experts`).
pub struct ExpertsEndpoint {
    pub service: ExpertsServer<ExpertsService>,
    /// A port of its own, never the client port, so that a NetworkPolicy can admit the exchange
    /// from sibling shards only while clients reach the gRPC port.
    pub addr: SocketAddr,
    /// The group's token every caller must present (open: none).
    pub auth: ExpertsAuth,
    /// When peers last called: the drain keeps the exchange up while they do.
    pub activity: Arc<PeerActivity>,
}

/// How long a draining shard keeps serving its experts after the last call from a peer: the
/// peers of a group drain at the same time (a rollout, a new expert placement), and a shard
/// that stopped at once would fail the requests its peers are still finishing.
pub const PEER_QUIET: Duration = Duration::from_secs(2);

impl RunningServer {
    /// Binds every port (port 0 picks a free one) and serves health, reflection and metrics at
    /// once; health reports NOT_SERVING and inference calls UNAVAILABLE (503 over HTTP) until
    /// [`Self::set_loaded`]. `experts` is the expert exchange of a sharded worker, on the gRPC
    /// port or on a port of its own.
    pub async fn start(
        addrs: &ListenAddrs,
        metrics: Arc<Metrics>,
        experts: Option<ExpertsEndpoint>,
    ) -> Result<Self, ServerError> {
        let (grpc_addr, metrics_addr) = (addrs.grpc, addrs.metrics);
        let grpc_listener =
            TcpListener::bind(grpc_addr)
                .await
                .map_err(|source| ServerError::Bind {
                    what: "the gRPC port",
                    addr: grpc_addr,
                    source,
                })?;
        let http_listener =
            TcpListener::bind(metrics_addr)
                .await
                .map_err(|source| ServerError::Bind {
                    what: "the metrics port",
                    addr: metrics_addr,
                    source,
                })?;
        let bound = |listener: &TcpListener, what, addr| {
            listener
                .local_addr()
                .map_err(|source| ServerError::Bind { what, addr, source })
        };
        let grpc_addr = bound(&grpc_listener, "the gRPC port", grpc_addr)?;
        let metrics_addr = bound(&http_listener, "the metrics port", metrics_addr)?;
        // Loaded before anything is served: a server must not start with a certificate it
        // cannot present.
        let tls = |alpn| -> Result<Option<Arc<ReloadingTls>>, ServerError> {
            Ok(match &addrs.tls {
                Some(files) => Some(Arc::new(ReloadingTls::new(files.clone(), alpn)?)),
                None => None,
            })
        };
        let (grpc_tls, openai_tls) = (tls(ALPN_GRPC)?, tls(ALPN_HTTP)?);
        let capped = |listener: TcpListener, what, addr, tls| {
            CappedListener::new(listener, addrs.connections, tls)
                .map_err(|source| ServerError::Bind { what, addr, source })
        };

        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;
        // grpcurl and most tools speak v1; older clients still ask v1alpha. Only the client
        // services are listed: the expert exchange is for the group's shards, not for clients.
        let reflection = || {
            CLIENT_SERVICES.iter().fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(latentserve_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |builder, name| builder.with_service_name(*name),
            )
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let loaded = Arc::new(OnceLock::new());
        let inference = InferenceServer::new(InferenceService::new(loaded.clone()));
        let (draining, draining_rx) = watch::channel(false);
        let worker_status = WorkerStatusServer::new(status::WorkerStatusService::new(
            loaded.clone(),
            draining_rx,
        ))
        .max_encoding_message_size(status::MAX_PROMPT_FILES_BYTES);
        let ready = Arc::new(AtomicBool::new(false));
        let readiness = Arc::new(Readiness {
            health,
            ready: ready.clone(),
            loaded: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            peers_ok: AtomicBool::new(true),
            all_peers_usable: AtomicBool::new(true),
            metrics: metrics.clone(),
        });

        let (shutdown, shutdown_rx) = watch::channel(false);
        let (experts_shutdown, experts_shutdown_rx) = watch::channel(false);
        let mut peer_activity = None;
        let wait_for = |mut receiver: watch::Receiver<bool>| async move {
            let _ = receiver.wait_for(|stop| *stop).await;
        };
        let grpc_server = || {
            tonic::transport::Server::builder()
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .http2_keepalive_interval(Some(HTTP2_KEEPALIVE.0))
                .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE.1))
                .layer(TrackRequestsLayer)
        };
        let grpc_incoming = capped(grpc_listener, "the gRPC port", grpc_addr, grpc_tls)?;
        let grpc_task = tokio::spawn(
            grpc_server()
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(inference)
                .add_service(worker_status)
                .serve_with_incoming_shutdown(
                    grpc_incoming.into_incoming(),
                    wait_for(shutdown_rx.clone()),
                ),
        );
        let (experts_task, experts_addr) = match experts {
            Some(ExpertsEndpoint {
                service,
                addr,
                auth,
                activity,
            }) => {
                peer_activity = Some(activity);
                let listener =
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ServerError::Bind {
                            what: "the experts port",
                            addr,
                            source,
                        })?;
                let addr = bound(&listener, "the experts port", addr)?;
                if auth.is_open() {
                    tracing::warn!(%addr, "the expert exchange takes calls from anyone who reaches its port (no --experts-token-file)");
                }
                let incoming = capped(listener, "the experts port", addr, None)?;
                let service = tonic::service::interceptor::InterceptedService::new(
                    service,
                    RequireToken(auth),
                );
                let task = tokio::spawn(
                    grpc_server()
                        .add_service(service)
                        .serve_with_incoming_shutdown(
                            incoming.into_incoming(),
                            wait_for(experts_shutdown_rx),
                        ),
                );
                (Some(task), Some(addr))
            }
            None => (None, None),
        };
        let (openai_task, openai_addr) = match addrs.openai {
            Some(addr) => {
                let listener =
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ServerError::Bind {
                            what: "the OpenAI API port",
                            addr,
                            source,
                        })?;
                let addr = bound(&listener, "the OpenAI API port", addr)?;
                let app = openai::router(loaded.clone(), ready.clone());
                let listener = capped(listener, "the OpenAI API port", addr, openai_tls)?;
                let limits = HttpLimits {
                    header_read_timeout: addrs.http_header_timeout,
                    max_concurrent_streams: MAX_STREAMS_PER_CONNECTION,
                };
                let task = tokio::spawn(connections::serve_http(
                    listener,
                    app,
                    limits,
                    wait_for(shutdown_rx.clone()),
                ));
                (Some(task), Some(addr))
            }
            None => (None, None),
        };
        let http_task = tokio::spawn(
            axum::serve(http_listener, http::router(metrics, ready.clone()))
                .with_graceful_shutdown(wait_for(shutdown_rx))
                .into_future(),
        );
        let tls = addrs.tls.is_some();
        tracing::info!(%grpc_addr, %metrics_addr, ?openai_addr, ?experts_addr, tls, "listening");
        Ok(Self {
            grpc_addr,
            metrics_addr,
            loaded,
            readiness,
            shutdown,
            draining,
            grpc_task,
            experts_task,
            experts_shutdown,
            peer_activity,
            http_task,
            openai_task,
            experts_addr,
            openai_addr,
        })
    }

    /// Starts serving inference: the model is loaded and its engine has run its warm-up step.
    pub async fn set_loaded(&self, model: LoadedModel) {
        if self.loaded.set(model).is_err() {
            tracing::warn!("the model was already set; keeping the first one");
        }
        self.readiness.loaded.store(true, Ordering::SeqCst);
        self.readiness.refresh().await;
        tracing::info!("ready");
    }

    /// Makes readiness follow the expert group too, from now until the server stops: serving
    /// needs every routed expert of every MoE layer held by this shard or a usable peer (with
    /// replicas, a peer may be down), and the degraded gauge shows serving without every peer.
    pub fn follow_peers(&self, mut group: watch::Receiver<GroupHealth>) {
        let readiness = self.readiness.clone();
        tokio::spawn(async move {
            loop {
                let health = *group.borrow_and_update();
                readiness.peers_ok.store(health.covered, Ordering::SeqCst);
                readiness
                    .all_peers_usable
                    .store(health.all_usable(), Ordering::SeqCst);
                readiness
                    .metrics
                    .set_expert_peers_usable(health.usable_peers);
                readiness.refresh().await;
                if group.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Stops taking requests (health NOT_SERVING, new requests UNAVAILABLE), lets in-flight
    /// requests finish for up to `timeout`, cancels what is left, then stops both servers.
    pub async fn drain(self, timeout: Duration) -> Result<(), ServerError> {
        self.readiness.draining.store(true, Ordering::SeqCst);
        let _ = self.draining.send(true);
        self.readiness.refresh().await;
        let until_peers = Instant::now() + timeout;
        if let Some(model) = self.loaded.get() {
            let engine = &model.engine;
            tracing::info!(in_flight = engine.in_flight(), ?timeout, "draining");
            engine.start_draining();
            let until = Instant::now() + timeout;
            while engine.in_flight() > 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if engine.in_flight() > 0 {
                tracing::warn!(
                    in_flight = engine.in_flight(),
                    "drain timeout passed; cancelling the remaining requests"
                );
                engine.cancel_all();
                // Give the streams a moment to carry their final message to the clients.
                let grace = Instant::now() + Duration::from_secs(2);
                while engine.in_flight() > 0 && Instant::now() < grace {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let _ = self.shutdown.send(true);
        self.grpc_task.await??;
        if let Some(activity) = &self.peer_activity {
            // Until the peers stop calling (they finish their own requests), within the drain.
            while activity.idle_for() < PEER_QUIET && Instant::now() < until_peers {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let _ = self.experts_shutdown.send(true);
        if let Some(task) = self.experts_task {
            task.await??;
        }
        if let Some(task) = self.openai_task {
            task.await?.map_err(ServerError::Http)?;
        }
        self.http_task.await?.map_err(ServerError::Http)?;
        tracing::info!("drained");
        Ok(())
    }
}

/// What health and /readyz report: SERVING when the model is loaded, the worker is not draining
/// and (for expert shards) every peer is usable.
struct Readiness {
    health: HealthReporter,
    ready: Arc<AtomicBool>,
    loaded: AtomicBool,
    draining: AtomicBool,
    /// The usable peers and this shard hold every routed expert.
    peers_ok: AtomicBool,
    all_peers_usable: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Readiness {
    async fn refresh(&self) {
        let serving = self.loaded.load(Ordering::SeqCst)
            && !self.draining.load(Ordering::SeqCst)
            && self.peers_ok.load(Ordering::SeqCst);
        let was = self.ready.swap(serving, Ordering::SeqCst);
        self.metrics
            .set_expert_group_degraded(serving && !self.all_peers_usable.load(Ordering::SeqCst));
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_health(&self.health, status).await;
        if was != serving {
            tracing::info!(serving, "readiness changed");
        }
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(INFERENCE_SERVICE_NAME, status)
        .await;
    health
        .set_service_status(EXPERTS_SERVICE_NAME, status)
        .await;
}
