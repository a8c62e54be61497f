//! Who may call a shard's experts: the shards of its group, which share a secret token.
//!
//! The operator creates one random token per ModelDeployment (a Secret with the key `token`,
//! and `previous` while a rotation is under way) and mounts it into every worker; `serve
//! --experts-token-file DIR/token` reads it. A peer sends every token it knows as
//! `authorization: Bearer ...` metadata on each Experts call, and the service accepts a call when
//! one of them matches one it accepts, compared in constant time. Sending the previous token too
//! lets a rotation proceed while the kubelet updates the pods' files one by one: a shard that
//! still has only the old token accepts a peer that already has both, and the other way round.
//!
//! The files are re-read when they change (checked at most every [`RELOAD_CHECK_INTERVAL`]); a
//! token file that becomes unreadable or empty keeps the tokens last read and logs an error.
//!
//! Without a token file the exchange is open to anyone who reaches the port: for one host or a
//! development cluster only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// How often, at most, a call looks at the token files for a rotation.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// The file next to the token file with the token accepted during a rotation (Secret key
/// `previous`).
pub const PREVIOUS_TOKEN_FILE: &str = "previous";
/// Shortest token accepted: 16 bytes of hex.
pub const MIN_TOKEN_LEN: usize = 32;

/// Why the token files could not be used at start.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the experts token {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the experts token {} has {len} characters; at least {MIN_TOKEN_LEN} printable ASCII characters are needed", path.display())]
    TooShort { path: PathBuf, len: usize },
    #[error("the experts token {} holds characters other than printable ASCII", path.display())]
    NotAscii { path: PathBuf },
}

/// The tokens of one moment: the one this shard sends first and the ones it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tokens {
    current: String,
    previous: Option<String>,
}

fn read_token(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotAscii {
            path: path.to_owned(),
        });
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort {
            path: path.to_owned(),
            len: token.len(),
        });
    }
    Ok(token.to_owned())
}

type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), inode(&meta)))
}

/// The inode: the kubelet swaps a whole new directory in when a Secret changes, so a rotated
/// file is a new inode even when its size and (coarse) modification time are the same. (The
/// same test as the TLS files'; the expert exchange sits below the server layer.)
fn inode(meta: &std::fs::Metadata) -> u64 {
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

struct Loaded {
    tokens: Tokens,
    stamps: [Stamp; 2],
    checked: Instant,
}

/// The group's shared token, read from its file(s) and followed as they change.
pub struct TokenFiles {
    current: PathBuf,
    previous: PathBuf,
    check_interval: Duration,
    loaded: Mutex<Loaded>,
}

impl TokenFiles {
    fn stamps(&self) -> [Stamp; 2] {
        [stamp(&self.current), stamp(&self.previous)]
    }

    fn read(&self) -> Result<Tokens, TokenError> {
        let current = read_token(&self.current)?;
        let previous = match std::fs::exists(&self.previous) {
            Ok(true) => Some(read_token(&self.previous)?),
            _ => None,
        };
        Ok(Tokens { current, previous })
    }

    fn tokens(&self) -> Tokens {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.checked.elapsed() >= self.check_interval {
            loaded.checked = Instant::now();
            let stamps = self.stamps();
            if stamps != loaded.stamps {
                loaded.stamps = stamps;
                match self.read() {
                    Ok(tokens) => {
                        if tokens != loaded.tokens {
                            tracing::info!(file = %self.current.display(), "experts token reloaded");
                        }
                        loaded.tokens = tokens;
                    }
                    Err(error) => tracing::error!(
                        %error,
                        "the experts token changed but does not load; keeping the tokens read before"
                    ),
                }
            }
        }
        loaded.tokens.clone()
    }
}

/// The expert exchange's credentials: `open` (no token, anyone may call) or a token file.
/// The same value checks incoming calls ([`Self::check`]) and signs outgoing ones (as a tonic
/// [`Interceptor`]).
#[derive(Clone, Default)]
pub struct ExpertsAuth {
    files: Option<Arc<TokenFiles>>,
}

impl std::fmt::Debug for ExpertsAuth {
    // Never the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.files {
            None => f.write_str("ExpertsAuth(open)"),
            Some(files) => write!(f, "ExpertsAuth({})", files.current.display()),
        }
    }
}

impl ExpertsAuth {
    /// No authentication: every caller is accepted and no token is sent.
    pub fn open() -> Self {
        Self::default()
    }

    /// The token in `path`, and the one in `previous` next to it when that file exists.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        Self::with_check_interval(path, RELOAD_CHECK_INTERVAL)
    }

    pub fn with_check_interval(path: &Path, check_interval: Duration) -> Result<Self, TokenError> {
        let previous = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(PREVIOUS_TOKEN_FILE);
        let mut files = TokenFiles {
            current: path.to_owned(),
            previous,
            check_interval,
            loaded: Mutex::new(Loaded {
                tokens: Tokens {
                    current: String::new(),
                    previous: None,
                },
                stamps: [None, None],
                checked: Instant::now(),
            }),
        };
        let stamps = files.stamps();
        let tokens = files.read()?;
        *files.loaded.get_mut().unwrap_or_else(|e| e.into_inner()) = Loaded {
            tokens,
            stamps,
            checked: Instant::now(),
        };
        Ok(Self {
            files: Some(Arc::new(files)),
        })
    }

    pub fn is_open(&self) -> bool {
        self.files.is_none()
    }

    /// Accepts a call whose metadata carries a token this shard accepts. The refusal says
    /// nothing about the tokens, the model or the placement.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(files) = &self.files else {
            return Ok(());
        };
        let tokens = files.tokens();
        let accepted = [Some(&tokens.current), tokens.previous.as_ref()];
        let mut ok = subtle::Choice::from(0);
        for value in metadata.get_all("authorization") {
            let Some(presented) = value
                .to_str()
                .ok()
                .and_then(|value| value.strip_prefix("Bearer "))
            else {
                continue;
            };
            for token in accepted.iter().flatten() {
                ok |= presented.as_bytes().ct_eq(token.as_bytes());
            }
        }
        if bool::from(ok) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "the expert exchange accepts only the shards of its group",
            ))
        }
    }

    /// Adds this shard's tokens to an outgoing call.
    pub fn sign(&self, metadata: &mut MetadataMap) {
        let Some(files) = &self.files else {
            return;
        };
        let tokens = files.tokens();
        for token in [Some(&tokens.current), tokens.previous.as_ref()]
            .into_iter()
            .flatten()
        {
            // Checked printable ASCII when read, so always a valid header value.
            if let Ok(value) = AsciiMetadataValue::try_from(format!("Bearer {token}")) {
                metadata.append("authorization", value);
            }
        }
    }
}

impl Interceptor for ExpertsAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.sign(request.metadata_mut());
        Ok(request)
    }
}

/// The server side: refuses calls without a token this shard accepts (UNAUTHENTICATED).
#[derive(Clone, Debug)]
pub struct RequireToken(pub ExpertsAuth);

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.0.check(request.metadata())?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const NEW: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    /// Replaces a file as the kubelet does: a new file (inode) moved over the old one.
    fn replace(path: &Path, text: &str) {
        let next = path.with_extension("next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, path).unwrap();
    }

    fn bearer(tokens: &[&str]) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        for token in tokens {
            metadata.append("authorization", format!("Bearer {token}").parse().unwrap());
        }
        metadata
    }

    #[test]
    fn open_accepts_everyone_and_sends_nothing() {
        let auth = ExpertsAuth::open();
        assert!(auth.check(&MetadataMap::new()).is_ok());
        let mut metadata = MetadataMap::new();
        auth.sign(&mut metadata);
        assert!(metadata.is_empty());
    }

    #[test]
    fn only_the_token_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{OLD}\n")).unwrap();
        let auth = ExpertsAuth::from_file(&path).unwrap();
        assert!(auth.check(&bearer(&[OLD])).is_ok());
        for metadata in [MetadataMap::new(), bearer(&[NEW]), bearer(&[&OLD[1..]])] {
            let status = auth.check(&metadata).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(!status.message().contains(OLD));
        }
        let mut wrong_scheme = MetadataMap::new();
        wrong_scheme.insert("authorization", format!("Basic {OLD}").parse().unwrap());
        assert!(auth.check(&wrong_scheme).is_err());
        // What a shard sends is what it accepts.
        let mut signed = MetadataMap::new();
        auth.sign(&mut signed);
        assert!(auth.check(&signed).is_ok());
    }

    #[test]
    fn a_rotation_accepts_both_and_follows_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, OLD).unwrap();
        let auth = ExpertsAuth::with_check_interval(&path, Duration::ZERO).unwrap();
        // A shard still on the old token, before its files change.
        let stale = ExpertsAuth::from_file(&path).unwrap();
        assert!(auth.check(&bearer(&[NEW])).is_err());

        replace(&path, NEW);
        replace(&dir.path().join(PREVIOUS_TOKEN_FILE), OLD);
        assert!(auth.check(&bearer(&[NEW])).is_ok());
        assert!(auth.check(&bearer(&[OLD])).is_ok());
        // Mid-rotation, the stale shard accepts the rotated one's calls and the other way round.
        let mut signed = MetadataMap::new();
        auth.sign(&mut signed);
        assert!(stale.check(&signed).is_ok());
        let mut signed = MetadataMap::new();
        stale.sign(&mut signed);
        assert!(auth.check(&signed).is_ok());

        // A broken file keeps the tokens read before.
        replace(&path, "short");
        assert!(auth.check(&bearer(&[NEW])).is_ok());
    }

    #[test]
    fn bad_token_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let error = ExpertsAuth::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("token"), "{error}");
        std::fs::write(&path, "abc").unwrap();
        let error = ExpertsAuth::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("at least 32"), "{error}");
        std::fs::write(&path, format!("{OLD} {OLD}")).unwrap();
        assert!(ExpertsAuth::from_file(&path).is_err());
    }
}
