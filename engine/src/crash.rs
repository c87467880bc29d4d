//! Crash points for crash tests: the process aborts at a chosen step of a commit protocol.
//!
//! Only reachable through the server's fault-injection endpoint (`--fault-injection`), which is
//! for tests. `abort()` gives the same outcome as `kill -9` at that instant: no destructor,
//! no flush, no buffered write.

use std::sync::atomic::{AtomicU8, Ordering};

/// A step of a commit protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CrashPoint {
    /// A flush wrote its data files, before the catalog commit.
    FlushBeforeCommit = 1,
    /// A flush committed, before the WAL segments it covers are released.
    FlushAfterCommit = 2,
    /// Compaction wrote its output files, before the catalog commit.
    CompactionBeforeCommit = 3,
    /// Compaction committed, before its input files are deleted.
    CompactionAfterCommit = 4,
    /// A deletion wrote the rewritten files, before the catalog commit.
    DeleteBeforeCommit = 5,
    /// A deletion committed, before the old files are deleted.
    DeleteAfterCommit = 6,
}

impl CrashPoint {
    /// Parses the names used by the fault-injection endpoint (`flush_before_commit`, ...).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "flush_before_commit" => Self::FlushBeforeCommit,
            "flush_after_commit" => Self::FlushAfterCommit,
            "compaction_before_commit" => Self::CompactionBeforeCommit,
            "compaction_after_commit" => Self::CompactionAfterCommit,
            "delete_before_commit" => Self::DeleteBeforeCommit,
            "delete_after_commit" => Self::DeleteAfterCommit,
            _ => return None,
        })
    }
}

static ARMED: AtomicU8 = AtomicU8::new(0);

/// Makes the process abort the next time it reaches `point` (`None` disarms).
pub fn arm(point: Option<CrashPoint>) {
    ARMED.store(point.map_or(0, |p| p as u8), Ordering::SeqCst);
}

/// Aborts the process if `point` is armed.
pub fn reached(point: CrashPoint) {
    if ARMED.load(Ordering::SeqCst) == point as u8 {
        tracing::error!(?point, "crash point reached: aborting (fault injection)");
        std::process::abort();
    }
}
