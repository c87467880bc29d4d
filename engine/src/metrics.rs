//! Process metrics: lock-free counters, gauges and histograms, rendered in the Prometheus text
//! format by the binary's `/metrics` endpoint. Updated per request or per batch, never per row.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds `n` (may be negative).
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Sets the value.
    pub fn set(&self, n: i64) {
        self.0.store(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of latency histogram buckets.
const LATENCY_BOUNDS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A latency histogram with fixed buckets from 0.5 ms to 10 s.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BOUNDS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Writes Prometheus text exposition lines.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
    families: std::collections::HashSet<String>,
}

impl Exposition {
    /// A counter with one label; the help and type lines are written once per name.
    pub fn labeled_counter(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        value_of_label: &str,
        value: u64,
    ) {
        if self.families.insert(name.to_string()) {
            let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} counter");
        }
        let _ = writeln!(self.out, "{name}{{{label}=\"{value_of_label}\"}} {value}");
    }

    /// A counter line with its help and type.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
    }
    /// A gauge line with its help and type.
    pub fn gauge(&mut self, name: &str, help: &str, value: i64) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
    }
    /// A histogram with cumulative buckets.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BOUNDS.iter().zip(&h.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(self.out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = h.count();
        let sum = h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(self.out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(self.out, "{name}_sum {sum}\n{name}_count {count}");
    }
    /// The rendered text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Metrics of the storage engine.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Spans committed to the WAL and made visible.
    pub spans_ingested: Counter,
    /// Spans written to Parquet files.
    pub spans_flushed: Counter,
    /// Flushes committed.
    pub flushes: Counter,
    /// Repeats of a span dropped when flushing.
    pub spans_deduplicated: Counter,
    /// Parquet files written.
    pub files_written: Counter,
    /// Bytes of Parquet written.
    pub bytes_written: Counter,
    /// Failed flush attempts (retried).
    pub flush_errors: Counter,
    /// Time to encode, write and commit one flush.
    pub flush_seconds: Histogram,
    /// Bytes appended to the WAL.
    pub wal_bytes: Counter,
    /// WAL group commits (one write and sync each).
    pub wal_syncs: Counter,
    /// WAL write or sync failures.
    pub wal_errors: Counter,
    /// Time of one WAL group commit (write and sync).
    pub wal_sync_seconds: Histogram,
    /// Compaction jobs committed.
    pub compactions: Counter,
    /// Files merged away by compaction.
    pub compacted_files: Counter,
    /// Failed compaction jobs (retried at the next interval).
    pub compaction_errors: Counter,
    /// Compaction jobs put off because the memory budget had no room for them.
    pub compactions_deferred: Counter,
    /// Files removed by retention.
    pub retention_files: Counter,
    /// Spans removed by deletion requests.
    pub spans_deleted: Counter,
    /// Data and index objects deleted after they left the catalog.
    pub objects_deleted: Counter,
}

impl EngineMetrics {
    /// Appends the engine's metrics to an exposition.
    pub fn render(&self, e: &mut Exposition) {
        e.counter(
            "spanlake_spans_ingested_total",
            "Spans committed to the WAL and visible to queries",
            self.spans_ingested.get(),
        );
        e.counter(
            "spanlake_spans_flushed_total",
            "Spans written to Parquet files",
            self.spans_flushed.get(),
        );
        e.counter("spanlake_flushes_total", "Flushes committed", self.flushes.get());
        e.counter(
            "spanlake_spans_deduplicated_total",
            "Repeats of a span dropped when flushing",
            self.spans_deduplicated.get(),
        );
        e.counter(
            "spanlake_files_written_total",
            "Parquet files written",
            self.files_written.get(),
        );
        e.counter(
            "spanlake_bytes_written_total",
            "Bytes of Parquet written",
            self.bytes_written.get(),
        );
        e.counter("spanlake_flush_errors_total", "Failed flush attempts", self.flush_errors.get());
        e.counter(
            "spanlake_compactions_total",
            "Compaction jobs committed",
            self.compactions.get(),
        );
        e.counter(
            "spanlake_compacted_files_total",
            "Files merged away by compaction",
            self.compacted_files.get(),
        );
        e.counter(
            "spanlake_compaction_errors_total",
            "Failed compaction jobs",
            self.compaction_errors.get(),
        );
        e.counter(
            "spanlake_compactions_deferred_total",
            "Compaction jobs put off for lack of room in the memory budget",
            self.compactions_deferred.get(),
        );
        e.counter(
            "spanlake_retention_files_total",
            "Files removed by retention",
            self.retention_files.get(),
        );
        e.counter(
            "spanlake_spans_deleted_total",
            "Spans removed by deletion requests",
            self.spans_deleted.get(),
        );
        e.counter(
            "spanlake_objects_deleted_total",
            "Data and index objects deleted after leaving the catalog",
            self.objects_deleted.get(),
        );
        e.histogram(
            "spanlake_flush_duration_seconds",
            "Time to encode, write and commit one flush",
            &self.flush_seconds,
        );
        e.counter(
            "spanlake_wal_bytes_total",
            "Bytes appended to the write-ahead log",
            self.wal_bytes.get(),
        );
        e.counter(
            "spanlake_wal_syncs_total",
            "Write-ahead log group commits",
            self.wal_syncs.get(),
        );
        e.counter(
            "spanlake_wal_errors_total",
            "Write-ahead log write or sync failures",
            self.wal_errors.get(),
        );
        e.histogram(
            "spanlake_wal_sync_duration_seconds",
            "Time of one write-ahead log group commit",
            &self.wal_sync_seconds,
        );
    }
}
