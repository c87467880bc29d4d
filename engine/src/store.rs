//! The committed data files and the in-memory batches not yet flushed, as one table.
//!
//! Readers take a [`Snapshot`]: the files and the memory batches at one instant, under one lock,
//! so that a flush (which adds files and drops the batches they hold in one step) never shows a
//! row twice or not at all.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::TimestampNanosecondType;
use object_store::ObjectStore;

use crate::catalog::{Change, DataFile};
use crate::schema::col;
use crate::trace_index::TraceIndex;

/// An inclusive range of `start_time` nanoseconds; `None` is unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeRange {
    /// Lower bound (inclusive).
    pub min_ns: Option<i64>,
    /// Upper bound (inclusive).
    pub max_ns: Option<i64>,
}

impl TimeRange {
    /// Whether `[lo, hi]` overlaps this range.
    pub fn overlaps(&self, lo: i64, hi: i64) -> bool {
        self.min_ns.is_none_or(|m| hi >= m) && self.max_ns.is_none_or(|m| lo <= m)
    }

    /// Whether either bound is set.
    pub fn is_bounded(&self) -> bool {
        self.min_ns.is_some() || self.max_ns.is_some()
    }
}

/// A batch held in memory until flushed.
#[derive(Debug)]
pub struct MemBatch {
    /// Highest WAL LSN of the records in it.
    pub lsn: u64,
    /// Lowest WAL LSN of the records in it. Records of one group commit are split by project,
    /// so another batch's LSNs may fall between this one's.
    pub first_lsn: u64,
    /// Project of its spans.
    pub project: Arc<str>,
    /// The rows.
    pub batch: RecordBatch,
    /// Smallest `start_time` (ns).
    pub min_start_ns: i64,
    /// Largest `start_time` (ns).
    pub max_start_ns: i64,
    /// Bytes charged to the memory budget.
    pub charged: u64,
    /// Runs of equal trace ids ([`trace_runs`]): the query planner's estimate of its traces.
    pub traces: u64,
    /// When it became visible.
    pub created: Instant,
}

impl MemBatch {
    /// A memory batch; computes its time bounds and trace runs.
    pub fn new(lsn: u64, project: Arc<str>, batch: RecordBatch, charged: u64) -> Self {
        let (min_start_ns, max_start_ns) = start_bounds(&batch);
        let traces = trace_runs(&batch);
        Self {
            lsn,
            first_lsn: lsn,
            project,
            batch,
            min_start_ns,
            max_start_ns,
            charged,
            traces,
            created: Instant::now(),
        }
    }
}

/// Runs of equal `trace_id` in a spans batch: its distinct trace ids when each trace's spans
/// arrive together, as exporters mostly send them, and more when traces interleave. One
/// comparison per row, where counting distinct ids exactly would hash every one.
pub fn trace_runs(batch: &RecordBatch) -> u64 {
    let Some(ids) = batch.column_by_name(col::TRACE_ID).and_then(|c| c.as_string_opt::<i32>())
    else {
        return batch.num_rows() as u64;
    };
    let mut runs = 0;
    let mut last = None;
    for id in ids {
        if runs == 0 || id != last {
            runs += 1;
            last = id;
        }
    }
    runs
}

/// Smallest and largest `start_time` of a spans batch (`(0, 0)` when empty).
pub fn start_bounds(batch: &RecordBatch) -> (i64, i64) {
    let Some(times) = batch.column_by_name(col::START_TIME) else { return (0, 0) };
    let values = times.as_primitive::<TimestampNanosecondType>().values();
    let min = values.iter().copied().min().unwrap_or(0);
    let max = values.iter().copied().max().unwrap_or(0);
    (min, max)
}

/// Which part of the table a reader wants.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Only this project's spans; `None` for every project.
    pub project: Option<String>,
    /// Only spans starting in this range.
    pub time: TimeRange,
    /// Only this trace (files are chosen by the trace index).
    pub trace_id: Option<String>,
}

/// What a reader sees: files and memory batches at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Committed files.
    pub files: Vec<Arc<DataFile>>,
    /// Batches not yet in a file.
    pub batches: Vec<Arc<MemBatch>>,
}

#[derive(Debug, Default)]
struct State {
    files: BTreeMap<String, Arc<DataFile>>,
    batches: Vec<Arc<MemBatch>>,
}

/// The `spans` data of one data location.
#[derive(Debug)]
pub struct SpanStore {
    object_store: Arc<dyn ObjectStore>,
    state: RwLock<State>,
    trace_index: TraceIndex,
}

impl SpanStore {
    /// A store over `object_store` holding `files`.
    pub fn new(
        object_store: Arc<dyn ObjectStore>,
        files: impl IntoIterator<Item = Arc<DataFile>>,
    ) -> Self {
        let files = files.into_iter().map(|f| (f.path.clone(), f)).collect();
        Self {
            object_store,
            state: RwLock::new(State { files, batches: Vec::new() }),
            trace_index: TraceIndex::default(),
        }
    }

    /// The trace filters of the committed files.
    pub fn trace_index(&self) -> &TraceIndex {
        &self.trace_index
    }

    /// The object store holding the data files.
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.object_store)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The files and batches that may hold rows in `scope`.
    pub fn snapshot(&self, scope: &Scope) -> Snapshot {
        let s = self.read();
        let project_ok = |p: &str| scope.project.as_deref().is_none_or(|want| want == p);
        // A lookup by trace id tests every file: the id is hashed once, and the trace filter,
        // which rules out nearly every file, goes after the cheap tests (the trace id range
        // rarely rules a file out: ids are random), all files' filters together.
        let mut files: Vec<&Arc<DataFile>> = s
            .files
            .values()
            .filter(|f| {
                scope.time.overlaps(f.min_start_ns, f.max_start_ns)
                    && scope.trace_id.as_deref().is_none_or(|id| {
                        f.min_trace_id.as_str() <= id && id <= f.max_trace_id.as_str()
                    })
                    && project_ok(&f.project)
            })
            .collect();
        if let Some(id) = scope.trace_id.as_deref() {
            let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
            let mut may = self.trace_index.lookup(id).may_contain_all(&paths).into_iter();
            files.retain(|_| may.next().unwrap_or(true));
        }
        Snapshot {
            files: files.into_iter().cloned().collect(),
            batches: s
                .batches
                .iter()
                .filter(|b| {
                    project_ok(&b.project) && scope.time.overlaps(b.min_start_ns, b.max_start_ns)
                })
                .cloned()
                .collect(),
        }
    }

    /// Every committed file.
    pub fn files(&self) -> Vec<Arc<DataFile>> {
        self.read().files.values().cloned().collect()
    }

    /// The memory batches, oldest first.
    pub fn batches(&self) -> Vec<Arc<MemBatch>> {
        self.read().batches.clone()
    }

    /// Makes batches visible.
    pub fn push_batches(&self, batches: impl IntoIterator<Item = MemBatch>) {
        let mut s = self.write();
        s.batches.extend(batches.into_iter().map(Arc::new));
    }

    /// Applies a committed catalog change and drops the memory batches it covers (every batch
    /// with an LSN at or below `flushed_lsn`), in one step. Returns the bytes those batches
    /// were charged.
    pub fn apply(&self, change: &Change, flushed_lsn: Option<u64>) -> u64 {
        let mut s = self.write();
        for path in &change.remove {
            s.files.remove(path);
        }
        self.trace_index.remove(&change.remove);
        for f in &change.add {
            s.files.insert(f.path.clone(), Arc::new(f.clone()));
        }
        let mut released = 0;
        if let Some(lsn) = flushed_lsn {
            s.batches.retain(|b| {
                let keep = b.lsn > lsn;
                if !keep {
                    released += b.charged;
                }
                keep
            });
        }
        released
    }

    /// Rows and bytes in memory, the age of the oldest memory batch, and the highest LSN.
    pub fn memory_usage(&self) -> MemoryUsage {
        let s = self.read();
        MemoryUsage {
            rows: s.batches.iter().map(|b| b.batch.num_rows() as u64).sum(),
            bytes: s.batches.iter().map(|b| b.charged).sum(),
            oldest: s.batches.iter().map(|b| b.created).min(),
            max_lsn: s.batches.iter().map(|b| b.lsn).max(),
        }
    }
}

/// What the memory part of the table holds.
#[derive(Debug, Clone, Copy)]
pub struct MemoryUsage {
    /// Rows.
    pub rows: u64,
    /// Bytes charged.
    pub bytes: u64,
    /// When the oldest batch became visible.
    pub oldest: Option<Instant>,
    /// Highest LSN held.
    pub max_lsn: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SpanBatchBuilder;
    use crate::record::SpanRecord;

    #[test]
    fn trace_runs_count_changes_of_trace_id() {
        let mut b = SpanBatchBuilder::with_capacity(6);
        for t in [1u8, 1, 2, 2, 2, 1] {
            b.append(&SpanRecord { trace_id: [t; 16], ..Default::default() });
        }
        assert_eq!(trace_runs(&b.finish().unwrap()), 3);
        assert_eq!(trace_runs(&SpanBatchBuilder::with_capacity(0).finish().unwrap()), 0);
    }
}
