//! Wire formats spanlake speaks.
//!
//! OTLP trace messages come from `opentelemetry-proto` (generated prost/tonic code kept in step
//! with the OpenTelemetry specification, with the OTLP/JSON mapping: hex ids, 64-bit integers as
//! strings or numbers, enums as integers). This crate adds the decoding entry points with
//! spanlake's errors and the `google.rpc.Status` message that OTLP/HTTP uses for error bodies.
//! No business logic lives here.

pub mod view;

pub use opentelemetry_proto::tonic::collector::trace::v1 as collector;
pub use opentelemetry_proto::tonic::common::v1 as common;
pub use opentelemetry_proto::tonic::resource::v1 as resource;
pub use opentelemetry_proto::tonic::trace::v1 as trace;

use collector::ExportTraceServiceRequest;
use prost::Message;

/// Errors decoding wire messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are not a valid protobuf message.
    #[error("invalid OTLP protobuf: {source}")]
    Protobuf {
        /// The cause.
        #[source]
        source: prost::DecodeError,
    },
    /// The bytes are not a valid OTLP trace request (read in place).
    #[error("invalid OTLP protobuf: {source}")]
    Wire {
        /// The field and the problem.
        #[source]
        source: view::DecodeError,
    },
    /// The bytes are not valid OTLP/JSON.
    #[error("invalid OTLP JSON at line {line} column {column}: {source}")]
    Json {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Decodes an `ExportTraceServiceRequest` from protobuf bytes.
pub fn decode_protobuf(bytes: &[u8]) -> Result<ExportTraceServiceRequest> {
    ExportTraceServiceRequest::decode(bytes).map_err(|source| Error::Protobuf { source })
}

/// Decodes an `ExportTraceServiceRequest` from protobuf bytes in place, borrowing its strings
/// and ids (see [`view`]).
pub fn decode_view(bytes: &[u8]) -> Result<view::ExportRequest<'_>> {
    view::decode(bytes).map_err(|source| Error::Wire { source })
}

/// Decodes an `ExportTraceServiceRequest` from OTLP/JSON bytes.
pub fn decode_json(bytes: &[u8]) -> Result<ExportTraceServiceRequest> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json {
        line: source.line(),
        column: source.column(),
        source,
    })
}

/// `google.rpc.Status`: the body of an OTLP/HTTP error answer.
#[derive(Clone, PartialEq, Message, serde::Serialize)]
pub struct Status {
    /// A `google.rpc.Code` value.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// What went wrong, for people.
    #[prost(string, tag = "2")]
    pub message: String,
    /// Error details (unused by spanlake).
    #[prost(message, repeated, tag = "3")]
    #[serde(skip)]
    pub details: Vec<prost_types::Any>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_protobuf_errors_name_the_problem() {
        let e = decode_json(b"{\"resourceSpans\": 5}").unwrap_err();
        assert!(e.to_string().starts_with("invalid OTLP JSON at line 1 column"), "{e}");
        let e = decode_protobuf(&[0x0a, 0xff, 0xff]).unwrap_err();
        assert!(e.to_string().starts_with("invalid OTLP protobuf"), "{e}");
    }

    #[test]
    fn json_accepts_int64_as_string_or_number() {
        let json = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{
            "traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708",
            "name":"s","kind":2,"startTimeUnixNano":"1000","endTimeUnixNano":2000,
            "attributes":[{"key":"n","value":{"intValue":"42"}},{"key":"m","value":{"intValue":7}}]}]}]}]}"#;
        let req = decode_json(json).unwrap();
        let span = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.trace_id.len(), 16);
        assert_eq!(span.start_time_unix_nano, 1000);
        assert_eq!(span.end_time_unix_nano, 2000);
        assert_eq!(span.kind, 2);
        assert_eq!(span.attributes.len(), 2);
    }
}
