use object_store::path::Path;

/// Errors of the storage engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The ingest buffer is over its memory budget.
    #[error("ingest buffer full ({used} of {limit} bytes in use); retry later")]
    BufferFull {
        /// Bytes in use when the request came.
        used: u64,
        /// The configured budget.
        limit: u64,
    },
    /// The process's resident memory is over the ingest memory budget while ingest holds a
    /// good part of it (see [`crate::budget::MemoryBudget`]).
    #[error(
        "process memory over the ingest budget ({resident} bytes resident, {used} held by ingest, budget {limit}); retry later"
    )]
    ResidentOverBudget {
        /// Resident bytes of the process, as last sampled.
        resident: u64,
        /// Bytes ingest held.
        used: u64,
        /// The configured budget.
        limit: u64,
    },
    /// The write-ahead log queue is full: the disk is not keeping up.
    #[error("write-ahead log queue full ({pending} requests waiting); retry later")]
    WalBusy {
        /// Requests waiting for the log.
        pending: usize,
    },
    /// The engine is shutting down and takes no more data.
    #[error("storage engine is shutting down")]
    ShuttingDown,
    /// Building or converting an Arrow batch failed.
    #[error("arrow error")]
    Arrow {
        /// The cause.
        #[source]
        source: arrow::error::ArrowError,
    },
    /// Encoding or decoding Parquet failed.
    #[error("parquet error on {path}")]
    Parquet {
        /// The file.
        path: Path,
        /// The cause.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// An object store call failed.
    #[error("object store {op} failed on {path}")]
    ObjectStore {
        /// What was attempted (put, get, list, ...).
        op: &'static str,
        /// The object.
        path: Path,
        /// The cause.
        #[source]
        source: object_store::Error,
    },
    /// Writing or syncing the write-ahead log failed.
    #[error("write-ahead log {op} failed on {path}")]
    WalIo {
        /// What was attempted.
        op: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A write-ahead log segment holds bytes that are not a valid record and are not a torn tail.
    #[error("write-ahead log segment {path} corrupt at byte {offset}: {reason}")]
    WalCorrupt {
        /// The segment.
        path: std::path::PathBuf,
        /// Offset of the bad record.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The catalog holds something this version cannot read.
    #[error("catalog object {path} is invalid")]
    CatalogFormat {
        /// The object.
        path: Path,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Another writer changed the catalog in a way that conflicts with this commit.
    #[error("catalog commit conflict: {reason}")]
    CatalogConflict {
        /// What conflicted.
        reason: String,
    },
    /// A price table file could not be read or parsed.
    #[error("invalid price table {path}: {reason}")]
    PriceTable {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A data location could not be opened.
    #[error("cannot open data location {location}: {reason}")]
    Location {
        /// The location as configured.
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// Local files (the write-ahead log directory) could not be used.
    #[error("cannot use local directory {path}")]
    LocalIo {
        /// The directory or file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the WAL directory.
    #[error("{path} is locked by another spanlake process writing the same data directory")]
    Locked {
        /// The lock file.
        path: std::path::PathBuf,
    },
    /// A CPU task panicked or was cancelled.
    #[error("cpu task failed")]
    TaskFailed {
        /// The cause.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The maintenance thread could not run a job.
    #[error("maintenance thread failed: {reason}")]
    WorkerFailed {
        /// What went wrong.
        reason: String,
    },
}

/// What kind of failure an [`Error`] is, for mapping to protocol status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The client should retry later (HTTP 429, gRPC RESOURCE_EXHAUSTED).
    Overloaded,
    /// A dependency is unavailable (HTTP 503, gRPC UNAVAILABLE); retry later.
    Unavailable,
    /// The input was invalid (HTTP 400, gRPC INVALID_ARGUMENT).
    InvalidInput,
    /// A bug or an unexpected failure (HTTP 500, gRPC INTERNAL).
    Internal,
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::BufferFull { .. } | Self::ResidentOverBudget { .. } | Self::WalBusy { .. } => {
                ErrorKind::Overloaded
            }
            Self::ShuttingDown
            | Self::ObjectStore { .. }
            | Self::WalIo { .. }
            | Self::CatalogConflict { .. }
            | Self::LocalIo { .. }
            | Self::Locked { .. } => ErrorKind::Unavailable,
            Self::PriceTable { .. } | Self::Location { .. } => ErrorKind::InvalidInput,
            Self::Arrow { .. }
            | Self::Parquet { .. }
            | Self::WalCorrupt { .. }
            | Self::CatalogFormat { .. }
            | Self::TaskFailed { .. }
            | Self::WorkerFailed { .. } => ErrorKind::Internal,
        }
    }
}

/// Result type of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs a CPU-heavy closure off the IO threads; the engine's sanctioned `spawn_blocking` site.
pub async fn on_cpu<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    #[expect(clippy::disallowed_methods, reason = "the one sanctioned blocking-pool call site")]
    let handle = tokio::task::spawn_blocking(f);
    handle.await.map_err(|source| Error::TaskFailed { source })
}

/// An error and its causes as one line (`what failed: why: why`), for answers to clients and
/// logs. A cause already quoted in its parent's message is not repeated.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
