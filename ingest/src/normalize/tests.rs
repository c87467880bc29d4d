use std::path::PathBuf;

use super::*;
use serde_json::json;
use spanlake_proto::common::{AnyValue, KeyValue, any_value};
use spanlake_proto::trace::Span;
use spanlake_proto::{decode_json, decode_protobuf};

fn fixtures_dir() -> PathBuf {
    std::env::var_os("SPANLAKE_FIXTURES")
        .map_or_else(|| manifest_dir().join("../../shared/fixtures"), PathBuf::from)
}

fn index() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures_dir().join("index.json")).expect("fixtures index");
    serde_json::from_str(&text).unwrap()
}

/// The rows of a batch as JSON objects (nulls omitted).
fn rows(batch: &RecordBatch) -> Vec<Map<String, Value>> {
    let mut w = arrow::json::ArrayWriter::new(Vec::new());
    w.write(batch).unwrap();
    w.finish().unwrap();
    let bytes = w.into_inner();
    if bytes.is_empty() {
        return Vec::new();
    }
    serde_json::from_slice(&bytes).unwrap()
}

fn run(req: &ExportTraceServiceRequest) -> (Normalized, Vec<Map<String, Value>>) {
    let n = normalize(req, &NormalizeContext::default()).unwrap();
    let r = rows(&n.batch);
    (n, r)
}

type Rows = Vec<Map<String, Value>>;

fn load(name: &str) -> (Rows, Rows) {
    let dir = fixtures_dir();
    let pb = std::fs::read(dir.join(format!("{name}.otlp.pb"))).unwrap();
    let js = std::fs::read(dir.join(format!("{name}.otlp.json"))).unwrap();
    let (a, from_pb) = run(&decode_protobuf(&pb).unwrap());
    let (b, from_json) = run(&decode_json(&js).unwrap());
    assert_eq!((a.rejected, b.rejected), (0, 0), "{name}");
    (from_pb, from_json)
}

fn find<'r>(rows: &'r [Map<String, Value>], span_id: &str) -> &'r Map<String, Value> {
    rows.iter().find(|r| r["span_id"] == span_id).unwrap_or_else(|| panic!("span {span_id}"))
}

fn parse(v: &Value) -> Value {
    serde_json::from_str(v.as_str().unwrap()).unwrap()
}

#[test]
fn fixtures_normalise_to_expected_span_types_and_tokens() {
    let prices = PriceTable::default();
    for fixture in index() {
        let name = fixture["fixture"].as_str().unwrap();
        let (rows, from_json) = load(name);
        assert_eq!(rows, from_json, "{name}: protobuf and JSON differ");
        let expected = fixture["spans"].as_array().unwrap();
        assert_eq!(rows.len(), expected.len(), "{name}");
        for e in expected {
            let id = e["span_id"].as_str().unwrap();
            let row = find(&rows, id);
            assert_eq!(row["name"], e["name"], "{name} {id}");
            assert_eq!(row["span_type"], e["expected_span_type"], "{name} {id} {}", row["name"]);
            assert_eq!(
                row.get("parent_span_id").unwrap_or(&Value::Null),
                &e["parent_span_id"],
                "{name} {id}"
            );
            assert_eq!(row["service_name"], format!("fixture-{name}"));
        }
        // LLM spans in time order carry exactly the usage the test server returned.
        let mut llm: Vec<_> = rows.iter().filter(|r| r["span_type"] == "llm").collect();
        llm.sort_by_key(|r| r["start_time"].as_str().unwrap().to_string());
        let usage = fixture["llm_usage_returned_by_the_mock"].as_array().unwrap();
        assert_eq!(llm.len(), usage.len(), "{name}");
        for (row, u) in llm.iter().zip(usage) {
            assert_eq!(row["input_tokens"], u["input_tokens"], "{name}");
            assert_eq!(row["output_tokens"], u["output_tokens"], "{name}");
            assert_eq!(row["total_tokens"], u["total_tokens"], "{name}");
            assert_eq!(row["model"], u["model"], "{name}");
            assert_eq!(row["provider"], "openai", "{name}");
            let cost = prices
                .cost("gpt-4o-mini", u["input_tokens"].as_i64(), u["output_tokens"].as_i64())
                .unwrap();
            assert_eq!(row["cost_usd"].as_f64(), Some(cost), "{name}");
            assert!(
                row.contains_key("input") && row.contains_key("output"),
                "{name}: llm input/output"
            );
        }
        // Tokens stay on LLM spans only.
        for r in rows.iter().filter(|r| r["span_type"] != "llm") {
            for c in ["input_tokens", "output_tokens", "total_tokens", "cost_usd"] {
                assert!(!r.contains_key(c), "{name} {} has {c}", r["name"]);
            }
        }
        for r in rows.iter().filter(|r| r["span_type"] == "tool") {
            assert_eq!(r["tool_name"], "get_weather", "{name}");
        }
        assert!(
            rows.iter().any(|r| r.get("session_id") == Some(&json!("session-fixture-1"))),
            "{name}"
        );
        // Every JSON column parses.
        for r in &rows {
            for c in ["attributes", "resource_attributes", "events", "links", "scope"] {
                parse(&r[c]);
            }
        }
    }
}

#[test]
fn openinference_messages_are_rebuilt() {
    let (rows, _) = load("openai-openinference");
    let row = find(&rows, "b206f36d6952ca4a");
    let input = parse(&row["input"]);
    assert_eq!(input[0]["role"], "system");
    assert_eq!(input[1]["content"], "What's the weather in Paris?");
    assert_eq!(input[2]["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(input[3]["tool_call_id"], "call_80f46b374a9542439811");
    let output = parse(&row["output"]);
    assert_eq!(output[0]["content"], "It is sunny and 22 degrees Celsius in Paris.");
    assert_eq!(row["user_id"], "user-fixture-1");
    let attrs = parse(&row["attributes"]);
    assert_eq!(attrs["llm.token_count.total"], 140);
    assert_eq!(attrs["llm.model_name"], "gpt-4o-mini");
}

#[test]
fn openllmetry_association_properties_and_entities() {
    let (rows, _) = load("openai-openllmetry");
    let agent = find(&rows, "6f26d00bac64ce5a");
    assert_eq!(agent["agent_name"], "WeatherAgent");
    assert_eq!(agent["user_id"], "user-fixture-1");
    let tool = find(&rows, "017346a23fbc4cd2");
    assert_eq!(tool["output"], "\"sunny, 22C in Paris\"");
    let chat = find(&rows, "2a2bb31e8e32955c");
    assert_eq!(chat["kind"], "client");
    assert_eq!(chat["status_code"], "unset");
    let attrs = parse(&chat["attributes"]);
    assert_eq!(attrs["gen_ai.response.finish_reasons"], json!(["tool_call"]));
    assert_eq!(attrs["gen_ai.is_streaming"], false);
}

#[test]
fn otel_genai_conversation_is_session() {
    let (rows, _) = load("openai-otel-genai");
    let agent = find(&rows, "e1e56496fa8a3f77");
    assert_eq!(agent["session_id"], "session-fixture-1");
    assert_eq!(agent["agent_name"], "WeatherAgent");
    assert!(!agent.contains_key("parent_span_id"));
}

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

fn span(trace: Vec<u8>, id: Vec<u8>, attrs: Vec<KeyValue>) -> Span {
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap() as u64;
    Span {
        trace_id: trace,
        span_id: id,
        name: "s".into(),
        start_time_unix_nano: now,
        end_time_unix_nano: now + 2_999_000,
        attributes: attrs,
        ..Default::default()
    }
}

fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
    use spanlake_proto::trace::{ResourceSpans, ScopeSpans};
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
}

#[test]
fn deprecated_genai_names_and_openllmetry_prompts() {
    use any_value::Value as V;
    let s = span(
        vec![1; 16],
        vec![2; 8],
        vec![
            kv("gen_ai.system", V::StringValue("anthropic".into())),
            kv("gen_ai.request.model", V::StringValue("claude-3-5-sonnet-20241022".into())),
            kv("gen_ai.usage.prompt_tokens", V::IntValue(1000)),
            kv("gen_ai.usage.completion_tokens", V::IntValue(500)),
            kv("llm.usage.total_tokens", V::IntValue(1500)),
            kv("gen_ai.prompt.0.role", V::StringValue("user".into())),
            kv("gen_ai.prompt.0.content", V::StringValue("hi".into())),
            kv("gen_ai.completion.0.role", V::StringValue("assistant".into())),
            kv("gen_ai.completion.0.content", V::StringValue("hello".into())),
        ],
    );
    let (_, rows) = run(&request(vec![s]));
    let row = &rows[0];
    assert_eq!(row["span_type"], "llm");
    assert_eq!(row["provider"], "anthropic");
    assert_eq!(
        (&row["input_tokens"], &row["output_tokens"], &row["total_tokens"]),
        (&json!(1000), &json!(500), &json!(1500))
    );
    assert_eq!(row["cost_usd"].as_f64(), Some((1000.0 * 3.0 + 500.0 * 15.0) / 1e6));
    assert_eq!(parse(&row["input"]), json!([{"content": "hi", "role": "user"}]));
    assert_eq!(parse(&row["output"]), json!([{"content": "hello", "role": "assistant"}]));
    assert_eq!(row["duration_ms"], json!(2.999));
    assert_eq!(row["kind"], "internal");
}

#[test]
fn own_cost_attribute_wins_and_total_is_derived() {
    use any_value::Value as V;
    let s = span(
        vec![1; 16],
        vec![2; 8],
        vec![
            kv("gen_ai.operation.name", V::StringValue("chat".into())),
            kv("gen_ai.request.model", V::StringValue("gpt-4o".into())),
            kv("gen_ai.usage.input_tokens", V::IntValue(10)),
            kv("gen_ai.usage.output_tokens", V::IntValue(5)),
            kv("gen_ai.usage.cost", V::DoubleValue(0.5)),
        ],
    );
    let (_, rows) = run(&request(vec![s]));
    assert_eq!(rows[0]["total_tokens"], 15);
    assert_eq!(rows[0]["cost_usd"], 0.5);
}

#[test]
fn invalid_spans_are_rejected_one_by_one_and_valid_ones_kept() {
    let mut bad_parent = span(vec![1; 16], vec![3; 8], vec![]);
    bad_parent.parent_span_id = vec![3; 4];
    let mut zero_start = span(vec![1; 16], vec![4; 8], vec![]);
    zero_start.start_time_unix_nano = 0;
    let mut future = span(vec![1; 16], vec![5; 8], vec![]);
    future.start_time_unix_nano += 3 * 24 * 3600 * 1_000_000_000;
    let mut backwards = span(vec![1; 16], vec![6; 8], vec![]);
    backwards.end_time_unix_nano = backwards.start_time_unix_nano - 1;
    let (n, rows) = run(&request(vec![
        span(vec![1; 15], vec![2; 8], vec![]),
        span(vec![1; 16], vec![0; 8], vec![]),
        bad_parent,
        zero_start,
        future,
        span(vec![1; 16], vec![7; 8], vec![]),
        span(vec![1; 16], vec![7; 8], vec![]),
        backwards,
    ]));
    assert_eq!(n.rejected, 6);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["span_id"], "0707070707070707");
    assert_eq!(rows[1]["duration_ms"], 0.0);
    let msg = n.message();
    for part in [
        "rejected 6 span(s): ",
        "span \"s\" (0202020202020202): trace_id must be 16 bytes, got 15",
        "span \"s\" (0000000000000000): span_id is all zeros",
        "parent_span_id must be 8 bytes, got 4",
        "start_time_unix_nano is 0",
        "starts more than 86400s in the future",
        "; ...",
        "1 span(s) end before they start; their duration is 0",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg:?}");
    }
}

#[test]
fn huge_prompts_are_truncated_but_usage_is_kept() {
    use any_value::Value as V;
    let prompt = "p".repeat(300 << 10);
    let s = span(
        vec![1; 16],
        vec![2; 8],
        vec![
            kv("gen_ai.operation.name", V::StringValue("chat".into())),
            kv("gen_ai.request.model", V::StringValue("gpt-4o".into())),
            kv("gen_ai.input.messages", V::StringValue(prompt.clone())),
            kv("gen_ai.usage.input_tokens", V::IntValue(70_000)),
            kv("gen_ai.usage.output_tokens", V::IntValue(5)),
        ],
    );
    let (n, rows) = run(&request(vec![s]));
    let input = rows[0]["input"].as_str().unwrap();
    let limit = SpanLimits::default().max_value_bytes;
    assert_eq!(
        input.len(),
        limit + format!("…[truncated: {limit} of {} bytes]", prompt.len()).len()
    );
    assert!(input.ends_with(&format!("…[truncated: {limit} of {} bytes]", 300 << 10)));
    assert_eq!(rows[0]["input_tokens"], 70_000);
    assert_eq!(rows[0]["model"], "gpt-4o");
    // Once in the input column and once in the attribute.
    assert_eq!(n.cuts.truncated_values, 2);
    assert!(n.message().contains("truncated 2 value(s)"), "{}", n.message());
}

#[test]
fn text_taken_whole_from_an_attribute_is_stored_once() {
    use any_value::Value as V;
    let s = |v: &str| V::StringValue(v.into());
    let prompt = r#"[{"role":"user","content":"say \"hi\""}]"#;
    let spans = vec![
        // OpenInference: `input.value` and `output.value` become the columns.
        span(
            vec![1; 16],
            vec![1; 8],
            vec![
                kv("openinference.span.kind", s("LLM")),
                kv("input.value", s(prompt)),
                kv("output.value", s("hi")),
                kv("note", s(prompt)),
            ],
        ),
        // Both GenAI messages and `input.value`: only the one the column took is a reference.
        span(
            vec![1; 16],
            vec![2; 8],
            vec![
                kv("gen_ai.operation.name", s("chat")),
                kv("input.value", s("other")),
                kv("gen_ai.input.messages", s(prompt)),
                kv("gen_ai.output.messages", s("")),
            ],
        ),
        // Rebuilt from flattened messages: nothing is taken whole.
        span(
            vec![1; 16],
            vec![3; 8],
            vec![
                kv("llm.input_messages.0.message.role", s("user")),
                kv("llm.input_messages.0.message.content", s("hey")),
            ],
        ),
    ];
    let (n, rows) = run(&request(spans));
    assert_eq!(n.rejected, 0);
    let attrs = |i: usize| rows[i]["attributes"].as_str().unwrap().to_string();
    assert_eq!(rows[0]["input"], prompt);
    assert_eq!(rows[0]["output"], "hi");
    // An equal value under another key is not the one the column took: it stays.
    assert_eq!(
        attrs(0),
        format!(
            r#"{{"openinference.span.kind":"LLM","input.value":{{"$column":"input"}},"output.value":{{"$column":"output"}},"note":{}}}"#,
            serde_json::to_string(prompt).unwrap()
        )
    );
    assert_eq!(rows[1]["input"], prompt);
    // An empty value is not worth a reference.
    assert_eq!(
        attrs(1),
        r#"{"gen_ai.operation.name":"chat","input.value":"other","gen_ai.input.messages":{"$column":"input"},"gen_ai.output.messages":""}"#
    );
    assert_eq!(rows[2]["input"], r#"[{"content":"hey","role":"user"}]"#);
    assert_eq!(
        attrs(2),
        r#"{"llm.input_messages.0.message.role":"user","llm.input_messages.0.message.content":"hey"}"#
    );
}

#[test]
fn spans_over_the_request_limit_are_rejected() {
    let spans = (1..=5u8).map(|i| span(vec![1; 16], vec![i; 8], vec![])).collect();
    let ctx = NormalizeContext { max_spans: 3, ..Default::default() };
    let n = normalize(&request(spans), &ctx).unwrap();
    assert_eq!(n.batch.num_rows(), 3);
    assert_eq!(n.rejected, 2);
    assert!(n.message().contains("over the limit of 3 spans per request"), "{}", n.message());
}

/// The package directory: from the environment `cargo test` sets when it runs the test (a
/// target directory shared by clones at different paths may hold a binary built elsewhere),
/// else where it was compiled.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        std::path::PathBuf::from,
    )
}
