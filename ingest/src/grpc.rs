//! OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export`.
//!
//! Accepts gzip and zstd request compression. Answers: OK with partial success when spans were
//! rejected or cut; `INVALID_ARGUMENT` for malformed requests; `UNAVAILABLE` (retryable by every
//! OTLP exporter) when the server is overloaded or stopping; `RESOURCE_EXHAUSTED` from tonic
//! for messages over the size limit.

use std::sync::Arc;

use spanlake_engine::ErrorKind;
use spanlake_engine::layout::DEFAULT_PROJECT;
use spanlake_proto::collector::trace_service_server::{TraceService, TraceServiceServer};
use spanlake_proto::collector::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::service::IngestService;

/// The gRPC trace service.
#[derive(Debug, Clone)]
pub struct GrpcTraceService {
    service: IngestService,
}

/// A tonic service for the OTLP trace endpoint.
pub fn trace_server(service: IngestService) -> TraceServiceServer<GrpcTraceService> {
    let max = service.limits().max_decompressed_bytes;
    TraceServiceServer::new(GrpcTraceService { service })
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max)
}

/// The gRPC status for an ingest error.
pub fn status_of(e: &Error) -> Status {
    let msg = spanlake_engine::chain(e);
    match e {
        Error::Unauthorized { .. } => return Status::unauthenticated(msg),
        Error::BodyTooLarge { .. } => return Status::resource_exhausted(msg),
        _ => {}
    }
    match e.kind() {
        ErrorKind::InvalidInput => Status::invalid_argument(msg),
        // UNAVAILABLE is retryable for every OTLP exporter without further details.
        ErrorKind::Overloaded | ErrorKind::Unavailable => Status::unavailable(msg),
        _ => Status::internal(msg),
    }
}

#[tonic::async_trait]
impl TraceService for GrpcTraceService {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let project = request
            .extensions()
            .get::<Project>()
            .map_or_else(|| Arc::from(DEFAULT_PROJECT), |p| Arc::clone(&p.0));
        let result = self.service.export(project, request.into_inner()).await;
        result.map(Response::new).map_err(|e| status_of(&e))
    }
}

/// The project a request belongs to, set as a request extension by an authenticating layer.
#[derive(Debug, Clone)]
pub struct Project(pub Arc<str>);
