//! Replay bundles: what is needed to re-run an agent run, taken from its trace.
//!
//! `GET /v1/traces/{id}/replay` and `spanlake replay export ID` answer one JSON document
//! (format `spanlake.replay/v1`):
//!
//! ```json
//! {"format": "spanlake.replay/v1", "trace_id": "…", "service": "…", "root_span_id": "…",
//!  "steps": [
//!    {"step": 1, "kind": "llm", "span_id": "…", "name": "…", "start_time": "…",
//!     "request": {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "…"}, …],
//!                 "tools": [{"type": "function", "function": {"name", "description", "parameters"}}],
//!                 "parameters": {"temperature": 0.2, …}},
//!     "response": {"role": "assistant", "content": "…" | null,
//!                  "tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}]},
//!     "finish_reason": "tool_calls", "usage": {"input_tokens": 107, "output_tokens": 23},
//!     "missing": []},
//!    {"step": 2, "kind": "tool", "span_id": "…", "name": "…", "tool": "get_weather",
//!     "arguments": {"city": "Paris"}, "result": "sunny, 22C in Paris", "error": null}],
//!  "missing": ["step 3 (span …): no recorded prompt messages …"]}
//! ```
//!
//! Requests and responses are in the OpenAI Chat Completions shape whichever convention
//! recorded them: OpenInference message lists (`llm.input_messages.*`, `input.value`),
//! OpenTelemetry GenAI and OpenLLMetry message parts (`{"type": "text" | "tool_call" |
//! "tool_call_response", …}`), tool definitions from `llm.tools.N.tool.json_schema` or
//! `gen_ai.tool.definitions`, parameters from `gen_ai.request.*` or
//! `llm.invocation_parameters`. A tool step whose span did not record its arguments or result
//! takes them from the tool call and tool message of the LLM calls around it. What a trace lacks
//! for a replay is listed in `missing`, step by step.

use std::collections::HashMap;

use serde_json::{Map, Value, json};
use spanlake_engine::schema::col;

use crate::engine::QueryEngine;
use crate::error::Result;
use crate::trace::trace_spans;

/// The bundle format this module writes.
pub const FORMAT: &str = "spanlake.replay/v1";

/// The replay bundle of a trace; `None` when no span has this id.
pub async fn replay_bundle(engine: &QueryEngine, trace_id: &str) -> Result<Option<Value>> {
    let spans = trace_spans(engine, trace_id).await?;
    if spans.is_empty() {
        return Ok(None);
    }
    Ok(Some(build_bundle(&crate::trace::parse_trace_id(trace_id)?, &spans)))
}

fn text<'a>(row: &'a Map<String, Value>, key: &str) -> &'a str {
    row.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// A JSON text column parsed, or the text itself.
fn parsed(row: &Map<String, Value>, key: &str) -> Option<Value> {
    let t = row.get(key)?.as_str()?;
    Some(serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.to_string())))
}

fn arguments_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One recorded message in the Chat Completions shape.
fn chat_message(m: &Value) -> Option<Value> {
    let m = m.as_object()?;
    let role = m.get("role")?.as_str()?.to_string();
    let mut out = Map::new();
    out.insert("role".into(), Value::String(role.clone()));
    if let Some(parts) = m.get("parts").and_then(Value::as_array) {
        let mut texts = Vec::new();
        let mut calls = Vec::new();
        for p in parts {
            match p.get("type").and_then(Value::as_str) {
                Some("text") => {
                    texts.push(p.get("content").and_then(Value::as_str).unwrap_or_default())
                }
                Some("tool_call") => calls.push(json!({
                    "id": p.get("id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {
                        "name": p.get("name").cloned().unwrap_or(Value::Null),
                        "arguments": arguments_text(p.get("arguments").unwrap_or(&json!({}))),
                    },
                })),
                Some("tool_call_response") => {
                    out.insert("role".into(), Value::String("tool".into()));
                    out.insert("tool_call_id".into(), p.get("id").cloned().unwrap_or(Value::Null));
                    let r = p.get("response").or_else(|| p.get("result")).unwrap_or(&Value::Null);
                    texts.push(match r {
                        Value::String(s) => s.as_str(),
                        _ => "",
                    });
                    if !r.is_string() {
                        out.insert("content".into(), Value::String(r.to_string()));
                    }
                }
                _ => {}
            }
        }
        if !out.contains_key("content") {
            out.insert(
                "content".into(),
                if texts.is_empty() { Value::Null } else { Value::String(texts.concat()) },
            );
        }
        if !calls.is_empty() {
            out.insert("tool_calls".into(), Value::Array(calls));
        }
        return Some(Value::Object(out));
    }
    out.insert("content".into(), m.get("content").cloned().unwrap_or(Value::Null));
    if let Some(calls) = m.get("tool_calls").and_then(Value::as_array).filter(|c| !c.is_empty()) {
        let calls = calls
            .iter()
            .map(|c| {
                let f = c.get("function").cloned().unwrap_or(json!({}));
                json!({
                    "id": c.get("id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {
                        "name": f.get("name").cloned().unwrap_or(Value::Null),
                        "arguments": arguments_text(f.get("arguments").unwrap_or(&json!({}))),
                    },
                })
            })
            .collect();
        out.insert("tool_calls".into(), Value::Array(calls));
    }
    if let Some(id) = m.get("tool_call_id") {
        out.insert("tool_call_id".into(), id.clone());
    }
    Some(Value::Object(out))
}

/// The recorded prompt as Chat Completions messages.
fn request_messages(row: &Map<String, Value>) -> Option<Vec<Value>> {
    let input = parsed(row, col::INPUT)?;
    let list = match &input {
        Value::Array(a) => a.clone(),
        Value::Object(o) => o.get("messages")?.as_array()?.clone(),
        _ => return None,
    };
    let messages: Vec<Value> = list.iter().filter_map(chat_message).collect();
    (!messages.is_empty()).then_some(messages)
}

fn response_message(row: &Map<String, Value>) -> Option<Value> {
    let output = parsed(row, col::OUTPUT)?;
    let first = match &output {
        Value::Array(a) => a.iter().find(|m| m.get("role").is_some())?.clone(),
        Value::Object(o) if o.contains_key("choices") => o["choices"][0]["message"].clone(),
        Value::Object(_) => output.clone(),
        Value::String(s) => json!({"role": "assistant", "content": s}),
        _ => return None,
    };
    chat_message(&first)
}

fn tools(attrs: &Map<String, Value>) -> Option<Vec<Value>> {
    let as_json = |v: &Value| match v {
        Value::String(s) => serde_json::from_str(s).ok(),
        other => Some(other.clone()),
    };
    let mut indexed: Vec<(u32, Value)> = attrs
        .iter()
        .filter_map(|(k, v)| {
            let n = k.strip_prefix("llm.tools.")?.strip_suffix(".tool.json_schema")?;
            Some((n.parse().ok()?, as_json(v)?))
        })
        .collect();
    indexed.sort_by_key(|(n, _)| *n);
    let mut list: Vec<Value> = indexed.into_iter().map(|(_, v)| v).collect();
    if list.is_empty()
        && let Some(defs) = attrs.get("gen_ai.tool.definitions").and_then(as_json)
    {
        list = defs.as_array().cloned().unwrap_or_default();
    }
    let list: Vec<Value> = list
        .into_iter()
        .map(|t| {
            if t.get("function").is_some() {
                t
            } else {
                json!({"type": "function", "function": {
                    "name": t.get("name").cloned().unwrap_or(Value::Null),
                    "description": t.get("description").cloned().unwrap_or(Value::Null),
                    "parameters": t.get("parameters").cloned().unwrap_or(json!({})),
                }})
            }
        })
        .collect();
    (!list.is_empty()).then_some(list)
}

const PARAMETERS: [&str; 9] = [
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "tool_choice",
];

fn parameters(attrs: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(Value::Object(inv)) = attrs
        .get("llm.invocation_parameters")
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok())
    {
        for p in PARAMETERS {
            if let Some(v) = inv.get(p).filter(|v| !v.is_null()) {
                out.insert(p.into(), v.clone());
            }
        }
    }
    for p in PARAMETERS {
        if let Some(v) = attrs.get(&format!("gen_ai.request.{p}")) {
            out.insert(p.into(), v.clone());
        }
    }
    if let Some(v) = attrs.get("gen_ai.request.stop_sequences") {
        out.insert("stop".into(), v.clone());
    }
    out
}

/// A tool call seen in the recorded messages: id, tool name, arguments, result.
type RecordedCall = (String, String, Value, Option<Value>);

/// The bundle of one trace's spans (rows as [`trace_spans`] returns them, in start order).
pub fn build_bundle(trace_id: &str, spans: &[Map<String, Value>]) -> Value {
    let root = spans.iter().find(|s| text(s, col::PARENT_SPAN_ID).is_empty()).or(spans.first());
    // Tool calls seen in the recorded messages: id → (name, arguments, result).
    let mut calls: Vec<RecordedCall> = Vec::new();
    fn note_call(m: &Value, calls: &mut Vec<RecordedCall>) {
        for c in m.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let id = c["id"].as_str().unwrap_or_default().to_string();
            if calls.iter().any(|(i, ..)| *i == id) {
                continue;
            }
            let name = c["function"]["name"].as_str().unwrap_or_default().to_string();
            let args = c["function"]["arguments"].as_str().map_or(Value::Null, |a| {
                serde_json::from_str(a).unwrap_or_else(|_| Value::String(a.into()))
            });
            calls.push((id, name, args, None));
        }
        if m["role"] == "tool"
            && let Some(id) = m.get("tool_call_id").and_then(Value::as_str)
            && let Some(entry) = calls.iter_mut().find(|(i, ..)| i == id)
        {
            entry.3.get_or_insert(m["content"].clone());
        }
    }
    let mut steps = Vec::new();
    let mut missing_all = Vec::new();
    let mut tool_rows = Vec::new();
    for s in spans {
        let span_type = text(s, col::SPAN_TYPE);
        let base = json!({
            "span_id": text(s, col::SPAN_ID),
            "name": text(s, col::NAME),
            "start_time": text(s, col::START_TIME),
        });
        if span_type == "llm" {
            let attrs =
                s.get(col::ATTRIBUTES).and_then(Value::as_object).cloned().unwrap_or_default();
            let messages = request_messages(s);
            let response = response_message(s);
            for m in messages.iter().flatten().chain(response.iter()) {
                note_call(m, &mut calls);
            }
            let mut missing = Vec::new();
            if messages.is_none() {
                missing.push("no recorded prompt messages (the instrumentation did not capture message content; enable it, e.g. OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true for OpenTelemetry GenAI or TRACELOOP_TRACE_CONTENT=true for OpenLLMetry)".to_string());
            }
            if text(s, col::MODEL).is_empty() {
                missing.push("no model name".to_string());
            }
            if response.is_none() {
                missing.push("no recorded response".to_string());
            }
            let uses_tools = messages
                .iter()
                .flatten()
                .chain(response.iter())
                .any(|m| m.get("tool_calls").is_some() || m["role"] == "tool");
            let tool_list = tools(&attrs);
            if uses_tools && tool_list.is_none() {
                missing.push("no recorded tool definitions (the run used tools; the replayed request is sent without them)".to_string());
            }
            let mut step = base;
            let finish = attrs.get("llm.finish_reason").cloned().or_else(|| {
                attrs
                    .get("gen_ai.response.finish_reasons")
                    .map(|v| v.get(0).cloned().unwrap_or(v.clone()))
            });
            step["kind"] = json!("llm");
            step["request"] = json!({
                "model": s.get(col::MODEL).cloned().unwrap_or(Value::Null),
                "messages": messages,
                "tools": tool_list,
                "parameters": parameters(&attrs),
            });
            step["response"] = response.unwrap_or(Value::Null);
            step["finish_reason"] = finish.unwrap_or(Value::Null);
            step["usage"] = json!({
                "input_tokens": s.get(col::INPUT_TOKENS).cloned().unwrap_or(Value::Null),
                "output_tokens": s.get(col::OUTPUT_TOKENS).cloned().unwrap_or(Value::Null),
            });
            step["missing"] = json!(missing);
            steps.push(step);
        } else if span_type == "tool" {
            let mut step = base;
            step["kind"] = json!("tool");
            step["tool"] = s.get(col::TOOL_NAME).cloned().unwrap_or(Value::Null);
            step["arguments"] = parsed(s, col::INPUT).unwrap_or(Value::Null);
            step["result"] = parsed(s, col::OUTPUT).unwrap_or(Value::Null);
            step["error"] = if text(s, col::STATUS_CODE) == "error" {
                json!(text(s, col::STATUS_MESSAGE))
            } else {
                Value::Null
            };
            tool_rows.push(steps.len());
            steps.push(step);
        }
    }
    // Tool spans without arguments or result take them from the messages, in call order.
    let mut used: HashMap<usize, ()> = HashMap::new();
    for &i in &tool_rows {
        let name = steps[i]["tool"].as_str().unwrap_or_default().to_string();
        let found =
            calls.iter().enumerate().find(|(k, (_, n, ..))| *n == name && !used.contains_key(k));
        if let Some((k, (id, _, args, result))) = found {
            used.insert(k, ());
            steps[i]["tool_call_id"] = json!(id);
            if steps[i]["arguments"].is_null() {
                steps[i]["arguments"] = args.clone();
            }
            if steps[i]["result"].is_null() {
                steps[i]["result"] = result.clone().unwrap_or(Value::Null);
            }
        }
        if steps[i]["result"].is_null() && steps[i]["error"].is_null() {
            missing_all.push(format!(
                "step {} (span {}): no recorded result for tool {name}",
                i + 1,
                steps[i]["span_id"].as_str().unwrap_or_default()
            ));
        }
    }
    for (i, step) in steps.iter_mut().enumerate() {
        step["step"] = json!(i + 1);
        for m in step.get("missing").and_then(Value::as_array).into_iter().flatten() {
            missing_all.push(format!(
                "step {} (span {}): {}",
                i + 1,
                step["span_id"].as_str().unwrap_or_default(),
                m.as_str().unwrap_or_default()
            ));
        }
    }
    missing_all.sort();
    if !steps.iter().any(|s| s["kind"] == "llm") {
        missing_all.push("the trace has no LLM call spans".to_string());
    }
    json!({
        "format": FORMAT,
        "trace_id": trace_id,
        "service": root.map(|r| text(r, col::SERVICE_NAME)).unwrap_or_default(),
        "root_span_id": root.map(|r| text(r, col::SPAN_ID)).unwrap_or_default(),
        "steps": steps,
        "missing": missing_all,
    })
}
