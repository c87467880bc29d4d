//! The Jaeger query HTTP API, so that the Jaeger UI and Grafana's Jaeger data source browse
//! spanlake's traces.
//!
//! * `GET /api/services` → `{"data": ["svc", ...], "total": n}`
//! * `GET /api/services/{service}/operations` → `{"data": ["op", ...]}`
//! * `GET /api/operations?service=S[&spanKind=K]` → `{"data": [{"name", "spanKind"}]}`
//! * `GET /api/traces?service=S[&operation=O][&tags={"k":"v"}][&minDuration=1.2s]
//!   [&maxDuration=…][&start=µs&end=µs | &lookback=1h][&limit=20]` → `{"data": [trace, ...]}`
//! * `GET /api/traces/{id}` → `{"data": [trace]}`, 404 with `errors` when unknown
//!
//! The shapes follow Jaeger's `model/json` (the UI's): a trace is
//! `{"traceID", "spans": [...], "processes": {"p1": {"serviceName", "tags"}}, "warnings"}`, a span
//! `{"traceID", "spanID", "operationName", "references": [{"refType": "CHILD_OF"|"FOLLOWS_FROM",
//! "traceID", "spanID"}], "startTime": µs, "duration": µs, "tags": [{"key", "type", "value"}],
//! "logs": [{"timestamp": µs, "fields": [...]}], "processID", "warnings", "flags"}`.
//!
//! Tags are the span's attributes, plus `span.kind`, `otel.status_code`, `error` and the AI
//! columns spanlake derived (`span_type`, `model`, `provider`, `input_tokens`, `output_tokens`,
//! `total_tokens`, `cost_usd`, `tool_name`, `agent_name`, `session_id`, `user_id`, and the
//! prompt and completion as `input` and `output`). Tag search (`tags={"k":"v"}`) matches those
//! columns by name, `error=true` by status, and any other key against the span's attribute.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};
use spanlake_engine::schema::col;

use crate::engine::QueryEngine;
use crate::error::{Error, Result};
use crate::trace::{parse_trace_id, trace_spans};

/// Columns shown as tags, and searchable by these names.
const COLUMN_TAGS: [&str; 13] = [
    col::SPAN_TYPE,
    col::MODEL,
    col::PROVIDER,
    col::INPUT_TOKENS,
    col::OUTPUT_TOKENS,
    col::TOTAL_TOKENS,
    col::COST_USD,
    col::TOOL_NAME,
    col::AGENT_NAME,
    col::SESSION_ID,
    col::USER_ID,
    col::INPUT,
    col::OUTPUT,
];

/// The Jaeger routes (mounted at `/api/...` and `/jaeger/api/...`).
pub fn router(engine: Arc<QueryEngine>) -> Router {
    let api = Router::new()
        .route("/api/services", get(services))
        .route("/api/services/{service}/operations", get(operations))
        .route("/api/operations", get(operations_by_query))
        .route("/api/traces", get(search))
        .route("/api/traces/{trace_id}", get(trace))
        .with_state(engine);
    Router::new().nest("/jaeger", api.clone()).merge(api)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn data(values: Vec<Value>) -> Response {
    let total = values.len();
    Json(json!({"data": values, "total": total, "limit": 0, "offset": 0, "errors": null}))
        .into_response()
}

fn failure(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"data": null, "total": 0, "limit": 0, "offset": 0,
                    "errors": [{"code": status.as_u16(), "msg": message}]})),
    )
        .into_response()
}

fn error(e: &Error) -> Response {
    let status = crate::http::error_response(e).status();
    failure(status, &spanlake_engine::chain(e))
}

async fn strings(engine: &QueryEngine, sql: &str) -> Result<Vec<Value>> {
    let result = engine.sql(sql).await?;
    let mut out = Vec::new();
    for b in &result.batches {
        let c = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)
            .map_err(|source| Error::Encode { source })?;
        let c = c.as_any().downcast_ref::<arrow::array::StringArray>().expect("utf8");
        out.extend(c.iter().flatten().map(|s| Value::String(s.to_string())));
    }
    Ok(out)
}

async fn services(State(engine): State<Arc<QueryEngine>>) -> Response {
    let sql = "SELECT DISTINCT service_name FROM spans WHERE service_name IS NOT NULL ORDER BY 1";
    match strings(&engine, sql).await {
        Ok(v) => data(v),
        Err(e) => error(&e),
    }
}

async fn operations(
    State(engine): State<Arc<QueryEngine>>,
    Path(service): Path<String>,
) -> Response {
    let sql = format!(
        "SELECT DISTINCT name FROM spans WHERE service_name = {} ORDER BY 1",
        quote(&service)
    );
    match strings(&engine, &sql).await {
        Ok(v) => data(v),
        Err(e) => error(&e),
    }
}

async fn operations_by_query(
    State(engine): State<Arc<QueryEngine>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let Some(service) = q.get("service") else {
        return failure(StatusCode::BAD_REQUEST, "parameter 'service' is required");
    };
    let mut sql = format!(
        "SELECT DISTINCT name || '\u{1}' || kind FROM spans WHERE service_name = {}",
        quote(service)
    );
    if let Some(kind) = q.get("spanKind").filter(|k| !k.is_empty()) {
        sql.push_str(&format!(" AND kind = {}", quote(kind)));
    }
    sql.push_str(" ORDER BY 1");
    match strings(&engine, &sql).await {
        Ok(v) => data(
            v.iter()
                .filter_map(Value::as_str)
                .map(|s| {
                    let (name, kind) = s.split_once('\u{1}').unwrap_or((s, ""));
                    json!({"name": name, "spanKind": kind})
                })
                .collect(),
        ),
        Err(e) => error(&e),
    }
}

/// A Jaeger duration (`1.2s`, `100ms`, `500us`, `1m`, `1h`) in milliseconds.
pub fn parse_duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = text.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "ns" => 1e-6,
        "us" | "µs" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(n * scale)
}

/// The `WHERE` clause of a trace search; errors name the bad parameter.
pub fn search_condition(q: &BTreeMap<String, String>, now_us: i64) -> Result<String> {
    let bad = |message: String| Error::BadRequest { message };
    let service = q
        .get("service")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("parameter 'service' is required".into()))?;
    let mut conds = vec![format!("service_name = {}", quote(service))];
    if let Some(op) = q.get("operation").filter(|o| !o.is_empty() && *o != "all") {
        conds.push(format!("name = {}", quote(op)));
    }
    let micros = |name: &str| -> Result<Option<i64>> {
        q.get(name)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| bad(format!("parameter '{name}' must be microseconds since 1970")))
            })
            .transpose()
    };
    let end = micros("end")?.unwrap_or(now_us);
    let start = match micros("start")? {
        Some(s) => s,
        None => {
            let lookback = q.get("lookback").filter(|l| !l.is_empty() && *l != "custom");
            let ms =
                lookback.map_or(Some(3_600_000.0), |l| parse_duration_ms(l)).ok_or_else(|| {
                    bad(format!("parameter 'lookback' is not a duration: {lookback:?}"))
                })?;
            end - (ms * 1e3) as i64
        }
    };
    conds.push(format!(
        "start_time BETWEEN to_timestamp_micros({start}) AND to_timestamp_micros({end})"
    ));
    for (param, op) in [("minDuration", ">="), ("maxDuration", "<=")] {
        if let Some(d) = q.get(param).filter(|d| !d.is_empty()) {
            let ms = parse_duration_ms(d)
                .ok_or_else(|| bad(format!("parameter '{param}' is not a duration: {d:?}")))?;
            conds.push(format!("duration_ms {op} {ms}"));
        }
    }
    if let Some(tags) = q.get("tags").filter(|t| !t.is_empty()) {
        let tags: Map<String, Value> = serde_json::from_str(tags)
            .map_err(|e| bad(format!("parameter 'tags' must be a JSON object of strings: {e}")))?;
        for (key, value) in tags {
            let value = match value {
                Value::String(s) => s,
                other => other.to_string(),
            };
            conds.push(if key == "error" {
                let cmp = if value == "true" { "=" } else { "<>" };
                format!("status_code {cmp} 'error'")
            } else if COLUMN_TAGS.contains(&key.as_str()) {
                format!("CAST({key} AS VARCHAR) = {}", quote(&value))
            } else {
                format!("json_as_text(attributes, {}) = {}", quote(&key), quote(&value))
            });
        }
    }
    Ok(conds.join(" AND "))
}

async fn search(
    State(engine): State<Arc<QueryEngine>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let limit: usize = match q.get("limit").filter(|l| !l.is_empty()).map(|l| l.parse()) {
        None => 20,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return failure(StatusCode::BAD_REQUEST, "parameter 'limit' must be a number");
        }
    };
    let now_us = chrono::Utc::now().timestamp_micros();
    let cond = match search_condition(&q, now_us) {
        Ok(c) => c,
        Err(e) => return error(&e),
    };
    let sql = format!(
        "SELECT trace_id FROM spans WHERE {cond} GROUP BY trace_id ORDER BY max(start_time) DESC LIMIT {limit}"
    );
    let ids = match strings(&engine, &sql).await {
        Ok(ids) => ids,
        Err(e) => return error(&e),
    };
    let mut traces = Vec::with_capacity(ids.len());
    for id in ids.iter().filter_map(Value::as_str) {
        match trace_spans(&engine, id).await {
            Ok(spans) if !spans.is_empty() => traces.push(to_jaeger(id, &spans)),
            Ok(_) => {}
            Err(e) => return error(&e),
        }
    }
    data(traces)
}

async fn trace(
    State(engine): State<Arc<QueryEngine>>,
    Path(trace_id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    // Grafana's Tempo data source asks this path for protobuf.
    if crate::tempo::is_tempo_request(&headers) {
        return crate::tempo::trace_v1(State(engine), Path(trace_id), headers).await;
    }
    let id = match parse_trace_id(&trace_id) {
        Ok(id) => id,
        Err(e) => return error(&e),
    };
    match trace_spans(&engine, &id).await {
        Ok(spans) if spans.is_empty() => {
            failure(StatusCode::NOT_FOUND, &format!("trace {id} not found"))
        }
        Ok(spans) => data(vec![to_jaeger(&id, &spans)]),
        Err(e) => error(&e),
    }
}

fn micros_of(row: &Map<String, Value>, key: &str) -> i64 {
    row.get(key)
        .and_then(Value::as_str)
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map_or(0, |t| t.timestamp_micros())
}

/// A Jaeger tag for a JSON value.
fn tag(key: &str, value: &Value) -> Value {
    let (ty, v) = match value {
        Value::Bool(b) => ("bool", Value::Bool(*b)),
        Value::Number(n) if n.is_i64() || n.is_u64() => ("int64", value.clone()),
        Value::Number(n) => ("float64", json!(n.as_f64())),
        Value::String(s) => ("string", Value::String(s.clone())),
        other => ("string", Value::String(other.to_string())),
    };
    json!({"key": key, "type": ty, "value": v})
}

fn tags_of(attributes: Option<&Value>) -> Vec<Value> {
    attributes
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| tag(k, v)).collect())
        .unwrap_or_default()
}

/// Spans of one trace (rows as [`trace_spans`] returns them) in Jaeger's JSON model.
pub fn to_jaeger(trace_id: &str, spans: &[Map<String, Value>]) -> Value {
    let mut processes: Vec<(String, Value)> = Vec::new();
    let mut out = Vec::with_capacity(spans.len());
    for s in spans {
        let text = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        let service = text(col::SERVICE_NAME);
        let resource = s.get(col::RESOURCE_ATTRIBUTES).cloned().unwrap_or(Value::Null);
        let process_id = match processes
            .iter()
            .position(|(name, r)| *name == service && r.get("resource") == Some(&resource))
        {
            Some(i) => format!("p{}", i + 1),
            None => {
                processes.push((service.clone(), json!({"resource": resource})));
                format!("p{}", processes.len())
            }
        };
        let mut references = Vec::new();
        let parent = text(col::PARENT_SPAN_ID);
        if !parent.is_empty() {
            references.push(json!({"refType": "CHILD_OF", "traceID": trace_id, "spanID": parent}));
        }
        for link in s.get(col::LINKS).and_then(Value::as_array).into_iter().flatten() {
            references.push(json!({
                "refType": "FOLLOWS_FROM",
                "traceID": link.get("trace_id").cloned().unwrap_or(Value::Null),
                "spanID": link.get("span_id").cloned().unwrap_or(Value::Null),
            }));
        }
        let mut tags = tags_of(s.get(col::ATTRIBUTES));
        let kind = text(col::KIND);
        if !kind.is_empty() && kind != "internal" && kind != "unspecified" {
            tags.push(tag("span.kind", &Value::String(kind)));
        }
        let status = text(col::STATUS_CODE);
        if status == "error" {
            tags.push(tag("error", &Value::Bool(true)));
            tags.push(tag("otel.status_code", &Value::String("ERROR".into())));
            let msg = text(col::STATUS_MESSAGE);
            if !msg.is_empty() {
                tags.push(tag("otel.status_description", &Value::String(msg)));
            }
        } else if status == "ok" {
            tags.push(tag("otel.status_code", &Value::String("OK".into())));
        }
        for c in COLUMN_TAGS {
            if let Some(v) = s.get(c).filter(|v| !v.is_null()) {
                tags.push(tag(c, v));
            }
        }
        let logs: Vec<Value> = s
            .get(col::EVENTS)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|e| {
                let mut fields = vec![tag("event", e.get("name").unwrap_or(&Value::Null))];
                fields.extend(tags_of(e.get("attributes")));
                let ns = e.get("time_unix_nano").and_then(Value::as_i64).unwrap_or(0);
                json!({"timestamp": ns / 1000, "fields": fields})
            })
            .collect();
        let start = micros_of(s, col::START_TIME);
        let end = micros_of(s, col::END_TIME);
        out.push(json!({
            "traceID": trace_id,
            "spanID": text(col::SPAN_ID),
            "operationName": text(col::NAME),
            "references": references,
            "startTime": start,
            "duration": (end - start).max(0),
            "tags": tags,
            "logs": logs,
            "processID": process_id,
            "warnings": null,
            "flags": 1,
        }));
    }
    let processes: Map<String, Value> = processes
        .into_iter()
        .enumerate()
        .map(|(i, (service, r))| {
            (
                format!("p{}", i + 1),
                json!({"serviceName": service, "tags": tags_of(r.get("resource"))}),
            )
        })
        .collect();
    json!({"traceID": trace_id, "spans": out, "processes": processes, "warnings": null})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_search_conditions() {
        assert_eq!(parse_duration_ms("1.5s"), Some(1500.0));
        assert_eq!(parse_duration_ms("250ms"), Some(250.0));
        assert_eq!(parse_duration_ms("100us"), Some(0.1));
        assert_eq!(parse_duration_ms("2m"), Some(120_000.0));
        assert_eq!(parse_duration_ms("fast"), None);
        let q: BTreeMap<String, String> = [
            ("service", "agent's"),
            ("operation", "chat"),
            ("start", "1000"),
            ("end", "2000"),
            ("minDuration", "1s"),
            ("tags", r#"{"error":"true","model":"gpt-4o","http.route":"/x"}"#),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            search_condition(&q, 0).unwrap(),
            "service_name = 'agent''s' AND name = 'chat' AND start_time BETWEEN to_timestamp_micros(1000) AND to_timestamp_micros(2000) AND duration_ms >= 1000 AND status_code = 'error' AND json_as_text(attributes, 'http.route') = '/x' AND CAST(model AS VARCHAR) = 'gpt-4o'"
        );
        let mut q = q;
        q.remove("service");
        assert!(search_condition(&q, 0).unwrap_err().to_string().contains("'service' is required"));
    }
}
