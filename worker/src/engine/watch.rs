//! Reports of the engine's load and prefix cache to watchers (the request router): a snapshot
//! when a watcher joins, then the changes after every step that changed something.

use tokio::sync::mpsc;

use super::blocks::BlockManager;
use super::stats::Occupancy;

/// Reports a watcher may lag behind before it is dropped (it then reads a new snapshot).
pub const WATCH_BACKLOG: usize = 64;

/// One report to a watcher.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineReport {
    /// `cached_added` is the whole cache; anything known before is stale.
    pub snapshot: bool,
    pub cached_added: Vec<u64>,
    pub cached_removed: Vec<u64>,
    pub running: usize,
    pub waiting: usize,
    /// Prompt tokens not yet prefilled (see [`Occupancy::queued_prompt_tokens`]).
    pub queued_prompt_tokens: usize,
    pub available_blocks: usize,
    pub total_blocks: usize,
}

/// The load figures of a report, to tell whether anything changed since the last one.
type Load = (usize, usize, usize, usize);

fn load_of(report: &EngineReport) -> Load {
    (
        report.running,
        report.waiting,
        report.queued_prompt_tokens,
        report.available_blocks,
    )
}

/// The engine's watchers and what they were last told.
#[derive(Default)]
pub struct Watchers {
    senders: Vec<mpsc::Sender<EngineReport>>,
    last: Option<Load>,
}

impl Watchers {
    /// Adds a watcher and sends it the snapshot; the block manager records changes from now on.
    pub fn add(
        &mut self,
        sender: mpsc::Sender<EngineReport>,
        blocks: &mut BlockManager,
        occupancy: Occupancy,
    ) {
        if self.senders.is_empty() {
            blocks.record_cache_changes(true);
        }
        let snapshot = EngineReport {
            snapshot: true,
            cached_added: blocks.cached_hashes(),
            ..load_report(blocks, occupancy)
        };
        // The first watcher's snapshot is what was last told; later ones must not hide a load
        // change from the watchers before them.
        self.last.get_or_insert(load_of(&snapshot));
        if sender.try_send(snapshot).is_ok() {
            self.senders.push(sender);
        }
        self.stop_recording_if_alone(blocks);
    }

    /// Sends what changed since the last report, if anything did, to every watcher; drops those
    /// that left or lag [`WATCH_BACKLOG`] reports behind.
    pub fn publish(&mut self, blocks: &mut BlockManager, occupancy: Occupancy) {
        if self.senders.is_empty() {
            return;
        }
        let changes = blocks.take_cache_changes();
        let report = EngineReport {
            cached_added: changes.added,
            cached_removed: changes.removed,
            ..load_report(blocks, occupancy)
        };
        let load = load_of(&report);
        if changes_nothing(&report) && self.last == Some(load) {
            return;
        }
        self.last = Some(load);
        self.senders
            .retain(|sender| sender.try_send(report.clone()).is_ok());
        self.stop_recording_if_alone(blocks);
    }

    fn stop_recording_if_alone(&mut self, blocks: &mut BlockManager) {
        if self.senders.is_empty() {
            blocks.record_cache_changes(false);
            self.last = None;
        }
    }
}

fn changes_nothing(report: &EngineReport) -> bool {
    report.cached_added.is_empty() && report.cached_removed.is_empty()
}

fn load_report(blocks: &BlockManager, occupancy: Occupancy) -> EngineReport {
    EngineReport {
        running: occupancy.running,
        waiting: occupancy.waiting,
        queued_prompt_tokens: occupancy.queued_prompt_tokens,
        available_blocks: blocks.num_available_blocks(),
        total_blocks: blocks.num_blocks(),
        ..EngineReport::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::blocks::{BlockTable, block_hash};

    fn occupancy(running: usize) -> Occupancy {
        Occupancy {
            running,
            ..Occupancy::default()
        }
    }

    #[test]
    fn a_watcher_gets_a_snapshot_then_only_changes() {
        let mut blocks = BlockManager::new(4, 2, true);
        let mut table = BlockTable::default();
        blocks.ensure_capacity(&mut table, 2).unwrap();
        blocks.register_full_blocks(&mut table, &[1, 2], 2);
        let mut watchers = Watchers::default();
        let (sender, mut reports) = mpsc::channel(WATCH_BACKLOG);
        watchers.add(sender, &mut blocks, occupancy(1));
        let snapshot = reports.try_recv().unwrap();
        assert!(snapshot.snapshot);
        assert_eq!(snapshot.cached_added, vec![block_hash(None, &[1, 2])]);
        assert_eq!((snapshot.running, snapshot.available_blocks), (1, 3));

        // Nothing changed: nothing is sent.
        watchers.publish(&mut blocks, occupancy(1));
        assert!(reports.try_recv().is_err());
        blocks.ensure_capacity(&mut table, 4).unwrap();
        blocks.register_full_blocks(&mut table, &[1, 2, 3, 4], 4);
        watchers.publish(&mut blocks, occupancy(1));
        let report = reports.try_recv().unwrap();
        assert!(!report.snapshot);
        assert_eq!(
            report.cached_added,
            vec![block_hash(Some(block_hash(None, &[1, 2])), &[3, 4])]
        );
        // A load change alone is reported too, and so is prefill progress alone.
        watchers.publish(&mut blocks, occupancy(0));
        assert_eq!(reports.try_recv().unwrap().running, 0);
        let prefilling = Occupancy {
            queued_prompt_tokens: 40,
            ..occupancy(0)
        };
        watchers.publish(&mut blocks, prefilling);
        assert_eq!(reports.try_recv().unwrap().queued_prompt_tokens, 40);
        watchers.publish(&mut blocks, prefilling);
        assert!(reports.try_recv().is_err());
    }

    #[test]
    fn a_watcher_that_leaves_or_lags_is_dropped_and_recording_stops() {
        let mut blocks = BlockManager::new(64, 1, true);
        let mut watchers = Watchers::default();
        let (sender, reports) = mpsc::channel(2);
        watchers.add(sender, &mut blocks, occupancy(0));
        let mut table = BlockTable::default();
        for running in 1..=3 {
            watchers.publish(&mut blocks, occupancy(running));
        }
        assert!(watchers.senders.is_empty());
        drop(reports);
        blocks.ensure_capacity(&mut table, 3).unwrap();
        blocks.register_full_blocks(&mut table, &[1, 2, 3], 3);
        assert!(blocks.take_cache_changes().is_empty());
    }
}
