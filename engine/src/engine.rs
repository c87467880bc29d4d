//! The storage engine: WAL, memory table, flushes to Parquet, catalog commits.
//!
//! ```text
//! receivers ──ingest()──▶ memory budget ──▶ WAL queue (crossbeam, bounded)
//!                                               │ writer thread: frame, write, fsync (group commit)
//!                                               ▼
//!                                   memory table (visible to SQL) ──▶ ack to the client
//!                                               │ flusher task: by size or age
//!                                               ▼
//!                         Parquet files (object store) ──▶ catalog commit ──▶ WAL segments deleted
//! ```
//!
//! No request waits on Parquet encoding: a request waits for its WAL sync only. Parquet encoding
//! runs on the blocking pool. A failed flush keeps the data in memory (and in the WAL) and is
//! retried with backoff; meanwhile the memory budget fills and receivers answer "retry later".

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use tokio::sync::{Mutex, Notify};

use crate::budget::MemoryBudget;
use crate::catalog::{Catalog, Change, WalMark};
use crate::error::{Error, Result, on_cpu};
use crate::layout::SPANS_PREFIX;
use crate::metrics::EngineMetrics;
use crate::schema::spans_schema;
use crate::store::{MemBatch, SpanStore};
use crate::wal::{self, Committed, Durability, Wal, WalConfig};
use crate::writer::{WriterConfig, encode_file, split_by_partition};

/// Settings of the storage engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Local directory of the write-ahead log (and of this node's id).
    pub wal_dir: PathBuf,
    /// What an acknowledgement promises.
    pub durability: Durability,
    /// WAL segment size.
    pub wal_segment_bytes: u64,
    /// Requests that may wait for the WAL before new ones are refused.
    pub wal_queue_requests: usize,
    /// Bytes ingest may hold before Parquet (queued, in memory, being flushed).
    pub memory_budget_bytes: u64,
    /// Flush when the memory table holds this many bytes.
    pub flush_max_bytes: u64,
    /// Flush when the oldest row in memory is this old.
    pub flush_max_age: Duration,
    /// Parquet settings.
    pub writer: WriterConfig,
    /// How often to look for catalog commits by other nodes.
    pub catalog_refresh: Duration,
    /// Unreferenced data files younger than this are left alone by orphan collection.
    pub orphan_grace: Duration,
}

impl EngineConfig {
    /// The defaults, with the WAL in `wal_dir`.
    pub fn new(wal_dir: PathBuf) -> Self {
        Self {
            wal_dir,
            durability: Durability::Fsync,
            wal_segment_bytes: 64 << 20,
            wal_queue_requests: 4096,
            memory_budget_bytes: 1 << 30,
            flush_max_bytes: 128 << 20,
            flush_max_age: Duration::from_secs(10),
            writer: WriterConfig::default(),
            catalog_refresh: Duration::from_secs(5),
            orphan_grace: Duration::from_secs(3600),
        }
    }
}

/// The running storage engine.
#[derive(Debug)]
pub struct Engine {
    store: Arc<SpanStore>,
    catalog: Catalog,
    wal: Wal,
    budget: Arc<MemoryBudget>,
    metrics: Arc<EngineMetrics>,
    node_id: String,
    config: EngineConfig,
    flush_lock: Mutex<()>,
    flush_now: Notify,
    closing: AtomicBool,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Held while the engine lives: no second process writes this WAL.
    _lock: std::fs::File,
}

/// Reads this node's id from the WAL directory, creating it on first start.
fn node_id(dir: &std::path::Path) -> Result<String> {
    let path = dir.join("NODE_ID");
    let io = |source| Error::LocalIo { path: path.clone(), source };
    std::fs::create_dir_all(dir)
        .map_err(|source| Error::LocalIo { path: dir.to_path_buf(), source })?;
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) | Err(_) => {
            let id = uuid::Uuid::now_v7().simple().to_string();
            let tmp = dir.join("NODE_ID.tmp");
            std::fs::write(&tmp, &id).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(id)
        }
    }
}

/// Takes the exclusive lock of a WAL directory: one process writes a WAL at a time.
fn lock_wal_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(dir)
        .map_err(|source| Error::LocalIo { path: dir.to_path_buf(), source })?;
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::LocalIo { path: path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked { path }),
        Err(std::fs::TryLockError::Error(source)) => Err(Error::LocalIo { path, source }),
    }
}

/// A read-only view of a data location and its WAL, for tools that run beside (or without) a
/// server: the committed files plus the WAL records not yet flushed.
pub async fn open_snapshot(
    wal_dir: &std::path::Path,
    object_store: Arc<dyn ObjectStore>,
) -> Result<Arc<SpanStore>> {
    let node = std::fs::read_to_string(wal_dir.join("NODE_ID")).unwrap_or_default();
    let (_, state) = Catalog::load(Arc::clone(&object_store), "reader").await?;
    let flushed = state.flushed_lsn(node.trim());
    let store = SpanStore::new(object_store, state.files.values().cloned());
    let dir = wal_dir.to_path_buf();
    let records = on_cpu(move || wal::read_only(&dir)).await??;
    let pending: Vec<Committed> = records
        .into_iter()
        .filter(|r| r.lsn > flushed)
        .map(|r| Committed { lsn: r.lsn, project: r.project, batch: r.batch, charged: 0 })
        .collect();
    store.push_batches(coalesce(pending));
    Ok(Arc::new(store))
}

/// Concatenates committed records into one memory batch per project.
fn coalesce(records: Vec<Committed>) -> Vec<MemBatch> {
    let mut by_project: BTreeMap<Arc<str>, (u64, Vec<RecordBatch>, u64)> = BTreeMap::new();
    for c in records {
        let e = by_project.entry(c.project).or_default();
        e.0 = e.0.max(c.lsn);
        e.1.push(c.batch);
        e.2 += c.charged;
    }
    by_project
        .into_iter()
        .filter_map(|(project, (lsn, batches, charged))| {
            let batch = if batches.len() == 1 {
                batches.into_iter().next()?
            } else {
                match concat_batches(&spans_schema(), &batches) {
                    Ok(b) => b,
                    Err(e) => {
                        // Same schema by construction; keep the parts rather than lose rows.
                        tracing::error!(error = %e, "cannot concatenate committed batches");
                        return None;
                    }
                }
            };
            Some(MemBatch::new(lsn, project, batch, charged))
        })
        .collect()
}

impl Engine {
    /// Opens the engine over `object_store`: loads the catalog, replays the WAL, and starts the
    /// WAL writer, the flusher and the catalog refresher. Must run within a tokio runtime.
    pub async fn open(
        config: EngineConfig,
        object_store: Arc<dyn ObjectStore>,
        metrics: Arc<EngineMetrics>,
    ) -> Result<Arc<Self>> {
        let lock = lock_wal_dir(&config.wal_dir)?;
        let node_id = node_id(&config.wal_dir)?;
        let (catalog, state) = Catalog::load(Arc::clone(&object_store), &node_id).await?;
        let flushed_lsn = state.flushed_lsn(&node_id);
        let store = Arc::new(SpanStore::new(object_store, state.files.values().cloned()));
        let budget = Arc::new(MemoryBudget::new(config.memory_budget_bytes));

        let wal_dir = config.wal_dir.clone();
        let mut recovered = on_cpu(move || wal::recover(&wal_dir)).await??;
        let replay: Vec<Committed> = std::mem::take(&mut recovered.records)
            .into_iter()
            .filter(|r| r.lsn > flushed_lsn)
            .map(|r| {
                let charged = r.batch.get_array_memory_size() as u64;
                Committed { lsn: r.lsn, project: r.project, batch: r.batch, charged }
            })
            .collect();
        let replayed_rows: usize = replay.iter().map(|c| c.batch.num_rows()).sum();
        let replayed_records = replay.len();
        for c in &replay {
            budget.force_reserve(c.charged);
        }
        store.push_batches(coalesce(replay));
        tracing::info!(
            node = %node_id,
            catalog_version = state.version,
            files = state.files.len(),
            flushed_lsn,
            replayed_records,
            replayed_rows,
            "storage engine opened"
        );

        let wal = {
            let store = Arc::clone(&store);
            let commit_metrics = Arc::clone(&metrics);
            let on_commit: wal::CommitCallback = Box::new(move |committed: Vec<Committed>| {
                let rows: usize = committed.iter().map(|c| c.batch.num_rows()).sum();
                commit_metrics.spans_ingested.add(rows as u64);
                store.push_batches(coalesce(committed));
            });
            let wal_config = WalConfig {
                dir: config.wal_dir.clone(),
                durability: config.durability,
                segment_bytes: config.wal_segment_bytes,
                queue_requests: config.wal_queue_requests,
            };
            Wal::start(wal_config, recovered, flushed_lsn, Arc::clone(&metrics), on_commit)?
        };

        let engine = Arc::new(Self {
            store,
            catalog,
            wal,
            budget,
            metrics,
            node_id,
            config,
            flush_lock: Mutex::new(()),
            flush_now: Notify::new(),
            closing: AtomicBool::new(false),
            tasks: std::sync::Mutex::new(Vec::new()),
            _lock: lock,
        });
        let flusher = crate::task::spawn(Arc::clone(&engine).run_flusher());
        let refresher = crate::task::spawn(Arc::clone(&engine).run_refresher());
        engine
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend([flusher, refresher]);
        Ok(engine)
    }

    /// The table the engine maintains.
    pub fn store(&self) -> &Arc<SpanStore> {
        &self.store
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The engine's metrics.
    pub fn metrics(&self) -> &Arc<EngineMetrics> {
        &self.metrics
    }

    /// Bytes held against the memory budget, and the budget.
    pub fn memory(&self) -> (u64, u64) {
        (self.budget.used(), self.budget.limit())
    }

    /// Requests waiting for the WAL.
    pub fn wal_queued(&self) -> usize {
        self.wal.queued()
    }

    /// Stores one request's spans. Resolves once they are in the WAL (synced in `fsync` mode)
    /// and visible to queries: only then may the client be told they are accepted. Refuses
    /// at once, without waiting, when the memory budget or the WAL queue is full.
    pub async fn ingest(&self, project: Arc<str>, batch: RecordBatch) -> Result<u64> {
        if batch.num_rows() == 0 {
            return Ok(0);
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let charged = batch.get_array_memory_size() as u64;
        self.budget.try_reserve(charged)?;
        let payload = match wal::format::encode_payload(&project, &batch) {
            Ok(p) => p,
            Err(e) => {
                self.budget.release(charged);
                return Err(e);
            }
        };
        let ack = match self.wal.append(project, batch, payload, charged) {
            Ok(rx) => rx,
            Err(e) => {
                self.budget.release(charged);
                return Err(e);
            }
        };
        let result = match ack.await {
            Ok(r) => r,
            Err(_) => Err(Error::ShuttingDown),
        };
        match result {
            Ok(lsn) => {
                // The budget's counter (queued and in memory) is O(1); summing the memory
                // table's batches here would cost a lock and a scan per request.
                if self.budget.used() >= self.config.flush_max_bytes {
                    self.flush_now.notify_one();
                }
                Ok(lsn)
            }
            Err(e) => {
                self.budget.release(charged);
                Err(e)
            }
        }
    }

    async fn run_flusher(self: Arc<Self>) {
        let tick = (self.config.flush_max_age / 4)
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut backoff = Duration::from_millis(100);
        while !self.closing.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(tick, self.flush_now.notified()).await;
            let usage = self.store.memory_usage();
            let due = usage.bytes >= self.config.flush_max_bytes
                || usage.oldest.is_some_and(|t| t.elapsed() >= self.config.flush_max_age);
            if !due || self.closing.load(Ordering::Acquire) {
                continue;
            }
            match self.flush().await {
                Ok(_) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "flush failed; data stays in memory and in the WAL");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn run_refresher(self: Arc<Self>) {
        while !self.closing.load(Ordering::Acquire) {
            tokio::time::sleep(self.config.catalog_refresh).await;
            match self.catalog.refresh().await {
                Ok(changes) => {
                    for c in &changes {
                        self.store.apply(c, None);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "catalog refresh failed"),
            }
        }
    }

    /// Writes everything in memory to Parquet and commits it. Returns the rows flushed.
    pub async fn flush(&self) -> Result<u64> {
        let _guard = self.flush_lock.lock().await;
        let started = Instant::now();
        let batches = self.store.batches();
        let Some(max_lsn) = batches.iter().map(|b| b.lsn).max() else { return Ok(0) };
        let writer = self.config.writer.clone();
        let encoded = on_cpu(move || -> Result<Vec<_>> {
            split_by_partition(batches.iter().map(|b| (&b.project, &b.batch)))?
                .into_iter()
                .map(|((project, hour), parts)| encode_file(&project, hour, &parts, 0, &writer))
                .collect()
        })
        .await??;

        let object_store = self.store.object_store();
        let mut added = Vec::with_capacity(encoded.len());
        for file in encoded {
            let path = Path::from(file.meta.path.as_str());
            let size = file.bytes.len() as u64;
            if let Err(source) = object_store.put(&path, PutPayload::from_bytes(file.bytes)).await {
                self.metrics.flush_errors.add(1);
                self.discard(&added).await;
                return Err(Error::ObjectStore { op: "put", path, source });
            }
            self.metrics.files_written.add(1);
            self.metrics.bytes_written.add(size);
            self.metrics.spans_deduplicated.add(file.duplicates as u64);
            added.push(file.meta);
        }
        let rows: u64 = added.iter().map(|f| f.rows).sum();
        let change = Change {
            add: added,
            remove: Vec::new(),
            wal: Some(WalMark { node: self.node_id.clone(), flushed_lsn: max_lsn }),
        };
        let others = match self.catalog.commit(change.clone()).await {
            Ok((_, others)) => others,
            Err(e) => {
                // The put may have succeeded although its answer was lost: look before discarding.
                if let Ok(changes) = self.catalog.refresh().await {
                    for c in &changes {
                        self.store.apply(c, None);
                    }
                }
                if !self.committed(&change.add[0].path).await {
                    self.metrics.flush_errors.add(1);
                    self.discard(&change.add).await;
                    return Err(e);
                }
                Vec::new()
            }
        };
        for o in &others {
            self.store.apply(o, None);
        }
        let released = self.store.apply(&change, Some(max_lsn));
        self.budget.release(released);
        self.wal.release(max_lsn);
        self.metrics.spans_flushed.add(rows);
        self.metrics.flushes.add(1);
        self.metrics.flush_seconds.observe(started.elapsed());
        tracing::debug!(rows, files = change.add.len(), max_lsn, elapsed = ?started.elapsed(), "flushed");
        Ok(rows)
    }

    async fn committed(&self, path: &str) -> bool {
        self.catalog.state().await.files.contains_key(path)
    }

    /// Deletes data files of a flush that did not commit (best effort; orphan collection
    /// catches what is left).
    async fn discard(&self, files: &[crate::catalog::DataFile]) {
        let object_store = self.store.object_store();
        for f in files {
            if let Err(e) = object_store.delete(&Path::from(f.path.as_str())).await {
                tracing::debug!(path = f.path, error = %e, "cannot delete file of a failed flush");
            }
        }
    }

    /// Deletes unreferenced data files older than the configured grace period.
    pub async fn collect_orphans(&self) -> Result<Vec<String>> {
        self.catalog.collect_orphans(SPANS_PREFIX, self.config.orphan_grace).await
    }

    /// Stops intake, writes what the WAL queue holds, flushes everything to Parquet and stops
    /// the background tasks.
    pub async fn shutdown(self: &Arc<Self>) -> Result<()> {
        self.closing.store(true, Ordering::Release);
        // Joining the WAL thread blocks until it has written the queued requests.
        let engine = Arc::clone(self);
        on_cpu(move || engine.wal.close()).await?;
        let mut result = Ok(());
        for attempt in 0..5 {
            match self.flush().await {
                Ok(_) if self.store.memory_usage().rows == 0 => {
                    result = Ok(());
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "flush at shutdown failed; the WAL keeps the data");
                    result = Err(e);
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        let tasks = std::mem::take(
            &mut *self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for t in tasks {
            t.abort();
        }
        result
    }
}
