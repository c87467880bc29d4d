//! OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export`.

use spanlake_engine::ErrorKind;
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

/// A tonic service for the OTLP trace endpoint, accepting gzip and zstd request compression
/// and messages up to the service's request limit.
pub fn trace_server(service: IngestService) -> TraceServiceServer<GrpcTraceService> {
    let max = service.limits().max_request_bytes;
    TraceServiceServer::new(GrpcTraceService { service })
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max)
}

/// The gRPC status for an ingest error.
pub fn status_of(e: &Error) -> Status {
    let msg = e.to_string();
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
        self.service.export(request.get_ref()).map(Response::new).map_err(|e| status_of(&e))
    }
}
