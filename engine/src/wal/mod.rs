//! The write-ahead log: nothing acknowledged is lost.
//!
//! Receivers hand each request's batch to [`Wal::append`] and answer the client only when the
//! returned future resolves. One dedicated thread owns the log files: it takes every request
//! waiting in its bounded (lock-free, crossbeam) queue, frames them into one write, syncs once
//! (group commit: concurrent requests share one `fdatasync`), publishes the batches to the
//! in-memory table through the commit callback, and only then resolves the futures. A full queue
//! is answered at once with [`Error::WalBusy`] (retryable), never by waiting.
//!
//! After a flush has committed every record up to some LSN to Parquet and the catalog,
//! [`Wal::release`] lets the writer delete the segments that hold nothing newer. On start,
//! [`recover`] reads the segments back; the caller skips records at or below the LSN the catalog
//! says is flushed, so every acknowledged span comes back exactly once even when the process died
//! between the Parquet commit and the segment deletion.
//!
//! # Durability modes
//!
//! * `fsync` (default): a record is synced to disk before its request is acknowledged. An
//!   acknowledged span survives a process crash and a machine crash or power loss.
//! * `none`: records are written to the OS before the acknowledgement but not synced. An
//!   acknowledged span survives a process crash (`kill -9`), but a machine crash or power loss
//!   can lose the last few seconds of acknowledged spans.
//!
//! The on-disk format is described in [`format`].

pub mod format;

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::RecordBatch;
use crossbeam::channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::metrics::EngineMetrics;
use format::{Record, Tail};

/// What an acknowledgement promises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Synced to disk before the acknowledgement: survives power loss.
    #[default]
    Fsync,
    /// Written to the OS before the acknowledgement: survives a process crash only.
    None,
}

/// Settings of the write-ahead log.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Directory of the segments (local disk).
    pub dir: PathBuf,
    /// What an acknowledgement promises.
    pub durability: Durability,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// Requests that may wait for the log before new ones are refused.
    pub queue_requests: usize,
}

impl WalConfig {
    /// The defaults for a WAL in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, durability: Durability::Fsync, segment_bytes: 64 << 20, queue_requests: 4096 }
    }
}

/// One record committed to the log, handed to the commit callback.
#[derive(Debug)]
pub struct Committed {
    /// Its log sequence number.
    pub lsn: u64,
    /// The project.
    pub project: Arc<str>,
    /// The spans.
    pub batch: RecordBatch,
    /// Bytes charged to the memory budget for it.
    pub charged: u64,
}

/// Called by the writer thread with the records of each group commit, before they are
/// acknowledged.
pub type CommitCallback = Box<dyn Fn(Vec<Committed>) + Send>;

struct Append {
    project: Arc<str>,
    batch: RecordBatch,
    payload: Vec<u8>,
    charged: u64,
    ack: oneshot::Sender<Result<u64>>,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// LSN of its last record; `None` while empty.
    last_lsn: Option<u64>,
}

/// What [`recover`] found on disk.
#[derive(Debug)]
pub struct Recovered {
    /// Valid records, in LSN order.
    pub records: Vec<Record>,
    segments: Vec<Segment>,
    next_lsn: u64,
}

/// The running log.
pub struct Wal {
    tx: Sender<Append>,
    released: Arc<AtomicU64>,
    closing: Arc<AtomicBool>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("queued", &self.tx.len()).finish()
    }
}

fn segment_path(dir: &Path, first_lsn: u64) -> PathBuf {
    dir.join(format!("{first_lsn:020}.wal"))
}

fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> Error + use<'p> {
    move |source| Error::WalIo { op, path: path.to_path_buf(), source }
}

/// Reads the valid records of every segment in `dir` without changing anything (for readers
/// beside a running server).
pub fn read_only(dir: &Path) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(records),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_err("list", dir))?.path();
        if path.extension().is_some_and(|e| e == "wal") {
            match std::fs::read(&path) {
                Ok(bytes) => records.extend(format::read_segment(&bytes).0),
                // Deleted by the writer since the listing: its records are in Parquet.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("read", &path)(e)),
            }
        }
    }
    records.sort_by_key(|r| r.lsn);
    records.dedup_by_key(|r| r.lsn);
    Ok(records)
}

/// Reads every segment in `dir`, cutting off a torn tail and setting aside corrupt segments.
pub fn recover(dir: &Path) -> Result<Recovered> {
    std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let mut names: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "wal")
            && let Some(first) = path.file_stem().and_then(|s| s.to_str()?.parse::<u64>().ok())
        {
            names.push((first, path));
        }
    }
    names.sort();
    let mut records = Vec::new();
    let mut segments = Vec::new();
    let mut next_lsn = 1;
    for (first, path) in names {
        let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
        let (found, tail) = format::read_segment(&bytes);
        match tail {
            Tail::Clean => {}
            Tail::Torn { valid_len } => {
                tracing::warn!(
                    segment = %path.display(),
                    valid_len,
                    dropped = bytes.len() as u64 - valid_len,
                    "write-ahead log ends in a torn record (never acknowledged); cutting it off"
                );
                truncate(&path, valid_len.max(format::HEADER_LEN as u64), &bytes)?;
            }
            Tail::Corrupt { valid_len, reason } => {
                let aside = path.with_extension("wal.corrupt");
                tracing::error!(
                    segment = %path.display(),
                    offset = valid_len,
                    reason,
                    kept = found.len(),
                    moved_to = %aside.display(),
                    "write-ahead log segment is damaged; replaying its valid prefix and setting it aside"
                );
                std::fs::rename(&path, &aside).map_err(io_err("rename", &path))?;
            }
        }
        let last_lsn = found.last().map(|r| r.lsn);
        if let Some(last) = last_lsn {
            next_lsn = next_lsn.max(last + 1);
        }
        next_lsn = next_lsn.max(first);
        if !matches!(tail, Tail::Corrupt { .. }) {
            segments.push(Segment { path, last_lsn });
        }
        records.extend(found);
    }
    records.sort_by_key(|r| r.lsn);
    records.dedup_by_key(|r| r.lsn);
    Ok(Recovered { records, segments, next_lsn })
}

fn truncate(path: &Path, len: u64, bytes: &[u8]) -> Result<()> {
    if len < format::HEADER_LEN as u64 || bytes.len() < format::HEADER_LEN {
        // Not even the header made it: rewrite it.
        std::fs::write(path, format::header()).map_err(io_err("rewrite", path))?;
        return Ok(());
    }
    let f = OpenOptions::new().write(true).open(path).map_err(io_err("open", path))?;
    f.set_len(len).map_err(io_err("truncate", path))?;
    f.sync_all().map_err(io_err("sync", path))
}

impl Wal {
    /// Starts the writer thread after [`recover`]. Records at or below `flushed_lsn` are already
    /// in Parquet; segments holding nothing newer are deleted right away.
    pub fn start(
        config: WalConfig,
        recovered: Recovered,
        flushed_lsn: u64,
        metrics: Arc<EngineMetrics>,
        on_commit: CommitCallback,
    ) -> Result<Self> {
        let (tx, rx) = crossbeam::channel::bounded(config.queue_requests.max(1));
        let released = Arc::new(AtomicU64::new(flushed_lsn));
        let closing = Arc::new(AtomicBool::new(false));
        let next_lsn = recovered.next_lsn.max(flushed_lsn + 1);
        let mut writer = Writer {
            closed: Vec::new(),
            active: None,
            next_lsn,
            config,
            released: Arc::clone(&released),
            metrics,
            buf: Vec::new(),
        };
        // Existing segments are never appended to again: a fresh one starts at `next_lsn`.
        // Empty and released segments go first, so that the new segment's name is free.
        writer.closed = recovered.segments;
        writer.delete_released();
        writer.open_segment()?;
        let thread = {
            let closing = Arc::clone(&closing);
            std::thread::Builder::new()
                .name("spanlake-wal".into())
                .spawn(move || writer.run(&rx, &closing, &on_commit))
                .map_err(|source| Error::LocalIo { path: PathBuf::from("wal thread"), source })?
        };
        Ok(Self { tx, released, closing, thread: std::sync::Mutex::new(Some(thread)) })
    }

    /// Queues one request's batch (with its payload from [`format::encode_payload`]) and
    /// resolves with its LSN once it is durable and visible to queries.
    pub fn append(
        &self,
        project: Arc<str>,
        batch: RecordBatch,
        payload: Vec<u8>,
        charged: u64,
    ) -> Result<oneshot::Receiver<Result<u64>>> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let (ack, rx) = oneshot::channel();
        match self.tx.try_send(Append { project, batch, payload, charged, ack }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(Error::WalBusy { pending: self.tx.len() }),
            Err(TrySendError::Disconnected(_)) => Err(Error::ShuttingDown),
        }
    }

    /// Records up to `lsn` are committed elsewhere; their segments may be deleted.
    pub fn release(&self, lsn: u64) {
        self.released.fetch_max(lsn, Ordering::AcqRel);
    }

    /// Requests waiting for the writer.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// Stops taking requests, writes those queued, and stops the writer thread.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let handle = self.thread.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("write-ahead log thread panicked");
        }
    }
}

struct Writer {
    closed: Vec<Segment>,
    active: Option<(File, Segment, u64)>,
    next_lsn: u64,
    config: WalConfig,
    released: Arc<AtomicU64>,
    metrics: Arc<EngineMetrics>,
    buf: Vec<u8>,
}

/// Most bytes framed into one write.
const MAX_GROUP_BYTES: usize = 32 << 20;

impl Writer {
    fn run(mut self, rx: &Receiver<Append>, closing: &AtomicBool, on_commit: &CommitCallback) {
        loop {
            let first = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(a) => a,
                Err(RecvTimeoutError::Timeout) => {
                    self.maintain();
                    if closing.load(Ordering::Acquire) && rx.is_empty() {
                        return;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut group = vec![first];
            let mut bytes = group[0].payload.len();
            while bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(a) => {
                        bytes += a.payload.len();
                        group.push(a);
                    }
                    Err(_) => break,
                }
            }
            self.commit(group, on_commit);
            self.maintain();
        }
    }

    fn commit(&mut self, group: Vec<Append>, on_commit: &CommitCallback) {
        let started = std::time::Instant::now();
        let first_lsn = self.next_lsn;
        self.buf.clear();
        for (i, a) in group.iter().enumerate() {
            format::frame_record(first_lsn + i as u64, &a.payload, &mut self.buf);
        }
        match self.write_group() {
            Ok(()) => {
                let last = first_lsn + group.len() as u64 - 1;
                self.next_lsn = last + 1;
                if let Some((_, seg, _)) = &mut self.active {
                    seg.last_lsn = Some(last);
                }
                self.metrics.wal_bytes.add(self.buf.len() as u64);
                self.metrics.wal_syncs.add(1);
                self.metrics.wal_sync_seconds.observe(started.elapsed());
                let mut acks = Vec::with_capacity(group.len());
                let mut committed = Vec::with_capacity(group.len());
                for (i, a) in group.into_iter().enumerate() {
                    let lsn = first_lsn + i as u64;
                    acks.push((a.ack, lsn));
                    committed.push(Committed {
                        lsn,
                        project: a.project,
                        batch: a.batch,
                        charged: a.charged,
                    });
                }
                on_commit(committed);
                for (ack, lsn) in acks {
                    let _ = ack.send(Ok(lsn));
                }
            }
            Err(e) => {
                self.metrics.wal_errors.add(1);
                tracing::warn!(error = %e, requests = group.len(), "write-ahead log write failed; requests refused");
                let path = self.active.as_ref().map(|(_, s, _)| s.path.clone()).unwrap_or_default();
                let (kind, cause) = match &e {
                    Error::WalIo { source, .. } => (source.kind(), source.to_string()),
                    other => (std::io::ErrorKind::Other, other.to_string()),
                };
                for a in group {
                    let source = std::io::Error::new(kind, cause.clone());
                    let _ =
                        a.ack.send(Err(Error::WalIo { op: "append", path: path.clone(), source }));
                }
            }
        }
    }

    /// Appends the framed group to the active segment and syncs it; on failure the segment is
    /// cut back to where it was so that no half-written record stays in the middle of the log.
    fn write_group(&mut self) -> Result<()> {
        if self.active.is_none() {
            self.open_segment()?;
        }
        let fsync = self.config.durability == Durability::Fsync;
        let Some((file, seg, len)) = &mut self.active else { unreachable!("opened above") };
        let result =
            file.write_all(&self.buf).and_then(|()| if fsync { file.sync_data() } else { Ok(()) });
        match result {
            Ok(()) => {
                *len += self.buf.len() as u64;
                Ok(())
            }
            Err(source) => {
                let path = seg.path.clone();
                if file.set_len(*len).is_err() {
                    // The segment may hold a partial record: start a new one.
                    self.close_active();
                }
                Err(Error::WalIo { op: "append", path, source })
            }
        }
    }

    fn open_segment(&mut self) -> Result<()> {
        let path = segment_path(&self.config.dir, self.next_lsn);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        file.write_all(&format::header()).map_err(io_err("write header", &path))?;
        if self.config.durability == Durability::Fsync {
            file.sync_all().map_err(io_err("sync", &path))?;
            File::open(&self.config.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync directory", &self.config.dir))?;
        }
        self.active = Some((file, Segment { path, last_lsn: None }, format::HEADER_LEN as u64));
        Ok(())
    }

    fn close_active(&mut self) {
        if let Some((_, seg, _)) = self.active.take() {
            self.closed.push(seg);
        }
    }

    /// Rolls a full segment, and deletes segments whose records are all released.
    fn maintain(&mut self) {
        let released = self.released.load(Ordering::Acquire);
        let roll = match &self.active {
            Some((_, seg, len)) => {
                *len >= self.config.segment_bytes || seg.last_lsn.is_some_and(|l| l <= released)
            }
            None => true,
        };
        if roll {
            self.close_active();
            if let Err(e) = self.open_segment() {
                tracing::warn!(error = %e, "cannot start a new write-ahead log segment");
            }
        }
        self.delete_released();
    }

    fn delete_released(&mut self) {
        let released = self.released.load(Ordering::Acquire);
        self.closed.retain(|seg| {
            if seg.last_lsn.is_none_or(|l| l <= released) {
                match std::fs::remove_file(&seg.path) {
                    Ok(()) => return false,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
                    Err(e) => tracing::warn!(segment = %seg.path.display(), error = %e, "cannot delete released segment"),
                }
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SpanBatchBuilder;
    use crate::record::SpanRecord;
    use std::sync::Mutex;

    fn batch(id: u8) -> RecordBatch {
        let mut b = SpanBatchBuilder::with_capacity(1);
        b.append(&SpanRecord {
            trace_id: [id; 16],
            span_id: [id; 8],
            attributes: "{}",
            ..Default::default()
        });
        b.finish().unwrap()
    }

    fn start(dir: &Path, flushed: u64) -> (Wal, Arc<Mutex<Vec<u64>>>, Vec<u64>) {
        let recovered = recover(dir).unwrap();
        let replayed: Vec<u64> =
            recovered.records.iter().map(|r| r.lsn).filter(|l| *l > flushed).collect();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let wal = Wal::start(
            WalConfig::new(dir.to_path_buf()),
            recovered,
            flushed,
            Arc::new(EngineMetrics::default()),
            Box::new(move |c| sink.lock().unwrap().extend(c.iter().map(|c| c.lsn))),
        )
        .unwrap();
        (wal, seen, replayed)
    }

    fn append(wal: &Wal, id: u8) -> u64 {
        let b = batch(id);
        let payload = format::encode_payload("p", &b).unwrap();
        let rx = wal.append(Arc::from("p"), b, payload, 0).unwrap();
        rx.blocking_recv().unwrap().unwrap()
    }

    #[test]
    fn acknowledged_records_come_back_after_restart_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, seen, replayed) = start(dir.path(), 0);
        assert!(replayed.is_empty());
        let lsns: Vec<u64> = (1..=5).map(|i| append(&wal, i)).collect();
        assert_eq!(lsns, vec![1, 2, 3, 4, 5]);
        assert_eq!(*seen.lock().unwrap(), lsns);
        wal.close();

        // Records 1..=3 were flushed: only 4 and 5 come back, and new LSNs continue after 5.
        let (wal, _, replayed) = start(dir.path(), 3);
        assert_eq!(replayed, vec![4, 5]);
        assert_eq!(append(&wal, 6), 6);
        wal.release(6);
        wal.close();
        let (wal, _, replayed) = start(dir.path(), 6);
        assert!(replayed.is_empty());
        wal.close();
    }

    #[test]
    fn released_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = start(dir.path(), 0);
        for i in 1..=3 {
            append(&wal, i);
        }
        wal.release(3);
        // The writer rolls and deletes on its next idle tick.
        std::thread::sleep(Duration::from_millis(400));
        let count = |d: &Path| std::fs::read_dir(d).unwrap().count();
        assert_eq!(count(dir.path()), 1, "only the fresh active segment is left");
        wal.close();
    }

    #[test]
    fn torn_tail_is_cut_and_later_appends_survive() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _, _) = start(dir.path(), 0);
        append(&wal, 1);
        append(&wal, 2);
        wal.close();
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| std::fs::metadata(p).unwrap().len() > format::HEADER_LEN as u64)
            .unwrap();
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 10).unwrap();
        let (wal, _, replayed) = start(dir.path(), 0);
        assert_eq!(replayed, vec![1]);
        assert_eq!(
            append(&wal, 3),
            2,
            "the torn record's LSN is reused: it was never acknowledged"
        );
        wal.close();
        let (wal, _, replayed) = start(dir.path(), 0);
        assert_eq!(replayed, vec![1, 2]);
        wal.close();
    }
}
