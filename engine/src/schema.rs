//! The `spans` table: spanlake's public contract.
//!
//! Columns may be added; none may be renamed or dropped. The attribute columns hold JSON text
//! (objects keyed by attribute name; typed values: strings, numbers, booleans, arrays, objects;
//! bytes as base64 strings), so every attribute is reachable from SQL by key with its type, e.g.
//! `json_get_int(attributes, 'gen_ai.usage.input_tokens')` or `attributes->>'session.id'`.

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Name of the span table.
pub const SPANS_TABLE: &str = "spans";

/// Column names, in schema order.
pub mod col {
    #![allow(missing_docs)]
    pub const TRACE_ID: &str = "trace_id";
    pub const SPAN_ID: &str = "span_id";
    pub const PARENT_SPAN_ID: &str = "parent_span_id";
    pub const TRACE_STATE: &str = "trace_state";
    pub const NAME: &str = "name";
    pub const KIND: &str = "kind";
    pub const SERVICE_NAME: &str = "service_name";
    pub const START_TIME: &str = "start_time";
    pub const END_TIME: &str = "end_time";
    pub const DURATION_MS: &str = "duration_ms";
    pub const STATUS_CODE: &str = "status_code";
    pub const STATUS_MESSAGE: &str = "status_message";
    pub const SPAN_TYPE: &str = "span_type";
    pub const PROVIDER: &str = "provider";
    pub const MODEL: &str = "model";
    pub const INPUT_TOKENS: &str = "input_tokens";
    pub const OUTPUT_TOKENS: &str = "output_tokens";
    pub const TOTAL_TOKENS: &str = "total_tokens";
    pub const COST_USD: &str = "cost_usd";
    pub const TOOL_NAME: &str = "tool_name";
    pub const AGENT_NAME: &str = "agent_name";
    pub const SESSION_ID: &str = "session_id";
    pub const USER_ID: &str = "user_id";
    pub const INPUT: &str = "input";
    pub const OUTPUT: &str = "output";
    pub const ATTRIBUTES: &str = "attributes";
    pub const RESOURCE_ATTRIBUTES: &str = "resource_attributes";
    pub const EVENTS: &str = "events";
    pub const LINKS: &str = "links";
    pub const SCOPE: &str = "scope";
}

/// Prompts and completions are stored once. When `input` or `output` is one string attribute's
/// value taken as it was sent (`input.value`, `gen_ai.input.messages`, tool call arguments, …),
/// that attribute stays in `attributes` under its key, but its value there is the object
/// `{"$column": "input"}` (or `"output"`) instead of a second copy of the text. Readers that
/// rebuild spans (the trace API, the Jaeger and Tempo APIs, replay) put the text back; SQL sees
/// the reference. LLM spans are mostly this text, so storing it twice doubled their memory,
/// WAL, compression and disk.
pub const MOVED_TO_COLUMN: &str = "$column";

/// The timestamp type of `start_time` and `end_time`.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    use DataType::{Float64, Int64, Utf8};
    let f = |name: &str, ty: DataType, nullable: bool| Field::new(name, ty, nullable);
    Arc::new(Schema::new(vec![
        f(col::TRACE_ID, Utf8, false),
        f(col::SPAN_ID, Utf8, false),
        f(col::PARENT_SPAN_ID, Utf8, true),
        f(col::TRACE_STATE, Utf8, true),
        f(col::NAME, Utf8, false),
        f(col::KIND, Utf8, false),
        f(col::SERVICE_NAME, Utf8, true),
        f(col::START_TIME, timestamp_type(), false),
        f(col::END_TIME, timestamp_type(), false),
        f(col::DURATION_MS, Float64, false),
        f(col::STATUS_CODE, Utf8, false),
        f(col::STATUS_MESSAGE, Utf8, true),
        f(col::SPAN_TYPE, Utf8, false),
        f(col::PROVIDER, Utf8, true),
        f(col::MODEL, Utf8, true),
        f(col::INPUT_TOKENS, Int64, true),
        f(col::OUTPUT_TOKENS, Int64, true),
        f(col::TOTAL_TOKENS, Int64, true),
        f(col::COST_USD, Float64, true),
        f(col::TOOL_NAME, Utf8, true),
        f(col::AGENT_NAME, Utf8, true),
        f(col::SESSION_ID, Utf8, true),
        f(col::USER_ID, Utf8, true),
        f(col::INPUT, Utf8, true),
        f(col::OUTPUT, Utf8, true),
        f(col::ATTRIBUTES, Utf8, false),
        f(col::RESOURCE_ATTRIBUTES, Utf8, false),
        f(col::EVENTS, Utf8, false),
        f(col::LINKS, Utf8, false),
        f(col::SCOPE, Utf8, false),
    ]))
});

/// The Arrow schema of the `spans` table.
pub fn spans_schema() -> SchemaRef {
    Arc::clone(&SCHEMA)
}
