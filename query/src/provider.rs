//! The `spans` table provider.

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use datafusion::arrow::array::{RecordBatch, RecordBatchOptions};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::catalog::TableProvider;
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::parquet::CachedParquetFileReaderFactory;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use spanlake_engine::catalog::DataFile;
use spanlake_engine::schema::{col, spans_schema};
use spanlake_engine::store::{Scope, Snapshot, SpanStore, TimeRange};

use crate::stats::{Estimate, WithStatistics};

/// The URL under which the data location is registered with DataFusion.
pub const STORE_URL: &str = "spanlake://data";

/// The `spans` table as queries see it: the stored schema with its text columns as
/// `Utf8View`. Parquet pages decode into views without copying each string, and comparisons,
/// grouping and joins on views look at an inline prefix first; on generated agent spans this
/// halved the time of filters and group-bys on `span_type`, `status_code` and `service_name`.
/// Files and memory batches keep the stored types (`Utf8`): readers other than spanlake see
/// plain strings.
pub fn query_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let stored = spans_schema();
        Arc::new(Schema::new_with_metadata(
            stored
                .fields()
                .iter()
                .map(|f| match f.data_type() {
                    DataType::Utf8 => {
                        Arc::new(Field::new(f.name(), DataType::Utf8View, f.is_nullable()))
                    }
                    _ => Arc::clone(f),
                })
                .collect::<Vec<_>>(),
            stored.metadata().clone(),
        ))
    });
    Arc::clone(&SCHEMA)
}

/// `batch` with each column cast to the type of the same column of `schema` (same columns,
/// in order; only their types differ, e.g. `Utf8` and `Utf8View`).
pub(crate) fn cast_to(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema_ref().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| cast(c, f.data_type()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let rows = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(Arc::clone(schema), columns, &rows)?)
}

/// Casts batches of [`query_schema`] rows (the result of a query over the whole table) back to
/// the stored schema, for rewriting files.
pub fn to_stored(batches: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
    let schema = spans_schema();
    batches.iter().map(|b| cast_to(b, &schema)).collect()
}

/// `spans`: the Parquet files and the unflushed memory batches of a [`SpanStore`], for one
/// project or for all.
#[derive(Debug)]
pub struct SpansTable {
    store: Arc<SpanStore>,
    project: Option<String>,
    schema: SchemaRef,
    /// Only these files and no memory batches (maintenance jobs reading one file).
    files: Option<Vec<Arc<DataFile>>>,
}

impl SpansTable {
    /// The table over `store`; only `project`'s spans when one is given.
    pub fn new(store: Arc<SpanStore>, project: Option<String>) -> Self {
        Self { store, project, schema: query_schema(), files: None }
    }

    /// The table over exactly `files` (no memory batches).
    pub fn over_files(store: Arc<SpanStore>, files: Vec<Arc<DataFile>>) -> Self {
        Self { store, project: None, schema: query_schema(), files: Some(files) }
    }

    /// The files and batches that may hold rows in `scope`.
    fn snapshot(&self, scope: &Scope) -> Snapshot {
        match &self.files {
            Some(files) => Snapshot { files: files.clone(), batches: Vec::new() },
            None => self.store.snapshot(scope),
        }
    }

    /// The files and batches that may hold rows of `trace_id` (see [`crate::lookup`]).
    pub(crate) fn trace_snapshot(&self, trace_id: &str) -> Snapshot {
        self.snapshot(&Scope {
            project: self.project.clone(),
            time: TimeRange::default(),
            trace_id: Some(trace_id.to_string()),
        })
    }
}

#[async_trait]
impl TableProvider for SpansTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Filters prune files, batches, row groups and pages; DataFusion still applies them to rows.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let scope = Scope {
            project: self.project.clone(),
            time: time_range(filters),
            trace_id: trace_id(filters),
        };
        let snapshot = self.snapshot(&scope);
        let mut plans: Vec<Arc<dyn ExecutionPlan>> = Vec::with_capacity(2);

        if !snapshot.files.is_empty() {
            let url = ObjectStoreUrl::parse(STORE_URL)?;
            let object_store = state.runtime_env().object_store(&url)?;
            let metadata_cache = state.runtime_env().cache_manager.get_file_metadata_cache();
            let mut source = ParquetSource::new(Arc::clone(&self.schema))
                .with_table_parquet_options(state.table_options().parquet.clone())
                .with_parquet_file_reader_factory(Arc::new(CachedParquetFileReaderFactory::new(
                    object_store,
                    metadata_cache,
                )))
                // Only a trace id or a time range can prune below a file here (page index):
                // rows are sorted by trace id. Other predicates match nearly every page, and
                // reading and checking these costs a query that touches every file about 1 ms
                // per file.
                .with_enable_page_index(scope.trace_id.is_some() || scope.time.is_bounded())
                // The files' own bloom filters stay unread (they are written for other
                // readers): the trace index has already picked the files that hold the id, and
                // row groups sorted by trace id are pruned by their min/max. Reading the
                // filter was one more read per file a lookup opens: at 100 M LLM spans, p50
                // 12.2-12.5 ms with it and 11.0-11.1 ms without, lookups one after another;
                // 13.6 and 13.8 ms when each follows a DuckDB scan (BENCHMARKS.md, fourteenth
                // session).
                .with_bloom_filter_on_read(false);
            if scope.trace_id.is_some() {
                // A trace's rows are a few of the thousands the trace id's page index leaves:
                // checking the id while decoding reads the other columns, the prompts among
                // them, for those rows alone, and skips their other pages undecompressed.
                source = source.with_pushdown_filters(true);
            }
            if let Some(predicate) = conjunction(filters.iter().cloned()) {
                let df_schema = DFSchema::try_from(Arc::clone(&self.schema))?;
                source = source.with_predicate(state.create_physical_expr(predicate, &df_schema)?);
            }
            let partitions = state.config().target_partitions().max(1);
            let n_groups = partitions.min(snapshot.files.len());
            let mut groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); n_groups];
            // Largest files first, each to the group holding the fewest bytes.
            let mut files = snapshot.files.clone();
            files.sort_by_key(|f| std::cmp::Reverse(f.size));
            let mut sizes = vec![0u64; n_groups];
            for f in files {
                let i = (0..n_groups).min_by_key(|i| sizes[*i]).unwrap_or(0);
                sizes[i] += f.size;
                groups[i].push(PartitionedFile::new(f.path.clone(), f.size));
            }
            let config = FileScanConfigBuilder::new(url, Arc::new(source))
                .with_statistics(Estimate::of_files(&snapshot.files).statistics(&self.schema))
                .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
                .with_projection_indices(projection.cloned())?
                .with_limit(limit)
                .build();
            plans.push(DataSourceExec::from_data_source(config));
        }
        if !snapshot.batches.is_empty() {
            // Memory batches have the stored types: projected, then cast to the table's.
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => Arc::clone(&self.schema),
            };
            let batches = snapshot
                .batches
                .iter()
                .map(|b| match projection {
                    Some(p) => cast_to(&b.batch.project(p)?, &schema),
                    None => cast_to(&b.batch, &schema),
                })
                .collect::<Result<Vec<_>>>()?;
            let estimate = Estimate::of_batches(&snapshot.batches);
            let memory = MemorySourceConfig::try_new_exec(&[batches], Arc::clone(&schema), None)?;
            plans.push(Arc::new(WithStatistics::new(memory, estimate.statistics(&schema))));
        }
        match plans.len() {
            0 => {
                let projected = match projection {
                    Some(p) => Arc::new(self.schema.project(p)?),
                    None => Arc::clone(&self.schema),
                };
                Ok(Arc::new(EmptyExec::new(projected)))
            }
            1 => Ok(plans.pop().expect("one plan")),
            _ => UnionExec::try_new(plans),
        }
    }
}

/// The trace id a conjunction of filters pins (`trace_id = '…'`), if any.
pub fn trace_id(filters: &[Expr]) -> Option<String> {
    fn find(e: &Expr) -> Option<String> {
        match e {
            Expr::BinaryExpr(BinaryExpr { left, op: Operator::And, right }) => {
                find(left).or_else(|| find(right))
            }
            Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) => {
                let is_col = |e: &Expr| matches!(e, Expr::Column(c) if c.name == col::TRACE_ID);
                let lit = |e: &Expr| match e {
                    Expr::Literal(
                        ScalarValue::Utf8(Some(v))
                        | ScalarValue::Utf8View(Some(v))
                        | ScalarValue::LargeUtf8(Some(v)),
                        _,
                    ) => Some(v.clone()),
                    _ => None,
                };
                match (is_col(left), is_col(right)) {
                    (true, _) => lit(right),
                    (_, true) => lit(left),
                    _ => None,
                }
            }
            _ => None,
        }
    }
    filters.iter().find_map(find)
}

/// The `start_time` range implied by a conjunction of filters (unbounded where unknown).
pub fn time_range(filters: &[Expr]) -> TimeRange {
    let mut range = TimeRange::default();
    for f in filters {
        narrow(f, &mut range);
    }
    range
}

fn narrow(expr: &Expr, range: &mut TimeRange) {
    match expr {
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::And, right }) => {
            narrow(left, range);
            narrow(right, range);
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (op, ns) = match (
                is_start_time(left),
                literal_ns(right),
                is_start_time(right),
                literal_ns(left),
            ) {
                (true, Some(ns), _, _) => (*op, ns),
                (_, _, true, Some(ns)) => match op.swap() {
                    Some(op) => (op, ns),
                    None => return,
                },
                _ => return,
            };
            match op {
                Operator::Gt | Operator::GtEq => lower(range, ns),
                Operator::Lt | Operator::LtEq => upper(range, ns),
                Operator::Eq => {
                    lower(range, ns);
                    upper(range, ns);
                }
                _ => {}
            }
        }
        Expr::Between(Between { expr, negated: false, low, high }) if is_start_time(expr) => {
            if let Some(ns) = literal_ns(low) {
                lower(range, ns);
            }
            if let Some(ns) = literal_ns(high) {
                upper(range, ns);
            }
        }
        _ => {}
    }
}

fn lower(range: &mut TimeRange, ns: i64) {
    range.min_ns = Some(range.min_ns.map_or(ns, |m| m.max(ns)));
}

fn upper(range: &mut TimeRange, ns: i64) {
    range.max_ns = Some(range.max_ns.map_or(ns, |m| m.min(ns)));
}

fn is_start_time(e: &Expr) -> bool {
    match e {
        Expr::Column(c) => c.name == col::START_TIME,
        Expr::Cast(c) => is_start_time(&c.expr),
        _ => false,
    }
}

fn literal_ns(e: &Expr) -> Option<i64> {
    let Expr::Literal(v, _) = e else { return None };
    match v {
        ScalarValue::TimestampNanosecond(Some(v), _) => Some(*v),
        ScalarValue::TimestampMicrosecond(Some(v), _) => v.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(v), _) => v.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1_000_000_000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{col as c, lit};

    fn ts(ns: i64) -> Expr {
        lit(ScalarValue::TimestampNanosecond(Some(ns), Some("UTC".into())))
    }

    #[test]
    fn time_range_from_comparisons_and_between() {
        let r = time_range(&[c("start_time").gt_eq(ts(10)), ts(50).gt(c("start_time"))]);
        assert_eq!(r, TimeRange { min_ns: Some(10), max_ns: Some(50) });
        let r = time_range(&[c("start_time").between(ts(5), ts(7)).and(c("name").eq(lit("x")))]);
        assert_eq!(r, TimeRange { min_ns: Some(5), max_ns: Some(7) });
        let r = time_range(&[c("end_time").gt(ts(10)), c("start_time").eq(lit(3))]);
        assert_eq!(r, TimeRange::default());
    }

    #[test]
    fn trace_id_from_equality() {
        let id = "0af7651916cd43dd8448eb211c80319c";
        assert_eq!(
            trace_id(&[c("name").eq(lit("x")).and(lit(id).eq(c("trace_id")))]).as_deref(),
            Some(id)
        );
        assert_eq!(trace_id(&[c("trace_id").gt(lit(id))]), None);
        assert_eq!(trace_id(&[c("trace_id").eq(lit(id)).or(c("name").eq(lit("x")))]), None);
    }
}
