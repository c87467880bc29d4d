//! SQL over spanlake's spans, through Apache DataFusion.
//!
//! * [`provider::SpansTable`] — the `spans` table: committed Parquet files plus the in-memory
//!   data not yet flushed, pruned by `start_time` predicates (files and memory batches by their
//!   time range, row groups and pages by Parquet statistics);
//! * [`QueryEngine`] — a DataFusion context with `spans`, the `traces` view, the JSON functions
//!   for attribute access, and the read-only SQL sandbox used by every network frontend;
//! * [`format`] — results as JSON, CSV, Arrow IPC or a table for people;
//! * [`trace`] — a whole trace by id as a span tree, found through the trace index;
//! * [`replay`] — replay bundles: a run's LLM requests and responses and tool calls;
//! * [`admin`] — deletion of spans by predicate;
//! * [`flight`] — Arrow Flight SQL (ADBC/JDBC drivers, Grafana's InfluxDB SQL mode);
//! * [`pg`] — the Postgres wire protocol (psql, Grafana, BI tools) behind the SQL sandbox;
//! * [`jaeger`] and [`tempo`] — the Jaeger query API and Tempo's trace-by-id, for the Jaeger UI
//!   and Grafana's Jaeger and Tempo data sources;
//! * [`http`] — `POST /v1/sql`, `GET /v1/traces/{id}`, `POST /v1/admin/delete`.
//!
//! Depends on `spanlake-engine` only.
#![warn(missing_docs)]

pub mod admin;
pub mod aggregate;
mod engine;
mod error;
pub mod flight;
pub mod format;
pub mod functions;
pub mod http;
pub mod jaeger;
pub mod lookup;
pub mod memory;
pub mod pg;
pub mod provider;
pub mod replay;
pub mod stats;
pub mod tempo;
pub mod trace;
pub mod trace_group;
pub mod trace_key;

pub use engine::{
    EngineFor, QueryConfig, QueryEngine, QueryMetrics, QueryResult, check_read_only,
    check_read_only_statement,
};
pub use error::{Error, Result};
