//! Splitting projections over the kernels' thread pool ([`crate::pool`]) by blocks of weight
//! rows.

use half::f16;
use std::sync::Mutex;

use crate::isa::Isa;
use crate::kernel::{self, Packed};
use crate::pool;

/// Weight rows as stored.
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> Rows<'a> {
    fn element_bytes(self) -> usize {
        match self {
            Rows::F32(_) => 4,
            Rows::F16(_) => 2,
        }
    }

    fn len(self) -> usize {
        match self {
            Rows::F32(w) => w.len(),
            Rows::F16(w) => w.len(),
        }
    }

    fn is_empty(self) -> bool {
        self.len() == 0
    }

    fn split_at(self, elements: usize) -> (Rows<'a>, Rows<'a>) {
        match self {
            Rows::F32(w) => {
                let (head, tail) = w.split_at(elements);
                (Rows::F32(head), Rows::F32(tail))
            }
            Rows::F16(w) => {
                let (head, tail) = w.split_at(elements);
                (Rows::F16(head), Rows::F16(tail))
            }
        }
    }
}

/// One projection: `out` (rows, n) = `w` (rows, in_features) applied to `x` (n, in_features).
pub(crate) struct Projection<'a> {
    pub(crate) weights: Rows<'a>,
    pub(crate) in_features: usize,
    pub(crate) x: &'a [f32],
    pub(crate) n: usize,
    pub(crate) out: &'a mut [f32],
}

impl Projection<'_> {
    /// The weight rows, packed `in_features` apart.
    fn packed(&self) -> Packed {
        Packed {
            rows: self.weights.len() / self.in_features,
            stride: self.in_features,
        }
    }

    fn weight_bytes(&self) -> usize {
        self.weights.len() * self.weights.element_bytes()
    }

    fn run(self, isa: Isa) {
        let packed = self.packed();
        let Projection {
            weights,
            in_features,
            x,
            n,
            out,
        } = self;
        match weights {
            Rows::F32(w) => kernel::project(isa, w, packed, in_features, x, n, out),
            Rows::F16(w) => kernel::project(isa, w, packed, in_features, x, n, out),
        }
    }
}

/// Below this many weight bytes in total, waking the other threads costs more than it saves.
const SERIAL_MAX_BYTES: usize = 64 << 10;
/// Smallest block handed to one task, so that scheduling stays small against streaming it.
const MIN_TASK_BYTES: usize = 64 << 10;
/// Tasks per thread: more than one evens out cores that are busy with something else.
const TASKS_PER_THREAD: usize = 4;
/// Weight rows per task are a multiple of this (the kernels' row blocking).
const ROW_ALIGN: usize = 4;

/// Runs all projections, split by weight rows over the kernels' pool when they are large enough
/// to gain from it.
pub(crate) fn run(isa: Isa, projections: Vec<Projection<'_>>) {
    let total_bytes: usize = projections.iter().map(Projection::weight_bytes).sum();
    let pool = pool::pool();
    let threads = pool.threads();
    if threads <= 1 || total_bytes <= SERIAL_MAX_BYTES {
        for projection in projections {
            projection.run(isa);
        }
        return;
    }
    let task_bytes = (total_bytes / (threads * TASKS_PER_THREAD)).max(MIN_TASK_BYTES);
    let mut tasks = Vec::new();
    for projection in projections {
        split(projection, task_bytes, &mut tasks);
    }
    let tasks: Vec<Mutex<Option<Projection>>> = tasks
        .into_iter()
        .map(|task| Mutex::new(Some(task)))
        .collect();
    pool.run(tasks.len(), &|index| {
        let task = tasks[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            task.run(isa);
        }
    });
}

/// Cuts `projection` into tasks of about `task_bytes` of weights each.
fn split<'a>(projection: Projection<'a>, task_bytes: usize, tasks: &mut Vec<Projection<'a>>) {
    let Projection {
        mut weights,
        in_features,
        x,
        n,
        mut out,
    } = projection;
    let row_bytes = in_features * weights.element_bytes();
    let rows_per_task = task_bytes.div_ceil(row_bytes).next_multiple_of(ROW_ALIGN);
    while !weights.is_empty() {
        let rows = rows_per_task.min(weights.len() / in_features);
        let (task_weights, rest_weights) = weights.split_at(rows * in_features);
        let (task_out, rest_out) = std::mem::take(&mut out).split_at_mut(rows * n);
        tasks.push(Projection {
            weights: task_weights,
            in_features,
            x,
            n,
            out: task_out,
        });
        weights = rest_weights;
        out = rest_out;
    }
}
