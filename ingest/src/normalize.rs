//! OTLP spans to `spans` rows.
//!
//! AI attributes are read from whichever convention sent them:
//!
//! | column | OpenTelemetry GenAI | OpenInference | OpenLLMetry |
//! |---|---|---|---|
//! | span_type | `gen_ai.operation.name` | `openinference.span.kind` | `traceloop.span.kind`, `llm.request.type` |
//! | provider | `gen_ai.provider.name`, `gen_ai.system` | `llm.provider`, `llm.system` | `gen_ai.system` |
//! | model | `gen_ai.response.model`, `gen_ai.request.model` | `llm.model_name` | `llm.response.model`, `llm.request.model` |
//! | input_tokens | `gen_ai.usage.input_tokens`, `gen_ai.usage.prompt_tokens` | `llm.token_count.prompt` | `llm.usage.prompt_tokens` |
//! | output_tokens | `gen_ai.usage.output_tokens`, `gen_ai.usage.completion_tokens` | `llm.token_count.completion` | `llm.usage.completion_tokens` |
//! | total_tokens | `gen_ai.usage.total_tokens` | `llm.token_count.total` | `llm.usage.total_tokens` |
//! | cost_usd | `gen_ai.usage.cost` | `llm.cost.total` | — |
//! | tool_name | `gen_ai.tool.name` | `tool.name` | `traceloop.entity.name` on tool spans |
//! | agent_name | `gen_ai.agent.name` | `agent.name` | `traceloop.entity.name` on agent spans |
//! | session_id | `gen_ai.conversation.id`, `session.id` | `session.id` | `traceloop.association.properties.session_id` |
//! | user_id | `user.id`, `enduser.id` | `user.id` | `traceloop.association.properties.user_id` |
//! | input | `gen_ai.input.messages`, message events | `llm.input_messages.*`, `input.value` | `gen_ai.prompt.N.*`, `traceloop.entity.input` |
//! | output | `gen_ai.output.messages`, `gen_ai.choice` events | `llm.output_messages.*`, `output.value` | `gen_ai.completion.N.*`, `traceloop.entity.output` |
//!
//! Flattened message attributes (`llm.input_messages.0.message.role`, `gen_ai.prompt.0.content`)
//! are rebuilt into a JSON array of message objects. Token counts are kept on LLM and embedding
//! spans only, so that sums over a trace never count a roll-up twice. `total_tokens` is
//! input + output when the span sends no total. `cost_usd` is the span's own cost, else the price
//! table's, else null.

use std::collections::HashMap;

use base64::Engine as _;
use serde_json::{Map, Value};
use spanlake_engine::pricing::PriceTable;
use spanlake_engine::row::SpanRow;
use spanlake_proto::collector::ExportTraceServiceRequest;
use spanlake_proto::common::{AnyValue, KeyValue, any_value};
use spanlake_proto::trace::Span;

/// The rows of one request and what was rejected.
#[derive(Debug, Default)]
pub struct Normalized {
    /// Valid spans as rows.
    pub rows: Vec<SpanRow>,
    /// Number of spans rejected.
    pub rejected: u64,
    /// Why spans were rejected (the first few).
    pub errors: Vec<String>,
}

const MAX_REPORTED_ERRORS: usize = 5;

impl Normalized {
    /// The OTLP partial-success message, empty when nothing was rejected.
    pub fn error_message(&self) -> String {
        if self.rejected == 0 {
            return String::new();
        }
        let mut msg = format!("rejected {} span(s): {}", self.rejected, self.errors.join("; "));
        if self.rejected as usize > self.errors.len() {
            msg.push_str("; ...");
        }
        msg
    }
}

/// Normalises every span of a request.
pub fn normalize(req: &ExportTraceServiceRequest, prices: &PriceTable) -> Normalized {
    let mut out = Normalized::default();
    let total: usize = req
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum();
    out.rows.reserve(total);
    for rs in &req.resource_spans {
        let resource_attrs = rs.resource.as_ref().map(|r| r.attributes.as_slice()).unwrap_or(&[]);
        let service_name = resource_attrs
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| as_str(kv.value.as_ref()))
            .map(str::to_string);
        let resource_json = attrs_json(resource_attrs);
        for ss in &rs.scope_spans {
            let scope_json = {
                let mut m = Map::new();
                if let Some(scope) = &ss.scope {
                    m.insert("name".into(), Value::String(scope.name.clone()));
                    m.insert("version".into(), Value::String(scope.version.clone()));
                    m.insert("attributes".into(), attrs_value(&scope.attributes));
                }
                Value::Object(m).to_string()
            };
            for span in &ss.spans {
                match normalize_span(span, prices) {
                    Ok(mut row) => {
                        row.service_name.clone_from(&service_name);
                        row.resource_attributes.clone_from(&resource_json);
                        row.scope.clone_from(&scope_json);
                        out.rows.push(row);
                    }
                    Err(reason) => {
                        out.rejected += 1;
                        if out.errors.len() < MAX_REPORTED_ERRORS {
                            out.errors.push(format!("span {:?} ({}): {reason}", span.name, hex::encode(&span.span_id)));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Why a span is invalid.
fn validate_id(bytes: &[u8], len: usize, what: &str) -> Result<String, String> {
    if bytes.len() != len {
        return Err(format!("{what} must be {len} bytes, got {}", bytes.len()));
    }
    if bytes.iter().all(|b| *b == 0) {
        return Err(format!("{what} is all zeros"));
    }
    Ok(hex::encode(bytes))
}

struct Attrs<'a> {
    map: HashMap<&'a str, &'a AnyValue>,
    list: &'a [KeyValue],
}

impl<'a> Attrs<'a> {
    fn new(list: &'a [KeyValue]) -> Self {
        let mut map = HashMap::with_capacity(list.len());
        for kv in list {
            if let Some(v) = &kv.value {
                map.insert(kv.key.as_str(), v);
            }
        }
        Self { map, list }
    }
    fn get(&self, key: &str) -> Option<&'a AnyValue> {
        self.map.get(key).copied()
    }
    fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }
    fn str(&self, keys: &[&str]) -> Option<&'a str> {
        keys.iter().find_map(|k| as_str(self.get(k)).filter(|s| !s.is_empty()))
    }
    fn string(&self, keys: &[&str]) -> Option<String> {
        self.str(keys).map(str::to_string)
    }
    fn int(&self, keys: &[&str]) -> Option<i64> {
        keys.iter().find_map(|k| as_int(self.get(k)))
    }
    fn float(&self, keys: &[&str]) -> Option<f64> {
        keys.iter().find_map(|k| as_float(self.get(k)))
    }
    fn has_prefix(&self, prefix: &str) -> bool {
        self.list.iter().any(|kv| kv.key.starts_with(prefix))
    }
}

fn as_str(v: Option<&AnyValue>) -> Option<&str> {
    match v?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn as_int(v: Option<&AnyValue>) -> Option<i64> {
    match v?.value.as_ref()? {
        any_value::Value::IntValue(i) => Some(*i),
        any_value::Value::DoubleValue(d) if d.fract() == 0.0 && d.is_finite() => Some(*d as i64),
        any_value::Value::StringValue(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn as_float(v: Option<&AnyValue>) -> Option<f64> {
    match v?.value.as_ref()? {
        any_value::Value::IntValue(i) => Some(*i as f64),
        any_value::Value::DoubleValue(d) if d.is_finite() => Some(*d),
        any_value::Value::StringValue(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn span_kind(kind: i32) -> &'static str {
    match kind {
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        // 1 is INTERNAL; UNSPECIFIED (0) is treated as INTERNAL, as the OTel spec allows.
        _ => "internal",
    }
}

fn status_code(code: i32) -> &'static str {
    match code {
        1 => "ok",
        2 => "error",
        _ => "unset",
    }
}

fn span_type(a: &Attrs<'_>) -> &'static str {
    if let Some(kind) = a.str(&["openinference.span.kind"]) {
        return match kind.to_ascii_uppercase().as_str() {
            "LLM" => "llm",
            "TOOL" => "tool",
            "AGENT" => "agent",
            "CHAIN" => "chain",
            "RETRIEVER" | "RERANKER" => "retrieval",
            "EMBEDDING" => "embedding",
            _ => "other",
        };
    }
    if let Some(kind) = a.str(&["traceloop.span.kind"]) {
        return match kind {
            "agent" => "agent",
            "tool" => "tool",
            "workflow" | "task" => "chain",
            _ => "other",
        };
    }
    if let Some(op) = a.str(&["gen_ai.operation.name"]) {
        match op {
            "chat" | "text_completion" | "generate_content" | "completion" => return "llm",
            "embeddings" | "embedding" => return "embedding",
            "execute_tool" => return "tool",
            "invoke_agent" | "create_agent" => return "agent",
            "invoke_workflow" => return "chain",
            "retrieval" | "retrieve" => return "retrieval",
            _ => {}
        }
    }
    if let Some(t) = a.str(&["llm.request.type"]) {
        match t {
            "chat" | "completion" => return "llm",
            "embedding" => return "embedding",
            "rerank" => return "retrieval",
            _ => {}
        }
    }
    if a.has("gen_ai.request.model")
        || a.has("gen_ai.system")
        || a.has("llm.model_name")
        || a.has("llm.request.model")
        || a.has("gen_ai.usage.input_tokens")
        || a.has("gen_ai.usage.prompt_tokens")
        || a.has("llm.token_count.prompt")
    {
        return "llm";
    }
    if a.has("gen_ai.tool.name") || a.has("tool.name") {
        return "tool";
    }
    if a.has("gen_ai.agent.name") || a.has("agent.name") {
        return "agent";
    }
    if a.has_prefix("retrieval.documents") || a.has("gen_ai.data_source.id") {
        return "retrieval";
    }
    "other"
}

/// Converts one span; `Err` names why it is rejected.
pub fn normalize_span(span: &Span, prices: &PriceTable) -> Result<SpanRow, String> {
    let trace_id = validate_id(&span.trace_id, 16, "trace_id")?;
    let span_id = validate_id(&span.span_id, 8, "span_id")?;
    let parent_span_id = match span.parent_span_id.as_slice() {
        [] => None,
        p if p.iter().all(|b| *b == 0) => None,
        p => Some(validate_id(p, 8, "parent_span_id")?),
    };
    let a = Attrs::new(&span.attributes);
    let span_type = span_type(&a);
    let traceloop_kind = a.str(&["traceloop.span.kind"]);

    let provider =
        a.string(&["gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system"]);
    let model = a.string(&[
        "gen_ai.response.model",
        "gen_ai.request.model",
        "llm.response.model",
        "llm.request.model",
        "llm.model_name",
        "embedding.model_name",
    ]);

    let counts_tokens = matches!(span_type, "llm" | "embedding");
    let (input_tokens, output_tokens, total_tokens) = if counts_tokens {
        let input = a.int(&[
            "gen_ai.usage.input_tokens",
            "gen_ai.usage.prompt_tokens",
            "llm.token_count.prompt",
            "llm.usage.prompt_tokens",
        ]);
        let output = a.int(&[
            "gen_ai.usage.output_tokens",
            "gen_ai.usage.completion_tokens",
            "llm.token_count.completion",
            "llm.usage.completion_tokens",
        ]);
        let total = a
            .int(&["gen_ai.usage.total_tokens", "llm.token_count.total", "llm.usage.total_tokens"])
            .or_else(|| match (input, output) {
                (None, None) => None,
                (i, o) => Some(i.unwrap_or(0) + o.unwrap_or(0)),
            });
        (input, output, total)
    } else {
        (None, None, None)
    };
    let cost_usd = a
        .float(&["gen_ai.usage.cost", "llm.cost.total", "gen_ai.usage.cost_usd"])
        .or_else(|| {
            if !counts_tokens {
                return None;
            }
            prices.cost(model.as_deref()?, input_tokens, output_tokens)
        });

    let tool_name = a.string(&["gen_ai.tool.name", "tool.name"]).or_else(|| {
        if traceloop_kind == Some("tool") {
            a.string(&["traceloop.entity.name"])
        } else if span_type == "tool" {
            Some(span.name.clone())
        } else {
            None
        }
    });
    let agent_name = a.string(&["gen_ai.agent.name", "agent.name"]).or_else(|| {
        if traceloop_kind == Some("agent") {
            a.string(&["traceloop.entity.name"])
        } else if span_type == "agent" {
            Some(span.name.clone())
        } else {
            None
        }
    });
    let session_id = a.string(&[
        "session.id",
        "gen_ai.conversation.id",
        "traceloop.association.properties.session_id",
        "langfuse.session.id",
    ]);
    let user_id = a.string(&[
        "user.id",
        "enduser.id",
        "traceloop.association.properties.user_id",
        "langfuse.user.id",
    ]);

    let input = a
        .string(&["gen_ai.input.messages"])
        .or_else(|| unflatten_messages(&a, "llm.input_messages."))
        .or_else(|| unflatten_messages(&a, "gen_ai.prompt."))
        .or_else(|| event_messages(span, false))
        .or_else(|| {
            a.string(&[
                "input.value",
                "traceloop.entity.input",
                "gen_ai.tool.call.arguments",
                "gen_ai.prompt",
            ])
        });
    let output = a
        .string(&["gen_ai.output.messages"])
        .or_else(|| unflatten_messages(&a, "llm.output_messages."))
        .or_else(|| unflatten_messages(&a, "gen_ai.completion."))
        .or_else(|| event_messages(span, true))
        .or_else(|| {
            a.string(&[
                "output.value",
                "traceloop.entity.output",
                "gen_ai.tool.call.result",
                "gen_ai.completion",
            ])
        });

    let status = span.status.as_ref();
    let start = clamp_ns(span.start_time_unix_nano);
    let end = clamp_ns(span.end_time_unix_nano);
    Ok(SpanRow {
        trace_id,
        span_id,
        parent_span_id,
        trace_state: Some(span.trace_state.clone()).filter(|s| !s.is_empty()),
        name: span.name.clone(),
        kind: span_kind(span.kind),
        service_name: None,
        start_time_ns: start,
        end_time_ns: end,
        status_code: status_code(status.map_or(0, |s| s.code)),
        status_message: status.map(|s| s.message.clone()).filter(|m| !m.is_empty()),
        span_type,
        provider,
        model,
        input_tokens,
        output_tokens,
        total_tokens,
        cost_usd,
        tool_name,
        agent_name,
        session_id,
        user_id,
        input,
        output,
        attributes: attrs_json(&span.attributes),
        resource_attributes: String::new(),
        events: events_json(span),
        links: links_json(span),
        scope: String::new(),
    })
}

fn clamp_ns(ns: u64) -> i64 {
    i64::try_from(ns).unwrap_or(i64::MAX)
}

/// An AnyValue as JSON: strings, numbers and booleans as themselves, arrays and key-value lists
/// as arrays and objects, bytes as base64 strings, non-finite doubles as strings.
pub fn any_to_json(v: &AnyValue) -> Value {
    match &v.value {
        None => Value::Null,
        Some(any_value::Value::StringValue(s)) => Value::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(*b),
        Some(any_value::Value::IntValue(i)) => Value::from(*i),
        Some(any_value::Value::DoubleValue(d)) => serde_json::Number::from_f64(*d)
            .map_or_else(|| Value::String(d.to_string()), Value::Number),
        Some(any_value::Value::ArrayValue(a)) => Value::Array(a.values.iter().map(any_to_json).collect()),
        Some(any_value::Value::KvlistValue(kv)) => attrs_value(&kv.values),
        Some(any_value::Value::BytesValue(b)) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        // A string-table index is only meaningful in profiles, never in traces.
        Some(any_value::Value::StringValueStrindex(_)) => Value::Null,
    }
}

fn attrs_value(list: &[KeyValue]) -> Value {
    let mut m = Map::with_capacity(list.len());
    for kv in list {
        m.insert(kv.key.clone(), kv.value.as_ref().map_or(Value::Null, any_to_json));
    }
    Value::Object(m)
}

/// Attributes as one JSON object text.
pub fn attrs_json(list: &[KeyValue]) -> String {
    if list.is_empty() {
        return "{}".to_string();
    }
    attrs_value(list).to_string()
}

fn events_json(span: &Span) -> String {
    if span.events.is_empty() {
        return "[]".to_string();
    }
    let events: Vec<Value> = span
        .events
        .iter()
        .map(|e| {
            let mut m = Map::new();
            m.insert("name".into(), Value::String(e.name.clone()));
            m.insert("time_unix_nano".into(), Value::from(e.time_unix_nano));
            m.insert("attributes".into(), attrs_value(&e.attributes));
            Value::Object(m)
        })
        .collect();
    Value::Array(events).to_string()
}

fn links_json(span: &Span) -> String {
    if span.links.is_empty() {
        return "[]".to_string();
    }
    let links: Vec<Value> = span
        .links
        .iter()
        .map(|l| {
            let mut m = Map::new();
            m.insert("trace_id".into(), Value::String(hex::encode(&l.trace_id)));
            m.insert("span_id".into(), Value::String(hex::encode(&l.span_id)));
            if !l.trace_state.is_empty() {
                m.insert("trace_state".into(), Value::String(l.trace_state.clone()));
            }
            m.insert("attributes".into(), attrs_value(&l.attributes));
            Value::Object(m)
        })
        .collect();
    Value::Array(links).to_string()
}

/// Rebuilds flattened attributes under `prefix` (`prefix.0.message.role` ...) into a JSON array
/// of objects, dropping OpenInference's single-key wrappers (`message`, `tool_call`,
/// `message_content`).
fn unflatten_messages(a: &Attrs<'_>, prefix: &str) -> Option<String> {
    let mut root = Value::Object(Map::new());
    let mut any = false;
    for kv in a.list {
        let Some(path) = kv.key.strip_prefix(prefix) else { continue };
        let Some(value) = kv.value.as_ref() else { continue };
        // Only indexed entries (`0.role`), not e.g. `gen_ai.prompt` itself.
        if !path.split('.').next().is_some_and(|s| s.parse::<usize>().is_ok()) {
            continue;
        }
        insert_path(&mut root, path.split('.'), any_to_json(value));
        any = true;
    }
    if !any {
        return None;
    }
    Some(tidy(root).to_string())
}

fn insert_path<'p>(node: &mut Value, mut path: impl Iterator<Item = &'p str>, value: Value) {
    let Some(seg) = path.next() else {
        *node = value;
        return;
    };
    if !node.is_object() {
        *node = Value::Object(Map::new());
    }
    let Value::Object(m) = node else { return };
    let child = m.entry(seg.to_string()).or_insert(Value::Null);
    insert_path(child, path, value);
}

/// Objects keyed by indexes become arrays; single-key wrapper objects are unwrapped.
fn tidy(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            if !m.is_empty() && m.keys().all(|k| k.parse::<usize>().is_ok()) {
                let mut items: Vec<(usize, Value)> =
                    m.into_iter().map(|(k, v)| (k.parse().unwrap_or(0), tidy(v))).collect();
                items.sort_by_key(|(i, _)| *i);
                return Value::Array(items.into_iter().map(|(_, v)| v).collect());
            }
            if m.len() == 1
                && let Some(key) = m.keys().next()
                && matches!(key.as_str(), "message" | "tool_call" | "message_content")
            {
                let (_, inner) = m.into_iter().next().expect("one entry");
                return tidy(inner);
            }
            Value::Object(m.into_iter().map(|(k, v)| (k, tidy(v))).collect())
        }
        other => other,
    }
}

/// Messages carried as span events by the older GenAI conventions (`gen_ai.user.message`,
/// `gen_ai.choice`, ...) or the `gen_ai.client.inference.operation.details` event.
fn event_messages(span: &Span, output: bool) -> Option<String> {
    let mut messages = Vec::new();
    for e in &span.events {
        let attrs = Attrs::new(&e.attributes);
        let key = if output { "gen_ai.output.messages" } else { "gen_ai.input.messages" };
        if let Some(s) = attrs.str(&[key]) {
            return Some(s.to_string());
        }
        let role = match e.name.as_str() {
            "gen_ai.choice" if output => "assistant",
            "gen_ai.system.message" if !output => "system",
            "gen_ai.user.message" if !output => "user",
            "gen_ai.assistant.message" if !output => "assistant",
            "gen_ai.tool.message" if !output => "tool",
            _ => continue,
        };
        let mut m = match attrs_value(&e.attributes) {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        m.entry("role").or_insert_with(|| Value::String(role.to_string()));
        messages.push(Value::Object(m));
    }
    if messages.is_empty() { None } else { Some(Value::Array(messages).to_string()) }
}

#[cfg(test)]
mod tests;
