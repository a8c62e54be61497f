//! A small pool of threads that spin briefly between jobs.
//!
//! A decode step runs ~170 projections, each a few tens of microseconds long, with serial work
//! between them. rayon parks its idle workers after a few yields, so every projection paid for a
//! futex wake-up and a context switch (~350 per token measured with `perf stat`), and the second
//! core joined late. Here workers spin for [`SPIN`] after each job, long enough to bridge the
//! serial gaps of a step, and then park, so an idle worker costs nothing. While waiting they
//! yield the core to any other runnable thread (rayon's, during a prefill's gemm).
//!
//! One job runs at a time. A caller that finds the pool busy (another thread's job, or a job
//! submitted from inside a task) runs its tasks itself, so submitting never blocks or deadlocks.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a worker keeps looking for the next job (yielding in between) before it parks.
const SPIN: Duration = Duration::from_micros(200);
/// Tasks per job at most (they share a 16-bit field of the claim word).
pub(crate) const MAX_TASKS: usize = u16::MAX as usize;

/// The task function of the running job, with its lifetime erased: it is only called for a task
/// claimed from the job's epoch, and [`Pool::run`] does not return before every claimed task has
/// finished.
type Task = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// epoch (32 bits) | task count (16 bits) | next unclaimed task (16 bits). A task is claimed
    /// by advancing `next` with a compare-exchange that also checks the epoch, so a worker that
    /// saw an earlier job can never claim a task of a later one.
    claims: AtomicU64,
    /// Written only by the submitter, while no task of any job can be claimed.
    task: UnsafeCell<Option<Task>>,
    /// Claimed tasks of the current job that have not finished.
    pending: AtomicUsize,
    panicked: AtomicBool,
    sleepers: Mutex<usize>,
    wake: Condvar,
}

// SAFETY: `task` is written by the submitter only between jobs (no claim can succeed, see
// `claims`), and read by a worker only after a successful claim of the job it was written for.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer refers to a `Sync` closure.
unsafe impl Send for Shared {}

fn unpack(claims: u64) -> (u32, usize, usize) {
    (
        (claims >> 32) as u32,
        ((claims >> 16) & 0xffff) as usize,
        (claims & 0xffff) as usize,
    )
}

impl Shared {
    /// Claims and runs tasks of job `epoch` until none is left.
    fn work(&self, epoch: u32) {
        let mut current = self.claims.load(Ordering::Acquire);
        loop {
            let (seen, count, next) = unpack(current);
            if seen != epoch || next >= count {
                return;
            }
            match self.claims.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // SAFETY: the claim succeeded, so `task` holds this epoch's function, and
                    // the submitter waits for `pending` (which counts this task) to reach zero
                    // before the function's borrow ends.
                    let task = unsafe { (*self.task.get()).expect("a job's task is set") };
                    // SAFETY: as above.
                    let task = unsafe { &*task };
                    if catch_unwind(AssertUnwindSafe(|| task(next))).is_err() {
                        self.panicked.store(true, Ordering::Relaxed);
                    }
                    self.pending.fetch_sub(1, Ordering::Release);
                    current = self.claims.load(Ordering::Acquire);
                }
                Err(actual) => current = actual,
            }
        }
    }

    fn worker(&self) {
        let mut seen = unpack(self.claims.load(Ordering::Acquire)).0;
        loop {
            let started = Instant::now();
            let epoch = loop {
                let epoch = unpack(self.claims.load(Ordering::Acquire)).0;
                if epoch != seen {
                    break epoch;
                }
                if started.elapsed() < SPIN {
                    // Yield rather than spin: between projections of a prefill, candle's gemm
                    // runs on rayon's threads, and a busy spinner here would take their core.
                    std::thread::yield_now();
                    continue;
                }
                let mut sleepers = self.sleepers.lock().unwrap_or_else(|e| e.into_inner());
                *sleepers += 1;
                let epoch = loop {
                    let epoch = unpack(self.claims.load(Ordering::Acquire)).0;
                    if epoch != seen {
                        break epoch;
                    }
                    sleepers = self.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
                };
                *sleepers -= 1;
                break epoch;
            };
            seen = epoch;
            self.work(epoch);
        }
    }
}

/// The pool; [`pool`] gives the process-wide one.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    /// Held by the thread whose job runs.
    submit: Mutex<()>,
    threads: usize,
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            claims: AtomicU64::new(0),
            task: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        });
        for index in 1..threads {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("kernels-{index}"))
                .spawn(move || shared.worker())
                .expect("spawn a kernel worker thread");
        }
        Self {
            shared,
            submit: Mutex::new(()),
            threads,
        }
    }

    /// Threads that run a job, the caller's included.
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `task(0..count)` over the pool's threads and the caller's, and returns when all have
    /// finished. Runs them on the caller alone when the pool is busy or has no other thread.
    ///
    /// Panics if a task panicked.
    pub(crate) fn run(&self, count: usize, task: &(dyn Fn(usize) + Sync)) {
        let guard = match self.submit.try_lock() {
            Ok(guard) if self.threads > 1 && count > 1 && count <= MAX_TASKS => guard,
            _ => {
                (0..count).for_each(task);
                return;
            }
        };
        let shared = &*self.shared;
        let epoch = unpack(shared.claims.load(Ordering::Acquire))
            .0
            .wrapping_add(1);
        // SAFETY: the previous job has finished (`pending` reached zero before its `run`
        // returned) and all its tasks were claimed, so no worker reads `task` until the claim
        // word below names the new epoch. The lifetime is erased; see `Task`.
        unsafe {
            *shared.task.get() = Some(std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                Task,
            >(task as *const _));
        }
        shared.pending.store(count, Ordering::Relaxed);
        shared.claims.store(
            (u64::from(epoch) << 32) | ((count as u64) << 16),
            Ordering::Release,
        );
        if *shared.sleepers.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            shared.wake.notify_all();
        }
        shared.work(epoch);
        while shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        // SAFETY: every task has finished; no worker can claim one of this job any more.
        unsafe { *shared.task.get() = None };
        let panicked = shared.panicked.swap(false, Ordering::Relaxed);
        drop(guard);
        assert!(!panicked, "a kernel task panicked");
    }
}

/// The process-wide pool, with as many threads as rayon's global pool (`RAYON_NUM_THREADS`),
/// started on first use.
pub(crate) fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(rayon::current_num_threads()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_jobs() {
        let pool = Pool::new(3);
        for count in [0, 1, 2, 7, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
            pool.run(count, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "count {count}"
            );
        }
    }

    #[test]
    fn jobs_after_the_workers_parked_still_run_everywhere() {
        let pool = Pool::new(2);
        let total = AtomicUsize::new(0);
        for _ in 0..3 {
            std::thread::sleep(SPIN * 5);
            pool.run(16, &|i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 3 * (0..16).sum::<usize>());
    }

    #[test]
    fn concurrent_and_nested_submitters_run_their_own_tasks() {
        let pool = Arc::new(Pool::new(2));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let sum = AtomicUsize::new(0);
                    for _ in 0..200 {
                        pool.run(8, &|i| {
                            // A nested job finds the pool busy and runs on this thread.
                            pool.run(2, &|j| {
                                sum.fetch_add(i * 2 + j, Ordering::Relaxed);
                            });
                        });
                    }
                    sum.load(Ordering::Relaxed)
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap(), 200 * (0..16).sum::<usize>());
        }
    }

    #[test]
    fn a_panicking_task_is_reported_to_the_submitter() {
        let pool = Pool::new(2);
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, &|i| assert_ne!(i, 5, "task five fails"));
        }));
        assert!(result.is_err());
        // The pool still works afterwards.
        let count = AtomicUsize::new(0);
        pool.run(8, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }
}
