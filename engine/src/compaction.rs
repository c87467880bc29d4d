//! The life of committed data: compaction, retention, deletion by rewriting, and the removal
//! of files that left the catalog.
//!
//! Every job follows the protocol of a flush: write the new files (and their trace filters),
//! then commit one catalog version that adds them and removes the files they replace, then
//! (after [`MaintenanceConfig::file_delete_delay`], so that queries that started before the
//! commit can finish reading) delete the replaced objects. Readers see the version before the
//! commit or the one after it, never a mix: the store swaps files in one step. A crash before
//! the commit leaves unreferenced new files, a crash after it unreferenced old ones; either
//! kind is deleted by orphan collection. Jobs that remove files run one at a time per node
//! ([`Engine::maintenance_guard`]); between nodes, the catalog's conditional commit refuses a
//! job whose inputs another node removed first, and the job is planned again.
//!
//! * **Compaction** merges the small files of a (project, hour) partition into files of about
//!   [`MaintenanceConfig::target_file_bytes`], sorted by `(trace_id, start_time, span_id)` with
//!   bloom filters, page indexes and statistics; exact repeats of a span (a client re-sending
//!   a request whose answer it lost, after the first copy was flushed) are dropped here.
//! * **Retention** removes whole hour partitions older than [`MaintenanceConfig::retention`].
//! * **Deletion** ([`Engine::replace_files`]) rewrites the files holding spans that match an
//!   operator's predicate (the predicate is evaluated by the query layer).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, RecordBatch, RecordBatchOptions};
use bytes::Bytes;
use object_store::ObjectStoreExt as _;
use object_store::path::Path;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio::sync::MutexGuard;

use crate::catalog::DataFile;
use crate::crash::CrashPoint;
use crate::engine::Engine;
use crate::error::{Error, Result, on_cpu};
use crate::layout::HourPartition;
use crate::trace_index::TraceFilter;
use crate::writer::{encode_file, encode_sorted, sort_for_storage, split_at_traces};

/// Settings of compaction, retention and file deletion.
#[derive(Debug, Clone)]
pub struct MaintenanceConfig {
    /// Whether compaction runs.
    pub compaction: bool,
    /// How often maintenance looks for work.
    pub interval: Duration,
    /// Small files in a partition that trigger its compaction (the partition of the current
    /// hour; older partitions are compacted as soon as they have two).
    pub min_files: usize,
    /// Size of the files compaction writes.
    pub target_file_bytes: u64,
    /// Arrow memory one compaction job may read at once (its input files decoded), capped at an
    /// eighth of the memory budget. A job charges its working set to the budget while it runs:
    /// twice its decoded input plus twice its input files' size (see `working_set`).
    pub max_input_bytes: u64,
    /// A past partition no flush has added a file to for this long is merged whole (up to the
    /// job size) instead of in size tiers: nothing more is arriving that tiering would wait for.
    pub settle_after: Duration,
    /// Spans older than this are removed, whole hour partitions at a time. `None` keeps all.
    pub retention: Option<Duration>,
    /// Files out of the catalog are deleted this long after, so that running queries finish.
    pub file_delete_delay: Duration,
    /// How often unreferenced objects (left by crashes) are looked for.
    pub orphan_interval: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            compaction: true,
            interval: Duration::from_secs(30),
            min_files: 8,
            target_file_bytes: 128 << 20,
            max_input_bytes: 256 << 20,
            settle_after: Duration::from_secs(600),
            retention: None,
            file_delete_delay: Duration::from_secs(60),
            orphan_interval: Duration::from_secs(3600),
        }
    }
}

/// One compaction job: files of one partition to merge.
#[derive(Debug, Clone, PartialEq)]
pub struct CompactionJob {
    /// Project.
    pub project: String,
    /// Hour partition.
    pub hour: i64,
    /// Files merged.
    pub inputs: Vec<Arc<DataFile>>,
}

/// Arrow memory a file takes when read whole (an estimate for files that did not record it).
fn mem_estimate(f: &DataFile) -> u64 {
    if f.mem_bytes > 0 { f.mem_bytes } else { f.size.saturating_mul(8) }
}

/// Memory a job over `inputs` holds at its peak, as charged to the memory budget: the decoded
/// inputs and their sorted copy, the Parquet bytes of the file being decoded and the encoded
/// output (about the size of the inputs' files) waiting to be written.
fn working_set(inputs: &[Arc<DataFile>]) -> u64 {
    inputs.iter().map(|f| mem_estimate(f).saturating_mul(2).saturating_add(f.size * 2)).sum()
}

/// A file joins the smaller files chosen before it when it is at most this many times their
/// size together (see [`plan`]).
const TIER_RATIO: u64 = 2;

/// Chooses compaction jobs: in each (project, hour) partition, among the files smaller than half
/// the target, smallest first, each file that is at most [`TIER_RATIO`] times the size of those
/// chosen before it together (size tiers), as long as their decoded size fits `max_input_bytes`.
///
/// Size tiers keep a backfill cheap: writing past hours adds a small file to every hour each
/// flush, and merging each into the hour's whole compacted file would rewrite the hour once per
/// flush. With tiers a span is rewritten about log2(files) times, and a partition holds about
/// as many files until it settles ([`MaintenanceConfig::settle_after`]), when its files are
/// merged whole.
pub fn plan(
    files: &[Arc<DataFile>],
    config: &MaintenanceConfig,
    current_hour: i64,
    now_ms: i64,
) -> Vec<CompactionJob> {
    let mut by_partition: BTreeMap<(&str, i64), Vec<&Arc<DataFile>>> = BTreeMap::new();
    for f in files {
        if f.size < config.target_file_bytes / 2 {
            by_partition.entry((f.project.as_str(), f.hour)).or_default().push(f);
        }
    }
    let settled_ms = i64::try_from(config.settle_after.as_millis()).unwrap_or(i64::MAX);
    let mut jobs = Vec::new();
    for ((project, hour), mut small) in by_partition {
        let needed = if hour >= current_hour { config.min_files.max(2) } else { 2 };
        if small.len() < needed {
            continue;
        }
        // Settled: no flush has added a file for a while (compaction's own outputs do not count,
        // or each capped merge of a large hour would restart the wait).
        let newest = small.iter().filter(|f| f.level == 0).map(|f| f.created_ms).max();
        let settled =
            hour < current_hour && newest.is_none_or(|n| now_ms.saturating_sub(n) >= settled_ms);
        small.sort_by_key(|f| (f.size, f.created_ms, f.path.clone()));
        let mut inputs = Vec::new();
        let (mut bytes, mut mem) = (0u64, 0u64);
        for f in small {
            let m = mem_estimate(f);
            if inputs.len() >= 2 && mem + m > config.max_input_bytes {
                break;
            }
            if !inputs.is_empty() && !settled && f.size > bytes.saturating_mul(TIER_RATIO) {
                break;
            }
            bytes += f.size;
            mem += m;
            inputs.push(Arc::clone(f));
        }
        if inputs.len() >= 2 {
            jobs.push(CompactionJob { project: project.to_string(), hour, inputs });
        }
    }
    jobs
}

/// The outcome of [`Engine::replace_files`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplaceReport {
    /// Files replaced.
    pub files_rewritten: usize,
    /// Rows in the replaced files minus rows in their replacements.
    pub rows_removed: u64,
}

/// Held while a job removes committed files; see [`Engine::maintenance_guard`].
#[derive(Debug)]
pub struct MaintenanceGuard<'a>(
    #[expect(dead_code, reason = "held for its drop")] MutexGuard<'a, ()>,
);

fn now_hour() -> i64 {
    HourPartition::of_ns(chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)).epoch_hour
}

/// Bytes of Arrow memory `batches` hold.
fn batches_memory(batches: &[RecordBatch]) -> u64 {
    batches.iter().map(|b| b.get_array_memory_size() as u64).sum()
}

impl Engine {
    /// Waits until no other job removes committed files, and keeps them out while held.
    pub async fn maintenance_guard(&self) -> MaintenanceGuard<'_> {
        MaintenanceGuard(self.maintenance_lock.lock().await)
    }

    pub(crate) async fn run_maintenance(self: Arc<Self>) {
        let config = self.config.maintenance.clone();
        // Orphans are looked for at start (a crash may just have left some), then periodically.
        let mut last_orphans: Option<Instant> = None;
        loop {
            tokio::time::sleep(config.interval).await;
            if let Err(e) = self.apply_retention().await {
                tracing::warn!(error = %e, "retention failed; retried at the next interval");
            }
            if config.compaction {
                match self.compact().await {
                    Ok(_) => {}
                    Err(e) => {
                        self.metrics.compaction_errors.add(1);
                        tracing::warn!(error = %e, "compaction failed; retried at the next interval");
                    }
                }
            }
            self.delete_due(false).await;
            if last_orphans.is_none_or(|t| t.elapsed() >= config.orphan_interval) {
                last_orphans = Some(Instant::now());
                match self.collect_orphans().await {
                    Ok(d) if !d.is_empty() => {
                        tracing::info!(objects = d.len(), "unreferenced objects deleted")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "orphan collection failed"),
                }
            }
        }
    }

    /// Runs every compaction job due now. Returns the number of input files merged.
    ///
    /// Compaction's memory comes out of the one memory budget. A job is started only when its
    /// working set can be reserved (so ingest backs off while it runs) and, while ingest holds
    /// over a quarter of the budget, the process's resident memory leaves room for it (see
    /// `room_for`); otherwise it waits for a later round, while its files stay queryable. After each job the memory it freed is handed back to
    /// the OS, since it is not about to be used again.
    pub async fn compact(&self) -> Result<usize> {
        let guard = self.maintenance_guard().await;
        let mut config = self.config.maintenance.clone();
        config.max_input_bytes = config.max_input_bytes.min(self.budget.limit() / 8);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let jobs = plan(&self.store.files(), &config, now_hour(), now_ms);
        let mut merged = 0;
        let mut collected = false;
        for job in jobs {
            if self.closing.load(std::sync::atomic::Ordering::Acquire) {
                break;
            }
            let charge = working_set(&job.inputs);
            if !self.room_for(charge, &mut collected).await {
                self.metrics.compactions_deferred.add(1);
                tracing::debug!(
                    hour = job.hour,
                    charge,
                    resident = self.budget.resident(),
                    used = self.budget.used(),
                    "compaction waits: no room in the memory budget"
                );
                continue;
            }
            let done = self.compact_job(&guard, job).await;
            self.budget.release(charge);
            self.release_memory().await;
            merged += done?;
        }
        Ok(merged)
    }

    /// Reserves `charge` bytes of the budget for a maintenance job, when both the budget and
    /// the process's resident memory have room for them (the latter only counts while ingest
    /// holds more than a quarter of the budget, as for ingest's own admission). Freed memory the
    /// allocator still holds may be what is in the way: it is handed back once per round
    /// (`collected`) before a job is put off.
    async fn room_for(&self, charge: u64, collected: &mut bool) -> bool {
        let limit = self.budget.limit();
        // Only while ingest holds something to flush does waiting bring resident memory down;
        // otherwise what is resident (queries, caches) is not compaction's to wait for, and
        // waiting would put compaction off for good.
        if self.budget.resident().saturating_add(charge) > limit && self.budget.used() > limit / 4 {
            if *collected {
                return false;
            }
            *collected = true;
            self.release_memory().await;
            if let Some(now) = crate::budget::resident_bytes() {
                self.budget.set_resident(now);
            }
            if self.budget.resident().saturating_add(charge) > limit {
                return false;
            }
        }
        self.budget.try_reserve(charge).is_ok()
    }

    /// Hands memory the allocator holds freed back to the OS (when the server gave a way to).
    /// It runs on the maintenance thread, the one whose heap holds what compaction freed.
    pub(crate) async fn release_memory(&self) {
        if let Some(release) = self.config.release_memory {
            let _ = self.maintenance_thread.run(release).await;
        }
    }

    async fn compact_job(
        &self,
        _guard: &MaintenanceGuard<'_>,
        job: CompactionJob,
    ) -> Result<usize> {
        let started = Instant::now();
        // The stored bytes are fetched here; decoding, sorting and encoding run on the
        // maintenance thread, so the job's memory is that thread's and is handed back after it
        // (see `crate::worker`).
        let mut stored = Vec::with_capacity(job.inputs.len());
        for f in &job.inputs {
            stored.push((Path::from(f.path.as_str()), self.fetch(f).await?));
        }
        // The job was charged for its inputs as recorded at their flush; decoded pages can take
        // more (buffers grown while reading). Charge the difference, twice (for the sorted copy),
        // until the job ends.
        let estimated: u64 = job.inputs.iter().map(|f| mem_estimate(f)).sum();
        let in_rows: u64 = job.inputs.iter().map(|f| f.rows).sum();
        let in_bytes: u64 = job.inputs.iter().map(|f| f.size).sum();
        let level = job.inputs.iter().map(|f| f.level).max().unwrap_or(0).saturating_add(1);
        let rows_per_file = (self.config.maintenance.target_file_bytes as f64
            / (in_bytes.max(1) as f64 / in_rows.max(1) as f64))
            .max(1.0) as usize;
        let writer = self.config.writer.clone();
        let budget = Arc::clone(&self.budget);
        let (project, hour) = (job.project.clone(), HourPartition { epoch_hour: job.hour });
        let (encoded, duplicates) = self
            .maintenance_thread
            .run(move || -> Result<_> {
                let mut batches = Vec::new();
                for (path, bytes) in stored {
                    batches.extend(decode_file(&path, bytes)?);
                }
                let decoded = batches_memory(&batches);
                let _extra = budget.hold(decoded.saturating_sub(estimated) * 2);
                let (sorted, duplicates) = sort_for_storage(batches, writer.encode_threads)?;
                let files = split_at_traces(&sorted, rows_per_file)
                    .iter()
                    .map(|part| encode_sorted(&project, hour, part, level, &writer))
                    .collect::<Result<Vec<_>>>()?;
                Ok((files, duplicates))
            })
            .await??;
        let published = self.publish(encoded).await?;
        let outputs = published.len();
        let remove: Vec<String> = job.inputs.iter().map(|f| f.path.clone()).collect();
        self.swap_files(
            published,
            remove,
            CrashPoint::CompactionBeforeCommit,
            CrashPoint::CompactionAfterCommit,
        )
        .await?;
        self.metrics.compactions.add(1);
        self.metrics.compacted_files.add(job.inputs.len() as u64);
        self.metrics.spans_deduplicated.add(duplicates as u64);
        tracing::info!(
            project = job.project,
            hour = job.hour,
            inputs = job.inputs.len(),
            outputs,
            rows = in_rows - duplicates as u64,
            duplicates,
            elapsed = ?started.elapsed(),
            "compacted"
        );
        Ok(job.inputs.len())
    }

    /// Reads a whole committed data file.
    pub async fn read_file(&self, file: &DataFile) -> Result<Vec<RecordBatch>> {
        let bytes = self.fetch(file).await?;
        let path = Path::from(file.path.as_str());
        on_cpu(move || decode_file(&path, bytes)).await?
    }

    /// A committed data file's stored bytes.
    async fn fetch(&self, file: &DataFile) -> Result<Bytes> {
        let path = Path::from(file.path.as_str());
        let get_err = |source| Error::ObjectStore { op: "get", path: path.clone(), source };
        let object_store = self.store.object_store();
        object_store.get(&path).await.map_err(get_err)?.bytes().await.map_err(get_err)
    }

    /// Removes the hour partitions older than the retention period. Returns the files removed.
    pub async fn apply_retention(&self) -> Result<usize> {
        let Some(retention) = self.config.maintenance.retention else { return Ok(0) };
        let guard = self.maintenance_guard().await;
        let cutoff_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
            - i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX);
        // A partition goes when its last nanosecond is older than the cutoff.
        let expired: Vec<String> = self
            .store
            .files()
            .into_iter()
            .filter(|f| HourPartition { epoch_hour: f.hour + 1 }.start_ns() <= cutoff_ns)
            .map(|f| f.path.clone())
            .collect();
        if expired.is_empty() {
            return Ok(0);
        }
        let n = expired.len();
        self.swap_files(
            Vec::new(),
            expired,
            CrashPoint::DeleteBeforeCommit,
            CrashPoint::DeleteAfterCommit,
        )
        .await?;
        self.metrics.retention_files.add(n as u64);
        drop(guard);
        tracing::info!(files = n, ?retention, "retention removed old partitions");
        Ok(n)
    }

    /// Replaces committed files by the rows to keep from each (an empty list removes the file),
    /// in one catalog commit. The caller holds the maintenance guard from the moment it read
    /// the files, so that no other job replaces them meanwhile.
    pub async fn replace_files(
        &self,
        _guard: &MaintenanceGuard<'_>,
        replacements: Vec<(Arc<DataFile>, Vec<RecordBatch>)>,
    ) -> Result<ReplaceReport> {
        if replacements.is_empty() {
            return Ok(ReplaceReport::default());
        }
        let writer = self.config.writer.clone();
        let old_rows: u64 = replacements.iter().map(|(f, _)| f.rows).sum();
        let remove: Vec<String> = replacements.iter().map(|(f, _)| f.path.clone()).collect();
        let encoded = on_cpu(move || -> Result<Vec<_>> {
            replacements
                .into_iter()
                .filter(|(_, keep)| keep.iter().any(|b| b.num_rows() > 0))
                .map(|(f, keep)| {
                    encode_file(
                        &f.project,
                        HourPartition { epoch_hour: f.hour },
                        keep,
                        f.level,
                        &writer,
                    )
                })
                .collect()
        })
        .await??;
        let published = self.publish(encoded).await?;
        let new_rows: u64 = published.iter().map(|(f, _)| f.rows).sum();
        let files_rewritten = remove.len();
        self.swap_files(
            published,
            remove,
            CrashPoint::DeleteBeforeCommit,
            CrashPoint::DeleteAfterCommit,
        )
        .await?;
        let rows_removed = old_rows.saturating_sub(new_rows);
        self.metrics.spans_deleted.add(rows_removed);
        Ok(ReplaceReport { files_rewritten, rows_removed })
    }

    /// Commits `added` in place of `remove` (one catalog version), shows the change to
    /// readers and schedules the removed files' deletion.
    async fn swap_files(
        &self,
        added: Vec<(DataFile, Arc<TraceFilter>)>,
        remove: Vec<String>,
        before: CrashPoint,
        after: CrashPoint,
    ) -> Result<()> {
        let change = self.commit_files(added, remove, None, before, after).await?;
        self.store.apply(&change, None);
        self.schedule_delete(change.remove);
        Ok(())
    }

    fn schedule_delete(&self, paths: Vec<String>) {
        if paths.is_empty() {
            return;
        }
        let due = Instant::now() + self.config.maintenance.file_delete_delay;
        self.pending_deletes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((due, paths));
    }

    /// Deletes the files out of the catalog whose delay is over (all of them when `all`).
    pub(crate) async fn delete_due(&self, all: bool) {
        let now = Instant::now();
        let due: Vec<String> = {
            let mut pending =
                self.pending_deletes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (due, keep): (Vec<_>, Vec<_>) =
                std::mem::take(&mut *pending).into_iter().partition(|(t, _)| all || *t <= now);
            *pending = keep;
            due.into_iter().flat_map(|(_, p)| p).collect()
        };
        if !due.is_empty() {
            self.delete_objects(&due).await;
        }
    }
}

/// Decodes a whole data file's bytes (`path` names it in errors).
///
/// The reader grows its text buffers by doubling, so a decoded batch can hold up to twice its
/// text; each is shrunk to its length, since a job holds every input whole until it is merged
/// (in a backfill this was the largest allocation in the process: 272 MB of a 926 MB peak).
fn decode_file(path: &Path, bytes: Bytes) -> Result<Vec<RecordBatch>> {
    let parquet_err = |source| Error::Parquet { path: path.clone(), source };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(parquet_err)?
        .with_batch_size(64 * 1024)
        .build()
        .map_err(parquet_err)?;
    reader
        .map(|b| {
            let (schema, mut columns, rows) =
                b.map_err(|source| Error::Arrow { source })?.into_parts();
            columns.iter_mut().for_each(Array::shrink_to_fit);
            RecordBatch::try_new_with_options(
                schema,
                columns,
                &RecordBatchOptions::new().with_row_count(Some(rows)),
            )
            .map_err(|source| Error::Arrow { source })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, hour: i64, size: u64, created_ms: i64) -> Arc<DataFile> {
        Arc::new(DataFile {
            path: path.into(),
            project: "default".into(),
            hour,
            size,
            rows: 10,
            min_start_ns: 0,
            max_start_ns: 0,
            min_trace_id: String::new(),
            max_trace_id: String::new(),
            trace_id_bloom: true,
            traces: 1,
            mem_bytes: size * 4,
            trace_index: true,
            level: 0,
            created_ms,
        })
    }

    /// A job holds its inputs decoded whole: they take about what the file's rows took when it
    /// was flushed (`mem_bytes`), not the doubled buffers the Parquet reader grows.
    #[test]
    fn decoded_inputs_take_what_their_rows_took_at_flush() {
        use crate::batch::SpanBatchBuilder;
        use crate::record::SpanRecord;
        let hour_ns = 1_800_000 * 3_600_000_000_000i64;
        let mut b = SpanBatchBuilder::with_capacity(2_000);
        let texts: Vec<String> = (0..2_000usize)
            .map(|i| format!("{i:06} {}", "x".repeat(500 + i * 7 % 3_000)))
            .collect();
        for (i, text) in texts.iter().enumerate() {
            b.append(&SpanRecord {
                trace_id: [(i / 8) as u8; 16],
                span_id: (i as u64).to_be_bytes(),
                name: "chat",
                start_time_ns: hour_ns + i as i64,
                end_time_ns: hour_ns + i as i64 + 1_000,
                input: Some(text),
                output: Some(&text[..text.len() / 2]),
                attributes: "{}",
                ..Default::default()
            });
        }
        let batch = b.finish().unwrap();
        let file = crate::writer::encode_file(
            "p",
            HourPartition::of_ns(hour_ns),
            vec![batch],
            0,
            &crate::writer::WriterConfig::default(),
        )
        .unwrap();
        let decoded = decode_file(&Path::from("p.parquet"), file.bytes.clone()).unwrap();
        let rows: usize = decoded.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 2_000);
        let text: usize = texts.iter().map(|t| t.len() + t.len() / 2).sum();
        let held = batches_memory(&decoded);
        assert!(held >= text as u64, "{held} < {text}");
        assert!(
            held <= file.meta.mem_bytes + file.meta.mem_bytes / 20,
            "{held} vs {}",
            file.meta.mem_bytes
        );
    }

    #[test]
    fn plans_small_files_per_partition() {
        let config = MaintenanceConfig {
            min_files: 3,
            target_file_bytes: 1000,
            max_input_bytes: 1000,
            ..Default::default()
        };
        let files = vec![
            file("a1", 10, 100, 3),
            file("a2", 10, 100, 1),
            file("a3", 10, 900, 2), // large: left alone
            file("b1", 11, 100, 1),
            file("b2", 11, 100, 2),
            file("c1", 12, 100, 1),
            file("c2", 12, 100, 2),
            file("c3", 12, 100, 3),
            file("c4", 12, 100, 4),
        ];
        // Hour 12 is current: it needs 3 small files; the older partitions need 2.
        let jobs = plan(&files, &config, 12, 0);
        let got: Vec<(i64, Vec<&str>)> = jobs
            .iter()
            .map(|j| (j.hour, j.inputs.iter().map(|f| f.path.as_str()).collect()))
            .collect();
        // Oldest first, up to 1000 bytes of decoded input (400 each): two files.
        assert_eq!(
            got,
            vec![(10, vec!["a2", "a1"]), (11, vec!["b1", "b2"]), (12, vec!["c1", "c2"])]
        );
        let jobs = plan(&files[3..5], &config, 11, 0);
        assert!(jobs.is_empty(), "the current hour waits for min_files");
    }

    /// A past hour's small files merge in size tiers (a file joins those smaller than it when it
    /// is at most twice their size together) until the partition settles; then whole.
    #[test]
    fn plans_size_tiers_until_a_partition_settles() {
        let config = MaintenanceConfig {
            target_file_bytes: 1000,
            max_input_bytes: u64::MAX,
            ..Default::default()
        };
        let files = vec![
            file("h0", 10, 400, 1),
            file("f1", 10, 10, 2),
            file("f2", 10, 10, 3),
            file("m", 10, 40, 6),
            file("f3", 10, 10, 4),
            file("f4", 10, 10, 5),
        ];
        let paths = |jobs: Vec<CompactionJob>| -> Vec<Vec<String>> {
            jobs.iter().map(|j| j.inputs.iter().map(|f| f.path.clone()).collect()).collect()
        };
        // 10 + 10 + 10 + 10 = 40 takes the 40-byte file (at most 2 x 40); 80 does not take the
        // 400-byte one (over 2 x 80).
        assert_eq!(paths(plan(&files, &config, 12, 6)), vec![vec!["f1", "f2", "f3", "f4", "m"]]);
        // One small file beside a large one is no job; files of about one size are.
        assert!(plan(&files[..2], &config, 12, 6).is_empty());
        let uneven = [file("u1", 10, 11, 1), file("u2", 10, 10, 2), file("u3", 10, 45, 3)];
        assert_eq!(paths(plan(&uneven, &config, 12, 6)), vec![vec!["u2", "u1"]]);
        // Nothing new for settle_after: the whole partition, smallest first.
        let settled = 6 + config.settle_after.as_millis() as i64;
        assert_eq!(
            paths(plan(&files, &config, 12, settled)),
            vec![vec!["f1", "f2", "f3", "f4", "m", "h0"]]
        );
        assert_eq!(paths(plan(&files[..2], &config, 12, settled)), vec![vec!["f1", "h0"]]);
        // A compaction output does not restart the wait; a flushed file does.
        let mut merged = (*file("c", 10, 30, settled)).clone();
        merged.level = 1;
        let with_output = [files[0].clone(), files[1].clone(), Arc::new(merged)];
        assert_eq!(paths(plan(&with_output, &config, 12, settled)), vec![vec!["f1", "c", "h0"]]);
        let with_flush = [files[0].clone(), files[1].clone(), file("n", 10, 30, settled)];
        assert!(plan(&with_flush, &config, 12, settled).is_empty());
        // The current hour is never settled.
        let two = MaintenanceConfig { min_files: 2, ..config.clone() };
        assert!(plan(&files[..2], &two, 10, settled).is_empty());
        // The job's decoded size still caps it (at least two files).
        let capped = MaintenanceConfig { max_input_bytes: 100, ..config };
        assert_eq!(paths(plan(&files, &capped, 12, settled)), vec![vec!["f1", "f2"]]);
    }
}
