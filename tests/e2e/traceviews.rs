//! Trace views where users already look: the Jaeger query API (as the Jaeger UI and Grafana's
//! Jaeger data source call it) and Tempo's trace-by-id (as Grafana's Tempo data source calls
//! it), checked against a known set of agent runs (`dashboards::agent_runs`).

use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::{TracesData, status};
use prost::Message as _;
use serde_json::Value;

use crate::dashboards::{BASE_S, agent_runs};
use crate::harness::TestServer;

fn trace_id(run: u64) -> String {
    format!("{}{run:016x}", "d0".repeat(8))
}

fn get(server: &TestServer, path: &str, accept: &str) -> (u16, Vec<u8>) {
    let resp = reqwest::blocking::Client::new()
        .get(server.url(path))
        .header("accept", accept)
        .send()
        .expect("GET");
    (resp.status().as_u16(), resp.bytes().unwrap().to_vec())
}

fn get_json(server: &TestServer, path: &str) -> (u16, Value) {
    let (status, body) = get(server, path, "application/json");
    (
        status,
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("{path}: {}", String::from_utf8_lossy(&body))),
    )
}

fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["tags"].as_array()?.iter().find(|t| t["key"] == key)
}

fn search_ids(server: &TestServer, query: &str) -> Vec<String> {
    let (status, body) = get_json(server, &format!("/api/traces?{query}"));
    assert_eq!(status, 200, "{query}: {body}");
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["traceID"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn jaeger_api_browses_agent_runs() {
    let server = TestServer::start();
    let (status, _) =
        server.post_traces("application/x-protobuf", agent_runs().encode_to_vec(), None);
    assert_eq!(status, 200);

    for prefix in ["", "/jaeger"] {
        let (status, body) = get_json(&server, &format!("{prefix}/api/services"));
        assert_eq!(status, 200);
        assert_eq!(body["data"], serde_json::json!(["agent-app"]));
    }
    let (_, ops) = get_json(&server, "/api/services/agent-app/operations");
    assert_eq!(
        ops["data"],
        serde_json::json!([
            "chat",
            "execute_tool calculator",
            "execute_tool search",
            "invoke_agent planner",
            "invoke_agent researcher",
            "invoke_agent writer"
        ])
    );
    let (_, ops) = get_json(&server, "/api/operations?service=agent-app&spanKind=");
    assert_eq!(ops["data"].as_array().unwrap().len(), 6);
    assert!(
        ops["data"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"name": "chat", "spanKind": "internal"})),
        "{ops}"
    );

    // Search as Grafana's Jaeger data source sends it (time range in microseconds).
    let range = format!(
        "service=agent-app&start={}&end={}&lookback=custom",
        (BASE_S - 3600) * 1_000_000,
        (BASE_S + 3 * 3600) * 1_000_000
    );
    let latest: Vec<String> = (7..12).rev().map(trace_id).collect();
    assert_eq!(search_ids(&server, &format!("{range}&limit=5")), latest);
    // Failed runs (0, 4, 8), runs of the writer agent (2, 5, 8, 11), slow runs (10, 11).
    let tags = |t: &str| url_encode(t);
    assert_eq!(
        search_ids(&server, &format!("{range}&tags={}", tags(r#"{"error":"true"}"#))),
        [8, 4, 0].map(trace_id)
    );
    assert_eq!(
        search_ids(&server, &format!("{range}&tags={}", tags(r#"{"gen_ai.agent.name":"writer"}"#))),
        [11, 8, 5, 2].map(trace_id)
    );
    assert_eq!(search_ids(&server, &format!("{range}&minDuration=3s")), [11, 10].map(trace_id));
    assert_eq!(
        search_ids(
            &server,
            &format!(
                "{range}&operation=execute_tool%20calculator&tags={}",
                tags(r#"{"error":"true"}"#)
            )
        ),
        [8, 4, 0].map(trace_id)
    );
    // The Jaeger UI's default: the last hour before now holds none of these 2026 runs... unless
    // the clock says otherwise; an explicit empty window must answer no traces.
    assert!(search_ids(&server, "service=agent-app&start=0&end=1").is_empty());
    let (status, body) = get_json(&server, "/api/traces?service=agent-app&minDuration=fast");
    assert_eq!(status, 400);
    assert!(
        body["errors"][0]["msg"].as_str().unwrap().contains("'minDuration' is not a duration"),
        "{body}"
    );
    let (status, body) = get_json(&server, "/api/traces?limit=3");
    assert_eq!(status, 400);
    assert!(body["errors"][0]["msg"].as_str().unwrap().contains("'service' is required"), "{body}");

    // One trace: run 11, the writer, 3.1 s, 6 spans.
    let (status, body) = get_json(&server, &format!("/api/traces/{}", trace_id(11)));
    assert_eq!(status, 200);
    let trace = &body["data"][0];
    assert_eq!(trace["traceID"], trace_id(11));
    assert_eq!(trace["processes"]["p1"]["serviceName"], "agent-app");
    assert!(trace["processes"]["p1"]["tags"].as_array().unwrap().contains(
        &serde_json::json!({"key": "service.name", "type": "string", "value": "agent-app"})
    ));
    let spans = trace["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 6);
    let root = spans.iter().find(|s| s["references"].as_array().unwrap().is_empty()).unwrap();
    assert_eq!(root["operationName"], "invoke_agent writer");
    assert_eq!(root["startTime"], (BASE_S + 11 * 600) * 1_000_000);
    assert_eq!(root["duration"], 3_100_000);
    assert_eq!(tag(root, "agent_name").unwrap()["value"], "writer");
    let llm: Vec<&Value> = spans.iter().filter(|s| s["operationName"] == "chat").collect();
    assert_eq!(llm.len(), 3);
    for (j, s) in llm.iter().enumerate() {
        assert_eq!(
            s["references"][0],
            serde_json::json!({"refType": "CHILD_OF", "traceID": trace_id(11), "spanID": root["spanID"]})
        );
        assert_eq!(
            tag(s, "input_tokens").unwrap(),
            &serde_json::json!({"key": "input_tokens", "type": "int64", "value": 1110 + j})
        );
        assert_eq!(tag(s, "gen_ai.usage.input_tokens").unwrap()["value"], 1110 + j);
        assert_eq!(tag(s, "span_type").unwrap()["value"], "llm");
        assert_eq!(tag(s, "model").unwrap()["value"], ["claude-sonnet-4", "gpt-4o"][j % 2]);
        let cost = tag(s, "cost_usd").unwrap();
        assert_eq!(cost["type"], "float64");
        assert!((cost["value"].as_f64().unwrap() - 0.012 * (j + 1) as f64).abs() < 1e-12);
        assert_eq!(s["duration"], 500_000 + 100_000 * j as u64);
    }
    // A failed tool call (run 8) carries error tags.
    let (_, body) = get_json(&server, &format!("/jaeger/api/traces/{}", trace_id(8)));
    let failed = body["data"][0]["spans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["operationName"] == "execute_tool calculator")
        .unwrap()
        .clone();
    assert_eq!(tag(&failed, "error").unwrap()["value"], true);
    assert_eq!(tag(&failed, "otel.status_description").unwrap()["value"], "tool failed");
    let (status, body) = get_json(&server, &format!("/api/traces/{}", "0".repeat(31) + "1"));
    assert_eq!(status, 404);
    assert_eq!(body["errors"][0]["code"], 404);
    let (status, _) = get_json(&server, "/api/traces/not-a-trace");
    assert_eq!(status, 400);
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Tempo's `TraceByIDResponse` (field 1: the trace).
#[derive(Clone, PartialEq, prost::Message)]
struct TraceByIdResponse {
    #[prost(message, optional, tag = "1")]
    trace: Option<TracesData>,
}

#[test]
fn tempo_trace_by_id_in_otlp_protobuf_and_json() {
    let server = TestServer::start();
    let sent = agent_runs();
    let (status, _) = server.post_traces("application/x-protobuf", sent.encode_to_vec(), None);
    assert_eq!(status, 200);
    for prefix in ["", "/tempo"] {
        let (status, body) = get(&server, &format!("{prefix}/api/echo"), "*/*");
        assert_eq!((status, body.as_slice()), (200, &b"echo"[..]));
    }
    let id = trace_id(0);
    let sent_spans: Vec<_> = sent.resource_spans[0].scope_spans[0]
        .spans
        .iter()
        .filter(|s| s.trace_id == hex(&id))
        .cloned()
        .collect();
    assert_eq!(sent_spans.len(), 6);
    // Prompts, completions and tool arguments are stored once, in their columns; the
    // attributes refer to them, and the trace views below put the text back.
    let rows = server.rows(&format!(
        "SELECT name, input, output, json_get_json(attributes, 'gen_ai.input.messages'), \
         json_get_json(attributes, 'gen_ai.output.messages'), \
         json_get_json(attributes, 'gen_ai.tool.call.arguments') \
         FROM spans WHERE trace_id = '{id}' AND span_type <> 'agent' ORDER BY start_time"
    ));
    let reference = |c: &str| Value::String(format!(r#"{{"$column":"{c}"}}"#));
    let mut want = Vec::new();
    for j in 0..3 {
        want.push(vec![
            Value::from("chat"),
            Value::from(format!(r#"[{{"role":"user","content":"step {j} of run 0"}}]"#)),
            Value::from(format!(r#"[{{"role":"assistant","content":"done {j}"}}]"#)),
            reference("input"),
            reference("output"),
            Value::Null,
        ]);
    }
    for tool in ["search", "calculator"] {
        want.push(vec![
            Value::from(format!("execute_tool {tool}")),
            Value::from(r#"{"q":"run 0"}"#),
            Value::Null,
            Value::Null,
            Value::Null,
            reference("input"),
        ]);
    }
    assert_eq!(rows, want);
    let check = |data: TracesData, what: &str| {
        assert_eq!(data.resource_spans.len(), 1, "{what}");
        let rs = &data.resource_spans[0];
        let service = rs
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .unwrap();
        assert_eq!(
            service.value.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("agent-app".into())),
            "{what}"
        );
        let mut got: Vec<_> = rs.scope_spans.iter().flat_map(|ss| ss.spans.clone()).collect();
        got.sort_by_key(|s| s.span_id.clone());
        let mut want = sent_spans.clone();
        want.sort_by_key(|s| s.span_id.clone());
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(
                (&g.trace_id, &g.span_id, &g.parent_span_id, &g.name),
                (&w.trace_id, &w.span_id, &w.parent_span_id, &w.name),
                "{what}"
            );
            assert_eq!(
                (g.start_time_unix_nano, g.end_time_unix_nano),
                (w.start_time_unix_nano, w.end_time_unix_nano),
                "{what}"
            );
            let mut ga: Vec<_> =
                g.attributes.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect();
            let mut wa: Vec<_> =
                w.attributes.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect();
            ga.sort_by(|a, b| a.0.cmp(&b.0));
            wa.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(ga, wa, "{what}: attributes of {}", g.name);
            let code = g.status.as_ref().map_or(0, |s| s.code);
            let want_code = w.status.as_ref().map_or(status::StatusCode::Unset as i32, |s| s.code);
            assert_eq!(code, want_code, "{what}");
        }
    };
    let (status, body) = get(&server, &format!("/api/v2/traces/{id}"), "application/protobuf");
    assert_eq!(status, 200);
    check(TraceByIdResponse::decode(body.as_slice()).unwrap().trace.unwrap(), "v2 protobuf");
    let (status, body) = get(&server, &format!("/api/traces/{id}"), "application/protobuf");
    assert_eq!(status, 200);
    check(TracesData::decode(body.as_slice()).unwrap(), "v1 protobuf");
    let (status, body) = get_json(&server, &format!("/tempo/api/v2/traces/{id}"));
    assert_eq!(status, 200);
    check(serde_json::from_value(body["trace"].clone()).expect("OTLP/JSON"), "v2 JSON");
    let (status, body) = get_json(&server, &format!("/tempo/api/traces/{id}"));
    assert_eq!(status, 200);
    check(
        TracesData { resource_spans: serde_json::from_value(body["batches"].clone()).unwrap() },
        "v1 JSON",
    );
    let (status, _) =
        get(&server, &format!("/api/v2/traces/{}", "0".repeat(31) + "1"), "application/protobuf");
    assert_eq!(status, 404);
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
}
