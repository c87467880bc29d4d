//! The Postgres wire protocol frontend (psql, Grafana's PostgreSQL datasource, BI tools).
//!
//! Built on `datafusion-postgres` (pgwire underneath): simple and extended query protocols,
//! prepared statements with parameters, text and binary results with Postgres type OIDs,
//! query cancellation, `pg_catalog` and `information_schema` for the tools that ask them
//! (`datafusion-pg-catalog`), `SET`/`SHOW`, transactions and cursors as no-op-safe hooks.
//!
//! With users configured (`[[postgres.users]]`), clients authenticate with a password
//! (cleartext password message: use TLS off localhost); without, any user name is accepted.
//!
//! spanlake adds its SQL sandbox in front of every statement ([`SandboxHook`]): only read
//! queries, `SHOW`, `EXPLAIN`, transaction statements, cursors and `SET` of Postgres session
//! settings (time zone, date style, application name, ...) pass. DDL, DML, `COPY` and `SET` of
//! engine settings (`datafusion.*`, which could lift the memory or time limits) are refused
//! with SQLSTATE 42501 and a message saying why.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{Set, Statement};
use datafusion_postgres::QueryHook;
use datafusion_postgres::auth::AuthManager;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::{DfSessionService, ServerOptions, serve_with_handlers};
use futures::Sink;
use pgwire::api::auth::cleartext::CleartextPasswordAuthStartupHandler;
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::Response;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionHandle, ConnectionManager, PgWireServerHandlers,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};

use crate::engine::{EngineFor, QueryEngine, check_read_only_statement};

/// Settings of the Postgres listener.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// Listen address (default `127.0.0.1:5433`, beside a local Postgres on 5432).
    pub listen: SocketAddr,
    /// PEM certificate and PKCS#8 key: TLS when both are set.
    pub tls: Option<(String, String)>,
    /// Connections served at once (0: no limit).
    pub max_connections: usize,
    /// User names and passwords; empty accepts any user without a password.
    pub users: Vec<(String, String)>,
    /// Longest a query may run (simple protocol).
    pub timeout: std::time::Duration,
    /// API keys: while any is in force, the password must be one the check accepts.
    pub api_keys: Option<ApiKeys>,
    /// Engines of single projects, for sessions of project-scoped keys.
    pub projects: Option<ProjectEngines>,
}

/// A shared [`EngineFor`].
#[derive(Clone)]
pub struct ProjectEngines(pub EngineFor);

impl std::fmt::Debug for ProjectEngines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProjectEngines")
    }
}

/// API key checks for the Postgres listener (provided by the binary).
pub trait PasswordKeys: Send + Sync {
    /// Whether keys are in force.
    fn enabled(&self) -> bool;
    /// Whether `password` is a key allowed to use the Postgres frontend.
    fn accepts(&self, password: &str) -> bool;
    /// The only project the key may see (`None`: every project).
    fn project(&self, password: &str) -> Option<String>;
}

/// Client metadata naming the project a session is scoped to.
const PROJECT: &str = "spanlake.project";

/// A shared [`PasswordKeys`].
#[derive(Clone)]
pub struct ApiKeys(pub Arc<dyn PasswordKeys>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKeys")
    }
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5433)),
            tls: None,
            max_connections: 256,
            users: Vec::new(),
            timeout: std::time::Duration::from_secs(300),
            api_keys: None,
            projects: None,
        }
    }
}

/// Refuses every statement that is not allowed over the network (see the module docs).
#[derive(Debug)]
pub struct SandboxHook;

/// Why a statement is refused, or `None` when it may run.
pub fn refusal(statement: &Statement) -> Option<String> {
    match statement {
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowStatus { .. } => None,
        Statement::Set(set) => {
            let names: Vec<String> = match set {
                Set::SingleAssignment { variable, .. } => vec![variable.to_string()],
                Set::SetTimeZone { .. } => Vec::new(),
                Set::SetNames { .. } | Set::SetNamesDefault {} => Vec::new(),
                other => vec![other.to_string()],
            };
            names
                .into_iter()
                .find(|n| n.contains('.') || n.to_ascii_lowercase().starts_with("datafusion"))
                .map(|n| {
                    format!(
                        "SET {n} is not allowed: engine settings cannot be changed over the network (session settings such as TIME ZONE are accepted)"
                    )
                })
        }
        other => check_read_only_statement(other).err().map(|e| e.to_string()),
    }
}

fn refused(message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".into(), "42501".into(), message)))
}

#[async_trait]
impl QueryHook for SandboxHook {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        refusal(statement).map(|m| Err(refused(m)))
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        refusal(statement).map(|m| Err(refused(m)))
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        refusal(statement).map(|m| Err(refused(m)))
    }
}

/// Grafana's schema, table and column pickers restrict `information_schema` to the schemas on
/// `search_path` with a subquery over `current_setting('search_path')`,
/// `generate_series(array_lower(...), array_upper(...))` and `string_to_array(...)` as a table
/// (which the Postgres compatibility layer turns into `IN ('')` before spanlake sees it).
/// This hook rewrites such statements the way Postgres would evaluate them for spanlake's
/// `search_path` (`public`):
/// * `quote_ident(table_schema) IN (<search_path subquery>)` → `... IN ('public')`;
/// * over `information_schema.tables`, `table_type = 'BASE TABLE'` also accepts views (the
///   `traces` and `sessions` views are what most panels read);
/// * over `information_schema.columns`, `data_type` is the Postgres type name (`bigint`,
///   `timestamp with time zone`, ...) instead of the Arrow one, so pickers recognise time
///   columns.
#[derive(Debug)]
pub struct GrafanaMetadataHook;

/// `statement` rewritten as [`GrafanaMetadataHook`] describes, or `None` when it is not a
/// picker query.
pub fn rewrite_picker_query(statement: &Statement) -> Option<Statement> {
    use datafusion::sql::sqlparser::ast::{
        BinaryOperator, Expr, Ident, Value, visit_expressions_mut,
    };
    let text = statement.to_string();
    let tables = text.contains("information_schema.tables");
    let columns = text.contains("information_schema.columns");
    if !(tables || columns || text.contains("information_schema.schemata")) {
        return None;
    }
    let public = || Expr::Value(Value::SingleQuotedString("public".into()).into());
    let is_schema_ident = |e: &Expr| {
        let t = e.to_string().to_ascii_lowercase();
        t == "quote_ident(table_schema)" || t == "table_schema"
    };
    let mut changed = false;
    let mut rewritten = statement.clone();
    let _ = visit_expressions_mut(&mut rewritten, |e: &mut Expr| {
        match e {
            Expr::InSubquery { expr, subquery, negated }
                if is_schema_ident(expr) && subquery.to_string().contains("search_path") =>
            {
                *e = Expr::InList { expr: expr.clone(), list: vec![public()], negated: *negated };
                changed = true;
            }
            // What the compatibility layer leaves of the subquery: `IN ()` or `IN ('')`.
            Expr::InList { expr, list, .. }
                if is_schema_ident(expr) && list.iter().all(|v| v.to_string() == "''") =>
            {
                *list = vec![public()];
                changed = true;
            }
            Expr::BinaryOp { left, op: BinaryOperator::Eq, right }
                if tables
                    && left.to_string().eq_ignore_ascii_case("table_type")
                    && right.to_string() == "'BASE TABLE'" =>
            {
                *e = Expr::InList {
                    expr: left.clone(),
                    list: vec![
                        Expr::Value(Value::SingleQuotedString("BASE TABLE".into()).into()),
                        Expr::Value(Value::SingleQuotedString("VIEW".into()).into()),
                    ],
                    negated: false,
                };
                changed = true;
            }
            Expr::Identifier(Ident { value, .. }) if columns && value == "data_type" => {
                *e = Expr::Function(datafusion::sql::sqlparser::ast::Function {
                    name: datafusion::sql::sqlparser::ast::ObjectName::from(vec![Ident::new(
                        "pg_type_name",
                    )]),
                    uses_odbc_syntax: false,
                    parameters: datafusion::sql::sqlparser::ast::FunctionArguments::None,
                    args: datafusion::sql::sqlparser::ast::FunctionArguments::List(
                        datafusion::sql::sqlparser::ast::FunctionArgumentList {
                            duplicate_treatment: None,
                            args: vec![datafusion::sql::sqlparser::ast::FunctionArg::Unnamed(
                                datafusion::sql::sqlparser::ast::FunctionArgExpr::Expr(
                                    Expr::Identifier(Ident::new("data_type")),
                                ),
                            )],
                            clauses: vec![],
                        },
                    ),
                    filter: None,
                    null_treatment: None,
                    over: None,
                    within_group: vec![],
                });
                changed = true;
            }
            _ => {}
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    changed.then_some(rewritten)
}

async fn plan_rewritten(statement: Statement, ctx: &SessionContext) -> PgWireResult<LogicalPlan> {
    ctx.state()
        .statement_to_plan(datafusion::sql::parser::Statement::Statement(Box::new(statement)))
        .await
        .map_err(|e| PgWireError::ApiError(Box::new(e)))
}

#[async_trait]
impl QueryHook for GrafanaMetadataHook {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        let rewritten = rewrite_picker_query(statement)?;
        let answer = async {
            let plan = plan_rewritten(rewritten, ctx).await?;
            let df = ctx
                .execute_logical_plan(plan)
                .await
                .map_err(|e| PgWireError::ApiError(Box::new(e)))?;
            let resp = datafusion_postgres::arrow_pg::datatypes::df::encode_dataframe(
                df,
                &pgwire::api::portal::Format::UnifiedText,
                None,
            )
            .await?;
            Ok(Response::Query(resp))
        };
        Some(answer.await)
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        let rewritten = rewrite_picker_query(statement)?;
        Some(plan_rewritten(rewritten, ctx).await)
    }

    async fn handle_extended_query(
        &self,
        _statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        None
    }
}

/// Adds `pg_catalog` (and the Postgres functions clients call) to the engine's context.
pub fn install_pg_catalog(engine: &QueryEngine) -> crate::Result<()> {
    setup_pg_catalog(engine.context(), "datafusion", Arc::new(AuthManager::default()))
        .map_err(|e| crate::Error::Query { source: *e })
}

/// The Postgres session service over a context, with spanlake's hooks.
fn session_service(ctx: SessionContext) -> DfSessionService {
    let hooks: Vec<Arc<dyn QueryHook>> = vec![
        Arc::new(SandboxHook),
        Arc::new(GrafanaMetadataHook),
        Arc::new(CursorStatementHook),
        Arc::new(SetShowHook),
        Arc::new(TransactionStatementHook),
    ];
    DfSessionService::new_with_hooks(Arc::new(ctx), hooks)
}

/// The session service of one connection.
struct Session(Arc<DfSessionService>);

/// Where sessions come from: each connection gets a session service of its own over its
/// engine (its project's for project-scoped keys, the shared one otherwise), with its own
/// settings (`SET TIME ZONE` changes that session only) and its own memory pool capped at
/// `query.memory_per_query` (a session runs one statement at a time).
struct Sessions {
    shared: Arc<QueryEngine>,
    projects: Option<ProjectEngines>,
    /// Project engines with `pg_catalog` installed.
    installed: tokio::sync::Mutex<HashMap<String, Arc<QueryEngine>>>,
}

impl Sessions {
    async fn engine(&self, project: &str) -> PgWireResult<Arc<QueryEngine>> {
        let Some(engines) = &self.projects else {
            return Err(refused("project-scoped sessions are not served here".into()));
        };
        let mut installed = self.installed.lock().await;
        if let Some(e) = installed.get(project) {
            return Ok(Arc::clone(e));
        }
        let engine =
            (engines.0)(project.to_string()).await.map_err(|e| PgWireError::ApiError(e.into()))?;
        install_pg_catalog(&engine).map_err(|e| PgWireError::ApiError(Box::new(e)))?;
        installed.insert(project.to_string(), Arc::clone(&engine));
        Ok(engine)
    }

    /// The connection's session service, created on its first statement.
    async fn service<C: ClientInfo>(&self, client: &C) -> PgWireResult<Arc<DfSessionService>> {
        if let Some(s) = client.session_extensions().get::<Session>() {
            return Ok(Arc::clone(&s.0));
        }
        let engine = match client.metadata().get(PROJECT) {
            Some(p) => self.engine(p).await?,
            None => Arc::clone(&self.shared),
        };
        let service = Arc::new(session_service(engine.query_context()));
        client.session_extensions().insert(Session(Arc::clone(&service)));
        Ok(service)
    }
}

/// Serves the Postgres protocol until the task is dropped.
pub async fn serve(engine: &Arc<QueryEngine>, config: &PgConfig) -> std::io::Result<()> {
    let mut opts = ServerOptions::new()
        .with_host(config.listen.ip().to_string())
        .with_port(config.listen.port())
        .with_max_connections(config.max_connections);
    if let Some((cert, key)) = &config.tls {
        opts = opts.with_tls_cert_path(Some(cert.clone())).with_tls_key_path(Some(key.clone()));
    }
    let sessions = Arc::new(Sessions {
        shared: Arc::clone(engine),
        projects: config.projects.clone(),
        installed: tokio::sync::Mutex::new(HashMap::new()),
    });
    let connections = Arc::new(ConnectionManager::new());
    let users: HashMap<String, String> = config.users.iter().cloned().collect();
    // What a password accepted by the API key check is replaced with before the cleartext
    // handler compares it: random per process, so no client can send it.
    let marker = format!("{:032x}", rand::random::<u128>());
    let password = CleartextPasswordAuthStartupHandler::new(
        ConfigUsers {
            users: Arc::new(users),
            keys: config.api_keys.clone(),
            marker: marker.clone(),
        },
        DefaultServerParameterProvider::default(),
    )
    .with_connection_manager(Arc::clone(&connections));
    let handlers = Handlers {
        simple: Arc::new(Simple { sessions: Arc::clone(&sessions), timeout: config.timeout }),
        extended: Arc::new(Extended {
            parser: Arc::new(ScopedParser {
                shared: session_service(engine.context().clone()).query_parser(),
                sessions,
            }),
            timeout: config.timeout,
        }),
        startup: Arc::new(Startup {
            password,
            users: !config.users.is_empty(),
            keys: config.api_keys.clone(),
            marker,
            open: OpenStartup(Arc::clone(&connections)),
        }),
        cancel: Arc::new(DefaultCancelHandler::new(connections)),
    };
    serve_with_handlers(Arc::new(handlers), &opts).await
}

/// The users of `[[postgres.users]]`.
#[derive(Debug)]
struct ConfigUsers {
    users: Arc<HashMap<String, String>>,
    keys: Option<ApiKeys>,
    marker: String,
}

#[async_trait]
impl AuthSource for ConfigUsers {
    #[expect(
        elided_lifetimes_in_paths,
        reason = "the trait's signature elides it; naming it makes async_trait bind it early"
    )]
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        if self.keys.as_ref().is_some_and(|k| k.0.enabled()) {
            return Ok(Password::new(None, self.marker.as_bytes().to_vec()));
        }
        match self.users.get(user) {
            Some(p) => Ok(Password::new(None, p.as_bytes().to_vec())),
            // The same answer as a wrong password: whether a user exists is not revealed.
            None => Err(PgWireError::InvalidPassword(user.to_string())),
        }
    }
}

/// Startup without authentication (no users configured).
struct OpenStartup(Arc<ConnectionManager>);

impl NoopStartupHandler for OpenStartup {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(Arc::clone(&self.0))
    }
}

/// Password authentication while API keys are in force (an admin key as the password) or
/// users are configured, none otherwise.
struct Startup {
    password: CleartextPasswordAuthStartupHandler<ConfigUsers, DefaultServerParameterProvider>,
    users: bool,
    keys: Option<ApiKeys>,
    marker: String,
    open: OpenStartup,
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let keys = self.keys.as_ref().filter(|k| k.0.enabled());
        if keys.is_none() && !self.users {
            return self.open.on_startup(client, message).await;
        }
        let message = match (keys, message) {
            (Some(k), PgWireFrontendMessage::PasswordMessageFamily(pwd)) => {
                let mut password = pwd.into_password()?;
                if let Some(project) = k.0.project(&password.password) {
                    client.metadata_mut().insert(PROJECT.to_string(), project);
                }
                password.password = if k.0.accepts(&password.password) {
                    self.marker.clone()
                } else {
                    String::new()
                };
                PgWireFrontendMessage::PasswordMessageFamily(
                    pgwire::messages::startup::PasswordMessageFamily::Password(password),
                )
            }
            (_, m) => m,
        };
        self.password.on_startup(client, message).await
    }
}

/// The simple query protocol (psql, Grafana) with cancellation and the query time limit:
/// statements run as `DfSessionService` runs them, and their row streams stop with SQLSTATE
/// 57014 when the client's cancel request arrives or the time limit passes (the DataFusion
/// plan is dropped, which stops its tasks).
struct Simple {
    sessions: Arc<Sessions>,
    timeout: std::time::Duration,
}

/// Memory limits reached answer SQLSTATE 53200 (out_of_memory) as Postgres does, with the
/// message naming the limit; other errors pass unchanged.
fn out_of_memory(e: PgWireError) -> PgWireError {
    match &e {
        PgWireError::ApiError(inner) => {
            let message = inner.to_string();
            if message.starts_with("Resources exhausted") {
                return PgWireError::UserError(Box::new(ErrorInfo::new(
                    "ERROR".into(),
                    "53200".into(),
                    message,
                )));
            }
            e
        }
        _ => e,
    }
}

fn cancelled(message: &str) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".into(), "57014".into(), message.into())))
}

/// What ends a guarded row stream early.
enum Stop {
    Row(Option<PgWireResult<pgwire::messages::data::DataRow>>),
    Deadline,
    Cancel,
    CancelGone,
}

fn guard_rows(
    rows: pgwire::api::results::SendableRowStream,
    cancel: Option<futures::channel::oneshot::Receiver<()>>,
    deadline: tokio::time::Instant,
) -> pgwire::api::results::SendableRowStream {
    use futures::StreamExt as _;
    Box::pin(futures::stream::unfold(
        (rows, cancel, false),
        move |(mut rows, mut cancel, done)| async move {
            if done {
                return None;
            }
            loop {
                let step = {
                    let on_cancel = async {
                        match cancel.as_mut() {
                            Some(rx) => match rx.await {
                                Ok(()) => Stop::Cancel,
                                Err(_) => Stop::CancelGone,
                            },
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        r = rows.next() => Stop::Row(r),
                        () = tokio::time::sleep_until(deadline) => Stop::Deadline,
                        s = on_cancel => s,
                    }
                };
                return match step {
                    Stop::Row(None) => None,
                    Stop::Row(Some(r)) => Some((r.map_err(out_of_memory), (rows, cancel, false))),
                    Stop::Deadline => Some((
                        Err(cancelled("canceling statement due to statement timeout")),
                        (rows, cancel, true),
                    )),
                    Stop::Cancel => Some((
                        Err(cancelled("canceling statement due to user request")),
                        (rows, cancel, true),
                    )),
                    Stop::CancelGone => {
                        cancel = None;
                        continue;
                    }
                };
            }
        },
    ))
}

/// The deadline of a statement starting now, and the receiver of a cancel request for it.
async fn start_query<C: ClientInfo>(
    client: &C,
    timeout: std::time::Duration,
) -> (tokio::time::Instant, Option<futures::channel::oneshot::Receiver<()>>) {
    let deadline = tokio::time::Instant::now() + timeout;
    let handle = client.session_extensions().get::<Arc<ConnectionHandle>>();
    let cancel = match &handle {
        Some(h) => Some(h.start_query().await),
        None => None,
    };
    (deadline, cancel)
}

#[async_trait]
impl SimpleQueryHandler for Simple {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (deadline, cancel) = start_query(client, self.timeout).await;
        // A project-scoped session runs on its project's engine.
        let inner = self.sessions.service(client).await?;
        let planned =
            tokio::time::timeout_at(deadline, SimpleQueryHandler::do_query(&*inner, client, query))
                .await;
        let responses = planned
            .map_err(|_| cancelled("canceling statement due to statement timeout"))?
            .map_err(out_of_memory)?;
        // One cancel request ends the first streaming result; later ones in a multi-statement
        // string run to completion (rare: clients send one heavy query at a time).
        let mut cancel = cancel;
        Ok(responses
            .into_iter()
            .map(|r| match r {
                Response::Query(mut q) => {
                    let rows =
                        std::mem::replace(&mut q.data_rows, Box::pin(futures::stream::empty()));
                    q.data_rows = guard_rows(rows, cancel.take(), deadline);
                    Response::Query(q)
                }
                other => other,
            })
            .collect())
    }
}

type DfParser = <DfSessionService as ExtendedQueryHandler>::QueryParser;
type DfStatement = <DfSessionService as ExtendedQueryHandler>::Statement;

/// Plans a session's statements (Parse) on the session's own context: a project-scoped
/// session's on its project's engine, so the plan a portal later executes only ever reads that
/// project's partitions.
struct ScopedParser {
    /// For what depends on the parsed statement alone (parameter and result types).
    shared: Arc<DfParser>,
    sessions: Arc<Sessions>,
}

#[async_trait]
impl pgwire::api::stmt::QueryParser for ScopedParser {
    type Statement = DfStatement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<pgwire::api::Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let parsed = self
            .sessions
            .service(client)
            .await?
            .query_parser()
            .parse_sql(client, sql, types)
            .await?;
        // Text parameters arrive as plain strings (see `text_placeholders`).
        let Some((sql, Some((statement, plan)))) = parsed else { return Ok(parsed) };
        let plan = crate::engine::text_placeholders(plan)
            .map_err(|e| PgWireError::ApiError(Box::new(e)))?;
        Ok(Some((sql, Some((statement, plan)))))
    }

    fn get_parameter_types(&self, stmt: &Self::Statement) -> PgWireResult<Vec<pgwire::api::Type>> {
        self.shared.get_parameter_types(stmt)
    }

    fn get_result_schema(
        &self,
        stmt: &Self::Statement,
        column_format: Option<&pgwire::api::portal::Format>,
    ) -> PgWireResult<Vec<pgwire::api::results::FieldInfo>> {
        self.shared.get_result_schema(stmt, column_format)
    }
}

/// The extended protocol with the same statement time limit and cancellation as [`Simple`],
/// and project-scoped sessions planned and run on their project's engine.
struct Extended {
    parser: Arc<ScopedParser>,
    timeout: std::time::Duration,
}

#[async_trait]
impl ExtendedQueryHandler for Extended {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = ScopedParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        Arc::clone(&self.parser)
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &pgwire::api::portal::Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let inner = self.parser.sessions.service(client).await?;
        let (deadline, cancel) = start_query(client, self.timeout).await;
        let planned = tokio::time::timeout_at(
            deadline,
            ExtendedQueryHandler::do_query(&*inner, client, portal, max_rows),
        )
        .await;
        match planned
            .map_err(|_| cancelled("canceling statement due to statement timeout"))?
            .map_err(out_of_memory)?
        {
            Response::Query(mut q) => {
                let rows = std::mem::replace(&mut q.data_rows, Box::pin(futures::stream::empty()));
                q.data_rows = guard_rows(rows, cancel, deadline);
                Ok(Response::Query(q))
            }
            other => Ok(other),
        }
    }
}

struct Handlers {
    simple: Arc<Simple>,
    extended: Arc<Extended>,
    startup: Arc<Startup>,
    cancel: Arc<DefaultCancelHandler>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.simple)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.extended)
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.startup)
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::clone(&self.cancel)
    }
}
