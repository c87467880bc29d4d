//! The maintenance thread: one long-lived thread on which compaction decodes, sorts and encodes.
//!
//! Why one thread: the allocator (mimalloc in the server) keeps memory per thread. When a job's
//! pages were decoded on whichever blocking-pool thread was free, its freed memory stayed with
//! those threads (idle, so never purged) and a compaction catch-up held 1.24–1.54 GB resident
//! for a 352 MB live heap (BENCHMARKS.md, eleventh session). Run on one thread, a job's memory
//! is that thread's, and collecting that thread's heap after the job hands it back (the
//! engine's `release_memory` runs here too). The columns a job encodes in parallel run on
//! scoped threads that exit with the job; their memory is collected as abandoned. Catching up
//! the same 2,777 files with ingest idle peaked at 925–931 MiB resident on this thread (against
//! 1,239–1,321 MiB before), and at 505 MiB with the server's zero purge delay as well
//! (BENCHMARKS.md, twelfth session).
//!
//! Jobs run one at a time, in the order they were sent. A job that panics fails alone: the
//! thread catches the panic, answers with an error and takes the next job.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::error::{Error, Result};

type Job = Box<dyn FnOnce() + Send>;

/// A thread that runs closures one at a time; see the module documentation.
#[derive(Debug)]
pub(crate) struct Worker {
    tx: mpsc::Sender<Job>,
}

impl Worker {
    /// Starts the thread, named `name`. It ends when the worker is dropped and its queue has
    /// run out.
    pub(crate) fn start(name: &str) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|e| Error::WorkerFailed { reason: format!("could not start it: {e}") })?;
        Ok(Self { tx })
    }

    /// Runs `f` on the thread and resolves with its result once it has run.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(std::panic::catch_unwind(AssertUnwindSafe(f)));
        });
        self.tx
            .send(job)
            .map_err(|_| Error::WorkerFailed { reason: "its thread has ended".into() })?;
        match result.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(panic)) => {
                let reason = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a job panicked".into());
                Err(Error::WorkerFailed { reason: format!("a job panicked: {reason}") })
            }
            Err(_) => Err(Error::WorkerFailed { reason: "its thread has ended".into() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_one_named_thread_and_a_panic_fails_alone() {
        let worker = Worker::start("spanlake-test-worker").unwrap();
        let first = worker.run(|| std::thread::current().id()).await.unwrap();
        let name = worker.run(|| std::thread::current().name().map(str::to_string)).await;
        assert_eq!(name.unwrap().as_deref(), Some("spanlake-test-worker"));
        let err = worker.run(|| -> u32 { panic!("bad input 7") }).await.unwrap_err();
        assert_eq!(err.to_string(), "maintenance thread failed: a job panicked: bad input 7");
        let after = worker.run(|| std::thread::current().id()).await.unwrap();
        assert_eq!(first, after, "the thread outlives a panicking job");
        assert_ne!(first, std::thread::current().id());
    }
}
