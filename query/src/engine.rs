use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::ParamValues;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{FairSpillPool, MemoryPool};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParserBuilder, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use spanlake_engine::metrics::{Counter, Exposition, Histogram};
use spanlake_engine::pricing::PriceTable;
use spanlake_engine::schema::SPANS_TABLE;
use spanlake_engine::store::SpanStore;

use crate::error::{Error, Result};
use crate::functions;
use crate::memory::QueryPool;
use crate::provider::{STORE_URL, SpansTable};

/// Settings of the query engine.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// Parallelism of one query (DataFusion target partitions). Twice the cores by default: a
    /// scan partition waits on its file reads (blocking reads on the I/O threads) between
    /// decoding, and with two per core one decodes while the other reads. At 113 M spans on two
    /// cores, four partitions ran the aggregations 3-8 % faster than two and the suite's
    /// slowest query against DuckDB went from 1.56 to 1.49 (BENCHMARKS.md, sixteenth session).
    pub target_partitions: usize,
    /// Memory all running queries may use together; past it they spill to disk or fail.
    pub memory_limit_bytes: usize,
    /// Memory one query (one Postgres session's running statement) may use; past it the
    /// query spills to disk or fails.
    pub memory_per_query_bytes: usize,
    /// The runtime (memory pool, spill files) of another engine to share, so that the engines
    /// of all projects stay within one `memory_limit_bytes`.
    pub shared_runtime: Option<Arc<RuntimeEnv>>,
    /// Directory for spill files (the system temporary directory when unset).
    pub spill_dir: Option<std::path::PathBuf>,
    /// Longest a query may run.
    pub timeout: Duration,
    /// The runtime queries execute on; a separate one keeps heavy queries from starving the
    /// ingest path's threads. The caller's runtime when unset.
    pub runtime: Option<tokio::runtime::Handle>,
    /// Evaluate filters while decoding Parquet (late materialisation). Helps selective filters
    /// on wide rows (a trace id, a substring in prompts), costs on filters that keep most rows.
    pub pushdown_filters: bool,
    /// Memory for decoded Parquet footers kept between queries. A scan that finds a file's
    /// footer here does not read and parse it again. At 100 M spans in 2,651 files (18.5 MB
    /// of encoded footers), DataFusion's default 50 MB left footer loading at 506 ms of a scan;
    /// 256 MiB brought it to 80 ms.
    pub metadata_cache_bytes: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            target_partitions: 2 * std::thread::available_parallelism().map_or(2, |n| n.get()),
            memory_limit_bytes: 512 << 20,
            memory_per_query_bytes: 256 << 20,
            shared_runtime: None,
            spill_dir: None,
            timeout: Duration::from_secs(300),
            runtime: None,
            pushdown_filters: false,
            metadata_cache_bytes: 256 << 20,
        }
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
        e.counter(
            "spanlake_query_errors_total",
            "SQL queries failed or refused",
            self.query_errors.get(),
        );
        e.histogram("spanlake_query_duration_seconds", "SQL query latency", &self.query_seconds);
    }
}

/// The query engine of one project, created (and cached) by the caller on first use; the
/// frontends that serve project-scoped keys (HTTP, Postgres, Flight SQL) share one.
pub type EngineFor = Arc<
    dyn Fn(
            String,
        )
            -> futures::future::BoxFuture<'static, std::result::Result<Arc<QueryEngine>, String>>
        + Send
        + Sync,
>;

/// A query's result.
#[derive(Debug)]
pub struct QueryResult {
    /// Result schema (also for empty results).
    pub schema: SchemaRef,
    /// Result rows.
    pub batches: Vec<RecordBatch>,
}

impl QueryResult {
    /// Rows in the result.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// Spill files a merge reads at once.
const SPILL_MERGE_FAN_IN: usize = 8;

/// One row per trace: the roll-ups that belong to traces, not to spans. It groups by the
/// trace id as a 128-bit number (see `trace_key`), which costs less than grouping by its text.
const TRACES_VIEW: &str = "CREATE VIEW traces AS
SELECT
  trace_key_hex(trace_key(trace_id)) AS trace_id,
  root_value(name, parent_span_id, start_time) AS root_span_name,
  root_value(service_name, parent_span_id, start_time) AS service_name,
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
GROUP BY trace_key(trace_id)";

/// One row per session: the traces whose spans carry the session id, rolled up whole.
const SESSIONS_VIEW: &str = "CREATE VIEW sessions AS
SELECT
  session_id,
  count(*) AS traces,
  sum(span_count) AS span_count,
  sum(llm_calls) AS llm_calls,
  sum(tool_calls) AS tool_calls,
  sum(error_count) AS error_count,
  sum(input_tokens) AS input_tokens,
  sum(output_tokens) AS output_tokens,
  sum(total_tokens) AS total_tokens,
  sum(cost_usd) AS cost_usd,
  min(start_time) AS first_time,
  max(end_time) AS last_time,
  max(user_id) AS user_id
FROM traces
WHERE session_id IS NOT NULL
GROUP BY session_id";

/// DataFusion over one data location, with spanlake's tables, views and functions.
pub struct QueryEngine {
    ctx: SessionContext,
    /// The `spans` table registered in `ctx` (trace lookups read it without a plan).
    spans: Arc<SpansTable>,
    metrics: Arc<QueryMetrics>,
    config: QueryConfig,
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine").field("session", &self.ctx.session_id()).finish()
    }
}

impl QueryEngine {
    /// A query engine over `store`, seeing only `project` when one is given.
    pub async fn new(
        store: Arc<SpanStore>,
        project: Option<String>,
        prices: Arc<PriceTable>,
        config: &QueryConfig,
        metrics: Arc<QueryMetrics>,
    ) -> Result<Self> {
        let session = SessionConfig::new()
            .with_target_partitions(config.target_partitions.max(1))
            .with_information_schema(true)
            .with_default_catalog_and_schema("datafusion", "public")
            .set_bool("datafusion.execution.parquet.pushdown_filters", config.pushdown_filters)
            .set_bool("datafusion.execution.parquet.reorder_filters", true)
            .set_str("datafusion.sql_parser.dialect", "PostgreSQL")
            // What a sort keeps back for merging its spill files must fit in the pool.
            .set_usize(
                "datafusion.execution.sort_spill_reservation_bytes",
                (config.memory_limit_bytes.min(config.memory_per_query_bytes) / 8)
                    .clamp(64 << 10, 10 << 20),
            );
        let runtime = match &config.shared_runtime {
            Some(r) => Arc::clone(r),
            None => {
                let mode = match &config.spill_dir {
                    Some(dir) => DiskManagerMode::Directories(vec![dir.clone()]),
                    None => DiskManagerMode::OsTmpDirectory,
                };
                // A merge of spill files reserves a batch or two per file it reads at once
                // and, unbounded, takes all the memory it can get for them; then the spilled
                // aggregation it feeds found none left for its own table (memory::QueryPool).
                // Eight at a time, more files are merged in more passes.
                let disk = DiskManagerBuilder::default()
                    .with_mode(mode)
                    .with_max_spill_merge_fan_in(SPILL_MERGE_FAN_IN);
                RuntimeEnvBuilder::new()
                    .with_memory_pool(Arc::new(FairSpillPool::new(config.memory_limit_bytes)))
                    .with_disk_manager_builder(disk)
                    .with_metadata_cache_limit(config.metadata_cache_bytes)
                    .build_arc()?
            }
        };
        // Grouping by trace key reports its traces before joins pick their build side.
        let mut rules = datafusion::physical_optimizer::optimizer::PhysicalOptimizer::new().rules;
        let join_selection = rules.iter().position(|r| r.name() == "join_selection").unwrap_or(0);
        rules.insert(join_selection, Arc::new(crate::trace_key::TraceKeyStatistics));
        let mut ctx = SessionContext::new_with_state(
            SessionStateBuilder::new()
                .with_config(session)
                .with_runtime_env(runtime)
                .with_default_features()
                .with_physical_optimizer_rules(rules)
                .with_optimizer_rule(Arc::new(crate::trace_group::GroupByTraceKey))
                .with_optimizer_rule(Arc::new(crate::trace_group::JoinOnTraceKey))
                .build(),
        );
        let url = ObjectStoreUrl::parse(STORE_URL)?;
        ctx.register_object_store(url.as_ref(), store.object_store());
        let spans = Arc::new(SpansTable::new(store, project));
        ctx.register_table(SPANS_TABLE, Arc::clone(&spans) as _)?;
        datafusion_functions_json::register_all(&mut ctx)?;
        functions::register(&ctx, prices);
        ctx.register_udaf(crate::aggregate::root_value());
        ctx.register_udf(crate::trace_key::trace_key());
        ctx.register_udf(crate::trace_key::trace_key_hex());
        ctx.sql(TRACES_VIEW).await?;
        ctx.sql(SESSIONS_VIEW).await?;
        Ok(Self { ctx, spans, metrics, config: config.clone() })
    }

    /// The DataFusion context (for frontends that plan themselves).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// The runtime (shared memory pool, spill files) queries execute in; give it to other
    /// engines as [`QueryConfig::shared_runtime`].
    pub fn runtime_env(&self) -> Arc<RuntimeEnv> {
        self.ctx.runtime_env()
    }

    /// A context for one query (or one Postgres session): the engine's tables, views, functions
    /// and settings, with a memory pool of its own capped at `memory_per_query_bytes` and
    /// drawing from the shared pool.
    pub fn query_context(&self) -> SessionContext {
        let state = self.ctx.state();
        let mut runtime = (**state.runtime_env()).clone();
        runtime.memory_pool = Arc::new(QueryPool::new(
            Arc::clone(&runtime.memory_pool),
            self.config.memory_per_query_bytes,
        ));
        SessionContext::new_with_state(
            SessionStateBuilder::new_from_existing(state)
                .with_runtime_env(Arc::new(runtime))
                .build(),
        )
    }

    /// The query metrics.
    pub fn metrics(&self) -> &Arc<QueryMetrics> {
        &self.metrics
    }

    /// Runs one read-only statement. DDL, DML, `COPY`, `SET` and other statements are refused.
    pub async fn sql(&self, sql: &str) -> Result<QueryResult> {
        self.query(sql, None).await
    }

    /// Plans one read-only statement without running it (for result and parameter schemas);
    /// refused statements are refused here as in [`QueryEngine::sql`].
    pub async fn plan(&self, sql: &str) -> Result<LogicalPlan> {
        plan_statement(&self.ctx, sql).await
    }

    /// Runs one read-only statement with values for its `$1`, `$2`, ... placeholders.
    pub async fn query(&self, sql: &str, params: Option<ParamValues>) -> Result<QueryResult> {
        self.bounded(run(self.query_context(), sql.to_string(), params)).await
    }

    /// The rows of one trace (32 lowercase hex digits), sorted by `(start_time, span_id)`, with
    /// the stored schema: what `SELECT * FROM spans WHERE trace_id = '…' ORDER BY start_time,
    /// span_id` returns, read without planning it (see [`crate::lookup`]). Counted, timed,
    /// limited in time and memory, and run on the query runtime as a query is.
    pub async fn trace_rows(&self, trace_id: &str) -> Result<Vec<RecordBatch>> {
        let spans = Arc::clone(&self.spans);
        let runtime = self.ctx.runtime_env();
        let pool: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(
            Arc::clone(&runtime.memory_pool),
            self.config.memory_per_query_bytes,
        ));
        let id = trace_id.to_string();
        self.bounded(
            async move { Ok(crate::lookup::trace_rows(&spans, &runtime, &pool, &id).await?) },
        )
        .await
    }

    /// Runs `work` on the query runtime within the query timeout, counting and timing it.
    async fn bounded<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let started = Instant::now();
        self.metrics.queries.add(1);
        let limit = self.config.timeout;
        let timed = async move {
            tokio::time::timeout(limit, work).await.unwrap_or(Err(Error::Timeout { limit }))
        };
        let result = match &self.config.runtime {
            // The task is aborted when this future is dropped (a client gone away).
            Some(rt) => {
                let mut task = AbortOnDrop(rt.spawn(timed));
                match (&mut task.0).await {
                    Ok(r) => r,
                    Err(e) => Err(Error::Query {
                        source: datafusion::error::DataFusionError::External(Box::new(e)),
                    }),
                }
            }
            None => timed.await,
        };
        self.metrics.query_seconds.observe(started.elapsed());
        if result.is_err() {
            self.metrics.query_errors.add(1);
        }
        result
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run(ctx: SessionContext, sql: String, params: Option<ParamValues>) -> Result<QueryResult> {
    let mut plan = plan_statement(&ctx, &sql).await?;
    if let Some(params) = params {
        plan = plan.with_param_values(params)?;
    }
    let df = ctx.execute_logical_plan(plan).await?;
    let schema = plain_schema(df.schema().as_arrow());
    let batches = df
        .collect()
        .await?
        .iter()
        .map(|b| crate::provider::cast_to(b, &schema))
        .collect::<datafusion::error::Result<_>>()?;
    Ok(QueryResult { schema, batches })
}

/// A result schema with view types as their plain forms (`Utf8View` as `Utf8`, `BinaryView` as
/// `Binary`). Text columns are views inside queries (see [`crate::provider::query_schema`]);
/// results leave as plain strings, which every Arrow reader (Flight SQL drivers, Arrow IPC and
/// Parquet downloads) understands.
pub(crate) fn plain_schema(schema: &arrow::datatypes::Schema) -> SchemaRef {
    let plain = |t: &DataType| match t {
        DataType::Utf8View => Some(DataType::Utf8),
        DataType::BinaryView => Some(DataType::Binary),
        _ => None,
    };
    Arc::new(arrow::datatypes::Schema::new_with_metadata(
        schema
            .fields()
            .iter()
            .map(|f| match plain(f.data_type()) {
                Some(t) => Arc::new(f.as_ref().clone().with_data_type(t)),
                None => Arc::clone(f),
            })
            .collect::<Vec<_>>(),
        schema.metadata().clone(),
    ))
}

async fn plan_statement(ctx: &SessionContext, sql: &str) -> Result<LogicalPlan> {
    let state = ctx.state();
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(&PostgreSqlDialect {})
        .build()?
        .parse_statements()?;
    let statement = match statements.len() {
        0 => return Err(Error::Empty),
        1 => statements.pop_front().expect("one statement"),
        count => return Err(Error::MultipleStatements { count }),
    };
    check_read_only(&statement)?;
    let plan = text_placeholders(state.statement_to_plan(statement).await?)?;
    read_only()
        .verify_plan(&plan)
        .map_err(|source| Error::Forbidden { what: source.strip_backtrace() })?;
    Ok(plan)
}

/// Declares `$n` placeholders compared with text columns as `Utf8` (the planner infers the
/// column's `Utf8View`): clients bind text parameters as plain strings (Postgres `text`,
/// Arrow `Utf8` in Flight SQL), and a bound value must match its placeholder's type exactly.
/// Once bound, the value is coerced to the column's type like any literal.
pub(crate) fn text_placeholders(plan: LogicalPlan) -> datafusion::error::Result<LogicalPlan> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::logical_expr::expr::Placeholder;
    plan.transform_up_with_subqueries(|node| {
        node.map_expressions(|e| {
            e.transform_up(|e| match e {
                Expr::Placeholder(Placeholder { id, field: Some(f) })
                    if f.data_type() == &DataType::Utf8View =>
                {
                    let field = f.as_ref().clone().with_data_type(DataType::Utf8);
                    Ok(Transformed::yes(Expr::Placeholder(Placeholder {
                        id,
                        field: Some(Arc::new(field)),
                    })))
                }
                other => Ok(Transformed::no(other)),
            })
        })
    })
    .map(|t| t.data)
}

/// Refuses every statement that is not a query, before planning.
pub fn check_read_only(statement: &DfStatement) -> Result<()> {
    let what = match statement {
        DfStatement::Statement(s) => return check_read_only_statement(s),
        DfStatement::Explain(_) => return Ok(()),
        DfStatement::CreateExternalTable(_) => "CREATE EXTERNAL TABLE".to_string(),
        DfStatement::CopyTo(_) => "COPY".to_string(),
        DfStatement::Reset(_) => "RESET".to_string(),
    };
    Err(Error::Forbidden { what })
}

/// Refuses a SQL statement that is not a query.
pub fn check_read_only_statement(statement: &Statement) -> Result<()> {
    match statement {
        Statement::Query(_)
        | Statement::Explain { .. }
        | Statement::ExplainTable { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowVariable { .. } => Ok(()),
        other => Err(Error::Forbidden { what: statement_kind(other) }),
    }
}

fn statement_kind(s: &Statement) -> String {
    if let Statement::CreateTable(t) = s
        && t.external
    {
        return "CREATE EXTERNAL TABLE".to_string();
    }
    // The statement's own text up to its first clause names it well enough: "DROP TABLE",
    // "INSERT INTO", "SET TIME ZONE", ...
    let text = s.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    match words.as_slice() {
        [first, second] if second.chars().all(|c| c.is_ascii_uppercase()) => {
            format!("{first} {second}")
        }
        [first, ..] => (*first).to_string(),
        [] => "this statement".to_string(),
    }
}

fn read_only() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}
