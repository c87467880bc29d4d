//! `POST /v1/sql`: `{"sql": "SELECT ..."}` in, the result out as JSON (default), CSV
//! (`Accept: text/csv`) or an Arrow IPC stream (`Accept: application/vnd.apache.arrow.stream`).
//! Errors are `{"error": "..."}` with 400 for bad or refused SQL, 429 when resources run out,
//! and 500 only for failures of spanlake itself.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use spanlake_engine::{Engine, ErrorKind};

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

/// The SQL and trace routes.
pub fn router(engine: Arc<QueryEngine>) -> Router {
    Router::new()
        .route("/v1/sql", post(sql))
        .route("/v1/traces/{trace_id}", get(trace))
        .route("/v1/traces/{trace_id}/replay", get(replay))
        .with_state(engine)
}

/// Operator routes: `POST /v1/admin/delete` with `{"where": "<SQL condition>", "project": …}`.
pub fn admin_router(query: Arc<QueryEngine>, engine: Arc<Engine>) -> Router {
    Router::new().route("/v1/admin/delete", post(delete)).with_state((query, engine))
}

async fn trace(State(engine): State<Arc<QueryEngine>>, Path(trace_id): Path<String>) -> Response {
    match crate::trace::trace_tree(&engine, &trace_id).await {
        Ok(Some(tree)) => Json(tree).into_response(),
        Ok(None) => error_body(
            StatusCode::NOT_FOUND,
            &format!("trace {} not found", trace_id.to_ascii_lowercase()),
        ),
        Err(e) => error_response(&e),
    }
}

async fn replay(State(engine): State<Arc<QueryEngine>>, Path(trace_id): Path<String>) -> Response {
    match crate::replay::replay_bundle(&engine, &trace_id).await {
        Ok(Some(bundle)) => Json(bundle).into_response(),
        Ok(None) => error_body(
            StatusCode::NOT_FOUND,
            &format!("trace {} not found", trace_id.to_ascii_lowercase()),
        ),
        Err(e) => error_response(&e),
    }
}

/// Body of `POST /v1/admin/delete`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    /// A SQL condition over the `spans` columns, e.g. `user_id = 'u-42'`.
    #[serde(rename = "where")]
    pub predicate: String,
    /// Only this project's spans (all projects when absent).
    #[serde(default)]
    pub project: Option<String>,
}

async fn delete(
    State((query, engine)): State<(Arc<QueryEngine>, Arc<Engine>)>,
    body: Result<Json<DeleteRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(rejection) => {
            let msg = format!(
                "invalid request body: {}; expected {{\"where\": \"<SQL condition>\"}}",
                rejection.body_text()
            );
            return error_body(StatusCode::BAD_REQUEST, &msg);
        }
    };
    match crate::admin::delete_where(&engine, &query, req.project.as_deref(), &req.predicate).await
    {
        Ok(report) => Json(report).into_response(),
        Err(e) => error_response(&e),
    }
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
