//! OTLP spans to rows of the `spans` table.
//!
//! AI attributes are read from whichever convention sent them (the first key present wins):
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
//! are rebuilt into a JSON array of message objects. A value `input` or `output` takes whole
//! from one attribute is not repeated in `attributes`: that key refers to the column instead
//! ([`spanlake_engine::schema::MOVED_TO_COLUMN`]). Token counts are kept on LLM and embedding
//! spans only, so that sums over a trace never count a roll-up twice. `total_tokens` is
//! input + output when the span sends no total. `cost_usd` is the span's own cost, else the price
//! table's, else null.
//!
//! # What happens to bad spans
//!
//! | input | outcome |
//! |---|---|
//! | `trace_id` not 16 bytes or all zeros; `span_id` not 8 bytes or all zeros; `parent_span_id` neither empty nor 8 bytes | span rejected (partial success names it and why) |
//! | all-zero `parent_span_id` | treated as a root span |
//! | `start_time_unix_nano` of 0, or further in the future than `max_future_skew` | span rejected |
//! | `end_time_unix_nano` of 0 or before the start | kept; `end_time` as sent, `duration_ms` 0; warning |
//! | a value, attribute count, depth, event or link count over a limit | kept, cut as [`crate::limits`] describes; warning |
//! | the same span twice in one request | the second copy is rejected as a duplicate |
//!
//! Everything is read in one pass over each span's attributes; JSON text is written directly,
//! without building a tree, except for flattened message lists.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::RecordBatch;
use serde_json::{Map, Value};
use spanlake_engine::batch::{SpanBatchBuilder, TextCapacity};
use spanlake_engine::pricing::PriceTable;
use spanlake_engine::record::{SpanRecord, kind, span_type, status};
use spanlake_engine::schema::col;
use spanlake_proto::collector::ExportTraceServiceRequest;
use spanlake_proto::view::{AnyValue, ExportRequest, KeyValue, Span};

use crate::json::{Cuts, JsonWriter, truncate, write_str};
use crate::limits::SpanLimits;

/// What normalisation needs besides the request.
#[derive(Debug, Clone)]
pub struct NormalizeContext {
    /// Prices for `cost_usd`.
    pub prices: Arc<PriceTable>,
    /// Per-span limits.
    pub limits: SpanLimits,
    /// Most spans one request may carry.
    pub max_spans: usize,
    /// Redaction applied to each request before it is normalised (`None`: none).
    pub redactor: Option<Arc<crate::redact::Redactor>>,
}

impl Default for NormalizeContext {
    fn default() -> Self {
        Self {
            prices: Arc::new(PriceTable::default()),
            limits: SpanLimits::default(),
            max_spans: 100_000,
            redactor: None,
        }
    }
}

/// The rows of one request and what was rejected or cut.
#[derive(Debug)]
pub struct Normalized {
    /// Valid spans as one batch of the `spans` schema.
    pub batch: RecordBatch,
    /// Number of spans rejected.
    pub rejected: u64,
    /// Why spans were rejected (the first few).
    pub errors: Vec<String>,
    /// What was cut to stay within the limits.
    pub cuts: Cuts,
    /// Spans kept with an end before their start.
    pub bad_end_times: u64,
    /// Events and links dropped past the limits.
    pub dropped_events_links: u64,
}

const MAX_REPORTED_ERRORS: usize = 5;

impl Normalized {
    /// The OTLP partial-success message: why spans were rejected, and warnings about what was
    /// kept but cut. Empty when there is nothing to say.
    pub fn message(&self) -> String {
        let mut parts = Vec::new();
        if self.rejected > 0 {
            let mut msg = format!("rejected {} span(s): {}", self.rejected, self.errors.join("; "));
            if self.rejected as usize > self.errors.len() {
                msg.push_str("; ...");
            }
            parts.push(msg);
        }
        let c = &self.cuts;
        if c.truncated_values > 0 {
            parts.push(format!(
                "truncated {} value(s) over the value size limit",
                c.truncated_values
            ));
        }
        if c.dropped_attributes > 0 {
            parts.push(format!(
                "dropped {} attribute(s) over the per-span limit",
                c.dropped_attributes
            ));
        }
        if c.too_deep > 0 {
            parts.push(format!("replaced {} value(s) nested over the depth limit", c.too_deep));
        }
        if self.dropped_events_links > 0 {
            parts.push(format!(
                "dropped {} event(s)/link(s) over the per-span limit",
                self.dropped_events_links
            ));
        }
        if self.bad_end_times > 0 {
            parts.push(format!(
                "{} span(s) end before they start; their duration is 0",
                self.bad_end_times
            ));
        }
        parts.join("; ")
    }
}

macro_rules! known_keys {
    ($($name:ident = $key:literal,)*) => {
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        #[derive(Debug, Clone, Copy)]
        enum K { $($name,)* }
        const KEY_COUNT: usize = [$($key,)*].len();
        fn key_index(k: &str) -> Option<K> {
            // Most attributes of most spans are none of these (`http.route`, `db.statement`):
            // the first byte turns them away before the comparisons of the match.
            const FIRST: [bool; 256] = {
                let mut t = [false; 256];
                $(t[$key.as_bytes()[0] as usize] = true;)*
                t
            };
            if !FIRST[usize::from(*k.as_bytes().first()?)] {
                return None;
            }
            match k { $($key => Some(K::$name),)* _ => None }
        }
    };
}

known_keys! {
    OI_KIND = "openinference.span.kind",
    TL_KIND = "traceloop.span.kind",
    OPERATION = "gen_ai.operation.name",
    LLM_REQUEST_TYPE = "llm.request.type",
    GENAI_PROVIDER = "gen_ai.provider.name",
    GENAI_SYSTEM = "gen_ai.system",
    LLM_PROVIDER = "llm.provider",
    LLM_SYSTEM = "llm.system",
    GENAI_RESPONSE_MODEL = "gen_ai.response.model",
    GENAI_REQUEST_MODEL = "gen_ai.request.model",
    LLM_RESPONSE_MODEL = "llm.response.model",
    LLM_REQUEST_MODEL = "llm.request.model",
    LLM_MODEL_NAME = "llm.model_name",
    EMBEDDING_MODEL_NAME = "embedding.model_name",
    GENAI_INPUT_TOKENS = "gen_ai.usage.input_tokens",
    GENAI_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens",
    OI_PROMPT_TOKENS = "llm.token_count.prompt",
    TL_PROMPT_TOKENS = "llm.usage.prompt_tokens",
    GENAI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens",
    GENAI_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens",
    OI_COMPLETION_TOKENS = "llm.token_count.completion",
    TL_COMPLETION_TOKENS = "llm.usage.completion_tokens",
    GENAI_TOTAL_TOKENS = "gen_ai.usage.total_tokens",
    OI_TOTAL_TOKENS = "llm.token_count.total",
    TL_TOTAL_TOKENS = "llm.usage.total_tokens",
    GENAI_COST = "gen_ai.usage.cost",
    OI_COST = "llm.cost.total",
    GENAI_COST_USD = "gen_ai.usage.cost_usd",
    GENAI_TOOL_NAME = "gen_ai.tool.name",
    OI_TOOL_NAME = "tool.name",
    TL_ENTITY_NAME = "traceloop.entity.name",
    GENAI_AGENT_NAME = "gen_ai.agent.name",
    AGENT_NAME = "agent.name",
    SESSION_ID = "session.id",
    GENAI_CONVERSATION_ID = "gen_ai.conversation.id",
    TL_SESSION_ID = "traceloop.association.properties.session_id",
    LANGFUSE_SESSION_ID = "langfuse.session.id",
    USER_ID = "user.id",
    ENDUSER_ID = "enduser.id",
    TL_USER_ID = "traceloop.association.properties.user_id",
    LANGFUSE_USER_ID = "langfuse.user.id",
    GENAI_INPUT_MESSAGES = "gen_ai.input.messages",
    GENAI_OUTPUT_MESSAGES = "gen_ai.output.messages",
    INPUT_VALUE = "input.value",
    OUTPUT_VALUE = "output.value",
    TL_ENTITY_INPUT = "traceloop.entity.input",
    TL_ENTITY_OUTPUT = "traceloop.entity.output",
    GENAI_TOOL_ARGUMENTS = "gen_ai.tool.call.arguments",
    GENAI_TOOL_RESULT = "gen_ai.tool.call.result",
    GENAI_PROMPT = "gen_ai.prompt",
    GENAI_COMPLETION = "gen_ai.completion",
    GENAI_DATA_SOURCE = "gen_ai.data_source.id",
}

/// The known attributes of one span, found in one pass.
struct Attrs<'a> {
    slots: [Option<&'a AnyValue<'a>>; KEY_COUNT],
    list: &'a [KeyValue<'a>],
    oi_input_messages: bool,
    oi_output_messages: bool,
    tl_prompts: bool,
    tl_completions: bool,
    retrieval_documents: bool,
}

impl<'a> Attrs<'a> {
    fn new(list: &'a [KeyValue<'a>]) -> Self {
        let mut a = Self {
            slots: [None; KEY_COUNT],
            list,
            oi_input_messages: false,
            oi_output_messages: false,
            tl_prompts: false,
            tl_completions: false,
            retrieval_documents: false,
        };
        for kv in list {
            let key = kv.key;
            if let Some(k) = key_index(key) {
                if kv.value != AnyValue::Empty {
                    a.slots[k as usize] = Some(&kv.value);
                }
                continue;
            }
            if key.starts_with("llm.input_messages.") {
                a.oi_input_messages = true;
            } else if key.starts_with("llm.output_messages.") {
                a.oi_output_messages = true;
            } else if key.starts_with("gen_ai.prompt.") {
                a.tl_prompts = true;
            } else if key.starts_with("gen_ai.completion.") {
                a.tl_completions = true;
            } else if key.starts_with("retrieval.documents") {
                a.retrieval_documents = true;
            }
        }
        a
    }

    fn get(&self, k: K) -> Option<&'a AnyValue<'a>> {
        self.slots[k as usize]
    }

    fn has(&self, k: K) -> bool {
        self.slots[k as usize].is_some()
    }

    fn str(&self, keys: &[K]) -> Option<&'a str> {
        keys.iter().find_map(|k| as_str(self.get(*k)).filter(|s| !s.is_empty()))
    }

    fn int(&self, keys: &[K]) -> Option<i64> {
        keys.iter().find_map(|k| as_int(self.get(*k)))
    }

    fn float(&self, keys: &[K]) -> Option<f64> {
        keys.iter().find_map(|k| as_float(self.get(*k)))
    }
}

fn as_str<'a>(v: Option<&AnyValue<'a>>) -> Option<&'a str> {
    v?.as_str()
}

fn as_int(v: Option<&AnyValue<'_>>) -> Option<i64> {
    match v? {
        AnyValue::Int(i) => Some(*i),
        AnyValue::Double(d) if d.fract() == 0.0 && d.is_finite() => Some(*d as i64),
        AnyValue::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn as_float(v: Option<&AnyValue<'_>>) -> Option<f64> {
    match v? {
        AnyValue::Int(i) => Some(*i as f64),
        AnyValue::Double(d) if d.is_finite() => Some(*d),
        AnyValue::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn span_kind(k: i32) -> &'static str {
    match k {
        2 => kind::SERVER,
        3 => kind::CLIENT,
        4 => kind::PRODUCER,
        5 => kind::CONSUMER,
        // 1 is INTERNAL; UNSPECIFIED (0) is treated as INTERNAL, as the OTel spec allows.
        _ => kind::INTERNAL,
    }
}

fn status_code(code: i32) -> &'static str {
    match code {
        1 => status::OK,
        2 => status::ERROR,
        _ => status::UNSET,
    }
}

fn classify(a: &Attrs<'_>) -> &'static str {
    if let Some(k) = a.str(&[K::OI_KIND]) {
        return match k.to_ascii_uppercase().as_str() {
            "LLM" => span_type::LLM,
            "TOOL" => span_type::TOOL,
            "AGENT" => span_type::AGENT,
            "CHAIN" => span_type::CHAIN,
            "RETRIEVER" | "RERANKER" => span_type::RETRIEVAL,
            "EMBEDDING" => span_type::EMBEDDING,
            _ => span_type::OTHER,
        };
    }
    if let Some(k) = a.str(&[K::TL_KIND]) {
        return match k {
            "agent" => span_type::AGENT,
            "tool" => span_type::TOOL,
            "workflow" | "task" => span_type::CHAIN,
            _ => span_type::OTHER,
        };
    }
    if let Some(op) = a.str(&[K::OPERATION]) {
        match op {
            "chat" | "text_completion" | "generate_content" | "completion" => {
                return span_type::LLM;
            }
            "embeddings" | "embedding" => return span_type::EMBEDDING,
            "execute_tool" => return span_type::TOOL,
            "invoke_agent" | "create_agent" => return span_type::AGENT,
            "invoke_workflow" => return span_type::CHAIN,
            "retrieval" | "retrieve" => return span_type::RETRIEVAL,
            _ => {}
        }
    }
    if let Some(t) = a.str(&[K::LLM_REQUEST_TYPE]) {
        match t {
            "chat" | "completion" => return span_type::LLM,
            "embedding" => return span_type::EMBEDDING,
            "rerank" => return span_type::RETRIEVAL,
            _ => {}
        }
    }
    let llm_keys = [
        K::GENAI_REQUEST_MODEL,
        K::GENAI_SYSTEM,
        K::LLM_MODEL_NAME,
        K::LLM_REQUEST_MODEL,
        K::GENAI_INPUT_TOKENS,
        K::GENAI_PROMPT_TOKENS,
        K::OI_PROMPT_TOKENS,
    ];
    if llm_keys.iter().any(|k| a.has(*k)) {
        return span_type::LLM;
    }
    if a.has(K::GENAI_TOOL_NAME) || a.has(K::OI_TOOL_NAME) {
        return span_type::TOOL;
    }
    if a.has(K::GENAI_AGENT_NAME) || a.has(K::AGENT_NAME) {
        return span_type::AGENT;
    }
    if a.retrieval_documents || a.has(K::GENAI_DATA_SOURCE) {
        return span_type::RETRIEVAL;
    }
    span_type::OTHER
}

fn id<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N], String> {
    let arr: [u8; N] =
        bytes.try_into().map_err(|_| format!("{what} must be {N} bytes, got {}", bytes.len()))?;
    if arr.iter().all(|b| *b == 0) {
        return Err(format!("{what} is all zeros"));
    }
    Ok(arr)
}

/// Scratch buffers reused for every span.
#[derive(Default)]
struct Scratch {
    attributes: String,
    events: String,
    links: String,
}

/// Normalises every span of a decoded `prost` request into one batch (the OTLP/JSON and
/// redaction paths, and tests): the request is encoded again and read by [`normalize_request`],
/// so that every path shares one reader.
pub fn normalize(
    req: &ExportTraceServiceRequest,
    ctx: &NormalizeContext,
) -> crate::Result<Normalized> {
    use prost::Message as _;
    let bytes = req.encode_to_vec();
    Ok(normalize_request(&spanlake_proto::decode_view(&bytes)?, ctx)?)
}

/// Normalises every span of a request into one batch.
pub fn normalize_request(
    req: &ExportRequest<'_>,
    ctx: &NormalizeContext,
) -> spanlake_engine::Result<Normalized> {
    let total: usize =
        req.resource_spans.iter().flat_map(|rs| &rs.scope_spans).map(|ss| ss.spans.len()).sum();
    let mut builder =
        SpanBatchBuilder::with_text_capacity(total.min(ctx.max_spans), text_capacity(req));
    let mut out = Normalized {
        batch: RecordBatch::new_empty(spanlake_engine::schema::spans_schema()),
        rejected: 0,
        errors: Vec::new(),
        cuts: Cuts::default(),
        bad_end_times: 0,
        dropped_events_links: 0,
    };
    let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
    let max_start_ns = now_ns
        .saturating_add(i64::try_from(ctx.limits.max_future_skew.as_nanos()).unwrap_or(i64::MAX));
    let mut json = JsonWriter::new(&ctx.limits);
    let mut scratch = Scratch::default();
    let mut seen: HashSet<([u8; 16], [u8; 8])> = HashSet::with_capacity(total.min(ctx.max_spans));
    let mut taken = 0usize;
    for rs in &req.resource_spans {
        let resource_attrs = rs.resource_attributes.as_slice();
        let service_name = resource_attrs
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_str());
        let mut resource_json = String::new();
        json.attributes(&mut resource_json, resource_attrs);
        for ss in &rs.scope_spans {
            let mut scope_json = String::from("{");
            if let Some(scope) = &ss.scope {
                scope_json.push_str("\"name\":");
                write_str(&mut scope_json, scope.name);
                scope_json.push_str(",\"version\":");
                write_str(&mut scope_json, scope.version);
                scope_json.push_str(",\"attributes\":");
                json.attributes(&mut scope_json, &scope.attributes);
            }
            scope_json.push('}');
            for span in &ss.spans {
                let reject = |out: &mut Normalized, reason: String| {
                    out.rejected += 1;
                    if out.errors.len() < MAX_REPORTED_ERRORS {
                        out.errors.push(format!(
                            "span {:?} ({}): {reason}",
                            span.name,
                            hex_lossy(span.span_id)
                        ));
                    }
                };
                if taken >= ctx.max_spans {
                    reject(
                        &mut out,
                        format!("over the limit of {} spans per request", ctx.max_spans),
                    );
                    continue;
                }
                let ids = (id::<16>(span.trace_id, "trace_id"), id::<8>(span.span_id, "span_id"));
                let (trace_id, span_id) = match ids {
                    (Ok(t), Ok(s)) => (t, s),
                    (Err(e), _) | (_, Err(e)) => {
                        reject(&mut out, e);
                        continue;
                    }
                };
                let parent_span_id = match span.parent_span_id {
                    [] => None,
                    p if p.iter().all(|b| *b == 0) => None,
                    p => match id::<8>(p, "parent_span_id") {
                        Ok(p) => Some(p),
                        Err(e) => {
                            reject(&mut out, e);
                            continue;
                        }
                    },
                };
                let start = i64::try_from(span.start_time_unix_nano).unwrap_or(i64::MAX);
                if start == 0 {
                    reject(&mut out, "start_time_unix_nano is 0".into());
                    continue;
                }
                if start > max_start_ns {
                    reject(
                        &mut out,
                        format!("starts more than {:?} in the future", ctx.limits.max_future_skew),
                    );
                    continue;
                }
                if !seen.insert((trace_id, span_id)) {
                    reject(&mut out, "duplicate of an earlier span in this request".into());
                    continue;
                }
                let end = i64::try_from(span.end_time_unix_nano).unwrap_or(i64::MAX);
                if end < start {
                    out.bad_end_times += 1;
                }
                taken += 1;
                let fields = SpanFields { trace_id, span_id, parent_span_id, start, end };
                append_span(
                    span,
                    fields,
                    service_name,
                    &resource_json,
                    &scope_json,
                    ctx,
                    &mut json,
                    &mut scratch,
                    &mut builder,
                    &mut out,
                );
            }
        }
    }
    out.cuts.add(json.cuts);
    out.batch = builder.finish()?;
    Ok(out)
}

/// Room the large text columns will need for a request, from the string values its spans carry
/// (one cheap pass over the keys): everything for `attributes` (plus key and JSON punctuation,
/// plus a little for escaping) except the values `input` and `output` may take whole,
/// prompt-like and completion-like keys for `input` and `output`.
fn text_capacity(req: &ExportRequest<'_>) -> TextCapacity {
    let mut c = TextCapacity::default();
    let len = |v: &AnyValue<'_>| match v {
        AnyValue::String(s) => s.len(),
        _ => 8,
    };
    for span in req.resource_spans.iter().flat_map(|rs| &rs.scope_spans).flat_map(|ss| &ss.spans) {
        for kv in &span.attributes {
            let n = len(&kv.value);
            let k = kv.key;
            let known = key_index(k);
            // The keys `input` and `output` are read from (see `append_span`). A value one of
            // them takes whole is a short reference in `attributes`.
            let whole_input = matches!(
                known,
                Some(
                    K::GENAI_INPUT_MESSAGES
                        | K::INPUT_VALUE
                        | K::TL_ENTITY_INPUT
                        | K::GENAI_TOOL_ARGUMENTS
                        | K::GENAI_PROMPT
                )
            );
            let whole_output = matches!(
                known,
                Some(
                    K::GENAI_OUTPUT_MESSAGES
                        | K::OUTPUT_VALUE
                        | K::TL_ENTITY_OUTPUT
                        | K::GENAI_TOOL_RESULT
                        | K::GENAI_COMPLETION
                )
            );
            let whole = whole_input || whole_output;
            c.attributes += kv.key.len() + if whole { 20 } else { n + n / 16 } + 6;
            if whole_input
                || k.starts_with("llm.input_messages.")
                || k.starts_with("gen_ai.prompt.")
            {
                c.input += n + n / 16;
            } else if whole_output
                || k.starts_with("llm.output_messages.")
                || k.starts_with("gen_ai.completion.")
            {
                c.output += n + n / 16;
            }
        }
        for e in &span.events {
            c.events += e.name.len() + 48;
            for kv in &e.attributes {
                c.events += kv.key.len() + len(&kv.value) + 6;
            }
        }
        c.attributes += 2;
    }
    c
}

fn hex_lossy(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes.iter().take(32) {
        let _ = write!(s, "{b:02x}");
    }
    s
}

struct SpanFields {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    start: i64,
    end: i64,
}

#[allow(clippy::too_many_arguments)]
fn append_span(
    span: &Span<'_>,
    f: SpanFields,
    service_name: Option<&str>,
    resource_json: &str,
    scope_json: &str,
    ctx: &NormalizeContext,
    json: &mut JsonWriter<'_>,
    scratch: &mut Scratch,
    builder: &mut SpanBatchBuilder,
    out: &mut Normalized,
) {
    let a = Attrs::new(&span.attributes);
    let span_type = classify(&a);
    let traceloop_kind = a.str(&[K::TL_KIND]);
    let provider = a.str(&[K::GENAI_PROVIDER, K::GENAI_SYSTEM, K::LLM_PROVIDER, K::LLM_SYSTEM]);
    let model = a.str(&[
        K::GENAI_RESPONSE_MODEL,
        K::GENAI_REQUEST_MODEL,
        K::LLM_RESPONSE_MODEL,
        K::LLM_REQUEST_MODEL,
        K::LLM_MODEL_NAME,
        K::EMBEDDING_MODEL_NAME,
    ]);
    let counts_tokens = matches!(span_type, span_type::LLM | span_type::EMBEDDING);
    let (input_tokens, output_tokens, total_tokens) = if counts_tokens {
        let input = a.int(&[
            K::GENAI_INPUT_TOKENS,
            K::GENAI_PROMPT_TOKENS,
            K::OI_PROMPT_TOKENS,
            K::TL_PROMPT_TOKENS,
        ]);
        let output = a.int(&[
            K::GENAI_OUTPUT_TOKENS,
            K::GENAI_COMPLETION_TOKENS,
            K::OI_COMPLETION_TOKENS,
            K::TL_COMPLETION_TOKENS,
        ]);
        let total = a.int(&[K::GENAI_TOTAL_TOKENS, K::OI_TOTAL_TOKENS, K::TL_TOTAL_TOKENS]).or(
            match (input, output) {
                (None, None) => None,
                (i, o) => Some(i.unwrap_or(0) + o.unwrap_or(0)),
            },
        );
        (input, output, total)
    } else {
        (None, None, None)
    };
    let cost_usd = a.float(&[K::GENAI_COST, K::OI_COST, K::GENAI_COST_USD]).or_else(|| {
        if !counts_tokens {
            return None;
        }
        ctx.prices.cost(model?, input_tokens, output_tokens)
    });
    let tool_name = a.str(&[K::GENAI_TOOL_NAME, K::OI_TOOL_NAME]).or_else(|| {
        if traceloop_kind == Some("tool") {
            a.str(&[K::TL_ENTITY_NAME])
        } else if span_type == span_type::TOOL {
            Some(span.name)
        } else {
            None
        }
    });
    let agent_name = a.str(&[K::GENAI_AGENT_NAME, K::AGENT_NAME]).or_else(|| {
        if traceloop_kind == Some("agent") {
            a.str(&[K::TL_ENTITY_NAME])
        } else if span_type == span_type::AGENT {
            Some(span.name)
        } else {
            None
        }
    });
    let session_id =
        a.str(&[K::SESSION_ID, K::GENAI_CONVERSATION_ID, K::TL_SESSION_ID, K::LANGFUSE_SESSION_ID]);
    let user_id = a.str(&[K::USER_ID, K::ENDUSER_ID, K::TL_USER_ID, K::LANGFUSE_USER_ID]);

    let input: Option<Cow<'_, str>> = a
        .str(&[K::GENAI_INPUT_MESSAGES])
        .map(Cow::Borrowed)
        .or_else(|| {
            a.oi_input_messages.then(|| unflatten_messages(&a, "llm.input_messages.")).flatten()
        })
        .or_else(|| a.tl_prompts.then(|| unflatten_messages(&a, "gen_ai.prompt.")).flatten())
        .or_else(|| event_messages(span, false))
        .or_else(|| {
            a.str(&[K::INPUT_VALUE, K::TL_ENTITY_INPUT, K::GENAI_TOOL_ARGUMENTS, K::GENAI_PROMPT])
                .map(Cow::Borrowed)
        });
    let output: Option<Cow<'_, str>> = a
        .str(&[K::GENAI_OUTPUT_MESSAGES])
        .map(Cow::Borrowed)
        .or_else(|| {
            a.oi_output_messages.then(|| unflatten_messages(&a, "llm.output_messages.")).flatten()
        })
        .or_else(|| {
            a.tl_completions.then(|| unflatten_messages(&a, "gen_ai.completion.")).flatten()
        })
        .or_else(|| event_messages(span, true))
        .or_else(|| {
            a.str(&[
                K::OUTPUT_VALUE,
                K::TL_ENTITY_OUTPUT,
                K::GENAI_TOOL_RESULT,
                K::GENAI_COMPLETION,
            ])
            .map(Cow::Borrowed)
        });
    let max = ctx.limits.max_value_bytes;
    let (input, cut_in) = limit_value(input, max);
    let (output, cut_out) = limit_value(output, max);
    out.cuts.truncated_values += u64::from(cut_in) + u64::from(cut_out);

    scratch.attributes.clear();
    // Text taken whole from one attribute is kept once, in its column.
    let mut moved = [("", ""); 2];
    let mut n = 0;
    for (value, cut, column) in [(&input, cut_in, col::INPUT), (&output, cut_out, col::OUTPUT)] {
        if let Some(Cow::Borrowed(v)) = value
            && !cut
            && !v.is_empty()
        {
            moved[n] = (v, column);
            n += 1;
        }
    }
    json.span_attributes(&mut scratch.attributes, &span.attributes, &moved[..n]);
    scratch.events.clear();
    out.dropped_events_links +=
        write_events(&mut scratch.events, span, json, ctx.limits.max_events);
    scratch.links.clear();
    out.dropped_events_links += write_links(&mut scratch.links, span, json, ctx.limits.max_links);

    let status = span.status.as_ref();
    builder.append(&SpanRecord {
        trace_id: f.trace_id,
        span_id: f.span_id,
        parent_span_id: f.parent_span_id,
        trace_state: span.trace_state,
        name: span.name,
        kind: span_kind(span.kind),
        service_name,
        start_time_ns: f.start,
        end_time_ns: f.end,
        status_code: status_code(status.map_or(0, |s| s.code)),
        status_message: status.map_or("", |s| s.message),
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
        input: input.as_deref(),
        output: output.as_deref(),
        attributes: &scratch.attributes,
        resource_attributes: resource_json,
        events: &scratch.events,
        links: &scratch.links,
        scope: scope_json,
    });
}

/// A value cut to `max` bytes with the truncation marker; whether it was cut.
fn limit_value(s: Option<Cow<'_, str>>, max: usize) -> (Option<Cow<'_, str>>, bool) {
    let Some(s) = s else { return (None, false) };
    match truncate(&s, max) {
        Some(cut) => (Some(Cow::Owned(cut)), true),
        None => (Some(s), false),
    }
}

/// Writes the span's events as a JSON array; returns how many were dropped over `max`.
fn write_events(out: &mut String, span: &Span<'_>, json: &mut JsonWriter<'_>, max: usize) -> u64 {
    out.push('[');
    for (i, e) in span.events.iter().take(max).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"name\":");
        write_str(out, e.name);
        let _ = write!(out, ",\"time_unix_nano\":{},\"attributes\":", e.time_unix_nano);
        json.attributes(out, &e.attributes);
        out.push('}');
    }
    out.push(']');
    span.events.len().saturating_sub(max) as u64
}

/// Writes the span's links as a JSON array; returns how many were dropped over `max`.
fn write_links(out: &mut String, span: &Span<'_>, json: &mut JsonWriter<'_>, max: usize) -> u64 {
    out.push('[');
    for (i, l) in span.links.iter().take(max).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"trace_id\":");
        write_str(out, &hex_lossy(l.trace_id));
        out.push_str(",\"span_id\":");
        write_str(out, &hex_lossy(l.span_id));
        if !l.trace_state.is_empty() {
            out.push_str(",\"trace_state\":");
            write_str(out, l.trace_state);
        }
        out.push_str(",\"attributes\":");
        json.attributes(out, &l.attributes);
        out.push('}');
    }
    out.push(']');
    span.links.len().saturating_sub(max) as u64
}

/// An AnyValue as a JSON tree (for rebuilding flattened message lists).
fn any_to_json(v: &AnyValue<'_>) -> Value {
    match v {
        AnyValue::Empty => Value::Null,
        AnyValue::String(s) => Value::String((*s).to_string()),
        AnyValue::Bool(b) => Value::Bool(*b),
        AnyValue::Int(i) => Value::from(*i),
        AnyValue::Double(d) => serde_json::Number::from_f64(*d)
            .map_or_else(|| Value::String(d.to_string()), Value::Number),
        AnyValue::Array(a) => Value::Array(a.iter().map(any_to_json).collect()),
        AnyValue::Kvlist(list) => Value::Object(
            list.iter().map(|kv| (kv.key.to_string(), any_to_json(&kv.value))).collect(),
        ),
        AnyValue::Bytes(b) => {
            use base64::Engine as _;
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
    }
}

/// Rebuilds flattened attributes under `prefix` (`prefix.0.message.role` ...) into a JSON array
/// of objects, dropping OpenInference's single-key wrappers (`message`, `tool_call`,
/// `message_content`).
fn unflatten_messages<'x>(a: &Attrs<'_>, prefix: &str) -> Option<Cow<'x, str>> {
    let mut root = Value::Object(Map::new());
    let mut any = false;
    for kv in a.list {
        let Some(path) = kv.key.strip_prefix(prefix) else { continue };
        let value = &kv.value;
        if *value == AnyValue::Empty {
            continue;
        }
        // Only indexed entries (`0.role`), not e.g. `gen_ai.prompt` itself.
        if path.split('.').next().is_none_or(|s| s.parse::<usize>().is_err()) {
            continue;
        }
        insert_path(&mut root, path.split('.'), any_to_json(value));
        any = true;
    }
    any.then(|| Cow::Owned(tidy(root).to_string()))
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
                return m.into_iter().next().map_or(Value::Null, |(_, inner)| tidy(inner));
            }
            Value::Object(m.into_iter().map(|(k, v)| (k, tidy(v))).collect())
        }
        other => other,
    }
}

/// Messages carried as span events by the older GenAI conventions (`gen_ai.user.message`,
/// `gen_ai.choice`, ...) or the `gen_ai.client.inference.operation.details` event.
fn event_messages<'x>(span: &Span<'_>, output: bool) -> Option<Cow<'x, str>> {
    if span.events.is_empty() {
        return None;
    }
    let mut messages = Vec::new();
    for e in &span.events {
        let key = if output { "gen_ai.output.messages" } else { "gen_ai.input.messages" };
        if let Some(s) =
            e.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_str())
        {
            return Some(Cow::Owned(s.to_string()));
        }
        let role = match e.name {
            "gen_ai.choice" if output => "assistant",
            "gen_ai.system.message" if !output => "system",
            "gen_ai.user.message" if !output => "user",
            "gen_ai.assistant.message" if !output => "assistant",
            "gen_ai.tool.message" if !output => "tool",
            _ => continue,
        };
        let mut m: Map<String, Value> =
            e.attributes.iter().map(|kv| (kv.key.to_string(), any_to_json(&kv.value))).collect();
        m.entry("role").or_insert_with(|| Value::String(role.to_string()));
        messages.push(Value::Object(m));
    }
    (!messages.is_empty()).then(|| Cow::Owned(Value::Array(messages).to_string()))
}

#[cfg(test)]
mod tests;
