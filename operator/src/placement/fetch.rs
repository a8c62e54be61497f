//! Reads a worker's expert counters from its metrics port (`GET /metrics`, Prometheus text).
//! [`LoadSource`] lets the reconciler tests answer with fixed counts instead.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use latentserve_placement::load::ExpertLoad;

use crate::http_get::{GetError, HttpGet};

pub const PATH: &str = "/metrics";
/// How long one worker may take to answer.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// The largest exposition read: DeepSeek-V3 has 58 MoE layers x 256 experts, ~80 bytes per
/// sample, plus everything else a worker exports.
const MAX_BODY_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("GET http://{address}{PATH}: {source}")]
    Get {
        address: String,
        #[source]
        source: GetError,
    },
    #[error("GET http://{address}{PATH}: {message}")]
    Parse { address: String, message: String },
}

/// Where expert counters come from: the workers over HTTP, or a test's fixed answers.
pub trait LoadSource: Send + Sync {
    /// The `latentserve_expert_tokens_total` counters of the worker at `address` (`IP:PORT`).
    fn expert_load<'a>(
        &'a self,
        address: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<ExpertLoad, FetchError>> + Send + 'a>>;
}

#[derive(Clone)]
pub struct HttpLoads {
    http: HttpGet,
}

impl Default for HttpLoads {
    fn default() -> Self {
        Self {
            http: HttpGet::new(TIMEOUT),
        }
    }
}

impl LoadSource for HttpLoads {
    fn expert_load<'a>(
        &'a self,
        address: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<ExpertLoad, FetchError>> + Send + 'a>> {
        Box::pin(async move {
            let body = self
                .http
                .get(address, PATH, MAX_BODY_BYTES)
                .await
                .map_err(|source| FetchError::Get {
                    address: address.to_owned(),
                    source,
                })?;
            let parse = |message: String| FetchError::Parse {
                address: address.to_owned(),
                message,
            };
            let text = std::str::from_utf8(&body).map_err(|e| parse(e.to_string()))?;
            ExpertLoad::from_prometheus_text(text).map_err(parse)
        })
    }
}
