//! Memory limits of queries: one pool shared by every query (and every project's engine), and
//! a cap on what one query may take from it.
//!
//! DataFusion operators reserve memory from the pool of the runtime they execute in. Each
//! query runs in a runtime whose pool is a [`QueryPool`]: it counts what that query holds and
//! refuses growth past `query.memory_per_query`, and hands everything else to the shared pool
//! (a fair spilling pool of `query.memory_limit`). Operators that can spill (sorts,
//! aggregations, joins' build sides where supported) spill to disk when either limit says no;
//! the others fail the query with a message naming the setting, and the server goes on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};

/// The setting named in the error of a query over its cap.
pub const PER_QUERY_SETTING: &str = "query.memory_per_query";

/// The memory pool of one query (or one Postgres session, whose statements run one at a time).
///
/// Operators take from the query's cap as they need it, except that operators that can spill
/// leave part of it free (the headroom) once they hold more than a 16th of the cap each: past
/// that they are told to spill. With a plain cap the first operators to grow took all of it,
/// and then an operator that must have memory to go on failed the query although the others
/// could have spilled. Two cases showed it, both in a join of spans with `traces` over 100 M
/// spans, refused at the default 256 MiB:
/// - a spilled aggregation merges its sorted runs through an aggregation that cannot spill
///   again (`FinalHashAggregateStream` in DataFusion 55) and needs a few batches' worth while
///   other partitions' aggregations still fill their tables;
/// - a hash join's build side cannot spill, and grows while the aggregations that feed it
///   still hold their tables (an aggregation that never spilled keeps its table until it has
///   given out its last row).
///
/// The headroom is an eighth of the cap, and half of it while the query has a join's build
/// side (`HashJoinInput`, `CrossJoinExec`, `NestedLoopJoinLoad`; DataFusion registers them when
/// the plan starts, before rows flow). DataFusion's `FairSpillPool` gives each spilling
/// operator an equal part instead, counting every registered one, most of which hold nothing:
/// at small caps no operator's part held one batch.
#[derive(Debug)]
pub struct QueryPool {
    shared: Arc<dyn MemoryPool>,
    limit: usize,
    state: Mutex<State>,
}

/// What the query holds, in all and by consumer, and its join build sides.
#[derive(Debug, Default)]
struct State {
    total: usize,
    /// Bytes held and name, by consumer id.
    by_consumer: HashMap<usize, (usize, String)>,
    build_sides: usize,
}

/// Whether `consumer` is a join's build side, which cannot spill.
fn build_side(consumer: &MemoryConsumer) -> bool {
    let name = consumer.name();
    !consumer.can_spill()
        && ["HashJoinInput", "CrossJoinExec", "NestedLoopJoinLoad"]
            .iter()
            .any(|p| name.starts_with(p))
}

impl State {
    fn add(&mut self, consumer: &MemoryConsumer, bytes: usize) {
        self.total += bytes;
        let held = self.by_consumer.entry(consumer.id());
        held.or_insert_with(|| (0, consumer.name().to_owned())).0 += bytes;
    }

    /// The three largest holders, for an error message.
    fn largest(&self) -> String {
        let mut held: Vec<_> = self.by_consumer.values().filter(|h| h.0 > 0).collect();
        held.sort_by_key(|h| std::cmp::Reverse(h.0));
        let named: Vec<_> =
            held.iter().take(3).map(|(bytes, name)| format!("{name} {}", human(*bytes))).collect();
        named.join(", ")
    }

    fn sub(&mut self, consumer: &MemoryConsumer, bytes: usize) {
        self.total = self.total.saturating_sub(bytes);
        if let Some((held, _)) = self.by_consumer.get_mut(&consumer.id()) {
            *held = held.saturating_sub(bytes);
        }
    }
}

impl QueryPool {
    /// A pool of at most `limit` bytes taken from `shared`.
    pub fn new(shared: Arc<dyn MemoryPool>, limit: usize) -> Self {
        Self { shared, limit, state: Mutex::default() }
    }

    /// The part of the cap operators that can spill leave free once past [`Self::floor`].
    fn headroom(&self, state: &State) -> usize {
        if state.build_sides > 0 { self.limit / 2 } else { self.limit / 8 }
    }

    /// What an operator that can spill may always hold while the cap allows.
    fn floor(&self) -> usize {
        self.limit / 16
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
        if build_side(consumer) {
            self.state().build_sides += 1;
        }
        self.shared.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        {
            let mut state = self.state();
            state.by_consumer.remove(&consumer.id());
            if build_side(consumer) {
                state.build_sides = state.build_sides.saturating_sub(1);
            }
        }
        self.shared.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.state().add(reservation.consumer(), additional);
        self.shared.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.state().sub(reservation.consumer(), shrink);
        self.shared.shrink(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let consumer = reservation.consumer();
        {
            let mut state = self.state();
            let total = state.total.saturating_add(additional);
            let held = state.by_consumer.get(&consumer.id()).map_or(0, |h| h.0) + additional;
            let headroom = self.headroom(&state);
            let spill =
                consumer.can_spill() && total > self.limit - headroom && held > self.floor();
            if total > self.limit || spill {
                let headroom = if spill {
                    format!(", less the {} left for operators that cannot spill", human(headroom))
                } else {
                    String::new()
                };
                return Err(DataFusionError::ResourcesExhausted(format!(
                    "query memory limit reached: {} needs {} more while the query holds {} of its {}{headroom} ({PER_QUERY_SETTING}; largest: {})",
                    consumer.name(),
                    human(additional),
                    human(state.total),
                    human(self.limit),
                    state.largest(),
                )));
            }
            state.add(consumer, additional);
        }
        if let Err(e) = self.shared.try_grow(reservation, additional) {
            self.state().sub(consumer, additional);
            return Err(e);
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.state().total
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

    /// Past seven eighths of the cap an operator that can spill is refused more once it holds
    /// more than a 16th (and so spills); what it leaves is there for operators that cannot
    /// spill and for spilling operators starting out, such as an aggregation merging its runs.
    #[test]
    fn spilling_operators_leave_headroom() {
        let shared: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 20));
        let pool: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(Arc::clone(&shared), 3200));
        let table = MemoryConsumer::new("table").with_can_spill(true).register(&pool);
        let merge = MemoryConsumer::new("merge").with_can_spill(true).register(&pool);
        let build = MemoryConsumer::new("build").register(&pool);
        table.try_grow(2700).unwrap();
        let e = table.try_grow(101).unwrap_err().to_string();
        assert!(
            e.contains("table needs 101 B more while the query holds 2700 B of its 3200 B"),
            "{e}"
        );
        assert!(e.contains("less the 400 B left for operators that cannot spill"), "{e}");
        // Up to a 16th of the cap for a spilling operator past the line, in one reservation
        // or several of the same operator.
        merge.try_grow(150).unwrap();
        let sibling = merge.new_empty();
        sibling.try_grow(50).unwrap();
        sibling.try_grow(1).unwrap_err();
        merge.try_grow(1).unwrap_err();
        // The rest up to the cap is for operators that cannot spill.
        build.try_grow(300).unwrap();
        let e = build.try_grow(1).unwrap_err().to_string();
        assert!(
            e.contains("build needs 1 B more while the query holds 3200 B of its 3200 B (query"),
            "{e}"
        );
        let largest = "largest: table 2700 B, build 300 B, merge 200 B)";
        assert!(e.ends_with(largest), "{e}");
        assert_eq!((pool.reserved(), shared.reserved()), (3200, 3200));
        // Below the line a spilling operator grows past its 16th again.
        table.shrink(1000);
        merge.try_grow(600).unwrap();
        merge.try_grow(1).unwrap_err();
        assert_eq!(pool.reserved(), 2800);
        drop((table, merge, sibling, build));
        assert_eq!((pool.reserved(), shared.reserved()), (0, 0));
    }

    /// While a join's build side is registered, spilling operators leave half the cap.
    #[test]
    fn spilling_operators_leave_half_beside_a_join_build_side() {
        let shared: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 20));
        let pool: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(Arc::clone(&shared), 3200));
        let table = MemoryConsumer::new("table").with_can_spill(true).register(&pool);
        let build = MemoryConsumer::new("HashJoinInput[1]").register(&pool);
        table.try_grow(1600).unwrap();
        let e = table.try_grow(1).unwrap_err().to_string();
        assert!(e.contains("less the 1600 B left for operators that cannot spill"), "{e}");
        build.try_grow(1600).unwrap();
        build.try_grow(1).unwrap_err();
        drop(build);
        // Without the build side, seven eighths.
        table.try_grow(1200).unwrap();
        table.try_grow(1).unwrap_err();
        // Other operators that cannot spill (a sort's merge, a top-k) leave it at an eighth.
        let topk = MemoryConsumer::new("TopK[0]").register(&pool);
        topk.try_grow(400).unwrap();
        assert_eq!(pool.reserved(), 3200);
    }
}
