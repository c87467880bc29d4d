//! `POST /v1/sql`: `{"sql": "SELECT ..."}` in, the result out as JSON (default), CSV
//! (`Accept: text/csv`) or an Arrow IPC stream (`Accept: application/vnd.apache.arrow.stream`).
//! Errors are `{"error": "..."}` with 400 for bad or refused SQL, 429 when resources run out,
//! and 500 only for failures of spanlake itself.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use spanlake_engine::ErrorKind;

use crate::engine::QueryEngine;
use crate::error::Error;
use crate::format::{Format, encode};

/// Body of `POST /v1/sql`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    /// One SQL statement.
    pub sql: String,
}

/// The SQL routes.
pub fn router(engine: Arc<QueryEngine>) -> Router {
    Router::new().route("/v1/sql", post(sql)).with_state(engine)
}

fn negotiate(headers: &HeaderMap) -> Format {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if accept.contains("application/vnd.apache.arrow.stream") {
        Format::Arrow
    } else if accept.contains("text/csv") {
        Format::Csv
    } else {
        Format::Json
    }
}

async fn sql(
    State(engine): State<Arc<QueryEngine>>,
    headers: HeaderMap,
    body: Result<Json<SqlRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(rejection) => {
            let msg = format!(
                "invalid request body: {}; expected {{\"sql\": \"...\"}}",
                rejection.body_text()
            );
            return error_body(StatusCode::BAD_REQUEST, &msg);
        }
    };
    let format = negotiate(&headers);
    let result = match engine.sql(&req.sql).await {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    match encode(&result, format) {
        Ok(bytes) => ([(header::CONTENT_TYPE, format.content_type())], bytes).into_response(),
        Err(e) => error_response(&e),
    }
}

/// The HTTP answer for a query error.
pub fn error_response(e: &Error) -> Response {
    let status = match e.kind() {
        ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(error = %e, "query failed");
    }
    error_body(status, &spanlake_engine::chain(e))
}

fn error_body(status: StatusCode, msg: &str) -> Response {
    (status, Json(serde_json::json!({ "error": msg }))).into_response()
}
