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
use crate::catalog::{Catalog, Change, DataFile, WalMark};
use crate::compaction::MaintenanceConfig;
use crate::crash::{self, CrashPoint};
use crate::error::{Error, Result, on_cpu};
use crate::layout::SPANS_PREFIX;
use crate::metrics::EngineMetrics;
use crate::schema::spans_schema;
use crate::store::{MemBatch, SpanStore};
use crate::trace_index::{self, TraceFilter};
use crate::wal::{self, Committed, Durability, Wal, WalConfig};
use crate::writer::{EncodedFile, WriterConfig, encode_partitions};

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
    /// Compaction, retention and the deletion of files that left the catalog.
    pub maintenance: MaintenanceConfig,
    /// Called after a flush has dropped what it wrote, while resident memory is high enough to
    /// hold ingest back (see [`MemoryBudget`]), to give freed memory back to the OS at once
    /// instead of when the allocator gets to it (the server passes its allocator's collection).
    pub release_memory: Option<fn()>,
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
            maintenance: MaintenanceConfig::default(),
            release_memory: None,
        }
    }
}

/// How long opening the engine waits for the trace index to load (see [`Engine::open`]).
const INDEX_LOAD_WAIT: Duration = Duration::from_secs(30);

/// The running storage engine.
#[derive(Debug)]
pub struct Engine {
    pub(crate) store: Arc<SpanStore>,
    pub(crate) catalog: Catalog,
    wal: Wal,
    pub(crate) budget: Arc<MemoryBudget>,
    pub(crate) metrics: Arc<EngineMetrics>,
    node_id: String,
    pub(crate) config: EngineConfig,
    flush_lock: Mutex<()>,
    /// Serialises the jobs that remove committed files (compaction, retention, deletion).
    pub(crate) maintenance_lock: Mutex<()>,
    /// Where compaction's CPU work and the collection after it run (see [`crate::worker`]).
    pub(crate) maintenance_thread: crate::worker::Worker,
    /// Files out of the catalog, deleted once readers that may still hold them are done.
    pub(crate) pending_deletes: std::sync::Mutex<Vec<(Instant, Vec<String>)>>,
    flush_now: Notify,
    pub(crate) closing: AtomicBool,
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
        .map(|r| {
            // No budget in a snapshot; the size still decides how records are concatenated.
            let charged = r.batch.get_array_memory_size() as u64;
            Committed { lsn: r.lsn, project: r.project, batch: r.batch, charged }
        })
        .collect();
    store.push_batches(coalesce(pending));
    Ok(Arc::new(store))
}

/// A memory batch is made of one project's consecutive records until it holds about this many
/// bytes (as charged): small requests make few batches (which scans and flush slicing prefer),
/// and a record this big already is kept as it is, without a copy.
const COALESCE_BYTES: u64 = 4 << 20;

/// Committed records (in LSN order) as memory batches: per project, consecutive records
/// concatenated up to [`COALESCE_BYTES`]; larger records alone and uncopied.
fn coalesce(records: Vec<Committed>) -> Vec<MemBatch> {
    #[derive(Default)]
    struct Open {
        first_lsn: u64,
        lsn: u64,
        batches: Vec<RecordBatch>,
        charged: u64,
    }
    fn finish(project: &Arc<str>, open: Open, out: &mut Vec<MemBatch>) {
        let made = |batch, charged| {
            let mut m = MemBatch::new(open.lsn, Arc::clone(project), batch, charged);
            m.first_lsn = open.first_lsn;
            m
        };
        let batch = match <[_; 1]>::try_from(open.batches) {
            Ok([one]) => one,
            Err(batches) if batches.is_empty() => return,
            Err(batches) => match concat_batches(&spans_schema(), &batches) {
                Ok(b) => b,
                Err(e) => {
                    // Same schema by construction; keep the parts rather than lose rows.
                    tracing::error!(error = %e, "cannot concatenate committed batches");
                    let mut charged = open.charged;
                    for b in batches {
                        out.push(made(b, std::mem::take(&mut charged)));
                    }
                    return;
                }
            },
        };
        out.push(made(batch, open.charged));
    }
    let mut open: BTreeMap<Arc<str>, Open> = BTreeMap::new();
    let mut out = Vec::new();
    for c in records {
        let e = open.entry(Arc::clone(&c.project)).or_default();
        if c.charged >= COALESCE_BYTES {
            finish(&c.project, std::mem::take(e), &mut out);
            out.push(MemBatch::new(c.lsn, c.project, c.batch, c.charged));
            continue;
        }
        if e.batches.is_empty() {
            e.first_lsn = c.lsn;
        }
        e.lsn = c.lsn;
        e.batches.push(c.batch);
        e.charged += c.charged;
        if e.charged >= COALESCE_BYTES {
            finish(&c.project, std::mem::take(e), &mut out);
        }
    }
    for (project, e) in open {
        finish(&project, e, &mut out);
    }
    out
}

/// The next slice of the memory table to flush, among the batches up to LSN `target`: a prefix
/// in LSN order of about `max_bytes`, closed so that it holds every record at or below its
/// highest LSN, which is what the WAL mark of its commit promises (replay after a restart skips
/// those records). A group commit's records are split by project, so another project's batch
/// may hold LSNs below the prefix's highest: such a batch joins the slice.
fn next_slice(mut batches: Vec<Arc<MemBatch>>, target: u64, max_bytes: u64) -> Vec<Arc<MemBatch>> {
    batches.sort_by_key(|b| b.lsn);
    let mut slice = Vec::new();
    let mut bytes = 0u64;
    let mut rest = batches.into_iter().filter(|b| b.lsn <= target).peekable();
    while let Some(b) = rest.next_if(|b| slice.is_empty() || bytes + b.charged <= max_bytes) {
        bytes += b.charged;
        slice.push(b);
    }
    let mut rest: Vec<_> = rest.collect();
    while let Some(max) = slice.iter().map(|b| b.lsn).max() {
        let (joining, staying): (Vec<_>, Vec<_>) =
            rest.into_iter().partition(|b| b.first_lsn <= max);
        rest = staying;
        if joining.is_empty() {
            break;
        }
        slice.extend(joining);
    }
    slice
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
            maintenance_lock: Mutex::new(()),
            maintenance_thread: crate::worker::Worker::start("spanlake-maintain")?,
            pending_deletes: std::sync::Mutex::new(Vec::new()),
            flush_now: Notify::new(),
            closing: AtomicBool::new(false),
            tasks: std::sync::Mutex::new(Vec::new()),
            _lock: lock,
        });
        let sampler = crate::task::spawn(Arc::clone(&engine).run_resident_sampler());
        let flusher = crate::task::spawn(Arc::clone(&engine).run_flusher());
        let refresher = crate::task::spawn(Arc::clone(&engine).run_refresher());
        let maintainer = crate::task::spawn(Arc::clone(&engine).run_maintenance());
        let mut index_loader = crate::task::spawn({
            let engine = Arc::clone(&engine);
            async move { engine.load_trace_filters().await }
        });
        // A lookup by trace id treats a file whose filter is not loaded as a candidate, so a
        // query right after start would open every file (and fill the footer cache with them:
        // 2,779 files took 400 ms and 350 MB). Wait for the index, up to a bound for stores
        // where loading takes long; past it, it goes on loading beside the server.
        let mut tasks = vec![sampler, flusher, refresher, maintainer];
        if tokio::time::timeout(INDEX_LOAD_WAIT, &mut index_loader).await.is_err() {
            tracing::warn!(
                wait = ?INDEX_LOAD_WAIT,
                "trace index still loading; lookups by trace id open more files until it is done"
            );
            tasks.push(index_loader);
        }
        engine.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(tasks);
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

    /// The process's resident memory as last sampled.
    pub fn resident_memory(&self) -> u64 {
        self.budget.resident()
    }

    /// Refuses new data at once, before it is decoded, while memory is exhausted (see
    /// [`MemoryBudget`]).
    pub fn admit(&self) -> Result<()> {
        self.budget.admit()
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

    /// Samples the process's resident memory for the budget every 100 ms (a read of
    /// /proc/self/status; at 250 MB/s of ingest, 25 MB arrive between two samples).
    async fn run_resident_sampler(self: Arc<Self>) {
        while !self.closing.load(Ordering::Acquire) {
            let Some(bytes) = crate::budget::resident_bytes() else { return };
            self.budget.set_resident(bytes);
            tokio::time::sleep(Duration::from_millis(100)).await;
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
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    // Only when resident memory holds ingest back: handing memory back that
                    // is about to be used again costs the next allocations page faults.
                    if let Some(release) = self.config.release_memory
                        && self.budget.resident_pressure()
                    {
                        let _ = on_cpu(release).await;
                    }
                }
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
                    if changes.iter().any(|c| !c.add.is_empty()) {
                        self.load_trace_filters().await;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "catalog refresh failed"),
            }
        }
    }

    /// Writes everything in memory to Parquet and commits it. Returns the rows flushed.
    ///
    /// The memory table is written in slices of about `flush_max_bytes` in LSN order, each its
    /// own commit: a flush that fell behind does not copy the whole memory table at once (a
    /// slice is gathered in sorted order into a copy of it).
    pub async fn flush(&self) -> Result<u64> {
        let _guard = self.flush_lock.lock().await;
        let Some(target) = self.store.batches().iter().map(|b| b.lsn).max() else { return Ok(0) };
        let mut rows = 0;
        loop {
            let slice = next_slice(self.store.batches(), target, self.config.flush_max_bytes);
            if slice.is_empty() {
                return Ok(rows);
            }
            rows += self.flush_slice(slice).await?;
        }
    }

    async fn flush_slice(&self, batches: Vec<Arc<MemBatch>>) -> Result<u64> {
        let started = Instant::now();
        let Some(max_lsn) = batches.iter().map(|b| b.lsn).max() else { return Ok(0) };
        // Until the commit, the sorted copy the columns are encoded from and then the encoded
        // files sit beside the memory table's batches: charge about one more slice for them, so
        // that ingest backs off instead of the process growing past the budget.
        let _working = self.budget.hold(batches.iter().map(|b| b.charged).sum());
        let writer = self.config.writer.clone();
        let encoded = on_cpu(move || {
            encode_partitions(batches.iter().map(|b| (&b.project, &b.batch)), 0, &writer)
        })
        .await??;

        let duplicates: usize = encoded.iter().map(|f| f.duplicates).sum();
        let published = match self.publish(encoded).await {
            Ok(p) => p,
            Err(e) => {
                self.metrics.flush_errors.add(1);
                return Err(e);
            }
        };
        self.metrics.spans_deduplicated.add(duplicates as u64);
        let rows: u64 = published.iter().map(|(f, _)| f.rows).sum();
        let wal = Some(WalMark { node: self.node_id.clone(), flushed_lsn: max_lsn });
        let change = match self
            .commit_files(
                published,
                Vec::new(),
                wal,
                CrashPoint::FlushBeforeCommit,
                CrashPoint::FlushAfterCommit,
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                self.metrics.flush_errors.add(1);
                return Err(e);
            }
        };
        let released = self.store.apply(&change, Some(max_lsn));
        self.budget.release(released);
        self.wal.release(max_lsn);
        self.metrics.spans_flushed.add(rows);
        self.metrics.flushes.add(1);
        self.metrics.flush_seconds.observe(started.elapsed());
        tracing::debug!(rows, files = change.add.len(), max_lsn, elapsed = ?started.elapsed(), "flushed");
        Ok(rows)
    }

    /// Puts encoded files and their trace filters. On failure deletes what it put and fails.
    pub(crate) async fn publish(
        &self,
        files: Vec<EncodedFile>,
    ) -> Result<Vec<(DataFile, Arc<TraceFilter>)>> {
        let object_store = self.store.object_store();
        let mut done: Vec<(DataFile, Arc<TraceFilter>)> = Vec::with_capacity(files.len());
        for file in files {
            let path = Path::from(file.meta.path.as_str());
            let size = file.bytes.len() as u64;
            let put = object_store.put(&path, PutPayload::from_bytes(file.bytes)).await;
            let put = match put {
                Ok(_) => {
                    let filter = Path::from(trace_index::filter_path(&file.meta.path));
                    let bytes = file.trace_filter.to_bytes();
                    object_store
                        .put(&filter, PutPayload::from_bytes(bytes))
                        .await
                        .map_err(|source| Error::ObjectStore { op: "put", path: filter, source })
                }
                Err(source) => Err(Error::ObjectStore { op: "put", path, source }),
            };
            if let Err(e) = put {
                done.push((file.meta, Arc::new(file.trace_filter)));
                let paths: Vec<String> = done.iter().map(|(f, _)| f.path.clone()).collect();
                self.delete_objects(&paths).await;
                return Err(e);
            }
            self.metrics.files_written.add(1);
            self.metrics.bytes_written.add(size);
            done.push((file.meta, Arc::new(file.trace_filter)));
        }
        Ok(done)
    }

    /// Commits published files (and the removal of others) as one catalog version, between
    /// two crash points. If the commit fails for sure, the published files are deleted.
    pub(crate) async fn commit_files(
        &self,
        added: Vec<(DataFile, Arc<TraceFilter>)>,
        remove: Vec<String>,
        wal: Option<WalMark>,
        before: CrashPoint,
        after: CrashPoint,
    ) -> Result<Change> {
        crash::reached(before);
        let change = Change { add: added.iter().map(|(f, _)| f.clone()).collect(), remove, wal };
        let others = match self.catalog.commit(change.clone()).await {
            Ok((_, others)) => others,
            Err(e) => {
                // The put may have succeeded although its answer was lost: look before discarding.
                if let Ok(changes) = self.catalog.refresh().await {
                    for c in &changes {
                        self.store.apply(c, None);
                    }
                }
                if !self.landed(&change).await {
                    let paths: Vec<String> = change.add.iter().map(|f| f.path.clone()).collect();
                    self.delete_objects(&paths).await;
                    return Err(e);
                }
                Vec::new()
            }
        };
        for o in &others {
            self.store.apply(o, None);
        }
        for (f, filter) in added {
            self.store.trace_index().insert(&f.path, filter);
        }
        crash::reached(after);
        Ok(change)
    }

    /// Whether `change` is in the catalog (after a commit whose answer was an error).
    async fn landed(&self, change: &Change) -> bool {
        let state = self.catalog.state().await;
        match (change.add.first(), change.remove.first()) {
            (Some(f), _) => state.files.contains_key(&f.path),
            (None, Some(p)) => !state.files.contains_key(p),
            (None, None) => true,
        }
    }

    /// Deletes data files and their trace filters (best effort; orphan collection catches
    /// what is left).
    pub(crate) async fn delete_objects(&self, paths: &[String]) {
        let object_store = self.store.object_store();
        for p in paths {
            for path in [Path::from(p.as_str()), Path::from(trace_index::filter_path(p))] {
                match object_store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                        self.metrics.objects_deleted.add(1)
                    }
                    Err(e) => tracing::debug!(%path, error = %e, "cannot delete object"),
                }
            }
        }
    }

    /// Loads the trace filters of committed files that have one and are not loaded yet.
    pub async fn load_trace_filters(&self) {
        use futures::StreamExt as _;
        let index = self.store.trace_index();
        let missing: Vec<String> = self
            .store
            .files()
            .into_iter()
            .filter(|f| f.trace_index && !index.has(&f.path))
            .map(|f| f.path.clone())
            .collect();
        if missing.is_empty() {
            return;
        }
        let object_store = self.store.object_store();
        let started = Instant::now();
        let loaded = futures::stream::iter(missing)
            .map(|p| {
                let object_store = Arc::clone(&object_store);
                async move {
                    let path = Path::from(trace_index::filter_path(&p));
                    let bytes = object_store.get(&path).await.ok()?.bytes().await.ok()?;
                    Some((p, TraceFilter::from_bytes(&bytes)?))
                }
            })
            .buffer_unordered(16)
            .filter_map(|r| async move { r })
            .collect::<Vec<_>>()
            .await;
        let n = loaded.len();
        let committed: std::collections::HashSet<String> =
            self.store.files().iter().map(|f| f.path.clone()).collect();
        for (p, f) in loaded {
            // A file may have left the catalog while its filter loaded.
            if committed.contains(&p) {
                index.insert(&p, Arc::new(f));
            }
        }
        tracing::info!(filters = n, elapsed = ?started.elapsed(), "trace index loaded");
    }

    /// Deletes unreferenced data files and trace filters older than the configured grace
    /// period.
    pub async fn collect_orphans(&self) -> Result<Vec<String>> {
        let grace = self.config.orphan_grace;
        let mut deleted =
            self.catalog.collect_orphans(SPANS_PREFIX, grace, |p| p.to_string()).await?;
        let index = self
            .catalog
            .collect_orphans(trace_index::INDEX_PREFIX, grace, |p| {
                p.strip_prefix(trace_index::INDEX_PREFIX)
                    .and_then(|p| p.strip_prefix('/'))
                    .and_then(|p| p.strip_suffix(".bloom"))
                    .unwrap_or(p)
                    .to_string()
            })
            .await?;
        deleted.extend(index);
        Ok(deleted)
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
        // A maintenance job in flight is let finish (compaction starts no new job once
        // `closing` is set): aborted between writing its outputs and committing them, it would
        // leave files no commit references, which a reader globbing the tree counts twice
        // until orphan collection removes them. The guard is held while the tasks stop.
        let _quiet = self.maintenance_guard().await;
        let tasks = std::mem::take(
            &mut *self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for t in tasks {
            t.abort();
        }
        // No reader is left in this process: files out of the catalog can go now.
        self.delete_due(true).await;
        result
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::AsArray as _;

    use super::*;
    use crate::batch::SpanBatchBuilder;
    use crate::record::SpanRecord;
    use crate::schema::col;

    /// A graceful stop waits for the maintenance job in flight (here: the guard a job holds)
    /// instead of aborting it between writing its files and committing them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_waits_for_the_maintenance_job_in_flight() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let store = object_store::local::LocalFileSystem::new_with_prefix(&data).unwrap();
        let engine = Engine::open(
            EngineConfig::new(tmp.path().join("wal")),
            Arc::new(store),
            Arc::default(),
        )
        .await
        .unwrap();
        let job = engine.maintenance_guard().await;
        #[expect(clippy::disallowed_methods, reason = "joined below")]
        let stopping = tokio::spawn({
            let engine = Arc::clone(&engine);
            async move { engine.shutdown().await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!stopping.is_finished(), "shutdown went on while a maintenance job held the guard");
        assert!(engine.closing.load(Ordering::Acquire));
        drop(job);
        stopping.await.unwrap().unwrap();
        // Compaction starts no job once the engine is closing.
        assert_eq!(engine.compact().await.unwrap(), 0);
    }

    /// A record of `rows` spans, each with `text` bytes of input, charged its size.
    fn record(lsn: u64, project: &str, rows: usize, text: usize) -> Committed {
        let input = "x".repeat(text);
        let mut b = SpanBatchBuilder::with_capacity(rows);
        for i in 0..rows {
            b.append(&SpanRecord {
                trace_id: [lsn as u8; 16],
                span_id: [i as u8 + 1; 8],
                name: "s",
                attributes: "{}",
                input: Some(&input),
                ..Default::default()
            });
        }
        let batch = b.finish().unwrap();
        let charged = batch.get_array_memory_size() as u64;
        Committed { lsn, project: project.into(), batch, charged }
    }

    fn input_ptr(batch: &RecordBatch) -> *const u8 {
        batch.column_by_name(col::INPUT).unwrap().as_string::<i32>().values().as_ptr()
    }

    /// A memory batch of no rows holding LSNs `first..=lsn`, charged `charged`.
    fn held(first: u64, lsn: u64, charged: u64) -> Arc<MemBatch> {
        let batch = SpanBatchBuilder::with_capacity(0).finish().unwrap();
        let mut m = MemBatch::new(lsn, "p".into(), batch, charged);
        m.first_lsn = first;
        Arc::new(m)
    }

    fn lsns(slice: &[Arc<MemBatch>]) -> Vec<u64> {
        slice.iter().map(|b| b.lsn).collect()
    }

    #[test]
    fn a_flush_slice_holds_every_record_up_to_its_highest_lsn() {
        // One group commit split by project: `a` holds LSNs 1..=6, `b` 2..=7 (interleaved),
        // then a later group 8..=9, and 10 arrived after the flush began (target 9).
        let batches = vec![held(8, 9, 100), held(2, 7, 100), held(1, 6, 100), held(10, 10, 1)];
        // 150 bytes take only `a`; `b` holds LSNs below 6, so it joins.
        assert_eq!(lsns(&next_slice(batches.clone(), 9, 150)), vec![6, 7]);
        assert_eq!(lsns(&next_slice(batches[..1].to_vec(), 9, 150)), vec![9]);
        // A batch past the target never joins; a large budget takes all up to it.
        assert_eq!(lsns(&next_slice(batches.clone(), 9, 1 << 20)), vec![6, 7, 9]);
        // The first batch goes even when it is over the size on its own.
        assert_eq!(lsns(&next_slice(vec![held(3, 3, 500), held(4, 4, 1)], 4, 100)), vec![3]);
        assert!(next_slice(batches, 0, 100).is_empty());
    }

    #[test]
    fn small_records_are_concatenated_and_large_ones_kept_uncopied() {
        let big = record(3, "a", 80, 64 << 10);
        assert!(big.charged >= COALESCE_BYTES);
        let big_input = input_ptr(&big.batch);
        let mut records = vec![record(1, "a", 2, 10), record(2, "b", 3, 10), big];
        records.extend([record(4, "a", 1, 10), record(5, "a", 2, 10)]);
        // Records of 1.1 MiB: four of them pass the size, the fifth starts another batch.
        records.extend((6..=10).map(|lsn| record(lsn, "c", 1, 1_100_000)));
        let charged: Vec<u64> = records.iter().map(|c| c.charged).collect();
        let sum = |lsns: std::ops::RangeInclusive<usize>| -> u64 {
            lsns.map(|lsn| charged[lsn - 1]).sum()
        };
        let out = coalesce(records);
        let summary: Vec<(&str, u64, u64, usize, u64)> = out
            .iter()
            .map(|m| (&*m.project, m.first_lsn, m.lsn, m.batch.num_rows(), m.charged))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("a", 1, 1, 2, sum(1..=1)),
                ("a", 3, 3, 80, sum(3..=3)),
                ("c", 6, 9, 4, sum(6..=9)),
                ("a", 4, 5, 3, sum(4..=5)),
                ("b", 2, 2, 3, sum(2..=2)),
                ("c", 10, 10, 1, sum(10..=10)),
            ]
        );
        assert_eq!(input_ptr(&out[1].batch), big_input, "the large record was copied");
    }
}
