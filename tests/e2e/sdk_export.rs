//! Spans sent by the OpenTelemetry SDK's own OTLP exporters (gRPC, HTTP protobuf, HTTP JSON)
//! come back through SQL with exact counts, sums, links and errors.

use std::collections::BTreeMap;

use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Value, json};

use crate::harness::TestServer;

/// One LLM call of a run.
#[derive(Debug, Clone)]
struct Call {
    model: &'static str,
    input: i64,
    output: i64,
}

/// One agent run: a root agent span, LLM calls and tool calls under it.
#[derive(Debug, Clone)]
struct Run {
    service: &'static str,
    convention: Convention,
    calls: Vec<Call>,
    /// Tool calls: (name, failed).
    tools: Vec<(&'static str, bool)>,
}

#[derive(Debug, Clone, Copy)]
enum Convention {
    GenAi,
    OpenInference,
    OpenLlmetryDeprecated,
}

fn llm_attributes(convention: Convention, call: &Call) -> Vec<KeyValue> {
    match convention {
        Convention::GenAi => vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.provider.name", "openai"),
            KeyValue::new("gen_ai.request.model", call.model),
            KeyValue::new("gen_ai.usage.input_tokens", call.input),
            KeyValue::new("gen_ai.usage.output_tokens", call.output),
            KeyValue::new(
                "gen_ai.input.messages",
                r#"[{"role":"user","parts":[{"type":"text","content":"hi"}]}]"#,
            ),
            KeyValue::new("gen_ai.conversation.id", "sess-1"),
        ],
        Convention::OpenInference => vec![
            KeyValue::new("openinference.span.kind", "LLM"),
            KeyValue::new("llm.system", "anthropic"),
            KeyValue::new("llm.model_name", call.model),
            KeyValue::new("llm.token_count.prompt", call.input),
            KeyValue::new("llm.token_count.completion", call.output),
            KeyValue::new("llm.input_messages.0.message.role", "user"),
            KeyValue::new("llm.input_messages.0.message.content", "hello"),
            KeyValue::new("session.id", "sess-2"),
            KeyValue::new("user.id", "user-2"),
        ],
        Convention::OpenLlmetryDeprecated => vec![
            KeyValue::new("llm.request.type", "chat"),
            KeyValue::new("gen_ai.system", "openai"),
            KeyValue::new("gen_ai.request.model", call.model),
            KeyValue::new("gen_ai.usage.prompt_tokens", call.input),
            KeyValue::new("gen_ai.usage.completion_tokens", call.output),
            KeyValue::new("gen_ai.prompt.0.role", "user"),
            KeyValue::new("gen_ai.prompt.0.content", "hey"),
        ],
    }
}

fn send(provider: &SdkTracerProvider, run: &Run) {
    let tracer = provider.tracer("spanlake-e2e");
    let root = tracer
        .span_builder("invoke_agent planner")
        .with_kind(SpanKind::Internal)
        .with_attributes(vec![
            KeyValue::new("gen_ai.operation.name", "invoke_agent"),
            KeyValue::new("gen_ai.agent.name", "planner"),
        ])
        .start(&tracer);
    let cx = Context::current_with_span(root);
    for call in &run.calls {
        let mut span = tracer
            .span_builder(format!("chat {}", call.model))
            .with_kind(SpanKind::Client)
            .with_attributes(llm_attributes(run.convention, call))
            .start_with_context(&tracer, &cx);
        span.end();
    }
    for (name, failed) in &run.tools {
        let mut span = tracer
            .span_builder(format!("execute_tool {name}"))
            .with_attributes(vec![
                KeyValue::new("gen_ai.operation.name", "execute_tool"),
                KeyValue::new("gen_ai.tool.name", *name),
            ])
            .start_with_context(&tracer, &cx);
        if *failed {
            span.set_status(Status::error("tool failed"));
        }
        span.end();
    }
    cx.span().end();
}

fn resource(service: &'static str) -> Resource {
    Resource::builder().with_service_name(service).build()
}

fn runs() -> Vec<Run> {
    vec![
        Run {
            service: "svc-grpc",
            convention: Convention::GenAi,
            calls: vec![
                Call { model: "gpt-4o", input: 100, output: 20 },
                Call { model: "gpt-4o-mini", input: 50, output: 10 },
            ],
            tools: vec![("search", false), ("fetch", true)],
        },
        Run {
            service: "svc-http-proto",
            convention: Convention::OpenInference,
            calls: vec![Call { model: "claude-3-5-sonnet", input: 1000, output: 200 }],
            tools: vec![("calculator", true)],
        },
        Run {
            service: "svc-http-json",
            convention: Convention::OpenLlmetryDeprecated,
            calls: vec![
                Call { model: "gpt-4o", input: 30, output: 7 },
                Call { model: "gpt-4o", input: 31, output: 8 },
            ],
            tools: vec![],
        },
    ]
}

#[test]
fn sdk_exporters_over_grpc_and_http_round_trip_through_sql() {
    let server = TestServer::start();
    let runs = runs();

    // gRPC (tonic, gzip-compressed requests). The tonic exporter needs a Tokio runtime.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let grpc = rt.block_on(async {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(server.grpc_endpoint())
            .with_compression(opentelemetry_otlp::Compression::Gzip)
            .build()
            .unwrap()
    });
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(grpc)
        .with_resource(resource(runs[0].service))
        .build();
    send(&provider, &runs[0]);
    provider.force_flush().unwrap();
    provider.shutdown().unwrap();

    // HTTP protobuf and HTTP JSON.
    for (run, protocol) in [(&runs[1], Protocol::HttpBinary), (&runs[2], Protocol::HttpJson)] {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .with_endpoint(server.url("/v1/traces"))
            .build()
            .unwrap();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource(run.service))
            .build();
        send(&provider, run);
        provider.force_flush().unwrap();
        provider.shutdown().unwrap();
    }

    // Exact counts per service: a root, the calls and the tools.
    let mut expected_spans = BTreeMap::new();
    for r in &runs {
        expected_spans.insert(r.service, (1 + r.calls.len() + r.tools.len()) as i64);
    }
    let got: BTreeMap<String, i64> = server
        .rows("SELECT service_name, count(*) FROM spans GROUP BY service_name")
        .into_iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_i64().unwrap()))
        .collect();
    let expected: BTreeMap<String, i64> =
        expected_spans.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(got, expected);

    // Per-model token sums.
    let mut per_model: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    for c in runs.iter().flat_map(|r| &r.calls) {
        let e = per_model.entry(c.model).or_default();
        e.0 += c.input;
        e.1 += c.output;
        e.2 += 1;
    }
    let rows = server.rows(
        "SELECT model, sum(input_tokens), sum(output_tokens), sum(total_tokens), count(*) FROM spans \
         WHERE span_type = 'llm' GROUP BY model ORDER BY model",
    );
    let want: Vec<Vec<Value>> = per_model
        .iter()
        .map(|(m, (i, o, n))| vec![json!(m), json!(i), json!(o), json!(i + o), json!(n)])
        .collect();
    assert_eq!(rows, want);

    // Errors: the failed tools, and nothing else.
    let failed: i64 = runs.iter().flat_map(|r| &r.tools).filter(|t| t.1).count() as i64;
    assert_eq!(
        server.scalar("SELECT count(*) FROM spans WHERE status_code = 'error'"),
        json!(failed)
    );
    assert_eq!(
        server.scalar("SELECT count(*) FROM spans WHERE status_code = 'error' AND span_type = 'tool' AND status_message = 'tool failed'"),
        json!(failed)
    );

    // Parent/child links: every non-root span's parent is its run's root agent span.
    let children: i64 = runs.iter().map(|r| (r.calls.len() + r.tools.len()) as i64).sum();
    assert_eq!(
        server.scalar(
            "SELECT count(*) FROM spans c JOIN spans p ON c.parent_span_id = p.span_id AND c.trace_id = p.trace_id \
             WHERE p.parent_span_id IS NULL AND p.span_type = 'agent' AND p.agent_name = 'planner'"
        ),
        json!(children)
    );
    assert_eq!(
        server.scalar("SELECT count(*) FROM spans WHERE parent_span_id IS NULL"),
        json!(runs.len())
    );

    // The traces view rolls calls up per run.
    let rows = server.rows(
        "SELECT service_name, span_count, llm_calls, tool_calls, error_count, input_tokens, output_tokens \
         FROM traces ORDER BY service_name",
    );
    let mut want: Vec<Vec<Value>> = runs
        .iter()
        .map(|r| {
            let input: i64 = r.calls.iter().map(|c| c.input).sum();
            let output: i64 = r.calls.iter().map(|c| c.output).sum();
            vec![
                json!(r.service),
                json!(1 + r.calls.len() + r.tools.len()),
                json!(r.calls.len()),
                json!(r.tools.len()),
                json!(r.tools.iter().filter(|t| t.1).count()),
                json!(input),
                json!(output),
            ]
        })
        .collect();
    want.sort_by(|a, b| a[0].as_str().cmp(&b[0].as_str()));
    assert_eq!(rows, want);

    // Conventions land in the same columns.
    assert_eq!(
        server
            .rows("SELECT DISTINCT provider FROM spans WHERE span_type = 'llm' ORDER BY provider"),
        vec![vec![json!("anthropic")], vec![json!("openai")]]
    );
    assert_eq!(
        server.scalar("SELECT session_id FROM spans WHERE service_name = 'svc-http-proto' AND span_type = 'llm'"),
        json!("sess-2")
    );
    let input = server.scalar("SELECT input FROM spans WHERE service_name = 'svc-http-json' AND span_type = 'llm' LIMIT 1");
    let input: Value = serde_json::from_str(input.as_str().unwrap()).unwrap();
    assert_eq!(input, json!([{"role": "user", "content": "hey"}]));
    // Every attribute is reachable by key with its type.
    assert_eq!(
        server.scalar(
            "SELECT sum(json_get_int(attributes, 'gen_ai.usage.input_tokens')) FROM spans WHERE service_name = 'svc-grpc'"
        ),
        json!(150)
    );
    assert_eq!(
        server.scalar("SELECT attributes->>'gen_ai.tool.name' FROM spans WHERE status_code = 'error' AND service_name = 'svc-grpc'"),
        json!("fetch")
    );
}
