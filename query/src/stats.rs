//! Statistics of the `spans` table for DataFusion's planner.
//!
//! The planner sizes joins and aggregations from row counts and distinct values. Without
//! them, a join of `spans` with the `traces` view builds its hash table from every span of the
//! spans side (at 10 M spans more than a query's default memory). With them, grouping by
//! `trace_id` is known to yield about one row per trace, and the join builds from the traces.
//!
//! Files carry what the catalog recorded when they were written ([`Estimate::of_files`]);
//! batches not yet flushed count their runs of equal trace ids ([`Estimate::of_batches`]) and
//! carry the estimate through [`WithStatistics`], since a union of inputs loses a distinct
//! count that any of them lacks. Every figure is marked
//! inexact: statistics choose plans here and never answer a query.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{ScalarValue, Statistics};
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, SendableRecordBatchStream,
    StatisticsArgs,
};
use spanlake_engine::catalog::DataFile;
use spanlake_engine::schema::col;
use spanlake_engine::store::MemBatch;

/// What is known of a set of spans before reading them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Rows.
    pub rows: u64,
    /// Their size as Arrow arrays, when known.
    pub bytes: Option<u64>,
    /// Distinct trace ids, when known.
    pub traces: Option<u64>,
    /// Smallest and largest `start_time` (ns).
    pub start_ns: Option<(i64, i64)>,
}

impl Estimate {
    /// From the catalog's entries. A trace held in several files counts once per file, so
    /// the distinct count is an estimate from above. Files written before the catalog recorded
    /// trace counts or memory sizes leave those unknown.
    pub fn of_files(files: &[Arc<DataFile>]) -> Self {
        let all = |known: fn(&DataFile) -> bool| files.iter().all(|f| f.rows == 0 || known(f));
        let sum = |f: fn(&DataFile) -> u64| files.iter().map(|d| f(d)).sum::<u64>();
        Self {
            rows: sum(|f| f.rows),
            bytes: all(|f| f.mem_bytes > 0).then(|| sum(|f| f.mem_bytes)),
            traces: all(|f| f.traces > 0).then(|| sum(|f| f.traces)),
            start_ns: files
                .iter()
                .map(|f| f.min_start_ns)
                .min()
                .zip(files.iter().map(|f| f.max_start_ns).max()),
        }
    }

    /// For batches not yet flushed, each counting its runs of equal trace ids as traces.
    pub fn of_batches(batches: &[Arc<MemBatch>]) -> Self {
        Self {
            rows: batches.iter().map(|b| b.batch.num_rows() as u64).sum(),
            bytes: Some(batches.iter().map(|b| b.batch.get_array_memory_size() as u64).sum()),
            traces: Some(batches.iter().map(|b| b.traces).sum()),
            start_ns: batches
                .iter()
                .map(|b| b.min_start_ns)
                .min()
                .zip(batches.iter().map(|b| b.max_start_ns).max()),
        }
    }

    /// As DataFusion statistics over `schema` (the table's schema, or a projection of it).
    pub fn statistics(&self, schema: &Schema) -> Statistics {
        let inexact = |n: u64| Precision::Inexact(usize::try_from(n).unwrap_or(usize::MAX));
        let mut stats = Statistics::new_unknown(schema);
        stats.num_rows = inexact(self.rows);
        if let Some(bytes) = self.bytes {
            stats.total_byte_size = inexact(bytes);
        }
        if let Ok(i) = schema.index_of(col::TRACE_ID) {
            let trace_id = &mut stats.column_statistics[i];
            trace_id.null_count = Precision::Inexact(0);
            if let Some(traces) = self.traces {
                trace_id.distinct_count = inexact(traces.min(self.rows));
            }
        }
        if let (Ok(i), Some((min, max))) = (schema.index_of(col::START_TIME), self.start_ns) {
            let ts = |ns| ScalarValue::TimestampNanosecond(Some(ns), Some("UTC".into()));
            let start = &mut stats.column_statistics[i];
            start.null_count = Precision::Inexact(0);
            start.min_value = Precision::Inexact(ts(min));
            start.max_value = Precision::Inexact(ts(max));
        }
        stats
    }
}

/// A plan that runs its input unchanged and reports the statistics it was given.
#[derive(Debug)]
pub struct WithStatistics {
    input: Arc<dyn ExecutionPlan>,
    statistics: Arc<Statistics>,
}

impl WithStatistics {
    /// `input`, reporting `statistics` (over the input's schema) as its own.
    pub fn new(input: Arc<dyn ExecutionPlan>, statistics: Statistics) -> Self {
        Self { input, statistics: Arc::new(statistics) }
    }
}

impl DisplayAs for WithStatistics {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WithStatistics: rows={}", self.statistics.num_rows)
    }
}

impl ExecutionPlan for WithStatistics {
    fn name(&self) -> &str {
        "WithStatistics"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match (children.pop(), children.is_empty()) {
            (Some(input), true) => {
                Ok(Arc::new(Self { input, statistics: Arc::clone(&self.statistics) }))
            }
            _ => datafusion::common::internal_err!("WithStatistics takes one input"),
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        self.input.execute(partition, context)
    }

    fn statistics_from_inputs(
        &self,
        _input_stats: &[Arc<Statistics>],
        args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        // One partition (the memory batches): its statistics are the whole input's.
        match (args.partition(), self.input.properties().partitioning.partition_count()) {
            (None, _) | (Some(_), 1) => Ok(Arc::clone(&self.statistics)),
            _ => Ok(Arc::new(Statistics::new_unknown(&self.schema()))),
        }
    }

    fn supports_limit_pushdown(&self) -> bool {
        true
    }
}

#[cfg(test)]
pub(crate) mod tests;
