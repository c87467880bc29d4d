//! OTLP receivers and the normalisation of AI-agent spans.
//!
//! * [`normalize`] turns an OTLP `ExportTraceServiceRequest` into a batch of the `spans`
//!   table, reading AI attributes from the OpenTelemetry GenAI, OpenInference and OpenLLMetry
//!   conventions;
//! * [`json`] writes attribute maps as JSON text under the [`limits`];
//! * [`service::IngestService`] is the transport-independent export path (decode, normalise,
//!   store through the engine, answer with OTLP partial success);
//! * [`grpc`] and [`http`] are the OTLP/gRPC and OTLP/HTTP front ends.
//!
//! Depends on `spanlake-proto` for wire types and `spanlake-engine` for batches and storage.

mod error;
pub mod grpc;
pub mod http;
pub mod json;
pub mod limits;
pub mod normalize;
pub mod redact;
pub mod service;

pub use error::{Error, Result};
