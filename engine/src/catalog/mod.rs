//! The catalog: which data files are committed, with their statistics.
//!
//! Queries never LIST the bucket: the set of committed files and their stats live in a log of
//! versioned, immutable catalog objects in the object store itself, next to the data, and each
//! node holds the current state in memory.
//!
//! # Format, version 1
//!
//! ```text
//! _catalog/v1/log/<version, 20 digits>.json         one commit: files added and removed,
//!                                                     and the WAL position it covers
//! _catalog/v1/checkpoint/<version, 20 digits>.json  the whole state at that version
//! _catalog/v1/_last_checkpoint                        {"version": N}, a hint
//! ```
//!
//! A commit writes log object `version + 1` with a conditional put that fails if the object
//! exists (`PutMode::Create`: `If-None-Match: *` on S3, an exclusive create on local disk). The
//! writer that loses a race reads the winner's entries, checks that its change still applies
//! (every file it removes is still committed) and tries the next version. So the log is a
//! linear history and every version is complete when it becomes visible: a crash before the
//! put leaves the data files it wrote unreferenced (orphans, collected later by
//! [`Catalog::collect_orphans`]), a crash after it leaves a committed version.
//!
//! Loading reads `_last_checkpoint`, that checkpoint, and then log objects one by one until
//! the next version does not exist: no LIST. Every [`CHECKPOINT_EVERY`] versions the
//! committer writes a checkpoint; log objects older than the newest checkpoint by more than
//! [`KEEP_LOG_VERSIONS`] are deleted.
//!
//! Each entry also records, per node, the highest WAL LSN whose spans are in committed files;
//! a node replaying its WAL skips records at or below it, so that spans are never duplicated.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt as _;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::error::{Error, Result};

/// The catalog format version this module reads and writes.
pub const FORMAT: u32 = 1;
/// A checkpoint is written every this many versions.
pub const CHECKPOINT_EVERY: u64 = 50;
/// Log objects this far behind the newest checkpoint are deleted.
pub const KEEP_LOG_VERSIONS: u64 = 100;
const ROOT: &str = "_catalog/v1";

/// A committed Parquet data file and its statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataFile {
    /// Object path.
    pub path: String,
    /// Project (tenant) the spans belong to.
    pub project: String,
    /// The hour partition (hours since the Unix epoch) of every span's start time.
    pub hour: i64,
    /// Size in bytes.
    pub size: u64,
    /// Rows.
    pub rows: u64,
    /// Smallest `start_time` (ns).
    pub min_start_ns: i64,
    /// Largest `start_time` (ns).
    pub max_start_ns: i64,
    /// Smallest `trace_id`.
    pub min_trace_id: String,
    /// Largest `trace_id`.
    pub max_trace_id: String,
    /// Whether `trace_id` has a Parquet bloom filter.
    pub trace_id_bloom: bool,
    /// Distinct trace ids.
    #[serde(default)]
    pub traces: u64,
    /// Bytes the rows take in memory as Arrow (what reading the whole file costs).
    #[serde(default)]
    pub mem_bytes: u64,
    /// Whether the file's trace filter exists (see [`crate::trace_index`]).
    #[serde(default)]
    pub trace_index: bool,
    /// 0 for a flush, 1 and above for compaction output.
    pub level: u8,
    /// When it was written (ms since the Unix epoch).
    pub created_ms: i64,
}

/// One commit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Files added.
    #[serde(default)]
    pub add: Vec<DataFile>,
    /// Paths of files removed.
    #[serde(default)]
    pub remove: Vec<String>,
    /// WAL position covered: (node id, LSN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal: Option<WalMark>,
}

/// The highest WAL LSN of a node whose spans are committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WalMark {
    /// The node.
    pub node: String,
    /// The LSN.
    pub flushed_lsn: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct LogEntry {
    format: u32,
    version: u64,
    timestamp_ms: i64,
    writer: String,
    #[serde(flatten)]
    change: Change,
}

#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    format: u32,
    version: u64,
    files: Vec<DataFile>,
    wal: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LastCheckpoint {
    version: u64,
}

/// The catalog state at one version.
#[derive(Debug, Clone, Default)]
pub struct CatalogState {
    /// The version.
    pub version: u64,
    /// Committed files by path.
    pub files: BTreeMap<String, Arc<DataFile>>,
    /// Flushed WAL LSN by node.
    pub wal: BTreeMap<String, u64>,
}

impl CatalogState {
    fn apply(&mut self, version: u64, change: &Change) {
        for path in &change.remove {
            self.files.remove(path);
        }
        for f in &change.add {
            self.files.insert(f.path.clone(), Arc::new(f.clone()));
        }
        if let Some(m) = &change.wal {
            let e = self.wal.entry(m.node.clone()).or_insert(0);
            *e = (*e).max(m.flushed_lsn);
        }
        self.version = version;
    }

    /// The LSN up to which `node`'s WAL is committed.
    pub fn flushed_lsn(&self, node: &str) -> u64 {
        self.wal.get(node).copied().unwrap_or(0)
    }
}

/// The catalog of one data location.
#[derive(Debug)]
pub struct Catalog {
    store: Arc<dyn ObjectStore>,
    writer: String,
    state: Mutex<CatalogState>,
}

fn log_path(version: u64) -> Path {
    Path::from(format!("{ROOT}/log/{version:020}.json"))
}

fn checkpoint_path(version: u64) -> Path {
    Path::from(format!("{ROOT}/checkpoint/{version:020}.json"))
}

fn last_checkpoint_path() -> Path {
    Path::from(format!("{ROOT}/_last_checkpoint"))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn get_json<T: for<'de> Deserialize<'de>>(
    store: &dyn ObjectStore,
    path: &Path,
) -> Result<Option<T>> {
    let bytes = match store.get(path).await {
        Ok(r) => r.bytes().await.map_err(|source| Error::ObjectStore {
            op: "get",
            path: path.clone(),
            source,
        })?,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(source) => return Err(Error::ObjectStore { op: "get", path: path.clone(), source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| Error::CatalogFormat { path: path.clone(), source })
}

fn to_json<T: Serialize>(v: &T) -> Bytes {
    // Catalog types serialize infallibly: strings, numbers and maps with string keys.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

impl Catalog {
    /// Loads the catalog of `store`; `writer` names this node in the entries it commits.
    pub async fn load(store: Arc<dyn ObjectStore>, writer: &str) -> Result<(Self, CatalogState)> {
        let mut state = CatalogState::default();
        if let Some(last) = get_json::<LastCheckpoint>(&*store, &last_checkpoint_path()).await?
            && let Some(cp) =
                get_json::<Checkpoint>(&*store, &checkpoint_path(last.version)).await?
        {
            state.version = cp.version;
            state.files = cp.files.into_iter().map(|f| (f.path.clone(), Arc::new(f))).collect();
            state.wal = cp.wal;
        }
        let catalog =
            Self { store, writer: writer.to_string(), state: Mutex::new(CatalogState::default()) };
        catalog.read_forward(&mut state).await?;
        *catalog.state.lock().await = state.clone();
        Ok((catalog, state))
    }

    /// Applies log entries after `state.version` until the next one does not exist; returns
    /// the changes applied.
    async fn read_forward(&self, state: &mut CatalogState) -> Result<Vec<Change>> {
        let mut applied = Vec::new();
        loop {
            let next = state.version + 1;
            let Some(entry) = get_json::<LogEntry>(&*self.store, &log_path(next)).await? else {
                return Ok(applied);
            };
            state.apply(next, &entry.change);
            applied.push(entry.change);
        }
    }

    /// Changes committed by other writers since this node last looked.
    pub async fn refresh(&self) -> Result<Vec<Change>> {
        let mut state = self.state.lock().await;
        self.read_forward(&mut state).await
    }

    /// The current state.
    pub async fn state(&self) -> CatalogState {
        self.state.lock().await.clone()
    }

    /// Commits `change` as the next version. Returns the version and the changes by other
    /// writers that were applied first (the caller's view must take them in too).
    pub async fn commit(&self, change: Change) -> Result<(u64, Vec<Change>)> {
        let mut state = self.state.lock().await;
        let mut others = Vec::new();
        for attempt in 0.. {
            if change.remove.iter().any(|p| !state.files.contains_key(p)) {
                // Perhaps only this node's view is stale.
                others.extend(self.read_forward(&mut state).await?);
                if let Some(path) = change.remove.iter().find(|p| !state.files.contains_key(*p)) {
                    return Err(Error::CatalogConflict {
                        reason: format!("{path} was removed by another commit"),
                    });
                }
            }
            let version = state.version + 1;
            let entry = LogEntry {
                format: FORMAT,
                version,
                timestamp_ms: now_ms(),
                writer: self.writer.clone(),
                change: change.clone(),
            };
            let path = log_path(version);
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            match self.store.put_opts(&path, PutPayload::from_bytes(to_json(&entry)), opts).await {
                Ok(_) => {
                    state.apply(version, &change);
                    if version.is_multiple_of(CHECKPOINT_EVERY)
                        && let Err(e) = self.checkpoint(&state).await
                    {
                        tracing::warn!(version, error = %e, "catalog checkpoint failed; the log still holds every version");
                    }
                    return Ok((version, others));
                }
                Err(object_store::Error::AlreadyExists { .. }) => {
                    tracing::debug!(
                        version,
                        attempt,
                        "catalog version taken by another writer; reading it"
                    );
                    others.extend(self.read_forward(&mut state).await?);
                }
                Err(source) => return Err(Error::ObjectStore { op: "put", path, source }),
            }
            if attempt > 100 {
                break;
            }
        }
        Err(Error::CatalogConflict { reason: "too many concurrent commits".into() })
    }

    async fn checkpoint(&self, state: &CatalogState) -> Result<()> {
        let cp = Checkpoint {
            format: FORMAT,
            version: state.version,
            files: state.files.values().map(|f| (**f).clone()).collect(),
            wal: state.wal.clone(),
        };
        let path = checkpoint_path(state.version);
        self.store
            .put(&path, PutPayload::from_bytes(to_json(&cp)))
            .await
            .map_err(|source| Error::ObjectStore { op: "put", path, source })?;
        let last = last_checkpoint_path();
        self.store
            .put(&last, PutPayload::from_bytes(to_json(&LastCheckpoint { version: state.version })))
            .await
            .map_err(|source| Error::ObjectStore { op: "put", path: last, source })?;
        // Old log entries are no longer needed to load; keep a margin for slow readers.
        if let Some(upto) = state.version.checked_sub(KEEP_LOG_VERSIONS) {
            let from = upto.saturating_sub(CHECKPOINT_EVERY) + 1;
            for v in from..=upto {
                match self.store.delete(&log_path(v)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        tracing::debug!(version = v, error = %e, "cannot delete old catalog entry")
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes objects under `prefix` whose data file (`data_path` maps an object's path to
    /// it) no catalog version references and that are older than `grace` (a flush or
    /// compaction may be about to commit younger ones). Returns the paths deleted. This is the
    /// only catalog operation that LISTs.
    pub async fn collect_orphans(
        &self,
        prefix: &str,
        grace: Duration,
        data_path: impl Fn(&str) -> String,
    ) -> Result<Vec<String>> {
        let prefix_path = Path::from(prefix);
        let listed: Vec<_> =
            self.store.list(Some(&prefix_path)).try_collect().await.map_err(|source| {
                Error::ObjectStore { op: "list", path: prefix_path.clone(), source }
            })?;
        let state = self.state.lock().await.clone();
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(grace).unwrap_or_default();
        let mut deleted = Vec::new();
        for meta in listed {
            let path = meta.location.to_string();
            if state.files.contains_key(&data_path(&path)) || meta.last_modified > cutoff {
                continue;
            }
            match self.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted.push(path),
                Err(e) => tracing::warn!(path, error = %e, "cannot delete orphan file"),
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn file(path: &str) -> DataFile {
        DataFile {
            path: path.into(),
            project: "default".into(),
            hour: 1,
            size: 10,
            rows: 2,
            min_start_ns: 1,
            max_start_ns: 2,
            min_trace_id: "a".into(),
            max_trace_id: "b".into(),
            trace_id_bloom: true,
            traces: 1,
            mem_bytes: 100,
            trace_index: false,
            level: 0,
            created_ms: 0,
        }
    }

    #[tokio::test]
    async fn commits_are_linear_and_reload() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let (a, _) = Catalog::load(Arc::clone(&store), "a").await.unwrap();
        let (b, _) = Catalog::load(Arc::clone(&store), "b").await.unwrap();
        let wal = Some(WalMark { node: "a".into(), flushed_lsn: 7 });
        let (v1, others) =
            a.commit(Change { add: vec![file("f1")], remove: vec![], wal }).await.unwrap();
        assert_eq!((v1, others.len()), (1, 0));
        // b still believes the catalog is empty: its commit takes version 2 after reading 1.
        let (v2, others) =
            b.commit(Change { add: vec![file("f2")], ..Default::default() }).await.unwrap();
        assert_eq!(v2, 2);
        assert_eq!(others[0].add[0].path, "f1");
        // Removing a file the other writer already removed is a conflict.
        a.commit(Change { remove: vec!["f2".into()], ..Default::default() }).await.unwrap();
        let err =
            b.commit(Change { remove: vec!["f2".into()], ..Default::default() }).await.unwrap_err();
        assert!(matches!(err, Error::CatalogConflict { .. }), "{err}");

        let (_, state) = Catalog::load(store, "c").await.unwrap();
        assert_eq!(state.version, 3);
        assert_eq!(state.files.keys().collect::<Vec<_>>(), vec!["f1"]);
        assert_eq!(state.flushed_lsn("a"), 7);
        assert_eq!(state.flushed_lsn("b"), 0);
    }

    #[tokio::test]
    async fn checkpoints_let_old_log_entries_go() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let (c, _) = Catalog::load(Arc::clone(&store), "a").await.unwrap();
        let n = CHECKPOINT_EVERY * 4;
        for i in 0..n {
            let mut change = Change { add: vec![file(&format!("f{i}"))], ..Default::default() };
            if i > 0 {
                change.remove.push(format!("f{}", i - 1));
            }
            c.commit(change).await.unwrap();
        }
        assert!(store.head(&log_path(1)).await.is_err(), "early log entries are deleted");
        let (_, state) = Catalog::load(store, "b").await.unwrap();
        assert_eq!(state.version, n);
        assert_eq!(state.files.keys().collect::<Vec<_>>(), vec![&format!("f{}", n - 1)]);
    }
}
