use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::DFParserBuilder;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use spanlake_engine::metrics::{Counter, Exposition, Histogram};
use spanlake_engine::schema::SPANS_TABLE;
use spanlake_engine::store::SpanStore;

use crate::error::{Error, Result};
use crate::provider::{STORE_URL, SpansTable};

/// Settings of the query engine.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// Parallelism of one query (DataFusion target partitions).
    pub target_partitions: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self { target_partitions: std::thread::available_parallelism().map_or(2, |n| n.get()) }
    }
}

/// Metrics of the query engine.
#[derive(Debug, Default)]
pub struct QueryMetrics {
    /// Queries run.
    pub queries: Counter,
    /// Queries that failed or were refused.
    pub query_errors: Counter,
    /// Query latency (plan, execute, collect).
    pub query_seconds: Histogram,
}

impl QueryMetrics {
    /// Appends the query metrics to an exposition.
    pub fn render(&self, e: &mut Exposition) {
        e.counter("spanlake_queries_total", "SQL queries run", self.queries.get());
        e.counter("spanlake_query_errors_total", "SQL queries failed or refused", self.query_errors.get());
        e.histogram("spanlake_query_duration_seconds", "SQL query latency", &self.query_seconds);
    }
}

/// A query's result.
#[derive(Debug)]
pub struct QueryResult {
    /// Result schema (also for empty results).
    pub schema: SchemaRef,
    /// Result rows.
    pub batches: Vec<RecordBatch>,
}

/// One row per trace: the roll-ups that belong to traces, not to spans.
const TRACES_VIEW: &str = "CREATE VIEW traces AS
SELECT
  trace_id,
  first_value(name ORDER BY CASE WHEN parent_span_id IS NULL THEN 0 ELSE 1 END, start_time) AS root_span_name,
  first_value(service_name ORDER BY CASE WHEN parent_span_id IS NULL THEN 0 ELSE 1 END, start_time) AS service_name,
  min(start_time) AS start_time,
  max(end_time) AS end_time,
  (CAST(max(end_time) AS BIGINT) - CAST(min(start_time) AS BIGINT)) / 1e6 AS duration_ms,
  count(*) AS span_count,
  count(*) FILTER (WHERE status_code = 'error') AS error_count,
  count(*) FILTER (WHERE span_type = 'llm') AS llm_calls,
  count(*) FILTER (WHERE span_type = 'tool') AS tool_calls,
  sum(input_tokens) AS input_tokens,
  sum(output_tokens) AS output_tokens,
  sum(total_tokens) AS total_tokens,
  sum(cost_usd) AS cost_usd,
  max(session_id) AS session_id,
  max(user_id) AS user_id
FROM spans
GROUP BY trace_id";

/// DataFusion over one data location, with spanlake's tables, views and functions.
#[derive(Debug)]
pub struct QueryEngine {
    ctx: SessionContext,
    metrics: Arc<QueryMetrics>,
}

impl QueryEngine {
    /// A query engine over `store`.
    pub async fn new(store: Arc<SpanStore>, config: &QueryConfig, metrics: Arc<QueryMetrics>) -> Result<Self> {
        let session = SessionConfig::new()
            .with_target_partitions(config.target_partitions.max(1))
            .with_information_schema(true)
            .set_bool("datafusion.execution.parquet.pushdown_filters", true)
            .set_bool("datafusion.execution.parquet.reorder_filters", true);
        let mut ctx = SessionContext::new_with_config(session);
        let url = ObjectStoreUrl::parse(STORE_URL)?;
        ctx.register_object_store(url.as_ref(), store.object_store());
        ctx.register_table(SPANS_TABLE, Arc::new(SpansTable::new(store)))?;
        datafusion_functions_json::register_all(&mut ctx)?;
        ctx.sql(TRACES_VIEW).await?;
        Ok(Self { ctx, metrics })
    }

    /// The DataFusion context (for frontends that plan themselves).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// The query metrics.
    pub fn metrics(&self) -> &QueryMetrics {
        &self.metrics
    }

    /// Runs one read-only statement. DDL, DML, `COPY`, `SET` and other statements are refused.
    pub async fn sql(&self, sql: &str) -> Result<QueryResult> {
        let started = Instant::now();
        self.metrics.queries.add(1);
        let result = self.run(sql).await;
        self.metrics.query_seconds.observe(started.elapsed());
        if result.is_err() {
            self.metrics.query_errors.add(1);
        }
        result
    }

    async fn run(&self, sql: &str) -> Result<QueryResult> {
        let state = self.ctx.state();
        let mut statements = DFParserBuilder::new(sql)
            .with_dialect(&GenericDialect {})
            .build()?
            .parse_statements()?;
        let statement = match statements.len() {
            0 => return Err(Error::Empty),
            1 => statements.pop_front().expect("one statement"),
            count => return Err(Error::MultipleStatements { count }),
        };
        let plan = state.statement_to_plan(statement).await?;
        read_only()
            .verify_plan(&plan)
            .map_err(|source| Error::Forbidden { source })?;
        let df = self.ctx.execute_logical_plan(plan).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        Ok(QueryResult { schema, batches })
    }
}

fn read_only() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}
