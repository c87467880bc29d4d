//! Tempo's trace-by-id endpoints, so that Grafana's Tempo data source opens a trace (for
//! example from a trace id link in a SQL dashboard):
//!
//! * `GET /api/v2/traces/{id}` → `{"trace": {"resourceSpans": [...]}}` in OTLP/JSON, or with
//!   `Accept: application/protobuf` Tempo's `TraceByIDResponse` (field 1: the trace, whose field
//!   1 is the repeated `ResourceSpans`);
//! * `GET /api/traces/{id}` with `Accept: application/protobuf` → the trace (repeated
//!   `ResourceSpans`, the wire layout of OTLP `TracesData`); the JSON form of this path is
//!   Jaeger's (see [`crate::jaeger`]), and `/tempo/api/traces/{id}` answers Tempo's
//!   `{"batches": [...]}`;
//! * `GET /api/echo` → `echo` (the data source's health check).
//!
//! Everything is also served under `/tempo/...` for a data source URL that names it. Spans come
//! back as OTLP as they were received: ids, times, kind, status, attributes with their types,
//! events, links, resource and scope, grouped by resource and scope.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, TracesData, span, status,
};
use prost::Message;
use serde_json::{Map, Value, json};
use spanlake_engine::schema::col;

use crate::engine::QueryEngine;
use crate::trace::{parse_trace_id, trace_spans};

/// Tempo's `TraceByIDResponse`: the trace in field 1.
#[derive(Clone, PartialEq, prost::Message)]
struct TraceByIdResponse {
    #[prost(message, optional, tag = "1")]
    trace: Option<TracesData>,
}

/// The Tempo routes.
pub fn router(engine: Arc<QueryEngine>) -> Router {
    let api = Router::new()
        .route("/api/echo", get(|| async { "echo" }))
        .route("/api/v2/traces/{trace_id}", get(trace_v2))
        .with_state(Arc::clone(&engine));
    let tempo_v1 = Router::new().route("/api/traces/{trace_id}", get(trace_v1)).with_state(engine);
    Router::new().nest("/tempo", api.clone().merge(tempo_v1)).merge(api)
}

fn wants_protobuf(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/protobuf") || a.contains("application/x-protobuf"))
}

/// The trace as OTLP, `None` when unknown; errors already as responses.
async fn load(engine: &QueryEngine, trace_id: &str) -> Result<TracesData, Response> {
    let err = |status: StatusCode, msg: String| {
        (status, axum::Json(json!({"error": msg}))).into_response()
    };
    let id = parse_trace_id(trace_id).map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    let spans = trace_spans(engine, &id).await.map_err(|e| crate::http::error_response(&e))?;
    if spans.is_empty() {
        return Err(err(StatusCode::NOT_FOUND, format!("trace {id} not found")));
    }
    Ok(to_otlp(&spans))
}

async fn trace_v2(
    State(engine): State<Arc<QueryEngine>>,
    Path(trace_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let trace = match load(&engine, &trace_id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    if wants_protobuf(&headers) {
        let body = TraceByIdResponse { trace: Some(trace) }.encode_to_vec();
        ([(header::CONTENT_TYPE, "application/protobuf")], body).into_response()
    } else {
        axum::Json(json!({"trace": trace})).into_response()
    }
}

/// `/api/traces/{id}` in Tempo's own form (`/tempo/...`, and the protobuf answer of the root
/// path).
pub async fn trace_v1(
    State(engine): State<Arc<QueryEngine>>,
    Path(trace_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let trace = match load(&engine, &trace_id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    if wants_protobuf(&headers) {
        ([(header::CONTENT_TYPE, "application/protobuf")], trace.encode_to_vec()).into_response()
    } else {
        axum::Json(json!({"batches": trace.resource_spans})).into_response()
    }
}

/// Whether a request for `/api/traces/{id}` is Tempo's (protobuf) rather than Jaeger's (JSON).
pub fn is_tempo_request(headers: &HeaderMap) -> bool {
    wants_protobuf(headers)
}

fn any_value(v: &Value) -> AnyValue {
    use any_value::Value as V;
    let value = match v {
        Value::Null => None,
        Value::Bool(b) => Some(V::BoolValue(*b)),
        Value::Number(n) => Some(match n.as_i64() {
            Some(i) => V::IntValue(i),
            None => V::DoubleValue(n.as_f64().unwrap_or(0.0)),
        }),
        Value::String(s) => Some(V::StringValue(s.clone())),
        Value::Array(a) => {
            Some(V::ArrayValue(ArrayValue { values: a.iter().map(any_value).collect() }))
        }
        Value::Object(o) => Some(V::KvlistValue(KeyValueList { values: key_values(o) })),
    };
    AnyValue { value }
}

fn key_values(m: &Map<String, Value>) -> Vec<KeyValue> {
    m.iter()
        .map(|(k, v)| KeyValue { key: k.clone(), value: Some(any_value(v)), ..Default::default() })
        .collect()
}

fn object<'a>(row: &'a Map<String, Value>, key: &str) -> Option<&'a Map<String, Value>> {
    row.get(key).and_then(Value::as_object)
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

fn nanos(row: &Map<String, Value>, key: &str) -> u64 {
    row.get(key)
        .and_then(Value::as_str)
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .and_then(|t| t.timestamp_nanos_opt())
        .map_or(0, |n| n.max(0) as u64)
}

fn kind(text: &str) -> span::SpanKind {
    match text {
        "internal" => span::SpanKind::Internal,
        "server" => span::SpanKind::Server,
        "client" => span::SpanKind::Client,
        "producer" => span::SpanKind::Producer,
        "consumer" => span::SpanKind::Consumer,
        _ => span::SpanKind::Unspecified,
    }
}

/// A scope (as stored, JSON) and its spans.
type ScopeGroup = (Value, Vec<Span>);

/// Rows of one trace (as [`trace_spans`] returns them) as OTLP, grouped by resource and scope.
pub fn to_otlp(spans: &[Map<String, Value>]) -> TracesData {
    let mut resources: Vec<(Value, Vec<ScopeGroup>)> = Vec::new();
    for s in spans {
        let text = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        let mut resource = s.get(col::RESOURCE_ATTRIBUTES).cloned().unwrap_or(json!({}));
        if let Some(r) = resource.as_object_mut()
            && !r.contains_key("service.name")
            && !text(col::SERVICE_NAME).is_empty()
        {
            r.insert("service.name".into(), Value::String(text(col::SERVICE_NAME)));
        }
        let scope = s.get(col::SCOPE).cloned().unwrap_or(json!({}));
        let events = s
            .get(col::EVENTS)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|e| span::Event {
                time_unix_nano: e.get("time_unix_nano").and_then(Value::as_u64).unwrap_or(0),
                name: e.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
                attributes: e
                    .get("attributes")
                    .and_then(Value::as_object)
                    .map(key_values)
                    .unwrap_or_default(),
                ..Default::default()
            })
            .collect();
        let links = s
            .get(col::LINKS)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|l| span::Link {
                trace_id: hex(l.get("trace_id").and_then(Value::as_str).unwrap_or_default()),
                span_id: hex(l.get("span_id").and_then(Value::as_str).unwrap_or_default()),
                trace_state: l
                    .get("trace_state")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                attributes: l
                    .get("attributes")
                    .and_then(Value::as_object)
                    .map(key_values)
                    .unwrap_or_default(),
                ..Default::default()
            })
            .collect();
        let code = match text(col::STATUS_CODE).as_str() {
            "ok" => status::StatusCode::Ok,
            "error" => status::StatusCode::Error,
            _ => status::StatusCode::Unset,
        };
        let otlp = Span {
            trace_id: hex(&text(col::TRACE_ID)),
            span_id: hex(&text(col::SPAN_ID)),
            trace_state: text(col::TRACE_STATE),
            parent_span_id: hex(&text(col::PARENT_SPAN_ID)),
            name: text(col::NAME),
            kind: kind(&text(col::KIND)) as i32,
            start_time_unix_nano: nanos(s, col::START_TIME),
            end_time_unix_nano: nanos(s, col::END_TIME),
            attributes: object(s, col::ATTRIBUTES).map(key_values).unwrap_or_default(),
            events,
            links,
            status: Some(Status { message: text(col::STATUS_MESSAGE), code: code as i32 }),
            ..Default::default()
        };
        let r = match resources.iter().position(|(r, _)| *r == resource) {
            Some(i) => i,
            None => {
                resources.push((resource, Vec::new()));
                resources.len() - 1
            }
        };
        let scopes = &mut resources[r].1;
        match scopes.iter_mut().find(|(sc, _)| *sc == scope) {
            Some((_, spans)) => spans.push(otlp),
            None => scopes.push((scope, vec![otlp])),
        }
    }
    TracesData {
        resource_spans: resources
            .into_iter()
            .map(|(resource, scopes)| ResourceSpans {
                resource: Some(Resource {
                    attributes: resource.as_object().map(key_values).unwrap_or_default(),
                    ..Default::default()
                }),
                scope_spans: scopes
                    .into_iter()
                    .map(|(scope, spans)| ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: scope
                                .get("name")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                            version: scope
                                .get("version")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                            ..Default::default()
                        }),
                        spans,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
    }
}
