//! TLS for the client ports: a rustls server configuration built from PEM files (a certificate
//! chain, its private key and, for mutual TLS, the CA that signs client certificates), reloaded
//! when the files change.
//!
//! cert-manager renews a certificate by rewriting its Secret in place and the kubelet swaps the
//! mounted files, so a long-running server must pick up new files without a restart. New
//! handshakes look at the files' modification times at most every [`RELOAD_CHECK_INTERVAL`]; a
//! changed set that does not parse is logged and the server keeps the certificate it has, so a
//! half-written rotation never takes a port down.
//!
//! Nothing here knows about the worker: any binary with listeners of its own (the router) can
//! build a [`ReloadingTls`] and hand its [`ReloadingTls::acceptor`] to its accept loop.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// How often, at most, a new handshake looks at the files for a rotation.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// ALPN protocols of a gRPC port: HTTP/2 only.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN protocols of an HTTP API port: HTTP/2 or HTTP/1.1.
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The PEM files a TLS port serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (cert-manager's `tls.crt`).
    pub cert: PathBuf,
    /// Its private key: PKCS#8, PKCS#1 or SEC1 (`tls.key`).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (`ca.crt`).
    pub client_ca: Option<PathBuf>,
}

/// Why a TLS configuration could not be built; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: no certificate (PEM block `CERTIFICATE`) in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no private key (PEM block `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`) in it", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: a client CA certificate was refused: {source}", path.display())]
    ClientCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: building the client certificate verifier: {source}", path.display())]
    Verifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("{} and {}: the certificate and key do not make a server configuration: {source}", cert.display(), key.display())]
    Config {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        source => TlsError::Pem {
            path: path.to_owned(),
            source,
        },
    })
}

/// A server configuration from `files`, offering `alpn` (e.g. [`ALPN_GRPC`]). Uses the ring
/// provider explicitly, so it never depends on a process-wide default.
pub fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&files.cert)?;
    let key = private_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(path)? {
                roots.add(ca).map_err(|source| TlsError::ClientCa {
                    path: path.clone(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::Verifier {
                    path: path.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Config {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(config)
}

/// What identifies one version of the files: modification time and length of each.
type Stamps = Vec<Option<(SystemTime, u64, u64)>>;

fn stamps(files: &TlsFiles) -> Stamps {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len(), inode(&meta)))
    })
    .collect()
}

/// The inode: the kubelet swaps a whole new directory in, so a rotated file is a new inode even
/// when its size and (coarse) modification time are the same.
pub(crate) fn inode(meta: &std::fs::Metadata) -> u64 {
    #[cfg(unix)]
    {
        std::os::unix::fs::MetadataExt::ino(meta)
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        0
    }
}

struct Current {
    config: Arc<ServerConfig>,
    stamps: Stamps,
    checked: Instant,
}

/// A server configuration that follows its files: [`Self::acceptor`] rebuilds it when they
/// changed (checked at most every `check_interval`), and keeps the last good one when the new
/// files do not load.
pub struct ReloadingTls {
    files: TlsFiles,
    alpn: Vec<Vec<u8>>,
    check_interval: Duration,
    current: Mutex<Current>,
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadingTls {
    /// Loads the files now: a server must not start with a certificate it cannot serve.
    pub fn new(files: TlsFiles, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        Self::with_check_interval(files, alpn, RELOAD_CHECK_INTERVAL)
    }

    pub fn with_check_interval(
        files: TlsFiles,
        alpn: &[&[u8]],
        check_interval: Duration,
    ) -> Result<Self, TlsError> {
        let stamps = stamps(&files);
        let config = Arc::new(server_config(&files, alpn)?);
        Ok(Self {
            alpn: alpn.iter().map(|protocol| protocol.to_vec()).collect(),
            files,
            check_interval,
            current: Mutex::new(Current {
                config,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration for the next handshake, reloaded first when the files changed.
    pub fn config(&self) -> Arc<ServerConfig> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.checked.elapsed() >= self.check_interval {
            current.checked = Instant::now();
            let now = stamps(&self.files);
            if now != current.stamps {
                // Remember the new stamps whatever happens: a broken set is reported once, not on
                // every handshake, and the next change is tried again.
                current.stamps = now;
                let alpn: Vec<&[u8]> = self.alpn.iter().map(Vec::as_slice).collect();
                match server_config(&self.files, &alpn) {
                    Ok(config) => {
                        current.config = Arc::new(config);
                        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                    }
                    Err(error) => tracing::error!(
                        %error,
                        "the TLS files changed but do not load; serving the previous certificate"
                    ),
                }
            }
        }
        current.config.clone()
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config())
    }
}
