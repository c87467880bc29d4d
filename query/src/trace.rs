//! A whole trace by id, as a tree of spans.
//!
//! The lookup reads what `SELECT * FROM spans WHERE trace_id = '…'` (no time range) would,
//! without planning it ([`crate::lookup`]): the store's trace index
//! ([`spanlake_engine::trace_index`]) keeps only the files that may hold the trace, and
//! the trace id's statistics and page index narrow each of those to a few pages.
//!
//! The JSON shape (`GET /v1/traces/{trace_id}`):
//!
//! ```json
//! {"trace_id": "…", "span_count": 4, "start_time": "…", "end_time": "…", "duration_ms": 12.5,
//!  "error_count": 0, "input_tokens": 120, "output_tokens": 40, "cost_usd": 0.0012,
//!  "spans": [{"span_id": "…", "name": "…", …every column…, "attributes": {…},
//!             "events": […], "links": […], "children": [ … ]}]}
//! ```
//!
//! `spans` holds the roots: spans without a parent, and spans whose parent is not in the trace
//! (marked `"parent_missing": true`, e.g. a parent never exported). Children are ordered by
//! start time. The JSON text columns (`attributes`, `resource_attributes`, `events`, `links`,
//! `scope`) are embedded as JSON values.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde_json::{Map, Value};
use spanlake_engine::schema::{MOVED_TO_COLUMN, col};

use crate::engine::QueryEngine;
use crate::error::{Error, Result};

/// A trace id as spanlake stores it: 32 lowercase hex digits. Uppercase is accepted.
pub fn parse_trace_id(id: &str) -> Result<String> {
    let id = id.trim();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::BadRequest {
            message: format!("invalid trace id {id:?}: expected 32 hexadecimal digits (16 bytes)"),
        });
    }
    Ok(id.to_ascii_lowercase())
}

/// The spans of a trace as JSON objects, in start time order (repeats of a span removed).
pub async fn trace_spans(engine: &QueryEngine, trace_id: &str) -> Result<Vec<Map<String, Value>>> {
    let id = parse_trace_id(trace_id)?;
    let batches = engine.trace_rows(&id).await?;
    let mut buf = Vec::new();
    {
        let mut writer = arrow::json::ArrayWriter::new(&mut buf);
        for b in &batches {
            writer.write(b).map_err(|source| Error::Encode { source })?;
        }
        writer.finish().map_err(|source| Error::Encode { source })?;
    }
    let rows: Vec<Map<String, Value>> = if buf.is_empty() {
        Vec::new()
    } else {
        serde_json::from_slice(&buf).map_err(|e| Error::BadRequest { message: e.to_string() })?
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(rows.len());
    for mut row in rows {
        let key = (str_of(&row, col::SPAN_ID), str_of(&row, col::START_TIME));
        if !seen.insert(key) {
            continue;
        }
        for c in [col::ATTRIBUTES, col::RESOURCE_ATTRIBUTES, col::EVENTS, col::LINKS, col::SCOPE] {
            if let Some(Value::String(text)) = row.get(c)
                && let Ok(v) = serde_json::from_str::<Value>(text)
            {
                row.insert(c.to_string(), v);
            }
        }
        restore_moved(&mut row);
        out.push(row);
    }
    Ok(out)
}

/// Puts the text of `input` and `output` back into the attributes it was taken from, where
/// ingest left a reference to the column (see [`MOVED_TO_COLUMN`]).
fn restore_moved(row: &mut Map<String, Value>) {
    let Some(Value::Object(mut attributes)) = row.remove(col::ATTRIBUTES) else { return };
    for value in attributes.values_mut() {
        let column = match value {
            Value::Object(m) if m.len() == 1 => m.get(MOVED_TO_COLUMN).and_then(Value::as_str),
            _ => None,
        };
        if let Some(column @ (col::INPUT | col::OUTPUT)) = column {
            *value = row.get(column).cloned().unwrap_or(Value::Null);
        }
    }
    row.insert(col::ATTRIBUTES.to_string(), Value::Object(attributes));
}

fn str_of(row: &Map<String, Value>, key: &str) -> String {
    row.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

fn f64_of(row: &Map<String, Value>, key: &str) -> f64 {
    row.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

fn i64_of(row: &Map<String, Value>, key: &str) -> i64 {
    row.get(key).and_then(Value::as_i64).unwrap_or(0)
}

/// The trace as a tree (see the module docs); `None` when no span has this id.
pub async fn trace_tree(engine: &QueryEngine, trace_id: &str) -> Result<Option<Value>> {
    let spans = trace_spans(engine, trace_id).await?;
    if spans.is_empty() {
        return Ok(None);
    }
    Ok(Some(build_tree(trace_id, spans)))
}

/// Nests spans under their parents.
pub fn build_tree(trace_id: &str, spans: Vec<Map<String, Value>>) -> Value {
    let ids: std::collections::HashSet<String> =
        spans.iter().map(|s| str_of(s, col::SPAN_ID)).collect();
    let start = spans.iter().map(|s| str_of(s, col::START_TIME)).min().unwrap_or_default();
    let end = spans.iter().map(|s| str_of(s, col::END_TIME)).max().unwrap_or_default();
    let min_ns = spans.iter().filter_map(|s| ns_of(s, col::START_TIME)).min();
    let max_ns = spans.iter().filter_map(|s| ns_of(s, col::END_TIME)).max();
    let duration_ms = match (min_ns, max_ns) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e6,
        _ => 0.0,
    };
    let summary = serde_json::json!({
        "trace_id": parse_trace_id(trace_id).unwrap_or_default(),
        "span_count": spans.len(),
        "start_time": start,
        "end_time": end,
        "duration_ms": duration_ms,
        "error_count": spans.iter().filter(|s| str_of(s, col::STATUS_CODE) == "error").count(),
        "input_tokens": spans.iter().map(|s| i64_of(s, col::INPUT_TOKENS)).sum::<i64>(),
        "output_tokens": spans.iter().map(|s| i64_of(s, col::OUTPUT_TOKENS)).sum::<i64>(),
        "cost_usd": spans.iter().map(|s| f64_of(s, col::COST_USD)).sum::<f64>(),
    });
    // Children by parent, in start order (the input is sorted by start time).
    let mut children: HashMap<String, Vec<Map<String, Value>>> = HashMap::new();
    let mut roots = Vec::new();
    for mut s in spans {
        let parent = str_of(&s, col::PARENT_SPAN_ID);
        if parent.is_empty() {
            roots.push(s);
        } else if ids.contains(&parent) && parent != str_of(&s, col::SPAN_ID) {
            children.entry(parent).or_default().push(s);
        } else {
            s.insert("parent_missing".into(), Value::Bool(true));
            roots.push(s);
        }
    }
    fn attach(
        mut s: Map<String, Value>,
        children: &mut HashMap<String, Vec<Map<String, Value>>>,
        depth: usize,
    ) -> Value {
        let kids = children.remove(&str_of(&s, col::SPAN_ID)).unwrap_or_default();
        // Depth bound: a cycle of parent ids cannot recurse forever (each span is attached once).
        let nested: Vec<Value> = if depth > 10_000 {
            Vec::new()
        } else {
            kids.into_iter().map(|k| attach(k, children, depth + 1)).collect()
        };
        s.insert("children".into(), Value::Array(nested));
        Value::Object(s)
    }
    let mut tree: Vec<Value> = roots.into_iter().map(|r| attach(r, &mut children, 0)).collect();
    // Spans in a parent cycle are reachable from no root: list them as roots too.
    let rest: BTreeMap<String, Vec<Map<String, Value>>> = children.drain().collect();
    for (_, spans) in rest {
        for mut s in spans {
            s.insert("parent_missing".into(), Value::Bool(true));
            s.insert("children".into(), Value::Array(Vec::new()));
            tree.push(Value::Object(s));
        }
    }
    let mut out = summary;
    out["spans"] = Value::Array(tree);
    out
}

fn ns_of(row: &Map<String, Value>, key: &str) -> Option<i64> {
    let s = row.get(key)?.as_str()?;
    chrono::DateTime::parse_from_rfc3339(s).ok()?.timestamp_nanos_opt()
}

/// The tree as indented text: one line per span with its duration, tokens, cost and errors.
pub fn render_text(tree: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "trace {}  {} spans  {:.1} ms  tokens {}/{}  cost ${:.6}  errors {}",
        tree["trace_id"].as_str().unwrap_or_default(),
        tree["span_count"],
        tree["duration_ms"].as_f64().unwrap_or(0.0),
        tree["input_tokens"],
        tree["output_tokens"],
        tree["cost_usd"].as_f64().unwrap_or(0.0),
        tree["error_count"],
    );
    fn line(out: &mut String, span: &Value, depth: usize) {
        let Some(s) = span.as_object() else { return };
        let _ = write!(
            out,
            "{:indent$}{} [{}] {:.1} ms",
            "",
            str_of(s, col::NAME),
            str_of(s, col::SPAN_TYPE),
            f64_of(s, col::DURATION_MS),
            indent = depth * 2
        );
        let model = str_of(s, col::MODEL);
        if !model.is_empty() {
            let _ = write!(out, "  model={model}");
        }
        let tool = str_of(s, col::TOOL_NAME);
        if !tool.is_empty() {
            let _ = write!(out, "  tool={tool}");
        }
        if s.get(col::INPUT_TOKENS).is_some_and(|v| !v.is_null())
            || s.get(col::OUTPUT_TOKENS).is_some_and(|v| !v.is_null())
        {
            let _ = write!(
                out,
                "  tokens={}/{}",
                i64_of(s, col::INPUT_TOKENS),
                i64_of(s, col::OUTPUT_TOKENS)
            );
        }
        if s.get(col::COST_USD).is_some_and(|v| !v.is_null()) {
            let _ = write!(out, "  cost=${:.6}", f64_of(s, col::COST_USD));
        }
        if str_of(s, col::STATUS_CODE) == "error" {
            let _ = write!(out, "  ERROR {}", str_of(s, col::STATUS_MESSAGE));
        }
        if s.get("parent_missing").is_some() {
            let _ = write!(out, "  (parent {} not in trace)", str_of(s, col::PARENT_SPAN_ID));
        }
        out.push('\n');
        if let Some(children) = s.get("children").and_then(Value::as_array) {
            for c in children {
                line(out, c, depth + 1);
            }
        }
    }
    if let Some(spans) = tree["spans"].as_array() {
        for s in spans {
            line(&mut out, s, 1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: Option<&str>, start: &str) -> Map<String, Value> {
        let v = serde_json::json!({
            "span_id": id, "parent_span_id": parent, "name": format!("op-{id}"),
            "span_type": "llm", "start_time": start, "end_time": start, "duration_ms": 1.0,
            "status_code": "ok", "input_tokens": 10, "output_tokens": 5, "cost_usd": 0.5,
        });
        v.as_object().unwrap().clone()
    }

    #[test]
    fn nests_children_and_marks_missing_parents() {
        let spans = vec![
            span("a", None, "2026-01-01T00:00:00Z"),
            span("b", Some("a"), "2026-01-01T00:00:01Z"),
            span("c", Some("a"), "2026-01-01T00:00:02Z"),
            span("d", Some("b"), "2026-01-01T00:00:03Z"),
            span("e", Some("zz"), "2026-01-01T00:00:04Z"),
        ];
        let t = build_tree("0af7651916cd43dd8448eb211c80319c", spans);
        assert_eq!(t["span_count"], 5);
        assert_eq!(t["input_tokens"], 50);
        assert_eq!(t["duration_ms"], 4000.0);
        let roots = t["spans"].as_array().unwrap();
        assert_eq!(roots.len(), 2);
        assert_eq!(roots[0]["span_id"], "a");
        let kids: Vec<&str> = roots[0]["children"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["span_id"].as_str().unwrap())
            .collect();
        assert_eq!(kids, ["b", "c"]);
        assert_eq!(roots[0]["children"][0]["children"][0]["span_id"], "d");
        assert_eq!(roots[1]["span_id"], "e");
        assert_eq!(roots[1]["parent_missing"], true);
        let text = render_text(&t);
        assert!(
            text.contains("\n      op-d [llm] 1.0 ms  tokens=10/5  cost=$0.500000\n"),
            "{text}"
        );
    }

    #[test]
    fn trace_ids_are_validated() {
        assert_eq!(
            parse_trace_id("0AF7651916CD43DD8448EB211C80319C").unwrap(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        let e = parse_trace_id("abc' OR 1=1 --").unwrap_err();
        assert!(e.to_string().contains("expected 32 hexadecimal digits"), "{e}");
    }
}
