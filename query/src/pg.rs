//! The Postgres wire protocol frontend (psql, Grafana's PostgreSQL datasource, BI tools).
//!
//! Built on `datafusion-postgres` (pgwire underneath): simple and extended query protocols,
//! prepared statements with parameters, text and binary results with Postgres type OIDs,
//! query cancellation, `pg_catalog` and `information_schema` for the tools that ask them
//! (`datafusion-pg-catalog`), `SET`/`SHOW`, transactions and cursors as no-op-safe hooks.
//!
//! spanlake adds its SQL sandbox in front of every statement ([`SandboxHook`]): only read
//! queries, `SHOW`, `EXPLAIN`, transaction statements, cursors and `SET` of Postgres session
//! settings (time zone, date style, application name, ...) pass. DDL, DML, `COPY` and `SET` of
//! engine settings (`datafusion.*`, which could lift the memory or time limits) are refused
//! with SQLSTATE 42501 and a message saying why.

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
use datafusion_postgres::{ServerOptions, serve_with_hooks};
use pgwire::api::ClientInfo;
use pgwire::api::results::Response;
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};

use crate::engine::{QueryEngine, check_read_only_statement};

/// Settings of the Postgres listener.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// Listen address (default `127.0.0.1:5433`, beside a local Postgres on 5432).
    pub listen: SocketAddr,
    /// PEM certificate and PKCS#8 key: TLS when both are set.
    pub tls: Option<(String, String)>,
    /// Connections served at once (0: no limit).
    pub max_connections: usize,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 5433)), tls: None, max_connections: 256 }
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

/// Adds `pg_catalog` (and the Postgres functions clients call) to the engine's context.
pub fn install_pg_catalog(engine: &QueryEngine) -> crate::Result<()> {
    setup_pg_catalog(engine.context(), "datafusion", Arc::new(AuthManager::default()))
        .map_err(|e| crate::Error::Query { source: *e })
}

/// Serves the Postgres protocol until the task is dropped.
pub async fn serve(engine: &QueryEngine, config: &PgConfig) -> std::io::Result<()> {
    let mut opts = ServerOptions::new()
        .with_host(config.listen.ip().to_string())
        .with_port(config.listen.port())
        .with_max_connections(config.max_connections);
    if let Some((cert, key)) = &config.tls {
        opts = opts.with_tls_cert_path(Some(cert.clone())).with_tls_key_path(Some(key.clone()));
    }
    let hooks: Vec<Arc<dyn QueryHook>> = vec![
        Arc::new(SandboxHook),
        Arc::new(CursorStatementHook),
        Arc::new(SetShowHook),
        Arc::new(TransactionStatementHook),
    ];
    serve_with_hooks(Arc::new(engine.context().clone()), &opts, hooks).await
}
