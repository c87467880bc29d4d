//! OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export`.
//!
//! Accepts gzip and zstd request compression. Answers: OK with partial success when spans were
//! rejected or cut; `INVALID_ARGUMENT` for malformed requests; `UNAVAILABLE` (retryable by every
//! OTLP exporter) when the server is overloaded or stopping; `RESOURCE_EXHAUSTED` from tonic
//! for messages over the size limit.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use prost::Message as _;
use spanlake_engine::ErrorKind;
use spanlake_engine::layout::DEFAULT_PROJECT;
use spanlake_proto::collector::ExportTraceServiceResponse;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::service::{Encoding, IngestService};

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The OTLP trace service over gRPC.
///
/// tonic's generated server would decode each request into `prost` structs; this one hands the
/// message's bytes to the ingest service, which reads spans in place, as it does for OTLP/HTTP.
#[derive(Debug, Clone)]
pub struct TraceServer {
    service: IngestService,
}

/// A tonic service for the OTLP trace endpoint.
pub fn trace_server(service: IngestService) -> TraceServer {
    TraceServer { service }
}

impl NamedService for TraceServer {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl<B> Service<http::Request<B>> for TraceServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != EXPORT_PATH {
            let status = Status::unimplemented(format!("no method {}", req.uri().path()));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let max = self.service.limits().max_decompressed_bytes;
        let export = Export(self.service.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RequestBytes)
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max);
            Ok(grpc.unary(export, req).await)
        })
    }
}

struct Export(IngestService);

impl UnaryService<Bytes> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<Response<Self::Response>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move {
            let project = request
                .extensions()
                .get::<Project>()
                .map_or_else(|| Arc::from(DEFAULT_PROJECT), |p| Arc::clone(&p.0));
            let result = service.export_bytes(project, request.into_inner(), Encoding::Protobuf);
            result.await.map(Response::new).map_err(|e| status_of(&e))
        })
    }
}

/// Requests are taken as their (decompressed) bytes; answers are encoded with `prost`.
#[derive(Debug, Clone, Copy, Default)]
struct RequestBytes;

impl Codec for RequestBytes {
    type Encode = ExportTraceServiceResponse;
    type Decode = Bytes;
    type Encoder = RequestBytes;
    type Decoder = RequestBytes;

    fn encoder(&mut self) -> Self::Encoder {
        RequestBytes
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestBytes
    }
}

impl Encoder for RequestBytes {
    type Item = ExportTraceServiceResponse;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf).map_err(|e| Status::internal(format!("encoding the answer: {e}")))
    }
}

impl Decoder for RequestBytes {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
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

/// The project a request belongs to, set as a request extension by an authenticating layer.
#[derive(Debug, Clone)]
pub struct Project(pub Arc<str>);
