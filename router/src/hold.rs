//! Requests held while no worker can take them: with no serving group (scaled to zero, or every
//! worker draining or failing) a request waits here, in a bounded queue, instead of failing, and
//! goes on as soon as the pool has a usable endpoint again. The pool wakes the queue oldest first
//! whenever an endpoint appears or recovers; a held request also wakes at its own time limits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use tokio::sync::Notify;

/// Default of `--hold-queue`.
pub const DEFAULT_HOLD_QUEUE: usize = 256;
/// Default of `--hold-timeout`: long enough for a group to be scheduled, pull its image and load
/// a model from a local volume.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest a held gRPC request gives up before the client's deadline: its answer must reach
/// the client before the client's own timer fires, or the client sees a bare CANCELLED instead of
/// why.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(250);

/// How requests are held (`--hold-queue`, `--hold-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldConfig {
    /// Requests held at once; 0: none, a request with no usable endpoint fails at once.
    pub capacity: usize,
    /// The longest one request is held.
    pub timeout: Duration,
}

impl Default for HoldConfig {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_HOLD_QUEUE,
            timeout: DEFAULT_HOLD_TIMEOUT,
        }
    }
}

/// Why a request that found no usable endpoint was not (or no longer) held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    /// Holding is off (`--hold-queue 0`).
    #[error("no worker is ready to take the request; retry later")]
    Off,
    #[error(
        "no worker is ready and {capacity} requests are already waiting for one (the router's --hold-queue); retry later"
    )]
    Full { capacity: usize },
    #[error("no worker became ready within {0:?} (the router's --hold-timeout); retry later")]
    TimedOut(Duration),
    #[error("no worker became ready before the request's deadline")]
    Deadline,
}

impl HoldError {
    /// The `reason` label of `latentserve_router_hold_rejected_total`; `None` when holding is off.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            HoldError::Off => None,
            HoldError::Full { .. } => Some("full"),
            HoldError::TimedOut(_) | HoldError::Deadline => Some("timeout"),
        }
    }
}

struct Entry {
    id: u64,
    arrival: Instant,
    wake: Arc<Notify>,
}

/// The held requests, oldest first.
pub struct HoldQueue {
    config: HoldConfig,
    entries: Mutex<VecDeque<Entry>>,
    next_id: AtomicU64,
    /// `latentserve_router_held_requests`.
    gauge: IntGauge,
}

impl HoldQueue {
    pub fn new(config: HoldConfig, gauge: IntGauge) -> Self {
        Self {
            config,
            entries: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(0),
            gauge,
        }
    }

    pub fn config(&self) -> HoldConfig {
        self.config
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests held now.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How long the oldest held request has waited (zero when none is held).
    pub fn oldest(&self, now: Instant) -> Duration {
        self.entries()
            .front()
            .map_or(Duration::ZERO, |e| now.saturating_duration_since(e.arrival))
    }

    /// Takes a place at the end of the queue, or says why not.
    pub fn join(self: &Arc<Self>, arrival: Instant) -> Result<Ticket, HoldError> {
        if self.config.capacity == 0 {
            return Err(HoldError::Off);
        }
        let mut entries = self.entries();
        if entries.len() >= self.config.capacity {
            return Err(HoldError::Full {
                capacity: self.config.capacity,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        entries.push_back(Entry {
            id,
            arrival,
            wake: wake.clone(),
        });
        self.gauge.set(entries.len() as i64);
        Ok(Ticket {
            queue: self.clone(),
            id,
            wake,
        })
    }

    /// Wakes every held request, oldest first, to look for an endpoint again. A request that is
    /// not waiting at this moment finds the wake-up when it next waits (nothing is lost).
    pub fn wake_all(&self) {
        for entry in self.entries().iter() {
            entry.wake.notify_one();
        }
    }

    fn leave(&self, id: u64) {
        let mut entries = self.entries();
        entries.retain(|e| e.id != id);
        self.gauge.set(entries.len() as i64);
    }
}

/// A held request's place in the queue; dropping it leaves the queue (the request went on, gave
/// up, or its client went away).
pub struct Ticket {
    queue: Arc<HoldQueue>,
    id: u64,
    wake: Arc<Notify>,
}

impl Ticket {
    /// Resolves when the pool may have a usable endpoint again.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.queue.leave(self.id);
    }
}

/// When a request that arrived at `arrival` with the client's `deadline` stops being held, and
/// the error it then gets. The client's deadline wins when it comes first, less a margin (a tenth
/// of the time the client gave, at most [`DEADLINE_MARGIN`]) so that the answer arrives in time.
pub fn give_up_at(
    arrival: Instant,
    deadline: Option<Instant>,
    timeout: Duration,
) -> (Instant, HoldError) {
    let own = arrival + timeout;
    match deadline {
        Some(deadline) => {
            let budget = deadline.saturating_duration_since(arrival);
            let early = deadline
                .checked_sub((budget / 10).min(DEADLINE_MARGIN))
                .unwrap_or(deadline);
            if early < own {
                (early, HoldError::Deadline)
            } else {
                (own, HoldError::TimedOut(timeout))
            }
        }
        None => (own, HoldError::TimedOut(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(capacity: usize) -> Arc<HoldQueue> {
        let gauge = IntGauge::new("held", "held").unwrap();
        Arc::new(HoldQueue::new(
            HoldConfig {
                capacity,
                timeout: Duration::from_secs(1),
            },
            gauge,
        ))
    }

    #[test]
    fn the_queue_is_bounded_and_a_ticket_leaves_when_dropped() {
        let now = Instant::now();
        assert_eq!(queue(0).join(now).err(), Some(HoldError::Off));
        let held = queue(2);
        let first = held.join(now).unwrap();
        let second = held.join(now + Duration::from_secs(1)).unwrap();
        assert_eq!(held.len(), 2);
        assert_eq!(held.gauge.get(), 2);
        let full = held.join(now).err().unwrap();
        assert_eq!(full, HoldError::Full { capacity: 2 });
        assert_eq!(full.reason(), Some("full"));
        assert!(full.to_string().contains("--hold-queue"), "{full}");
        assert_eq!(
            held.oldest(now + Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        drop(first);
        assert_eq!(
            held.oldest(now + Duration::from_secs(3)),
            Duration::from_secs(2)
        );
        drop(second);
        assert!(held.is_empty());
        assert_eq!(held.gauge.get(), 0);
        assert_eq!(held.oldest(now), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_wake_up_before_the_wait_is_not_lost() {
        let held = queue(4);
        let ticket = held.join(Instant::now()).unwrap();
        held.wake_all();
        tokio::time::timeout(Duration::from_secs(10), ticket.woken())
            .await
            .expect("the stored wake-up resolves at once");
    }

    #[test]
    fn the_earlier_of_the_hold_timeout_and_the_deadline_ends_the_hold() {
        let arrival = Instant::now();
        let timeout = Duration::from_secs(300);
        let (at, why) = give_up_at(arrival, None, timeout);
        assert_eq!((at, why), (arrival + timeout, HoldError::TimedOut(timeout)));
        // A 2 s deadline: given up 200 ms early, so that the answer reaches the client in time.
        let deadline = arrival + Duration::from_secs(2);
        let (at, why) = give_up_at(arrival, Some(deadline), timeout);
        assert_eq!(at, deadline - Duration::from_millis(200));
        assert_eq!(why, HoldError::Deadline);
        assert_eq!(why.reason(), Some("timeout"));
        // A long deadline: at most DEADLINE_MARGIN early; past the hold timeout, the timeout wins.
        let (at, _) = give_up_at(arrival, Some(arrival + Duration::from_secs(60)), timeout);
        assert_eq!(at, arrival + Duration::from_secs(60) - DEADLINE_MARGIN);
        let (at, why) = give_up_at(arrival, Some(arrival + Duration::from_secs(900)), timeout);
        assert_eq!((at, why), (arrival + timeout, HoldError::TimedOut(timeout)));
    }
}
