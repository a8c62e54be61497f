//! The one accept path of every served port (gRPC, OpenAI, expert exchange).
//!
//! - A cap: past `max_connections` open connections on a port, a new one is closed at once (a
//!   client sees the connection reset and retries elsewhere) instead of holding a socket and a
//!   task for as long as it likes. Each accepted connection carries its slot.
//! - TLS, when the port has it: the handshake runs in a task of its own under a timeout, so a
//!   client that connects and sends nothing holds a slot for at most `handshake_timeout` and
//!   never delays the next accept.
//! - An idle timeout: a connection with no request in flight for `idle_timeout` is closed. HTTP/2
//!   pings do not count as use (keepalive would otherwise keep a forgotten connection forever);
//!   [`TrackRequestsLayer`] counts the requests of each connection.
//!
//! [`serve_http`] serves an axum app over such a listener with an HTTP/1 header read timeout
//! (axum's own `serve` sets none).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;
use tower::{Layer, Service, ServiceExt};

use super::tls::ReloadingTls;

/// Open connections one port keeps by default (`--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// How long a client has to finish its TLS handshake (`--tls-handshake-timeout`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may stay open with no request in flight (`--idle-timeout`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an HTTP/1 client has to send a request's headers (`--http-header-timeout`).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The limits every accepted connection of a port lives under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections the port keeps; more are closed at once.
    pub max_connections: usize,
    /// Longest TLS handshake (TLS ports only).
    pub handshake_timeout: Duration,
    /// Longest time with no request in flight; `None` keeps idle connections open.
    pub idle_timeout: Option<Duration>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
        }
    }
}

/// Requests in flight on one connection, and since when it has had none.
#[derive(Debug)]
struct Activity {
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    /// When the connection may be closed for idleness: `None` while a request is in flight.
    fn idle_deadline(&self, after: Duration) -> Option<Instant> {
        let idle_since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        (self.active.load(Ordering::SeqCst) == 0).then_some(idle_since + after)
    }
}

/// A request in flight: counts on its connection until dropped (with the response body).
#[derive(Debug)]
pub struct ActiveRequest(Arc<Activity>);

impl ActiveRequest {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.active.fetch_add(1, Ordering::SeqCst);
        Self(activity.clone())
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let mut idle_since = self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            *idle_since = Instant::now();
        }
    }
}

/// What a served request knows about its connection (tonic puts it in the request extensions;
/// so does [`serve_http`]).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub remote: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    activity: Arc<Activity>,
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

struct IdleTimer {
    after: Duration,
    sleep: Pin<Box<Sleep>>,
}

/// An accepted connection: TCP or TLS over TCP, holding one of its port's slots and closed once
/// it has been idle too long.
pub struct Connection {
    transport: Transport,
    info: ConnectionInfo,
    idle: Option<IdleTimer>,
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Connection {
    fn new(
        transport: Transport,
        remote: SocketAddr,
        limits: &ConnectionLimits,
        slot: OwnedSemaphorePermit,
    ) -> Self {
        let tls = matches!(transport, Transport::Tls(_));
        let idle = limits.idle_timeout.map(|after| IdleTimer {
            after,
            sleep: Box::pin(tokio::time::sleep(after)),
        });
        Self {
            transport,
            info: ConnectionInfo {
                remote,
                tls,
                activity: Activity::new(),
            },
            idle,
            _slot: slot,
        }
    }

    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// The TCP stream under any TLS.
    pub fn tcp(&self) -> &TcpStream {
        match &self.transport {
            Transport::Plain(stream) => stream,
            Transport::Tls(stream) => stream.get_ref().0,
        }
    }

    /// An error once the connection has been idle for its timeout; re-arms the timer otherwise.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(idle) = &mut self.idle else {
            return Ok(());
        };
        while idle.sleep.as_mut().poll(cx).is_ready() {
            let next = match self.info.activity.idle_deadline(idle.after) {
                None => Instant::now() + idle.after,
                Some(deadline) if deadline > Instant::now() => deadline,
                Some(_) => {
                    tracing::debug!(remote = %self.info.remote, "closing an idle connection");
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request for the idle timeout",
                    ));
                }
            };
            idle.sleep.as_mut().reset(next);
        }
        Ok(())
    }
}

macro_rules! transport {
    ($self:ident, $stream:ident => $body:expr) => {
        match &mut $self.transport {
            Transport::Plain($stream) => {
                let $stream = Pin::new($stream);
                $body
            }
            Transport::Tls($stream) => {
                let $stream = Pin::new($stream.as_mut());
                $body
            }
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // The server always has a read pending on an open connection, so this is where an idle
        // one notices its timeout.
        if let Err(error) = self.poll_idle(cx) {
            return Poll::Ready(Err(error));
        }
        transport!(self, stream => stream.poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        transport!(self, stream => stream.poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        transport!(self, stream => stream.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        transport!(self, stream => stream.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        transport!(self, stream => stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.transport {
            Transport::Plain(stream) => stream.is_write_vectored(),
            Transport::Tls(stream) => stream.is_write_vectored(),
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

/// A listener that admits at most `max_connections` open connections, runs TLS handshakes when
/// the port has TLS, and turns Nagle's algorithm off (streamed tokens are small writes that must
/// not wait for the peer's delayed ACK). Accepting runs in a task of its own; dropping the
/// listener stops it and closes the port.
pub struct CappedListener {
    ready: mpsc::UnboundedReceiver<(Connection, SocketAddr)>,
    local_addr: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for CappedListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl CappedListener {
    /// Starts accepting on `listener` (needs a tokio runtime). With `tls`, every connection is
    /// TLS; the configuration is taken per handshake, so a reloaded certificate applies to new
    /// connections at once.
    pub fn new(
        listener: TcpListener,
        limits: ConnectionLimits,
        tls: Option<Arc<ReloadingTls>>,
    ) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (ready_tx, ready) = mpsc::unbounded_channel();
        let accept_task = tokio::spawn(accept_loop(listener, limits, tls, ready_tx));
        Ok(Self {
            ready,
            local_addr,
            accept_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next connection that got a slot (and finished its handshake).
    pub async fn accept_counted(&mut self) -> (Connection, SocketAddr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task never ends while the listener lives; should it have panicked,
            // the port simply stops taking connections.
            None => std::future::pending().await,
        }
    }

    /// The accepted connections as the stream tonic serves.
    pub fn into_incoming(
        self,
    ) -> impl futures::Stream<Item = io::Result<Connection>> + Send + 'static {
        futures::stream::unfold(self, |mut listener| async move {
            let (io, _) = listener.accept_counted().await;
            Some((Ok(io), listener))
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    limits: ConnectionLimits,
    tls: Option<Arc<ReloadingTls>>,
    ready: mpsc::UnboundedSender<(Connection, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            _ = ready.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, a connection reset before it was taken: logged
                    // and retried after a pause, as axum's own listener does.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = limits.max_connections, "connection refused: the port has its maximum of open connections");
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
        match &tls {
            None => {
                let connection = Connection::new(Transport::Plain(stream), peer, &limits, slot);
                let _ = ready.send((connection, peer));
            }
            Some(tls) => {
                let acceptor = tls.acceptor();
                let ready = ready.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            let transport = Transport::Tls(Box::new(stream));
                            let connection = Connection::new(transport, peer, &limits, slot);
                            let _ = ready.send((connection, peer));
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => {
                            tracing::debug!(%peer, timeout = ?limits.handshake_timeout, "TLS handshake timed out")
                        }
                    }
                });
            }
        }
    }
}

/// Counts each request on its connection (see [`ConnectionInfo`]) from the call until the
/// response body is dropped, so that the idle timeout spares connections that are streaming.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackRequestsLayer;

impl<S> Layer<S> for TrackRequestsLayer {
    type Service = TrackRequests<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TrackRequests { inner }
    }
}

#[derive(Debug, Clone)]
pub struct TrackRequests<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for TrackRequests<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Tracked<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let active = request
            .extensions()
            .get::<ConnectionInfo>()
            .map(|info| ActiveRequest::begin(&info.activity));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Tracked {
                body,
                _active: active,
            }))
        })
    }
}

/// A response body that keeps its request counted on the connection until it is dropped.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _active: Option<ActiveRequest>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// HTTP settings of [`serve_http`].
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// How long an HTTP/1 client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// Requests one HTTP/2 connection may have in flight.
    pub max_concurrent_streams: u32,
}

/// Serves `app` on `listener` (HTTP/1.1 and HTTP/2, TLS when the listener has it) until
/// `shutdown`, then lets open requests finish.
pub async fn serve_http(
    mut listener: CappedListener,
    app: axum::Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let app = app.layer(TrackRequestsLayer);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams);
    // Each connection task holds a receiver; the sender sees them all gone once they finished.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, _) = tokio::select! {
            accepted = listener.accept_counted() => accepted,
            () = &mut shutdown => break,
        };
        let info = io.info().clone();
        let service = app
            .clone()
            .map_request(move |mut request: http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(info.clone());
                request
            })
            .map_err(|never: Infallible| match never {});
        let builder = builder.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let connection = builder.serve_connection_with_upgrades(
                TokioIo::new(io),
                TowerToHyperService::new(service),
            );
            let mut connection = std::pin::pin!(connection);
            let stopping = async {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            let result = tokio::select! {
                result = connection.as_mut() => Some(result),
                () = stopping => None,
            };
            let result = match result {
                Some(result) => result,
                None => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::trace!(%error, "HTTP connection ended");
            }
            drop(stop);
        });
    }
    // Stop accepting (closes the port), then wait for the open connections to finish.
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tonic sets TCP_NODELAY only on listeners it binds; without it a small response (an expert
    /// partial sum, a streamed token) can wait ~40 ms for the peer's delayed ACK.
    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut capped = CappedListener::new(listener, ConnectionLimits::default(), None).unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = tokio::time::timeout(Duration::from_secs(10), capped.accept_counted())
            .await
            .expect("the connection is accepted");
        assert!(accepted.tcp().nodelay().unwrap());
    }

    /// A connection with no request in flight is closed after the idle timeout; one with a
    /// request in flight is not.
    #[tokio::test]
    async fn idle_connections_are_closed_busy_ones_are_not() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            idle_timeout: Some(Duration::from_millis(200)),
            ..ConnectionLimits::default()
        };
        let mut capped = CappedListener::new(listener, limits, None).unwrap();
        let _idle_client = TcpStream::connect(addr).await.unwrap();
        let (mut idle, _) = capped.accept_counted().await;
        let _busy_client = TcpStream::connect(addr).await.unwrap();
        let (mut busy, _) = capped.accept_counted().await;
        let in_flight = ActiveRequest::begin(&busy.info.activity);

        let mut buf = [0u8; 8];
        let error = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
            .await
            .expect("the idle connection is closed")
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);

        // Busy for three idle timeouts: still open.
        let read = tokio::time::timeout(Duration::from_millis(600), busy.read(&mut buf)).await;
        assert!(read.is_err(), "a busy connection stays open: {read:?}");
        drop(in_flight);
        let error = tokio::time::timeout(Duration::from_secs(10), busy.read(&mut buf))
            .await
            .expect("closed once idle")
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
