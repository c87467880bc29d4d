//! spanlake's storage engine.
//!
//! Owns everything between a normalised span and a Parquet file on an object store:
//!
//! * [`schema`] — the `spans` table, the public contract of spanlake;
//! * [`record::SpanRecord`] and [`batch::SpanBatchBuilder`] — one normalised span, and Arrow
//!   batches built from them;
//! * [`budget`] — the memory budget every byte held before Parquet is charged to;
//! * [`wal`] — the write-ahead log with group commit, and its recovery;
//! * [`store::SpanStore`] — the committed Parquet files and the in-memory data not yet flushed,
//!   as one consistent [`store::Snapshot`] for readers;
//! * [`writer`] and [`layout`] — Parquet encoding and where files go;
//! * [`catalog`] — the versioned list of committed files with their stats, in the object store;
//! * [`trace_index`] — per-file trace id filters: a trace found by id alone, whatever its time;
//! * [`compaction`] — merging small files, retention and deletion by rewriting files;
//! * [`engine::Engine`] — the running pieces wired together: ingest, flush, recovery, shutdown;
//! * [`objstore`] — data locations by URL (local disk, S3, GCS, Azure), with request accounting;
//! * [`pricing`] — the model price table used to derive `cost_usd`;
//! * [`metrics`] — counters and histograms rendered by the binary's `/metrics` endpoint.
//!
//! This crate depends on no other spanlake crate: its API speaks Arrow and its own types.
#![warn(missing_docs)]

pub mod batch;
pub mod budget;
pub mod catalog;
pub mod compaction;
pub mod crash;
pub mod engine;
mod error;
pub mod layout;
pub mod metrics;
pub mod objstore;
pub mod pricing;
pub mod record;
pub mod schema;
pub mod store;
pub mod task;
pub mod trace_index;
pub mod wal;
mod worker;
pub mod writer;

pub use engine::{Engine, EngineConfig};
pub use error::{Error, ErrorKind, Result, chain, on_cpu};
