//! The memory budget shared by everything ingest holds before Parquet.
//!
//! Every byte between a receiver's admission of a request and the Parquet commit of its spans
//! (queued for the WAL, in the memory table, being flushed) is charged to one
//! [`MemoryBudget`]. A request that would go over it is refused at once with
//! [`Error::BufferFull`], which receivers answer with the OTLP retryable codes; the process
//! never queues without bound.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// A byte budget.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicU64,
    limit: u64,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self { used: AtomicU64::new(0), limit }
    }

    /// Reserves `bytes`, or refuses when that would go over the limit.
    pub fn try_reserve(&self, bytes: u64) -> Result<()> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.saturating_add(bytes);
            if next > self.limit {
                return Err(Error::BufferFull { used, limit: self.limit });
            }
            match self.used.compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => used = actual,
            }
        }
    }

    /// Reserves `bytes` unconditionally (data already acknowledged, such as a WAL replay).
    pub fn force_reserve(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Reserves `bytes` unconditionally until the returned guard is dropped: working memory of
    /// a job that must run to free memory, such as a flush's sorted copy and encoded file.
    pub fn hold(&self, bytes: u64) -> Held<'_> {
        self.force_reserve(bytes);
        Held { budget: self, bytes }
    }

    /// Returns `bytes` to the budget.
    pub fn release(&self, bytes: u64) {
        let prev = self.used.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(prev >= bytes, "memory budget released more than reserved");
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// Bytes reserved by [`MemoryBudget::hold`], returned when dropped.
#[derive(Debug)]
pub struct Held<'a> {
    budget: &'a MemoryBudget,
    bytes: u64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_limit_and_recovers() {
        let budget = MemoryBudget::new(100);
        budget.try_reserve(60).unwrap();
        let err = budget.try_reserve(41).unwrap_err();
        assert!(matches!(err, Error::BufferFull { used: 60, limit: 100 }));
        budget.release(60);
        budget.try_reserve(100).unwrap();
        assert_eq!(budget.used(), 100);
    }

    #[test]
    fn held_bytes_count_until_dropped() {
        let budget = MemoryBudget::new(100);
        budget.try_reserve(60).unwrap();
        {
            let _held = budget.hold(50);
            assert_eq!(budget.used(), 110);
            assert!(budget.try_reserve(1).is_err());
        }
        assert_eq!(budget.used(), 60);
        budget.try_reserve(40).unwrap();
    }
}
