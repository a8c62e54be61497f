//! TLS on the client ports and the connection timeouts of the shared accept path, against real
//! servers on 127.0.0.1 with certificates made in the test: gRPC and HTTP over TLS with a real
//! rustls client, mutual TLS refusing a client without a certificate, a rotated certificate
//! picked up without a restart, and the handshake, header and idle timeouts.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use latentserve_worker::metrics::Metrics;
use latentserve_worker::server::connections::{CappedListener, ConnectionLimits};
use latentserve_worker::server::tls::{ALPN_HTTP, ReloadingTls, TlsFiles};
use latentserve_worker::server::{ListenAddrs, RunningServer};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A CA, and certificates for 127.0.0.1 and localhost (servers) or a client, signed by it.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

struct Issued {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: PrivateKeyDer<'static>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = params.self_signed(&ca_key).unwrap();
        Self { ca, ca_key }
    }

    fn issue(&self, common_name: &str) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        roots
    }
}

/// Writes the server's PEM files (and the client CA when given) into `dir`.
fn write_files(dir: &Path, server: &Issued, client_ca: Option<&str>) -> TlsFiles {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    replace(&cert, &server.cert_pem);
    replace(&key, &server.key_pem);
    let client_ca = client_ca.map(|pem| {
        let path = dir.join("ca.crt");
        replace(&path, pem);
        path
    });
    TlsFiles {
        cert,
        key,
        client_ca,
    }
}

/// Replaces a file as the kubelet does: a new file moved over the old one.
fn replace(path: &PathBuf, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

fn client_config(pki: &Pki, alpn: &[u8], identity: Option<&Issued>) -> Arc<ClientConfig> {
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(pki.roots());
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(vec![id.cert_der.clone()], id.key_der.clone_key())
            .unwrap(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// A gRPC health check over TLS.
async fn grpc_health(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<i32, String> {
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let config = config.clone();
        async move { tls_connect(addr, config).await.map(TokioIo::new) }
    });
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| format!("check: {e:?}"))?;
    Ok(answer.into_inner().status)
}

/// GET `path` over HTTP/1.1 on `io`: (status, body).
async fn http_get<IO>(io: IO, path: &str) -> Result<(u16, String), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start(tls: Option<TlsFiles>, tweak: impl FnOnce(&mut ListenAddrs)) -> RunningServer {
    let mut addrs = ListenAddrs::new(local(), local(), Some(local()));
    addrs.tls = tls;
    tweak(&mut addrs);
    let metrics = Arc::new(Metrics::new("tls-test").unwrap());
    RunningServer::start(&addrs, metrics, None).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_http_are_served_over_tls_and_metrics_stay_plain() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let files = write_files(dir.path(), &pki.issue("server"), None);
    let server = start(Some(files), |_| {}).await;

    // gRPC over TLS (h2 by ALPN): health answers (NOT_SERVING: no model in this test).
    let status = grpc_health(server.grpc_addr, client_config(&pki, b"h2", None))
        .await
        .unwrap();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );

    // The OpenAI port over TLS, HTTP/1.1.
    let openai = server.openai_addr.unwrap();
    let tls = tls_connect(openai, client_config(&pki, b"http/1.1", None))
        .await
        .unwrap();
    let (status, _) = http_get(tls, "/health").await.unwrap();
    assert_eq!(status, 503, "reachable over TLS, not ready without a model");

    // Plain text on a TLS port gets no answer.
    let plain = TcpStream::connect(openai).await.unwrap();
    assert!(http_get(plain, "/health").await.is_err());
    // A client that does not trust the server's CA is refused.
    let stranger = Pki::new("another CA");
    assert!(
        tls_connect(openai, client_config(&stranger, b"http/1.1", None))
            .await
            .is_err()
    );

    // The kubelet's probes stay plain HTTP on the metrics port.
    let plain = TcpStream::connect(server.metrics_addr).await.unwrap();
    let (status, _) = http_get(plain, "/healthz").await.unwrap();
    assert_eq!(status, 200);
    server.drain(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_client_certificate_refuses_clients_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let servers = Pki::new("server CA");
    let clients = Pki::new("client CA");
    let files = write_files(
        dir.path(),
        &servers.issue("server"),
        Some(&clients.ca_pem()),
    );
    let server = start(Some(files), |_| {}).await;
    let openai = server.openai_addr.unwrap();

    // No certificate: the handshake (TLS 1.3: the first read after it) fails.
    let anonymous = client_config(&servers, b"http/1.1", None);
    let refused = match tls_connect(openai, anonymous.clone()).await {
        Err(_) => true,
        Ok(tls) => http_get(tls, "/health").await.is_err(),
    };
    assert!(refused, "a client without a certificate got an answer");
    assert!(
        grpc_health(server.grpc_addr, client_config(&servers, b"h2", None))
            .await
            .is_err()
    );

    // A certificate from another CA: refused too.
    let outsider = servers.issue("outsider");
    let refused = match tls_connect(
        openai,
        client_config(&servers, b"http/1.1", Some(&outsider)),
    )
    .await
    {
        Err(_) => true,
        Ok(tls) => http_get(tls, "/health").await.is_err(),
    };
    assert!(refused, "a client certificate from another CA was accepted");

    // A certificate signed by the client CA: served, on both ports.
    let client = clients.issue("client");
    let tls = tls_connect(openai, client_config(&servers, b"http/1.1", Some(&client)))
        .await
        .unwrap();
    assert_eq!(http_get(tls, "/health").await.unwrap().0, 503);
    grpc_health(
        server.grpc_addr,
        client_config(&servers, b"h2", Some(&client)),
    )
    .await
    .unwrap();
    server.drain(Duration::from_secs(1)).await.unwrap();
}

/// The certificate a new connection to `addr` is shown.
async fn served_certificate(addr: SocketAddr, pki: &Pki) -> CertificateDer<'static> {
    let tls = tls_connect(addr, client_config(pki, b"http/1.1", None))
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_new_connections_and_a_broken_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let first = pki.issue("first");
    let files = write_files(dir.path(), &first, None);
    let tls = ReloadingTls::with_check_interval(files.clone(), ALPN_HTTP, Duration::ZERO).unwrap();
    let listener = TcpListener::bind(local()).await.unwrap();
    let mut capped =
        CappedListener::new(listener, ConnectionLimits::default(), Some(Arc::new(tls))).unwrap();
    let addr = capped.local_addr();
    // Accept (and keep) whatever completes its handshake.
    tokio::spawn(async move {
        let mut open = Vec::new();
        loop {
            open.push(capped.accept_counted().await);
        }
    });

    assert_eq!(served_certificate(addr, &pki).await, first.cert_der);

    let second = pki.issue("second");
    write_files(dir.path(), &second, None);
    assert_eq!(served_certificate(addr, &pki).await, second.cert_der);

    // A half-written rotation: the key does not parse. The last good pair stays.
    replace(
        &files.key,
        "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n",
    );
    let third = pki.issue("third");
    replace(&files.cert, &third.cert_pem);
    assert_eq!(served_certificate(addr, &pki).await, second.cert_der);
    // Completed: the new pair is served.
    replace(&files.key, &third.key_pem);
    assert_eq!(served_certificate(addr, &pki).await, third.cert_der);
}

#[tokio::test]
async fn bad_tls_files_stop_the_server_from_starting_and_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let mut files = write_files(dir.path(), &pki.issue("server"), None);
    files.key = dir.path().join("missing.key");
    let mut addrs = ListenAddrs::new(local(), local(), None);
    addrs.tls = Some(files.clone());
    let metrics = Arc::new(Metrics::new("tls-test").unwrap());
    let error = RunningServer::start(&addrs, metrics.clone(), None)
        .await
        .err()
        .expect("a missing key is refused")
        .to_string();
    assert!(error.contains("missing.key"), "{error}");

    files.key = files.cert.clone();
    addrs.tls = Some(files);
    let error = RunningServer::start(&addrs, metrics, None)
        .await
        .err()
        .expect("a certificate is no key")
        .to_string();
    assert!(error.contains("no private key"), "{error}");
}

/// Reads until the server closes the connection; how long that took.
async fn time_to_close(mut stream: TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Err(_) => panic!("the connection stayed open for {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_handshake_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let files = write_files(dir.path(), &pki.issue("server"), None);
    let server = start(Some(files), |addrs| {
        addrs.connections.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let silent = TcpStream::connect(server.grpc_addr).await.unwrap();
    let closed_after = time_to_close(silent, Duration::from_secs(10)).await;
    assert!(
        closed_after >= Duration::from_millis(250),
        "{closed_after:?}"
    );
    server.drain(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_closed() {
    let server = start(None, |addrs| {
        addrs.http_header_timeout = Duration::from_millis(300);
        addrs.connections.idle_timeout = Some(Duration::from_millis(600));
    })
    .await;
    let openai = server.openai_addr.unwrap();

    // Half a request line, then nothing: the header timeout, well before the idle one... or
    // whichever comes first; both close it.
    let mut slow = TcpStream::connect(openai).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let closed_after = time_to_close(slow, Duration::from_secs(10)).await;
    assert!(closed_after < Duration::from_secs(5), "{closed_after:?}");

    // A connection that never sends anything, on each client port: the idle timeout.
    for addr in [openai, server.grpc_addr] {
        let idle = TcpStream::connect(addr).await.unwrap();
        let closed_after = time_to_close(idle, Duration::from_secs(10)).await;
        assert!(
            closed_after >= Duration::from_millis(500),
            "{addr}: {closed_after:?}"
        );
    }

    // A keep-alive HTTP/1.1 connection: served, then closed once idle.
    let kept = TcpStream::connect(openai).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(kept))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get("/health")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    drop(response);
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the idle keep-alive connection is closed")
        .unwrap()
        .ok();
    server.drain(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_a_call_in_flight_is_not_idle() {
    let server = start(None, |addrs| {
        addrs.connections.idle_timeout = Some(Duration::from_millis(300));
    })
    .await;
    let channel = Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    // A server stream that stays open: Watch sends the status, then waits for changes.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("the first status");
    // Four idle timeouts later the stream (and its connection) is still there.
    let next = tokio::time::timeout(Duration::from_millis(1200), watch.message()).await;
    assert!(next.is_err(), "the watch ended: {next:?}");
    drop(watch);
    server.drain(Duration::from_secs(1)).await.unwrap();
}
