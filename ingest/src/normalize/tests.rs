use std::path::PathBuf;

use super::*;
use spanlake_proto::{decode_json, decode_protobuf};

fn fixtures_dir() -> PathBuf {
    std::env::var_os("SPANLAKE_FIXTURES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
        PathBuf::from,
    )
}

fn index() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fixtures_dir().join("index.json")).expect("fixtures index");
    serde_json::from_str(&text).unwrap()
}

fn load(name: &str) -> (Normalized, Normalized) {
    let dir = fixtures_dir();
    let pb = std::fs::read(dir.join(format!("{name}.otlp.pb"))).unwrap();
    let json = std::fs::read(dir.join(format!("{name}.otlp.json"))).unwrap();
    let prices = PriceTable::default();
    (
        normalize(&decode_protobuf(&pb).unwrap(), &prices),
        normalize(&decode_json(&json).unwrap(), &prices),
    )
}

#[test]
fn fixtures_normalise_to_expected_span_types_and_tokens() {
    for fixture in index() {
        let name = fixture["fixture"].as_str().unwrap();
        let (from_pb, from_json) = load(name);
        assert_eq!(from_pb.rows, from_json.rows, "{name}: protobuf and JSON differ");
        assert_eq!(from_pb.rejected, 0, "{name}");
        let rows = from_pb.rows;
        let expected = fixture["spans"].as_array().unwrap();
        assert_eq!(rows.len(), expected.len(), "{name}");
        for e in expected {
            let id = e["span_id"].as_str().unwrap();
            let row = rows.iter().find(|r| r.span_id == id).unwrap_or_else(|| panic!("{name}: {id}"));
            assert_eq!(row.name, e["name"].as_str().unwrap(), "{name} {id}");
            assert_eq!(row.span_type, e["expected_span_type"].as_str().unwrap(), "{name} {id} {}", row.name);
            assert_eq!(row.parent_span_id.as_deref(), e["parent_span_id"].as_str(), "{name} {id}");
            assert_eq!(row.service_name.as_deref(), Some(format!("fixture-{name}").as_str()));
        }
        // LLM spans in time order carry exactly the usage the test server returned.
        let mut llm: Vec<&SpanRow> = rows.iter().filter(|r| r.span_type == "llm").collect();
        llm.sort_by_key(|r| r.start_time_ns);
        let usage = fixture["llm_usage_returned_by_the_mock"].as_array().unwrap();
        assert_eq!(llm.len(), usage.len(), "{name}");
        for (row, u) in llm.iter().zip(usage) {
            assert_eq!(row.input_tokens, u["input_tokens"].as_i64(), "{name}");
            assert_eq!(row.output_tokens, u["output_tokens"].as_i64(), "{name}");
            assert_eq!(row.total_tokens, u["total_tokens"].as_i64(), "{name}");
            assert_eq!(row.model.as_deref(), u["model"].as_str(), "{name}");
            assert_eq!(row.provider.as_deref(), Some("openai"), "{name}");
            let cost = PriceTable::default()
                .cost("gpt-4o-mini", row.input_tokens, row.output_tokens)
                .unwrap();
            assert_eq!(row.cost_usd, Some(cost), "{name}");
            assert!(row.input.is_some() && row.output.is_some(), "{name}: llm input/output");
        }
        // Tokens stay on LLM spans only.
        for r in rows.iter().filter(|r| r.span_type != "llm") {
            assert_eq!((r.input_tokens, r.output_tokens, r.cost_usd), (None, None, None), "{name} {}", r.name);
        }
        for r in rows.iter().filter(|r| r.span_type == "tool") {
            assert_eq!(r.tool_name.as_deref(), Some("get_weather"), "{name}");
        }
        assert!(
            rows.iter().any(|r| r.session_id.as_deref() == Some("session-fixture-1")),
            "{name}: session id"
        );
    }
}

#[test]
fn openinference_messages_are_rebuilt() {
    let (n, _) = load("openai-openinference");
    let row = n.rows.iter().find(|r| r.span_id == "b206f36d6952ca4a").unwrap();
    let input: Value = serde_json::from_str(row.input.as_deref().unwrap()).unwrap();
    assert_eq!(input[0]["role"], "system");
    assert_eq!(input[1]["content"], "What's the weather in Paris?");
    assert_eq!(input[2]["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(input[3]["tool_call_id"], "call_80f46b374a9542439811");
    let output: Value = serde_json::from_str(row.output.as_deref().unwrap()).unwrap();
    assert_eq!(output[0]["content"], "It is sunny and 22 degrees Celsius in Paris.");
    assert_eq!(row.user_id.as_deref(), Some("user-fixture-1"));
    let attrs: Value = serde_json::from_str(&row.attributes).unwrap();
    assert_eq!(attrs["llm.token_count.total"], 140);
    assert_eq!(attrs["llm.model_name"], "gpt-4o-mini");
}

#[test]
fn openllmetry_association_properties_and_entities() {
    let (n, _) = load("openai-openllmetry");
    let agent = n.rows.iter().find(|r| r.span_id == "6f26d00bac64ce5a").unwrap();
    assert_eq!(agent.agent_name.as_deref(), Some("WeatherAgent"));
    assert_eq!(agent.user_id.as_deref(), Some("user-fixture-1"));
    let tool = n.rows.iter().find(|r| r.span_id == "017346a23fbc4cd2").unwrap();
    assert_eq!(tool.output.as_deref(), Some("\"sunny, 22C in Paris\""));
    let chat = n.rows.iter().find(|r| r.span_id == "2a2bb31e8e32955c").unwrap();
    assert_eq!(chat.kind, "client");
    assert_eq!(chat.status_code, "unset");
    let attrs: Value = serde_json::from_str(&chat.attributes).unwrap();
    assert_eq!(attrs["gen_ai.response.finish_reasons"], serde_json::json!(["tool_call"]));
    assert_eq!(attrs["gen_ai.is_streaming"], false);
}

#[test]
fn otel_genai_conversation_is_session() {
    let (n, _) = load("openai-otel-genai");
    let agent = n.rows.iter().find(|r| r.span_id == "e1e56496fa8a3f77").unwrap();
    assert_eq!(agent.session_id.as_deref(), Some("session-fixture-1"));
    assert_eq!(agent.agent_name.as_deref(), Some("WeatherAgent"));
    assert_eq!(agent.parent_span_id, None);
}

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

fn span(trace: Vec<u8>, id: Vec<u8>, attrs: Vec<KeyValue>) -> Span {
    Span {
        trace_id: trace,
        span_id: id,
        name: "s".into(),
        start_time_unix_nano: 1_000,
        end_time_unix_nano: 3_000_000,
        attributes: attrs,
        ..Default::default()
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
    let row = normalize_span(&s, &PriceTable::default()).unwrap();
    assert_eq!(row.span_type, "llm");
    assert_eq!(row.provider.as_deref(), Some("anthropic"));
    assert_eq!((row.input_tokens, row.output_tokens, row.total_tokens), (Some(1000), Some(500), Some(1500)));
    assert_eq!(row.cost_usd, Some((1000.0 * 3.0 + 500.0 * 15.0) / 1e6));
    let json = |s: Option<&str>| serde_json::from_str::<Value>(s.unwrap()).unwrap();
    assert_eq!(json(row.input.as_deref()), serde_json::json!([{"content": "hi", "role": "user"}]));
    assert_eq!(
        json(row.output.as_deref()),
        serde_json::json!([{"content": "hello", "role": "assistant"}])
    );
    assert_eq!(row.duration_ms(), 2.999);
    assert_eq!(row.kind, "internal");
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
    let row = normalize_span(&s, &PriceTable::default()).unwrap();
    assert_eq!(row.total_tokens, Some(15));
    assert_eq!(row.cost_usd, Some(0.5));
}

#[test]
fn invalid_ids_are_rejected_by_span() {
    let prices = PriceTable::default();
    assert_eq!(
        normalize_span(&span(vec![1; 15], vec![2; 8], vec![]), &prices).unwrap_err(),
        "trace_id must be 16 bytes, got 15"
    );
    assert_eq!(
        normalize_span(&span(vec![1; 16], vec![0; 8], vec![]), &prices).unwrap_err(),
        "span_id is all zeros"
    );
    let mut bad_parent = span(vec![1; 16], vec![2; 8], vec![]);
    bad_parent.parent_span_id = vec![3; 4];
    assert_eq!(
        normalize_span(&bad_parent, &prices).unwrap_err(),
        "parent_span_id must be 8 bytes, got 4"
    );
}

#[test]
fn any_values_keep_their_types() {
    use any_value::Value as V;
    use spanlake_proto::common::{ArrayValue, KeyValueList};
    let attrs = vec![
        kv("s", V::StringValue("x".into())),
        kv("i", V::IntValue(-3)),
        kv("d", V::DoubleValue(1.5)),
        kv("b", V::BoolValue(true)),
        kv("bytes", V::BytesValue(vec![1, 2, 3])),
        kv("nan", V::DoubleValue(f64::NAN)),
        kv("a", V::ArrayValue(ArrayValue { values: vec![AnyValue { value: Some(V::IntValue(1)) }] })),
        kv("kv", V::KvlistValue(KeyValueList { values: vec![kv("k", V::StringValue("v".into()))] })),
    ];
    let parsed: Value = serde_json::from_str(&attrs_json(&attrs)).unwrap();
    assert_eq!(
        parsed,
        serde_json::json!({"a":[1],"b":true,"bytes":"AQID","d":1.5,"i":-3,"kv":{"k":"v"},"nan":"NaN","s":"x"})
    );
}
