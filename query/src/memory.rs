//! Memory limits of queries: one pool shared by every query (and every project's engine), and
//! a cap on what one query may take from it.
//!
//! DataFusion operators reserve memory from the pool of the runtime they execute in. Each
//! query runs in a runtime whose pool is a [`QueryPool`]: it counts what that query holds and
//! refuses growth past `query.memory_per_query`, and hands everything else to the shared pool
//! (a fair spilling pool of `query.memory_limit`). Operators that can spill (sorts,
//! aggregations, joins' build sides where supported) spill to disk when either limit says no;
//! the others fail the query with a message naming the setting, and the server goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};

/// The setting named in the error of a query over its cap.
pub const PER_QUERY_SETTING: &str = "query.memory_per_query";

/// The memory pool of one query (or one Postgres session, whose statements run one at a time).
#[derive(Debug)]
pub struct QueryPool {
    shared: Arc<dyn MemoryPool>,
    limit: usize,
    used: AtomicUsize,
}

impl QueryPool {
    /// A pool of at most `limit` bytes taken from `shared`.
    pub fn new(shared: Arc<dyn MemoryPool>, limit: usize) -> Self {
        Self { shared, limit, used: AtomicUsize::new(0) }
    }
}

fn human(bytes: usize) -> String {
    const MIB: usize = 1 << 20;
    if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{bytes} B")
    }
}

impl std::fmt::Display for QueryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "query pool: {} of {} (shared: {})",
            human(self.reserved()),
            human(self.limit),
            human(self.shared.reserved())
        )
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "spanlake_query"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.shared.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.shared.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.used.fetch_add(additional, Ordering::Relaxed);
        self.shared.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.used.fetch_sub(shrink, Ordering::Relaxed);
        self.shared.shrink(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let limit = self.limit;
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(additional).filter(|&n| n <= limit)
            })
            .map_err(|used| {
                DataFusionError::ResourcesExhausted(format!(
                    "query memory limit reached: {} needs {} more while the query holds {} of its {} ({PER_QUERY_SETTING})",
                    reservation.consumer().name(),
                    human(additional),
                    human(used),
                    human(limit),
                ))
            })?;
        if let Err(e) = self.shared.try_grow(reservation, additional) {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::{FairSpillPool, GreedyMemoryPool};

    use super::*;

    #[test]
    fn a_query_is_capped_below_the_shared_pool() {
        let shared: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1000));
        let a: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(Arc::clone(&shared), 600));
        let b: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(Arc::clone(&shared), 600));
        let ra = MemoryConsumer::new("HashJoinInput").register(&a);
        let rb = MemoryConsumer::new("HashJoinInput").register(&b);
        ra.try_grow(500).unwrap();
        let e = ra.try_grow(101).unwrap_err().to_string();
        assert!(e.contains("query memory limit reached: HashJoinInput"), "{e}");
        assert!(e.contains("needs 101 B more while the query holds 500 B of its 600 B"), "{e}");
        assert_eq!((a.reserved(), shared.reserved()), (500, 500));
        // The shared pool refuses what no single query's cap would.
        rb.try_grow(501).unwrap_err();
        assert_eq!((b.reserved(), shared.reserved()), (0, 500));
        ra.shrink(200);
        rb.try_grow(500).unwrap();
        assert_eq!((a.reserved(), b.reserved(), shared.reserved()), (300, 500, 800));
        drop(ra);
        drop(rb);
        assert_eq!((a.reserved(), b.reserved(), shared.reserved()), (0, 0, 0));
    }

    #[test]
    fn spillable_consumers_keep_the_fair_share_of_the_shared_pool() {
        let shared: Arc<dyn MemoryPool> = Arc::new(FairSpillPool::new(1000));
        let a: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(Arc::clone(&shared), 10_000));
        let r1 = MemoryConsumer::new("s1").with_can_spill(true).register(&a);
        let r2 = MemoryConsumer::new("s2").with_can_spill(true).register(&a);
        r1.try_grow(500).unwrap();
        r1.try_grow(1).unwrap_err();
        r2.try_grow(500).unwrap();
        assert_eq!(a.reserved(), 1000);
    }
}
