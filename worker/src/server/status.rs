//! `latentserve.v1.WorkerStatus`: what the request router needs to route by prefix and load —
//! the prompt files once, then a stream of the engine's load and prefix-cache changes.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use futures::Stream;
use latentserve_proto::v1::worker_status_server::WorkerStatus;
use latentserve_proto::v1::{GetPromptFilesRequest, PromptFiles, WatchWorkerRequest, WorkerState};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};

use crate::engine::watch::EngineReport;
use crate::server::LoadedModel;

/// The health and reflection name of the service.
pub const WORKER_STATUS_SERVICE_NAME: &str = "latentserve.v1.WorkerStatus";

/// The largest prompt-files answer (tokenizer.json of large vocabularies is ~8 MB).
pub const MAX_PROMPT_FILES_BYTES: usize = 64 << 20;

/// The service; UNAVAILABLE until the model is loaded.
pub struct WorkerStatusService {
    loaded: Arc<OnceLock<LoadedModel>>,
    draining: watch::Receiver<bool>,
}

impl WorkerStatusService {
    /// `draining` turns true when the worker starts draining: every stream then sends a last
    /// state that says so and ends (a graceful shutdown waits for open streams).
    pub fn new(loaded: Arc<OnceLock<LoadedModel>>, draining: watch::Receiver<bool>) -> Self {
        Self { loaded, draining }
    }

    fn loaded(&self) -> Result<&LoadedModel, Status> {
        self.loaded
            .get()
            .ok_or_else(|| Status::unavailable("the model is still loading"))
    }
}

type StateStream = Pin<Box<dyn Stream<Item = Result<WorkerState, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerStatus for WorkerStatusService {
    async fn get_prompt_files(
        &self,
        _: Request<GetPromptFilesRequest>,
    ) -> Result<Response<PromptFiles>, Status> {
        Ok(Response::new(self.loaded()?.prompt_files.as_ref().clone()))
    }

    type WatchStream = StateStream;

    async fn watch(
        &self,
        _: Request<WatchWorkerRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let engine = self.loaded()?.engine.clone();
        let reports = engine
            .watch()
            .map_err(|_| Status::unavailable("the engine has stopped"))?;
        Ok(Response::new(Box::pin(states(
            reports,
            self.draining.clone(),
        ))))
    }
}

/// The engine's reports as worker states, until the engine closes the channel (the reader lags)
/// or the worker starts draining (one last state with `draining`).
fn states(
    reports: mpsc::Receiver<EngineReport>,
    draining: watch::Receiver<bool>,
) -> impl Stream<Item = Result<WorkerState, Status>> + Send {
    futures::stream::unfold(Some((reports, draining)), |state| async move {
        let (mut reports, mut draining) = state?;
        let next = tokio::select! {
            report = reports.recv() => Some(report?),
            _ = draining.wait_for(|draining| *draining) => None,
        };
        match next {
            Some(report) => Some((Ok(worker_state(report)), Some((reports, draining)))),
            None => {
                let last = WorkerState {
                    draining: true,
                    ..WorkerState::default()
                };
                Some((Ok(last), None))
            }
        }
    })
}

fn worker_state(report: EngineReport) -> WorkerState {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    WorkerState {
        snapshot: report.snapshot,
        cached_added: report.cached_added,
        cached_removed: report.cached_removed,
        running_requests: count(report.running),
        waiting_requests: count(report.waiting),
        available_blocks: count(report.available_blocks),
        total_blocks: count(report.total_blocks),
        draining: false,
        queued_prompt_tokens: count(report.queued_prompt_tokens),
    }
}
