//! `latentserve.v1.Experts`: runs this shard's routed experts for a peer, and tells peers who this
//! shard is in the handshake. Served on the same gRPC port as `latentserve.v1.Inference`.

use std::sync::{Arc, OnceLock};

use latentserve_proto::v1::experts_server::{Experts, ExpertsServer};
use latentserve_proto::v1::{
    HandshakeRequest, HandshakeResponse, RunExpertsRequest, RunExpertsResponse, WireDtype,
};
use tonic::{Request, Response, Status};

use super::peers::MAX_MESSAGE_BYTES;
use super::placement::Placement;
use super::wire;
use crate::metrics::Metrics;
use crate::model::{DispatchPlan, ExpertExecutor, ExpertWork, ModelError};

/// Who this shard is: what peers compare in the handshake.
#[derive(Debug, Clone)]
pub struct ShardIdentity {
    pub rank: usize,
    pub placement: Placement,
    pub fingerprint: String,
    pub model_name: String,
}

/// The local experts, once the model is loaded.
pub struct LocalBackend {
    pub experts: Arc<dyn ExpertExecutor>,
    pub hidden_size: usize,
    pub num_layers: usize,
}

/// The service; it reports not ready (and refuses work with UNAVAILABLE) until
/// [`ExpertsService::backend`] is set.
#[derive(Clone)]
pub struct ExpertsService {
    identity: Arc<ShardIdentity>,
    backend: Arc<OnceLock<LocalBackend>>,
    metrics: Arc<Metrics>,
    activity: Arc<PeerActivity>,
}

/// When a peer last called RunExperts: a draining shard keeps its exchange up while its peers
/// still finish requests that need its experts.
#[derive(Debug)]
pub struct PeerActivity {
    since: std::time::Instant,
    /// Milliseconds after `since` of the last call's start.
    last_call_ms: std::sync::atomic::AtomicU64,
}

impl Default for PeerActivity {
    fn default() -> Self {
        Self {
            since: std::time::Instant::now(),
            last_call_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl PeerActivity {
    fn record(&self) {
        let now = self.since.elapsed().as_millis() as u64;
        self.last_call_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long ago a peer last called (since start when none has).
    pub fn idle_for(&self) -> std::time::Duration {
        let last = self.last_call_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.since
            .elapsed()
            .saturating_sub(std::time::Duration::from_millis(last))
    }
}

impl ExpertsService {
    pub fn new(identity: ShardIdentity, metrics: Arc<Metrics>) -> Self {
        Self {
            identity: Arc::new(identity),
            backend: Arc::new(OnceLock::new()),
            metrics,
            activity: Arc::new(PeerActivity::default()),
        }
    }

    /// When peers last called; shared with the server's drain.
    pub fn activity(&self) -> Arc<PeerActivity> {
        self.activity.clone()
    }

    /// Where the loaded model's experts go; set once.
    pub fn backend(&self) -> Arc<OnceLock<LocalBackend>> {
        self.backend.clone()
    }

    /// The tonic server, with message limits that fit a long prefill chunk of a large model.
    pub fn into_server(self) -> ExpertsServer<Self> {
        ExpertsServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Checks a peer's request against this shard and turns it into a dispatch plan over its rows.
pub fn plan_for_request(
    request: &RunExpertsRequest,
    identity: &ShardIdentity,
    hidden_size: usize,
    num_layers: usize,
) -> Result<(Vec<f32>, DispatchPlan), Status> {
    if request.fingerprint != identity.fingerprint {
        return Err(Status::failed_precondition(format!(
            "fingerprint {} does not match this shard's {} (different model, placement or shard count)",
            request.fingerprint, identity.fingerprint
        )));
    }
    let layer = request.layer as usize;
    if layer >= num_layers {
        return Err(Status::invalid_argument(format!(
            "layer {layer} is out of range for a model of {num_layers} layers"
        )));
    }
    let rows = request
        .hidden
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("hidden is missing"))?;
    if rows.cols as usize != hidden_size {
        return Err(Status::invalid_argument(format!(
            "hidden has {} columns, the model's hidden_size is {hidden_size}",
            rows.cols
        )));
    }
    let Some(placement) = identity.placement.layer(layer) else {
        return Err(Status::invalid_argument(format!(
            "layer {layer} is not an MoE layer: it has no routed experts"
        )));
    };
    let hidden =
        wire::decode(rows).map_err(|e| Status::invalid_argument(format!("hidden: {e}")))?;
    let tokens = rows.rows;
    let mut works = Vec::with_capacity(request.experts.len());
    // A peer sends each expert once, with each of its rows once: anything else only multiplies
    // the work (one row named a million times took a worker from 0.45 to 3.6 GB), so the work of
    // one request stays within rows x experts held.
    let mut seen_experts = std::collections::HashSet::new();
    let mut row_seen = vec![false; tokens as usize];
    for (index, entry) in request.experts.iter().enumerate() {
        let expert = entry.expert as usize;
        if !placement.holds(identity.rank, expert) {
            return Err(Status::invalid_argument(format!(
                "experts[{index}]: expert {expert} of layer {layer} is not held by shard {}",
                identity.rank
            )));
        }
        if !seen_experts.insert(expert) {
            return Err(Status::invalid_argument(format!(
                "experts[{index}]: expert {expert} is listed twice"
            )));
        }
        if entry.rows.len() != entry.weights.len() {
            return Err(Status::invalid_argument(format!(
                "experts[{index}]: {} rows but {} weights",
                entry.rows.len(),
                entry.weights.len()
            )));
        }
        if let Some(&bad) = entry.rows.iter().find(|&&r| r >= tokens) {
            return Err(Status::invalid_argument(format!(
                "experts[{index}]: row {bad} is out of range for {tokens} hidden rows"
            )));
        }
        row_seen.fill(false);
        for &row in &entry.rows {
            if std::mem::replace(&mut row_seen[row as usize], true) {
                return Err(Status::invalid_argument(format!(
                    "experts[{index}]: row {row} is listed twice"
                )));
            }
        }
        works.push(ExpertWork {
            expert,
            rows: entry.rows.clone(),
            weights: entry.weights.clone(),
        });
    }
    Ok((hidden, DispatchPlan { works }))
}

#[tonic::async_trait]
impl Experts for ExpertsService {
    async fn handshake(
        &self,
        request: Request<HandshakeRequest>,
    ) -> Result<Response<HandshakeResponse>, Status> {
        let request = request.into_inner();
        if request.fingerprint != self.identity.fingerprint {
            tracing::warn!(
                peer = request.rank,
                theirs = %request.fingerprint,
                ours = %self.identity.fingerprint,
                "a peer with a different fingerprint connected"
            );
        }
        Ok(Response::new(HandshakeResponse {
            rank: self.identity.rank as u32,
            shard_count: self.identity.placement.shard_count() as u32,
            fingerprint: self.identity.fingerprint.clone(),
            ready: self.backend.get().is_some(),
            model_name: self.identity.model_name.clone(),
        }))
    }

    async fn run_experts(
        &self,
        request: Request<RunExpertsRequest>,
    ) -> Result<Response<RunExpertsResponse>, Status> {
        self.activity.record();
        let backend = self
            .backend
            .get()
            .ok_or_else(|| Status::unavailable("the model is still loading"))?;
        let request = request.into_inner();
        let hidden_size = backend.hidden_size;
        let (hidden, plan) =
            plan_for_request(&request, &self.identity, hidden_size, backend.num_layers)?;
        let layer = request.layer as usize;
        for work in &plan.works {
            self.metrics
                .record_expert_tokens(layer, work.expert, work.rows.len() as u64);
        }
        let response_dtype = match WireDtype::try_from(request.response_dtype) {
            Ok(WireDtype::Unspecified) | Err(_) => request
                .hidden
                .as_ref()
                .and_then(|h| WireDtype::try_from(h.dtype).ok())
                .unwrap_or(WireDtype::F32),
            Ok(dtype) => dtype,
        };
        let experts = backend.experts.clone();
        let tokens = hidden.len() / hidden_size;
        // Expert matmuls are CPU work: keep them off the async workers.
        let sums = tokio::task::spawn_blocking(move || {
            experts.run_experts(layer, &hidden, hidden_size, &plan)
        })
        .await
        .map_err(|e| Status::internal(format!("expert task failed: {e}")))?
        .map_err(|e| match e {
            // A dense layer, or an expert this shard did not load: the request is at fault.
            ModelError::ExpertNotLoaded { .. } => {
                Status::invalid_argument(format!("layer {layer}: {e}"))
            }
            other => Status::internal(format!("running experts of layer {layer}: {other}")),
        })?;
        Ok(Response::new(RunExpertsResponse {
            partial_sums: Some(wire::encode(&sums, tokens, hidden_size, response_dtype)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use latentserve_proto::v1::ExpertRows;

    use super::*;

    fn identity() -> ShardIdentity {
        ShardIdentity {
            rank: 1,
            // Layer 1 is MoE (experts 0, 1 on shard 0; 2, 3 on shard 1); layer 2 (per-layer
            // entry) gives shard 1 experts 0 and 3.
            placement: Placement::parse(
                r#"{"experts": [[0], [0], [1], [1]], "layers": {"2": [[1], [0], [0], [1]]}}"#,
                latentserve_placement::file::ModelShape {
                    n_experts: 4,
                    moe_layers: &[1, 2],
                    shard_count: 2,
                },
            )
            .unwrap(),
            fingerprint: "fp".to_owned(),
            model_name: "tiny".to_owned(),
        }
    }

    fn request() -> RunExpertsRequest {
        RunExpertsRequest {
            layer: 1,
            fingerprint: "fp".to_owned(),
            hidden: Some(wire::encode(&[1.0; 6], 2, 3, WireDtype::F32)),
            experts: vec![ExpertRows {
                expert: 3,
                rows: vec![0, 1],
                weights: vec![0.5, 0.25],
            }],
            response_dtype: WireDtype::F32 as i32,
        }
    }

    #[test]
    fn a_valid_request_becomes_a_plan() {
        let (hidden, plan) = plan_for_request(&request(), &identity(), 3, 3).unwrap();
        assert_eq!(hidden.len(), 6);
        assert_eq!(plan.works.len(), 1);
        assert_eq!(plan.works[0].expert, 3);
        assert_eq!(plan.works[0].rows, vec![0, 1]);
    }

    #[test]
    fn bad_requests_are_refused_with_a_named_reason() {
        let check = |request: RunExpertsRequest, code: tonic::Code, needle: &str| {
            let status = plan_for_request(&request, &identity(), 3, 3).unwrap_err();
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(needle), "{status:?}");
        };
        check(
            RunExpertsRequest {
                fingerprint: "other".to_owned(),
                ..request()
            },
            tonic::Code::FailedPrecondition,
            "fingerprint other",
        );
        check(
            RunExpertsRequest {
                layer: 3,
                ..request()
            },
            tonic::Code::InvalidArgument,
            "layer 3 is out of range",
        );
        check(
            RunExpertsRequest {
                layer: 0,
                ..request()
            },
            tonic::Code::InvalidArgument,
            "layer 0 is not an MoE layer",
        );
        let mut wrong_expert = request();
        wrong_expert.experts[0].expert = 0;
        check(
            wrong_expert,
            tonic::Code::InvalidArgument,
            "experts[0]: expert 0 of layer 1 is not held by shard 1",
        );
        // Held per layer: expert 0 is shard 1's in layer 2, expert 2 is not.
        let mut layer_2 = RunExpertsRequest {
            layer: 2,
            ..request()
        };
        layer_2.experts[0].expert = 0;
        assert!(plan_for_request(&layer_2, &identity(), 3, 3).is_ok());
        layer_2.experts[0].expert = 2;
        check(
            layer_2,
            tonic::Code::InvalidArgument,
            "expert 2 of layer 2 is not held by shard 1",
        );
        let mut bad_row = request();
        bad_row.experts[0].rows[1] = 2;
        check(
            bad_row,
            tonic::Code::InvalidArgument,
            "row 2 is out of range",
        );
        let mut repeated_row = request();
        repeated_row.experts[0].rows = vec![1, 1];
        check(
            repeated_row,
            tonic::Code::InvalidArgument,
            "row 1 is listed twice",
        );
        let mut repeated_expert = request();
        repeated_expert
            .experts
            .push(repeated_expert.experts[0].clone());
        check(
            repeated_expert,
            tonic::Code::InvalidArgument,
            "experts[1]: expert 3 is listed twice",
        );
        let mut short = request();
        short.experts[0].weights.pop();
        check(short, tonic::Code::InvalidArgument, "2 rows but 1 weights");
        check(
            RunExpertsRequest {
                hidden: Some(wire::encode(&[1.0; 4], 2, 2, WireDtype::F32)),
                ..request()
            },
            tonic::Code::InvalidArgument,
            "hidden_size is 3",
        );
    }

    /// A shard whose layer 1 is dense: it holds no expert there.
    struct DenseLayer;

    impl ExpertExecutor for DenseLayer {
        fn run_experts(
            &self,
            layer: usize,
            _: &[f32],
            _: usize,
            plan: &DispatchPlan,
        ) -> Result<Vec<f32>, ModelError> {
            Err(ModelError::ExpertNotLoaded {
                layer,
                expert: plan.works[0].expert,
            })
        }
    }

    #[tokio::test]
    async fn experts_of_a_dense_layer_are_the_callers_mistake() {
        let service = ExpertsService::new(identity(), Arc::new(Metrics::new("tiny").unwrap()));
        let backend = LocalBackend {
            experts: Arc::new(DenseLayer),
            hidden_size: 3,
            num_layers: 3,
        };
        assert!(service.backend().set(backend).is_ok());
        let status = service
            .run_experts(Request::new(request()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("layer 1"), "{status:?}");
    }
}
