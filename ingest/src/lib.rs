//! OTLP receivers and the normalisation of AI-agent spans.
//!
//! * [`normalize`] turns an OTLP `ExportTraceServiceRequest` into `spans` rows, reading AI
//!   attributes from the OpenTelemetry GenAI, OpenInference and OpenLLMetry conventions;
//! * [`service::IngestService`] is the transport-independent export path (normalise, admit to the
//!   engine's buffer, answer with OTLP partial success);
//! * [`grpc`] and [`http`] are the OTLP/gRPC and OTLP/HTTP front ends.
//!
//! Depends on `spanlake-proto` for wire types and `spanlake-engine` for rows and buffers.

mod error;
pub mod grpc;
pub mod http;
pub mod normalize;
pub mod service;

pub use error::{Error, Result};
