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
///
/// The bytes charged are what ingest holds; the process holds more (the allocator keeps freed
/// memory for a while, buffers are in flight, queries run). So new data is also refused while
/// the process's resident memory, as last sampled, is over 7/8 of the limit (the last eighth
/// absorbs what arrives between two samples and the requests being decoded) and ingest holds
/// more than a quarter of the limit: there is then something to flush that brings memory down.
/// Below that quarter, resident memory is not ingest's to give back, and refusing would only
/// stall it.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicU64,
    limit: u64,
    resident: AtomicU64,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self { used: AtomicU64::new(0), limit, resident: AtomicU64::new(0) }
    }

    /// Records the process's resident memory (sampled by the engine).
    pub fn set_resident(&self, bytes: u64) {
        self.resident.store(bytes, Ordering::Relaxed);
    }

    /// The process's resident memory as last recorded (0 if never).
    pub fn resident(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }

    /// Refuses new data while the budget is exhausted or the process is over it (see the type's
    /// docs); reserves nothing.
    pub fn admit(&self) -> Result<()> {
        let used = self.used();
        if used >= self.limit {
            return Err(Error::BufferFull { used, limit: self.limit });
        }
        self.check_resident(used)
    }

    /// Whether the process's resident memory is over 7/8 of the limit, where ingest starts to
    /// be refused (see the type's docs).
    pub fn resident_pressure(&self) -> bool {
        self.over_resident_line(self.resident())
    }

    fn over_resident_line(&self, resident: u64) -> bool {
        resident > self.limit - self.limit / 8
    }

    fn check_resident(&self, used: u64) -> Result<()> {
        let resident = self.resident();
        if self.over_resident_line(resident) && used > self.limit / 4 {
            return Err(Error::ResidentOverBudget { resident, used, limit: self.limit });
        }
        Ok(())
    }

    /// Reserves `bytes`, or refuses when that would go over the limit (or the process is over
    /// it, see the type's docs).
    pub fn try_reserve(&self, bytes: u64) -> Result<()> {
        let mut used = self.used.load(Ordering::Relaxed);
        self.check_resident(used)?;
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

/// The process's resident memory (`VmRSS` in /proc/self/status); `None` where there is none.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
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
    fn an_over_budget_process_refuses_while_ingest_holds_a_quarter() {
        let budget = MemoryBudget::new(100);
        budget.set_resident(89);
        // Little held: resident memory is not ingest's to give back.
        budget.try_reserve(25).unwrap();
        budget.admit().unwrap();
        budget.try_reserve(1).unwrap();
        let err = budget.try_reserve(1).unwrap_err();
        assert!(matches!(err, Error::ResidentOverBudget { resident: 89, used: 26, limit: 100 }));
        assert!(budget.admit().is_err());
        // At 7/8 of the limit (rounded up), data is taken again.
        budget.set_resident(88);
        budget.try_reserve(1).unwrap();
        budget.admit().unwrap();
    }

    /// The process's resident memory, read from /proc/self/status: more than nothing.
    #[test]
    fn resident_bytes_are_read_on_linux() {
        if cfg!(target_os = "linux") {
            let kb = resident_bytes().unwrap();
            assert!(kb > 1 << 20, "{kb}");
        }
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
