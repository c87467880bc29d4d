//! Background tasks: the one sanctioned `tokio::spawn` call site.
//!
//! Every task spawned here is owned: its handle is kept by whoever spawned it and aborted or
//! awaited at shutdown.

/// Spawns `fut` on the current runtime and returns its handle.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    #[expect(
        clippy::disallowed_methods,
        reason = "the sanctioned spawn site; callers own the handle"
    )]
    tokio::spawn(fut)
}
