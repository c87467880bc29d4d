//! Replay: bundles built from real instrumentation output (the shared fixtures, recorded from
//! the OpenAI client and Agents SDK with OpenInference, OpenLLMetry and OpenTelemetry GenAI
//! instrumentations), `spanlake replay run` against an OpenAI-compatible test endpoint that
//! answers differently at one step, the recorded re-run linked to the original, overrides,
//! traces that lack what replay needs, and `spanlake export`.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::harness::{TestServer, fixtures_dir};

fn post_fixture(server: &TestServer, name: &str) -> String {
    let body = std::fs::read(fixtures_dir().join(format!("{name}.otlp.pb"))).unwrap();
    let (status, _) = server.post_traces("application/x-protobuf", body, None);
    assert_eq!(status, 200);
    server
        .scalar(&format!(
            "SELECT DISTINCT trace_id FROM spans WHERE service_name = 'fixture-{name}'"
        ))
        .as_str()
        .unwrap()
        .to_string()
}

fn get_json(server: &TestServer, path: &str) -> (u16, Value) {
    let resp = reqwest::blocking::get(server.url(path)).unwrap();
    (resp.status().as_u16(), resp.json().unwrap())
}

const SYSTEM: &str = "Answer weather questions using the tools.";
const QUESTION: &str = "What's the weather in Paris?";
const ANSWER: &str = "It is sunny and 22 degrees Celsius in Paris.";
const TOOL_RESULT: &str = "sunny, 22C in Paris";

#[test]
fn replay_bundles_from_every_convention() {
    let server = TestServer::start();
    for name in [
        "openai-openinference",
        "openai-openllmetry",
        "openai-otel-genai",
        "agents-openinference",
        "agents-openinference-chat",
    ] {
        let id = post_fixture(&server, name);
        let (status, b) = get_json(&server, &format!("/v1/traces/{id}/replay"));
        assert_eq!(status, 200, "{name}: {b}");
        assert_eq!(b["format"], "spanlake.replay/v1");
        assert_eq!(b["trace_id"], id);
        let missing: Vec<&str> =
            b["missing"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
        if matches!(name, "openai-otel-genai" | "agents-openinference-chat") {
            // These instrumentations did not record the tool definitions.
            assert_eq!(missing.len(), 2, "{name}: {missing:?}");
            assert!(
                missing
                    .iter()
                    .all(|m| m.contains("no recorded tool definitions (the run used tools")),
                "{missing:?}"
            );
            assert!(
                missing[0].starts_with("step 1 (span ") && missing[1].starts_with("step 3 (span "),
                "{missing:?}"
            );
        } else {
            assert!(missing.is_empty(), "{name}: {missing:?}");
        }
        let steps = b["steps"].as_array().unwrap();
        let kinds: Vec<&str> = steps.iter().map(|s| s["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["llm", "tool", "llm"], "{name}");
        assert_eq!(
            steps.iter().map(|s| s["step"].as_u64().unwrap()).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let first = &steps[0];
        assert_eq!(first["request"]["model"], "gpt-4o-mini", "{name}");
        let messages = first["request"]["messages"].as_array().unwrap();
        let last_two: Vec<(&str, &str)> = messages[messages.len() - 2..]
            .iter()
            .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        if name == "agents-openinference" {
            // The Responses API records the instructions apart from the input list.
            assert_eq!(messages.last().unwrap()["content"], QUESTION, "{name}");
        } else {
            assert_eq!(last_two, [("system", SYSTEM), ("user", QUESTION)], "{name}");
        }
        let call = &first["response"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather", "{name}");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris"}), "{name}");
        assert_eq!(steps[1]["tool"], "get_weather");
        assert_eq!(steps[1]["result"], TOOL_RESULT, "{name}");
        assert_eq!(steps[1]["tool_call_id"], call["id"], "{name}");
        let second = steps[2]["request"]["messages"].as_array().unwrap();
        let tool_message = second.iter().find(|m| m["role"] == "tool").unwrap();
        assert_eq!(tool_message["content"], TOOL_RESULT, "{name}");
        assert_eq!(tool_message["tool_call_id"], call["id"], "{name}");
        assert_eq!(steps[2]["response"]["content"], ANSWER, "{name}");
        assert_eq!(steps[2]["response"]["role"], "assistant");
        if !matches!(name, "openai-otel-genai" | "agents-openinference-chat") {
            assert_eq!(first["request"]["tools"][0]["function"]["name"], "get_weather", "{name}");
        }
        // Usage as the test server that recorded the fixtures answered it (index.json).
        assert_eq!(first["usage"], json!({"input_tokens": 107, "output_tokens": 23}), "{name}");
    }
    // Unknown and malformed ids.
    assert_eq!(get_json(&server, &format!("/v1/traces/{}/replay", "ab".repeat(16))).0, 404);
    assert_eq!(get_json(&server, "/v1/traces/xyz/replay").0, 400);
}

/// An OpenAI-compatible endpoint: a tool call to get_weather for the city named in the last
/// user message until a tool result arrives, then "It is raining in <city>." Records every
/// request body.
fn test_endpoint() -> (String, Arc<Mutex<Vec<Value>>>, std::thread::JoinHandle<()>) {
    let requests: Arc<Mutex<Vec<Value>>> = Arc::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = Arc::clone(&requests);
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/chat/completions",
                axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                    let seen = Arc::clone(&seen);
                    async move {
                        seen.lock().unwrap().push(body.clone());
                        let messages = body["messages"].as_array().cloned().unwrap_or_default();
                        let city = messages
                            .iter()
                            .rev()
                            .find(|m| m["role"] == "user")
                            .and_then(|m| m["content"].as_str())
                            .map_or("Paris", |q| if q.contains("Berlin") { "Berlin" } else { "Paris" });
                        let message = if messages.last().is_some_and(|m| m["role"] == "tool") {
                            json!({"role": "assistant", "content": format!("It is raining in {city}.")})
                        } else {
                            json!({"role": "assistant", "content": null, "tool_calls": [{
                                "id": "call_test_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": json!({"city": city}).to_string()}}]})
                        };
                        axum::Json(json!({
                            "id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57},
                        }))
                    }
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (url, requests, handle)
}

#[test]
fn replay_run_reports_the_divergence_and_records_the_rerun() {
    let server = TestServer::start();
    let id = post_fixture(&server, "openai-openinference");
    // The CLI's bundle equals the HTTP one.
    let exported: Value = serde_json::from_str(&server.cli(&["replay", "export", &id])).unwrap();
    assert_eq!(exported, get_json(&server, &format!("/v1/traces/{id}/replay")).1);

    let (endpoint, requests, _endpoint_thread) = test_endpoint();
    let (code, out, err) = server.cli_status(&[
        "replay",
        "run",
        &id,
        "--endpoint",
        &endpoint,
        "--url",
        &server.url(""),
    ]);
    assert_eq!(code, 3, "diverged runs exit with 3\n{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "replay of trace {id}: 2 LLM calls and 1 tool calls recorded; endpoint {endpoint}/chat/completions"
        )
    );
    assert_eq!(
        lines[1],
        r#"step 1 llm gpt-4o-mini: same as recorded (get_weather {"city":"Paris"})"#
    );
    assert_eq!(
        lines[2],
        r#"  tool get_weather {"city":"Paris"}: answered from the recording: sunny, 22C in Paris"#
    );
    assert_eq!(lines[3], "step 3 llm gpt-4o-mini: DIVERGED: different text");
    assert_eq!(lines[4], format!("    recorded: {ANSWER}"));
    assert_eq!(lines[5], "    new:      It is raining in Paris.");
    assert_eq!(lines[6], "result: diverged at step 3");
    let new_id = lines[7]
        .strip_prefix("recorded as trace ")
        .unwrap()
        .strip_suffix(&format!(" (links to {id})"))
        .unwrap()
        .to_string();
    assert_eq!(lines.len(), 8, "{out}");

    // What the endpoint received: the recorded request, then the conversation with the tool
    // answered from the recording.
    let sent = requests.lock().unwrap().clone();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0]["model"], "gpt-4o-mini");
    assert_eq!(
        sent[0]["messages"],
        json!([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
    );
    assert_eq!(sent[0]["tools"][0]["function"]["name"], "get_weather");
    let m = sent[1]["messages"].as_array().unwrap();
    assert_eq!(m.len(), 4);
    assert_eq!(m[2]["tool_calls"][0]["id"], "call_test_1");
    assert_eq!(
        m[3],
        json!({"role": "tool", "tool_call_id": "call_test_1", "content": TOOL_RESULT})
    );

    // The re-run is a trace of its own, linked to the original, comparable in SQL.
    let rows = server.rows(&format!(
        "SELECT name, span_type, json_get_int(attributes, 'spanlake.replay.step'), json_get_bool(attributes, 'spanlake.replay.diverged'), input_tokens \
         FROM spans WHERE trace_id = '{new_id}' ORDER BY start_time, name"
    ));
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0][0], format!("replay {id}"));
    assert_eq!(rows[0][1], "agent");
    assert_eq!(
        rows[1],
        vec![json!("chat gpt-4o-mini"), json!("llm"), json!(1), json!(false), json!(50)]
    );
    assert_eq!(rows[2][0], "execute_tool get_weather");
    assert_eq!(rows[2][1], "tool");
    assert_eq!(
        rows[3],
        vec![json!("chat gpt-4o-mini"), json!("llm"), json!(3), json!(true), json!(50)]
    );
    let linked = server.rows(&format!(
        "SELECT r.trace_id, o.service_name FROM spans r JOIN spans o ON o.trace_id = json_get_str(r.attributes, 'spanlake.replay.of') \
         WHERE o.parent_span_id IS NULL AND r.parent_span_id IS NULL AND r.links LIKE '%{id}%'"
    ));
    assert_eq!(linked, vec![vec![json!(new_id), json!("fixture-openai-openinference")]]);

    // Trying a fix: the first request's messages replaced (another city): the tool is called
    // with different arguments and answered with the recorded result.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("step1.json");
    std::fs::write(&file, json!([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What's the weather in Berlin?"}]).to_string()).unwrap();
    let (code, out, _) = server.cli_status(&[
        "replay",
        "run",
        &id,
        "--endpoint",
        &endpoint,
        "--no-record",
        "--override",
        &format!("1={}", file.display()),
    ]);
    assert_eq!(code, 3);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[1], "step 1: messages replaced by the override");
    assert_eq!(
        lines[2],
        r#"step 1 llm gpt-4o-mini: DIVERGED: different arguments to get_weather: recorded {"city":"Paris"}, new {"city":"Berlin"}"#
    );
    assert_eq!(
        lines[3],
        r#"  tool get_weather {"city":"Berlin"}: answered with the recorded result of get_weather called with {"city":"Paris"}: sunny, 22C in Paris"#
    );
    assert!(!out.contains("recorded as trace"), "{out}");
    let (code, _, err) = server.cli_status(&[
        "replay",
        "run",
        &id,
        "--endpoint",
        &endpoint,
        "--override",
        "1=/no/such/file.json",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot read /no/such/file.json"), "{err}");
}

#[test]
fn traces_without_prompts_say_what_replay_is_missing() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message as _;
    let server = TestServer::start();
    let kv = |k: &str, v: &str| KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(v.into())) }),
        ..Default::default()
    };
    let span = Span {
        trace_id: vec![0x5a; 16],
        span_id: vec![1; 8],
        name: "chat gpt-4o".into(),
        start_time_unix_nano: 1_795_467_600_000_000_000,
        end_time_unix_nano: 1_795_467_601_000_000_000,
        attributes: vec![kv("gen_ai.operation.name", "chat"), kv("gen_ai.request.model", "gpt-4o")],
        ..Default::default()
    };
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans { spans: vec![span], ..Default::default() }],
            ..Default::default()
        }],
    };
    assert_eq!(server.post_traces("application/x-protobuf", req.encode_to_vec(), None).0, 200);
    let id = "5a".repeat(16);
    let (_, b) = get_json(&server, &format!("/v1/traces/{id}/replay"));
    let missing: Vec<&str> =
        b["missing"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    assert_eq!(missing.len(), 2, "{missing:?}");
    assert!(missing[0].starts_with("step 1 (span 0101010101010101): no recorded prompt messages (the instrumentation did not capture message content"), "{missing:?}");
    assert_eq!(missing[1], "step 1 (span 0101010101010101): no recorded response");
    let (code, _, err) = server.cli_status(&[
        "replay",
        "run",
        &id,
        "--endpoint",
        "http://127.0.0.1:9/v1",
        "--no-record",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("this trace cannot be replayed:\n  step 1 (span 0101010101010101): no recorded prompt messages"), "{err}");
}

#[test]
fn export_writes_query_results_as_json_lines_and_parquet() {
    let server = TestServer::start();
    for name in ["openai-openinference", "openai-openllmetry", "openai-otel-genai"] {
        post_fixture(&server, name);
    }
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("llm.jsonl");
    let sql = "SELECT trace_id, span_id, model, input, output, input_tokens FROM spans WHERE span_type = 'llm' ORDER BY start_time";
    let (code, _, err) =
        server.cli_status(&["export", "--sql", sql, "--format", "jsonl", jsonl.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("wrote 6 rows to"), "{err}");
    let lines: Vec<Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected = server.rows(sql);
    assert_eq!(lines.len(), expected.len());
    for (line, row) in lines.iter().zip(&expected) {
        assert_eq!(line["span_id"], row[1]);
        assert_eq!(line["model"], row[2]);
        assert_eq!(line["input"], row[3]);
        assert_eq!(line["input_tokens"], row[5]);
    }
    let parquet = tmp.path().join("llm.parquet");
    let (code, _, err) = server.cli_status(&[
        "export",
        "--sql",
        sql,
        "--format",
        "parquet",
        parquet.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let out = crate::harness::run_python(
        "import sys, duckdb; print(duckdb.sql(f\"SELECT count(*), sum(input_tokens), count(DISTINCT span_id) FROM read_parquet('{sys.argv[1]}')\").fetchall()[0])",
        &[parquet.to_str().unwrap()],
    );
    let tokens: i64 = expected.iter().map(|r| r[5].as_i64().unwrap()).sum();
    assert_eq!(out.trim(), format!("(6, {tokens}, 6)"));
    // The replay bundles of every trace a query names, one per line.
    let bundles = tmp.path().join("bundles.jsonl");
    let ids = "SELECT DISTINCT trace_id FROM spans ORDER BY 1";
    let (code, _, err) =
        server.cli_status(&["replay", "export", "--sql", ids, "-o", bundles.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("wrote 3 replay bundle(s) to"), "{err}");
    let lines: Vec<Value> = std::fs::read_to_string(&bundles)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected: Vec<Value> = server.rows(ids).into_iter().map(|r| r[0].clone()).collect();
    assert_eq!(lines.iter().map(|b| b["trace_id"].clone()).collect::<Vec<_>>(), expected);
    assert!(
        lines
            .iter()
            .all(|b| b["format"] == "spanlake.replay/v1"
                && b["steps"].as_array().unwrap().len() == 3)
    );
    let (code, _, err) = server.cli_status(&[
        "export",
        "--sql",
        "DROP TABLE spans",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("DROP TABLE is not allowed"), "{err}");
}
