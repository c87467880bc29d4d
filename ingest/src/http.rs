//! OTLP/HTTP: `POST /v1/traces` with `application/x-protobuf` or `application/json` bodies,
//! optionally `Content-Encoding: gzip` or `zstd`.
//!
//! Answers follow the OTLP/HTTP specification: 200 with an `ExportTraceServiceResponse` (with
//! partial success when spans were rejected or cut) in the request's encoding; 400 with a
//! `google.rpc.Status` body for malformed requests; 413 for bodies over the limits (the
//! decompressed size is capped while inflating); 415 for other content types or encodings;
//! 429 (memory budget or WAL queue full) or 503 (storage unavailable, shutting down) with
//! `Retry-After` when the client should retry.

use std::io::Read as _;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use prost::Message as _;
use spanlake_engine::ErrorKind;
use spanlake_engine::layout::DEFAULT_PROJECT;
use spanlake_proto::Status;

use crate::error::{Error, Result};
use crate::grpc::Project;
use crate::service::{Encoding, IngestService};

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

/// The OTLP/HTTP routes.
pub fn router(service: IngestService) -> Router {
    let limit = service.limits().max_request_bytes;
    Router::new()
        .route("/v1/traces", post(export))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(service)
}

async fn export(
    State(service): State<IngestService>,
    project: Option<axum::Extension<Project>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let encoding = match mime {
        PROTOBUF => Encoding::Protobuf,
        JSON => Encoding::Json,
        _ => {
            service.count_invalid();
            let e = Error::UnsupportedMediaType { content_type };
            return error_response(&e, Encoding::Json);
        }
    };
    let project = project.map_or_else(|| Arc::from(DEFAULT_PROJECT), |p| Arc::clone(&p.0.0));
    match handle(&service, project, &headers, body, encoding).await {
        Ok(resp) => resp,
        Err(e) => {
            if e.kind() == ErrorKind::InvalidInput && !matches!(e, Error::Decode(_)) {
                service.count_invalid();
            }
            error_response(&e, encoding)
        }
    }
}

async fn handle(
    service: &IngestService,
    project: Arc<str>,
    headers: &HeaderMap,
    body: Bytes,
    encoding: Encoding,
) -> Result<Response> {
    let limit = service.limits().max_decompressed_bytes;
    let content_encoding =
        headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    let body = match content_encoding.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => body,
        "gzip" | "x-gzip" => Bytes::from(inflate_capped(
            flate2::read::MultiGzDecoder::new(&body[..]),
            "gzip",
            limit,
        )?),
        "zstd" => {
            let decoder = zstd::stream::read::Decoder::new(&body[..])
                .map_err(|source| Error::Decompress { encoding: "zstd", source })?;
            Bytes::from(inflate_capped(decoder, "zstd", limit)?)
        }
        other => return Err(Error::UnsupportedEncoding { encoding: other.to_string() }),
    };
    let resp = service.export_bytes(project, body, encoding).await?;
    Ok(match encoding {
        Encoding::Protobuf => {
            ([(header::CONTENT_TYPE, PROTOBUF)], resp.encode_to_vec()).into_response()
        }
        Encoding::Json => (
            [(header::CONTENT_TYPE, JSON)],
            serde_json::to_vec(&resp).unwrap_or_else(|_| b"{}".to_vec()),
        )
            .into_response(),
    })
}

/// Inflates a compressed body, refusing it as soon as it grows past `limit` bytes.
fn inflate_capped(
    decoder: impl std::io::Read,
    encoding: &'static str,
    limit: usize,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|source| Error::Decompress { encoding, source })?;
    if out.len() > limit {
        return Err(Error::BodyTooLarge { limit, decompressed: true });
    }
    Ok(out)
}

/// The HTTP status, `google.rpc.Code` and retryability of an ingest error.
fn status_of(e: &Error) -> (StatusCode, i32) {
    match e {
        Error::UnsupportedMediaType { .. } | Error::UnsupportedEncoding { .. } => {
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, 3)
        }
        Error::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, 8),
        Error::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, 16),
        _ => match e.kind() {
            ErrorKind::InvalidInput => (StatusCode::BAD_REQUEST, 3),
            ErrorKind::Overloaded => (StatusCode::TOO_MANY_REQUESTS, 8),
            ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, 14),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, 13),
        },
    }
}

fn error_response(e: &Error, encoding: Encoding) -> Response {
    let (status, code) = status_of(e);
    let body = Status { code, message: spanlake_engine::chain(e), details: vec![] };
    let mut resp = match encoding {
        Encoding::Protobuf => {
            (status, [(header::CONTENT_TYPE, PROTOBUF)], body.encode_to_vec()).into_response()
        }
        Encoding::Json => {
            (status, [(header::CONTENT_TYPE, JSON)], serde_json::to_vec(&body).unwrap_or_default())
                .into_response()
        }
    };
    if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn gzip_bomb_is_refused_without_inflating_it_all() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![0u8; 10 << 20]).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 64 << 10);
        let err = inflate_capped(flate2::read::MultiGzDecoder::new(&bomb[..]), "gzip", 1 << 20)
            .unwrap_err();
        assert_eq!(err.to_string(), "request body larger than 1048576 bytes after decompression");
        let err = inflate_capped(flate2::read::MultiGzDecoder::new(&bomb[..100]), "gzip", 1 << 30)
            .unwrap_err();
        assert!(err.to_string().starts_with("invalid gzip body"), "{err}");
    }
}
