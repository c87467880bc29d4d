//! OTLP/HTTP: `POST /v1/traces` with `application/x-protobuf` or `application/json` bodies,
//! optionally `Content-Encoding: gzip`.
//!
//! Answers follow the OTLP/HTTP specification: 200 with an `ExportTraceServiceResponse` (with
//! partial success when spans were rejected) in the request's encoding; 400 with a
//! `google.rpc.Status` body for malformed requests; 413 for bodies over the limit; 415 for other
//! content types; 429 (buffer full) or 503 (shutting down) with `Retry-After` when the client
//! should retry.

use std::io::Read as _;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use prost::Message as _;
use spanlake_engine::ErrorKind;
use spanlake_proto::Status;

use crate::error::{Error, Result};
use crate::service::IngestService;

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Encoding {
    Protobuf,
    Json,
}

/// The OTLP/HTTP routes.
pub fn router(service: IngestService) -> Router {
    let limit = service.limits().max_request_bytes;
    Router::new()
        .route("/v1/traces", post(export))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(service)
}

async fn export(State(service): State<IngestService>, headers: HeaderMap, body: Bytes) -> Response {
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
    match handle(&service, &headers, &body, encoding) {
        Ok(resp) => resp,
        Err(e) => {
            if e.kind() == ErrorKind::InvalidInput {
                service.count_invalid();
            }
            error_response(&e, encoding)
        }
    }
}

fn handle(service: &IngestService, headers: &HeaderMap, body: &Bytes, encoding: Encoding) -> Result<Response> {
    let limit = service.limits().max_request_bytes;
    let content_encoding =
        headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    let inflated;
    let bytes: &[u8] = match content_encoding.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => body,
        "gzip" | "x-gzip" => {
            inflated = gunzip_capped(body, limit)?;
            &inflated
        }
        other => return Err(Error::UnsupportedEncoding { encoding: other.to_string() }),
    };
    let req = match encoding {
        Encoding::Protobuf => spanlake_proto::decode_protobuf(bytes)?,
        Encoding::Json => spanlake_proto::decode_json(bytes)?,
    };
    let resp = service.export(&req)?;
    Ok(match encoding {
        Encoding::Protobuf => ([(header::CONTENT_TYPE, PROTOBUF)], resp.encode_to_vec()).into_response(),
        Encoding::Json => (
            [(header::CONTENT_TYPE, JSON)],
            serde_json::to_vec(&resp).unwrap_or_else(|_| b"{}".to_vec()),
        )
            .into_response(),
    })
}

/// Inflates a gzip body, refusing it as soon as it grows past `limit` bytes.
fn gunzip_capped(body: &[u8], limit: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    let decoder = flate2::read::MultiGzDecoder::new(body);
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|source| Error::Decompress { source })?;
    if out.len() > limit {
        return Err(Error::BodyTooLarge { limit, decompressed: true });
    }
    Ok(out)
}

fn error_response(e: &Error, encoding: Encoding) -> Response {
    let (status, code) = match e {
        Error::UnsupportedMediaType { .. } | Error::UnsupportedEncoding { .. } => {
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, 3)
        }
        Error::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, 3),
        _ => match e.kind() {
            ErrorKind::InvalidInput => (StatusCode::BAD_REQUEST, 3),
            ErrorKind::Overloaded => (StatusCode::TOO_MANY_REQUESTS, 8),
            ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, 14),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, 13),
        },
    };
    let body = Status { code, message: e.to_string(), details: vec![] };
    let mut resp = match encoding {
        Encoding::Protobuf => (status, [(header::CONTENT_TYPE, PROTOBUF)], body.encode_to_vec()).into_response(),
        Encoding::Json => (
            status,
            [(header::CONTENT_TYPE, JSON)],
            serde_json::to_vec(&body).unwrap_or_default(),
        )
            .into_response(),
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
        let err = gunzip_capped(&bomb, 1 << 20).unwrap_err();
        assert!(matches!(err, Error::BodyTooLarge { limit: 1048576, decompressed: true }), "{err}");
        assert_eq!(err.to_string(), "request body larger than 1048576 bytes after decompression");
    }

    #[test]
    fn truncated_gzip_is_an_error() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"hello world, hello world").unwrap();
        let gz = enc.finish().unwrap();
        let err = gunzip_capped(&gz[..gz.len() / 2], 1 << 20).unwrap_err();
        assert!(err.to_string().starts_with("invalid gzip body"), "{err}");
    }
}
