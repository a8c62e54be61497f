//! Capacity figures for the status, read from a ready worker's `GetModelInfo`. Best effort: a
//! worker that does not answer leaves the status without figures until the next reconcile.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use latentserve_proto::v1::inference_client::InferenceClient;
use latentserve_proto::v1::{GetModelInfoRequest, ModelInfo};

use crate::crd::Capacity;

/// Why a worker gave no `ModelInfo`.
#[derive(Debug, thiserror::Error)]
pub enum ModelInfoError {
    #[error("bad worker address {address}: {source}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("GetModelInfo on {address}: {source}")]
    Call {
        address: String,
        #[source]
        source: tonic::Status,
    },
}

/// Where the reconciler gets `ModelInfo` from; a trait so that tests without workers can run the
/// reconciler with a source that never answers.
pub trait ModelInfoSource: Send + Sync {
    fn model_info<'a>(
        &'a self,
        address: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<ModelInfo, ModelInfoError>> + Send + 'a>>;
}

/// Asks the worker over gRPC, within a short deadline so that a hung worker cannot stall a
/// reconcile.
#[derive(Debug, Clone)]
pub struct GrpcModelInfo {
    pub timeout: Duration,
}

impl Default for GrpcModelInfo {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(3),
        }
    }
}

impl ModelInfoSource for GrpcModelInfo {
    fn model_info<'a>(
        &'a self,
        address: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<ModelInfo, ModelInfoError>> + Send + 'a>> {
        Box::pin(async move {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .map_err(|source| ModelInfoError::Address {
                    address: address.to_owned(),
                    source,
                })?
                .connect_timeout(self.timeout)
                .timeout(self.timeout);
            let channel = endpoint
                .connect()
                .await
                .map_err(|source| ModelInfoError::Connect {
                    address: address.to_owned(),
                    source,
                })?;
            let reply = InferenceClient::new(channel)
                .get_model_info(GetModelInfoRequest {})
                .await
                .map_err(|source| ModelInfoError::Call {
                    address: address.to_owned(),
                    source,
                })?;
            Ok(reply.into_inner())
        })
    }
}

/// The status figures from one worker's answer. `max_seq_len` is the spec's `serving.maxSeqLen`
/// when set, the model's context length otherwise.
pub fn capacity_from(info: &ModelInfo, max_seq_len: Option<i32>, pod: &str) -> Capacity {
    let max_context = max_seq_len
        .and_then(|n| u64::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(u64::from(info.max_context))
        .max(1);
    let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Capacity {
        kv_cache_bytes_per_token: to_i64(info.kv_cache_bytes_per_token),
        kv_cache_tokens: to_i64(info.kv_cache_capacity_tokens),
        concurrent_sequences_at_max_len: to_i64(info.kv_cache_capacity_tokens / max_context),
        max_context: to_i64(max_context),
        reported_by: pod.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use latentserve_proto::v1::inference_server::{Inference, InferenceServer};
    use latentserve_proto::v1::{
        DetokenizeRequest, DetokenizeResponse, GenerateRequest, GenerateResponse, TokenizeRequest,
        TokenizeResponse,
    };
    use tonic::{Request, Response, Status};

    fn v2_lite_info() -> ModelInfo {
        ModelInfo {
            model: "deepseek-v2-lite".into(),
            architecture: "deepseek_v2".into(),
            num_layers: 27,
            max_context: 163_840,
            // 576 latent values x 27 layers x 2 bytes (bf16).
            kv_cache_bytes_per_token: 576 * 27 * 2,
            kv_cache_capacity_tokens: 262_144,
            ..ModelInfo::default()
        }
    }

    #[test]
    fn figures_use_max_seq_len_when_set() {
        let capacity = capacity_from(&v2_lite_info(), Some(8192), "demo-0-0");
        assert_eq!(capacity.kv_cache_bytes_per_token, 31_104);
        assert_eq!(capacity.kv_cache_tokens, 262_144);
        assert_eq!(capacity.concurrent_sequences_at_max_len, 32);
        assert_eq!(capacity.max_context, 8192);
        let capacity = capacity_from(&v2_lite_info(), None, "demo-0-0");
        assert_eq!(capacity.concurrent_sequences_at_max_len, 1);
        assert_eq!(capacity.reported_by, "demo-0-0");
    }

    /// Answers `GetModelInfo` like a worker; the other calls are not part of this test.
    struct InfoOnly;

    #[tonic::async_trait]
    impl Inference for InfoOnly {
        type GenerateStream =
            std::pin::Pin<Box<dyn futures::Stream<Item = Result<GenerateResponse, Status>> + Send>>;

        async fn generate(
            &self,
            _: Request<GenerateRequest>,
        ) -> Result<Response<Self::GenerateStream>, Status> {
            Err(Status::unimplemented("not served by this test server"))
        }
        async fn tokenize(
            &self,
            _: Request<TokenizeRequest>,
        ) -> Result<Response<TokenizeResponse>, Status> {
            Err(Status::unimplemented("not served by this test server"))
        }
        async fn detokenize(
            &self,
            _: Request<DetokenizeRequest>,
        ) -> Result<Response<DetokenizeResponse>, Status> {
            Err(Status::unimplemented("not served by this test server"))
        }
        async fn get_model_info(
            &self,
            _: Request<GetModelInfoRequest>,
        ) -> Result<Response<ModelInfo>, Status> {
            Ok(Response::new(v2_lite_info()))
        }
    }

    #[tokio::test]
    async fn grpc_source_reads_a_served_model_info() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(InferenceServer::new(InfoOnly))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let info = GrpcModelInfo::default().model_info(&address).await.unwrap();
        assert_eq!(info, v2_lite_info());
        server.abort();
    }

    #[tokio::test]
    async fn an_absent_worker_is_an_error_not_a_hang() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let source = GrpcModelInfo {
            timeout: Duration::from_millis(500),
        };
        let err = source.model_info(&address).await.unwrap_err();
        assert!(err.to_string().contains(&address), "{err}");
        assert!(matches!(err, ModelInfoError::Connect { .. }), "{err:?}");
    }
}
