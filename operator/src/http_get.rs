//! Plain HTTP/1.1 GETs to pods (the routers' reports, the workers' metrics), with a deadline
//! and a bound on the body. One client and connection pool per reader.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Why a GET failed; the caller adds the URL.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("no answer within {seconds}s")]
    Timeout { seconds: f64 },
    #[error("{0}")]
    Http(String),
    #[error("status {0}")]
    Status(u16),
}

#[derive(Clone)]
pub struct HttpGet {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl HttpGet {
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    /// The body of `http://{address}{path}`, at most `max_bytes`, within the deadline.
    pub async fn get(
        &self,
        address: &str,
        path: &str,
        max_bytes: usize,
    ) -> Result<Bytes, GetError> {
        let get = async {
            let uri = format!("http://{address}{path}")
                .parse::<hyper::Uri>()
                .map_err(|e| GetError::Http(e.to_string()))?;
            let response = self
                .client
                .get(uri)
                .await
                .map_err(|e| GetError::Http(e.to_string()))?;
            let status = response.status();
            if !status.is_success() {
                return Err(GetError::Status(status.as_u16()));
            }
            Ok(Limited::new(response.into_body(), max_bytes)
                .collect()
                .await
                .map_err(|e| GetError::Http(format!("reading the body: {e}")))?
                .to_bytes())
        };
        tokio::time::timeout(self.timeout, get)
            .await
            .unwrap_or(Err(GetError::Timeout {
                seconds: self.timeout.as_secs_f64(),
            }))
    }
}
