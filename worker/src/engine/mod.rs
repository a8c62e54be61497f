//! The serving engine: one thread owns the model, its latent cache and every request's state, and
//! runs scheduling steps; requests reach it over a channel and stream their outputs back over
//! their own channel, so a dropped stream is a cancellation.
//!
//! - [`scheduler`]: the step (plan -> execute -> apply outputs) over the [`blocks`] manager;
//! - [`executor`]: the model as the engine drives it (one batched forward);
//! - [`output`]: finish rules and each request's text stream ([`detokenizer`], stop strings);
//! - [`sampler`]: logits -> token; [`codec`]: the tokenizer; [`request`]: what flows in and out;
//! - [`stats`]: what a step did, and how it becomes metrics.

pub mod blocks;
pub mod codec;
pub mod detokenizer;
pub mod executor;
pub mod output;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod stats;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use self::request::{GenerationRequest, OutputReceiver, OutputSender};
use self::scheduler::{RequestCounts, Scheduler, WarmUpError};
use crate::metrics::Metrics;
use executor::ModelExecutor;
use watch::{EngineReport, WATCH_BACKLOG, Watchers};

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("request queue is full ({max_queue} requests waiting); retry later")]
    QueueFull { max_queue: usize },
    #[error("the server is draining and accepts no new requests")]
    Draining,
    #[error("the engine has stopped")]
    Stopped,
}

enum Command {
    Submit(Box<GenerationRequest>, OutputSender),
    CancelAll,
    Watch(tokio::sync::mpsc::Sender<EngineReport>),
}

/// The cloneable front of a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    counts: Arc<RequestCounts>,
    draining: Arc<AtomicBool>,
    max_queue: usize,
}

impl EngineHandle {
    /// Queues a request; its outputs arrive on the returned receiver. Dropping the receiver
    /// cancels the request at the next step.
    pub fn submit(&self, request: GenerationRequest) -> Result<OutputReceiver, SubmitError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::Draining);
        }
        let queued = self.counts.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.max_queue {
            self.counts.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull {
                max_queue: self.max_queue,
            });
        }
        self.counts.in_flight.fetch_add(1, Ordering::SeqCst);
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        if self
            .commands
            .send(Command::Submit(Box::new(request), sender))
            .is_err()
        {
            self.counts.queued.fetch_sub(1, Ordering::SeqCst);
            self.counts.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(receiver)
    }

    /// Refuses new requests from now on; running and queued ones continue.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Requests accepted and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.counts.in_flight.load(Ordering::SeqCst)
    }

    /// Ends every request now with finish reason `cancelled`.
    pub fn cancel_all(&self) {
        let _ = self.commands.send(Command::CancelAll);
    }

    /// The engine's load and prefix cache as they change: a snapshot first, then a report after
    /// every step that changed something. The channel closes when the reader lags
    /// [`WATCH_BACKLOG`] reports behind (watch again for a new snapshot) or the engine stops.
    pub fn watch(&self) -> Result<tokio::sync::mpsc::Receiver<EngineReport>, SubmitError> {
        let (sender, receiver) = tokio::sync::mpsc::channel(WATCH_BACKLOG);
        self.commands
            .send(Command::Watch(sender))
            .map_err(|_| SubmitError::Stopped)?;
        Ok(receiver)
    }
}

/// Why the engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("spawning the engine thread")]
    Spawn(#[source] std::io::Error),
    #[error("the engine thread died during warm-up")]
    DiedDuringWarmUp,
    #[error("warm-up step failed")]
    WarmUp(#[source] WarmUpError),
}

/// The engine thread; it stops when every [`EngineHandle`] is dropped.
pub struct Engine {
    thread: JoinHandle<()>,
}

impl Engine {
    /// Warms the model up with one step, then serves requests on a dedicated thread. Returns once
    /// the warm-up step has run, so a caller can report readiness right after.
    /// Every step's [`stats::StepStats`] are recorded into `metrics`.
    pub fn start<E: ModelExecutor + 'static>(
        mut scheduler: Scheduler<E>,
        counts: Arc<RequestCounts>,
        metrics: Arc<Metrics>,
        max_queue: usize,
    ) -> Result<(Self, EngineHandle), EngineError> {
        let blocks = scheduler.blocks();
        metrics.set_cache_config(blocks.block_size(), blocks.num_blocks());
        let (commands, inbox) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let warm = scheduler.warm_up();
                let failed = warm.is_err();
                let _ = ready_tx.send(warm);
                if !failed {
                    run_loop(&mut scheduler, &inbox, &metrics);
                }
            })
            .map_err(EngineError::Spawn)?;
        ready_rx
            .recv()
            .map_err(|_| EngineError::DiedDuringWarmUp)?
            .map_err(EngineError::WarmUp)?;
        let handle = EngineHandle {
            commands,
            counts,
            draining: Arc::new(AtomicBool::new(false)),
            max_queue,
        };
        Ok((Self { thread }, handle))
    }

    /// Waits for the engine thread to stop (after every handle is dropped).
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("the engine thread panicked");
        }
    }
}

fn run_loop<E: ModelExecutor>(
    scheduler: &mut Scheduler<E>,
    inbox: &mpsc::Receiver<Command>,
    metrics: &Metrics,
) {
    let mut watchers = Watchers::default();
    loop {
        // Idle: sleep until a command arrives. Busy: take whatever arrived and keep stepping.
        if !scheduler.has_work() {
            match inbox.recv() {
                Ok(command) => apply(scheduler, command, metrics, &mut watchers),
                Err(_) => return,
            }
        }
        loop {
            match inbox.try_recv() {
                Ok(command) => apply(scheduler, command, metrics, &mut watchers),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    if !scheduler.has_work() {
                        return;
                    }
                    break;
                }
            }
        }
        let (stats, outputs) = scheduler.step();
        stats.record(metrics);
        outputs.deliver();
        let occupancy = scheduler.occupancy();
        watchers.publish(scheduler.blocks_mut(), occupancy);
    }
}

fn apply<E: ModelExecutor>(
    scheduler: &mut Scheduler<E>,
    command: Command,
    metrics: &Metrics,
    watchers: &mut Watchers,
) {
    match command {
        Command::Submit(request, sender) => {
            scheduler.add_request(*request, sender);
            scheduler.occupancy().record(metrics);
        }
        Command::CancelAll => {
            let (stats, outputs) = scheduler.cancel_all();
            stats.record(metrics);
            outputs.deliver();
        }
        Command::Watch(sender) => {
            let occupancy = scheduler.occupancy();
            watchers.add(sender, scheduler.blocks_mut(), occupancy);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::engine::blocks::BlockManager;
    use crate::engine::codec::tests::ByteCodec;
    use crate::engine::executor::StepError;
    use crate::engine::request::GenerationRequest;
    use crate::engine::sampler::SamplingParams;
    use crate::engine::scheduler::SchedulerConfig;
    use crate::model::SequenceChunk;

    /// Always says `a`.
    struct SaysA;

    impl ModelExecutor for SaysA {
        fn vocab_size(&self) -> usize {
            300
        }

        fn forward(&mut self, chunks: &[SequenceChunk<'_>]) -> Result<Vec<f32>, StepError> {
            let mut logits = vec![0.0; chunks.len() * 300];
            for row in logits.chunks_mut(300) {
                row[usize::from(b'a')] = 10.0;
            }
            Ok(logits)
        }
    }

    #[test]
    fn a_finished_request_is_in_the_metrics_when_its_client_sees_the_finish() {
        let metrics = Arc::new(Metrics::new("test").unwrap());
        let counts = Arc::new(RequestCounts::default());
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_batch_size: 8,
                max_tokens_per_step: 64,
                max_seq_len: 64,
            },
            SaysA,
            Arc::new(ByteCodec),
            BlockManager::new(32, 4, false),
            counts.clone(),
        );
        let (engine, handle) = Engine::start(scheduler, counts, metrics.clone(), 8).unwrap();
        // The pool's shape, where a gateway's endpoint picker reads the block size.
        assert!(metrics.render().contains(
            r#"latentserve_cache_config_info{block_size="4",num_gpu_blocks="32",model="test"} 1"#
        ));
        let counted = "latentserve_request_success_total{finish_reason=\"length\",model=\"test\"} ";
        for done in 1..=20 {
            let request = GenerationRequest {
                arrival: Instant::now(),
                ..GenerationRequest::of_bytes(b"prompt", 3, SamplingParams::default())
            };
            let mut outputs = handle.submit(request).unwrap();
            // The moment the stream shows the finish, the counter must already include it.
            while let Some(output) = outputs.blocking_recv() {
                if output.unwrap().finished.is_some() {
                    break;
                }
            }
            let text = metrics.render();
            assert!(text.contains(&format!("{counted}{done}")), "{text}");
        }
        drop(handle);
        engine.join();
    }
}
