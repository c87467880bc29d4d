//! `spanlake replay run`: re-runs a recorded agent run against an OpenAI-compatible endpoint.
//!
//! The run follows the new model's answers: it starts from the first recorded LLM request (or
//! the messages of `--override 1=FILE`), sends it to `ENDPOINT/chat/completions`, compares the
//! answer with the recorded one, answers the tool calls it makes from the recorded tool results
//! (same tool and arguments first, else the same tool), appends both to the conversation and
//! sends the next request, until the new run answers without a tool call or the recording has
//! no more LLM calls. Each step is reported as the same as recorded or diverged, and how:
//! different text, a different tool chosen, different arguments, a tool call where the
//! recording answered (or the reverse). `--override STEP=FILE` replaces the conversation sent
//! at that LLM step with the JSON array of messages in FILE, to try a fix.
//!
//! The re-run is recorded in spanlake as a new trace (service `spanlake-replay`) whose root span
//! links to the original trace and carries `spanlake.replay.of`; its LLM and tool spans carry
//! the OpenTelemetry GenAI attributes and `spanlake.replay.step` / `spanlake.replay.diverged`,
//! so both runs can be compared in SQL.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span};
use prost::Message as _;
use serde_json::{Value, json};

/// What `replay run` needs besides the bundle.
#[derive(Debug)]
pub struct RunOptions {
    /// Base URL of the OpenAI-compatible API (`…/v1`) or its `…/chat/completions` URL.
    pub endpoint: String,
    /// Bearer token for the endpoint.
    pub api_key: Option<String>,
    /// Replace the recorded model.
    pub model: Option<String>,
    /// LLM step number → messages to send at that step instead.
    pub overrides: BTreeMap<u64, Vec<Value>>,
    /// spanlake's HTTP address to record the re-run in; `None` records nothing.
    pub record_to: Option<String>,
}

/// The outcome of a replay.
#[derive(Debug)]
pub struct Outcome {
    /// The report, one line or block per step.
    pub report: String,
    /// The first step that diverged.
    pub diverged_at: Option<u64>,
}

/// Reads `STEP=FILE` overrides.
pub fn parse_override(text: &str) -> anyhow::Result<(u64, Vec<Value>)> {
    let (step, file) =
        text.split_once('=').with_context(|| format!("--override {text:?}: expected STEP=FILE"))?;
    let step: u64 =
        step.parse().with_context(|| format!("--override {text:?}: STEP must be a number"))?;
    let body = std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?;
    let messages: Value = serde_json::from_str(&body)
        .with_context(|| format!("{file}: not JSON (expected an array of chat messages)"))?;
    match messages {
        Value::Array(m) if m.iter().all(|x| x.get("role").is_some()) => Ok((step, m)),
        _ => bail!("{file}: expected a JSON array of chat messages with a \"role\" each"),
    }
}

fn args_value(v: &Value) -> Value {
    let v = match v {
        Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
        other => other.clone(),
    };
    // OpenLLMetry's tool wrapper records `{"args": [], "kwargs": {...}}`.
    match v.get("kwargs") {
        Some(k) if v.get("args").is_some_and(|a| a.as_array().is_some_and(Vec::is_empty)) => {
            k.clone()
        }
        _ => v,
    }
}

fn calls_of(message: &Value) -> Vec<(String, String, Value)> {
    message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["id"].as_str().unwrap_or_default().to_string(),
                c["function"]["name"].as_str().unwrap_or_default().to_string(),
                args_value(&c["function"]["arguments"]),
            )
        })
        .collect()
}

fn content_of(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<String>()
            .trim()
            .to_string(),
        _ => String::new(),
    }
}

/// How the new answer differs from the recorded one; empty when it does not.
fn compare(recorded: &Value, new: &Value) -> Vec<String> {
    let (rc, nc) = (calls_of(recorded), calls_of(new));
    let mut out = Vec::new();
    match (rc.is_empty(), nc.is_empty()) {
        (true, true) => {
            let (a, b) = (content_of(recorded), content_of(new));
            if a != b {
                out.push(format!("different text\n    recorded: {a}\n    new:      {b}"));
            }
        }
        (false, true) => out.push(format!(
            "answered with text where the recorded run called {}\n    new: {}",
            rc.iter().map(|c| c.1.as_str()).collect::<Vec<_>>().join(", "),
            content_of(new)
        )),
        (true, false) => out.push(format!(
            "called {} where the recorded run answered with text",
            nc.iter().map(|c| c.1.as_str()).collect::<Vec<_>>().join(", ")
        )),
        (false, false) => {
            let names =
                |c: &[(String, String, Value)]| c.iter().map(|x| x.1.clone()).collect::<Vec<_>>();
            if names(&rc) != names(&nc) {
                out.push(format!(
                    "different tool chosen: recorded {:?}, new {:?}",
                    names(&rc),
                    names(&nc)
                ));
            } else {
                for ((_, name, a), (_, _, b)) in rc.iter().zip(&nc) {
                    if a != b {
                        out.push(format!("different arguments to {name}: recorded {a}, new {b}"));
                    }
                }
            }
        }
    }
    out
}

fn short(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.chars().count() > 120 { s.chars().take(117).collect::<String>() + "..." } else { s }
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}
fn s(v: impl Into<String>) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

fn now_ns() -> u64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0).max(0) as u64
}

/// Re-runs `bundle` (a `spanlake.replay/v1` document) as described in the module docs.
pub async fn run(bundle: &Value, options: &RunOptions) -> anyhow::Result<Outcome> {
    if bundle["format"] != spanlake_query::replay::FORMAT {
        bail!("not a replay bundle of format {}", spanlake_query::replay::FORMAT);
    }
    let steps = bundle["steps"].as_array().cloned().unwrap_or_default();
    let llm: Vec<&Value> = steps.iter().filter(|s| s["kind"] == "llm").collect();
    let Some(first) = llm.first() else { bail!("the trace has no LLM calls to replay") };
    let blocking: Vec<String> = bundle["missing"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|m| {
            m.contains("no recorded prompt messages")
                || m.contains("no model name")
                || m.contains("no LLM call")
        })
        .map(str::to_string)
        .collect();
    if !blocking.is_empty() && !options.overrides.contains_key(&first["step"].as_u64().unwrap_or(1))
    {
        bail!("this trace cannot be replayed:\n  {}", blocking.join("\n  "));
    }
    // Recorded tool results: (tool, arguments, result, used).
    let mut recorded: Vec<(String, Value, Value, bool)> = steps
        .iter()
        .filter(|s| s["kind"] == "tool")
        .map(|s| {
            let result = if s["error"].is_null() {
                s["result"].clone()
            } else {
                json!({"error": s["error"]})
            };
            (
                s["tool"].as_str().unwrap_or_default().to_string(),
                args_value(&s["arguments"]),
                result,
                false,
            )
        })
        .collect();
    let url = if options.endpoint.trim_end_matches('/').ends_with("/chat/completions") {
        options.endpoint.clone()
    } else {
        format!("{}/chat/completions", options.endpoint.trim_end_matches('/'))
    };
    let client = reqwest::Client::new();
    let original = bundle["trace_id"].as_str().unwrap_or_default().to_string();
    let new_trace: [u8; 16] = rand::random();
    let root_id: [u8; 8] = rand::random();
    let run_start = now_ns();
    let mut spans: Vec<Span> = Vec::new();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "replay of trace {original}: {} LLM calls and {} tool calls recorded; endpoint {url}",
        llm.len(),
        recorded.len()
    );
    let mut diverged_at = None;
    let mut conversation: Vec<Value> =
        first["request"]["messages"].as_array().cloned().unwrap_or_default();
    for (k, step) in llm.iter().enumerate() {
        let number = step["step"].as_u64().unwrap_or(k as u64 + 1);
        if let Some(messages) = options.overrides.get(&number) {
            conversation = messages.clone();
            let _ = writeln!(report, "step {number}: messages replaced by the override");
        }
        let request = &step["request"];
        let model = options
            .model
            .clone()
            .or_else(|| request["model"].as_str().map(str::to_string))
            .unwrap_or_default();
        let mut body = json!({"model": model, "messages": conversation});
        if let Some(tools) = request["tools"].as_array().filter(|t| !t.is_empty()) {
            body["tools"] = json!(tools);
        }
        for (p, v) in request["parameters"].as_object().into_iter().flatten() {
            body[p] = v.clone();
        }
        let started = now_ns();
        let mut req = client.post(&url).json(&body);
        if let Some(key) = &options.api_key {
            req = req.bearer_auth(key);
        }
        let response = req.send().await.with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let answer: Value =
            response.json().await.with_context(|| format!("{url}: the answer is not JSON"))?;
        if !status.is_success() {
            bail!("step {number}: {url} answered {status}: {}", short(&answer));
        }
        let message = answer["choices"][0]["message"].clone();
        if message.is_null() {
            bail!("step {number}: the answer has no choices[0].message: {}", short(&answer));
        }
        let ended = now_ns();
        let differences = compare(&step["response"], &message);
        let calls = calls_of(&message);
        let what = if calls.is_empty() {
            format!("text {:?}", short(&Value::String(content_of(&message))))
        } else {
            calls.iter().map(|(_, n, a)| format!("{n} {a}")).collect::<Vec<_>>().join(", ")
        };
        if differences.is_empty() {
            let _ = writeln!(report, "step {number} llm {model}: same as recorded ({what})");
        } else {
            diverged_at.get_or_insert(number);
            let _ =
                writeln!(report, "step {number} llm {model}: DIVERGED: {}", differences.join("; "));
        }
        let llm_span_id: [u8; 8] = rand::random();
        let usage = &answer["usage"];
        let mut attributes = vec![
            kv("gen_ai.operation.name", s("chat")),
            kv("gen_ai.request.model", s(model.clone())),
            kv("gen_ai.input.messages", s(Value::Array(conversation.clone()).to_string())),
            kv("gen_ai.output.messages", s(Value::Array(vec![message.clone()]).to_string())),
            kv("spanlake.replay.step", any_value::Value::IntValue(number as i64)),
            kv("spanlake.replay.diverged", any_value::Value::BoolValue(!differences.is_empty())),
            kv("spanlake.replay.recorded_span_id", s(step["span_id"].as_str().unwrap_or_default())),
        ];
        for (key, field) in [
            ("gen_ai.usage.input_tokens", "prompt_tokens"),
            ("gen_ai.usage.output_tokens", "completion_tokens"),
        ] {
            if let Some(n) = usage[field].as_i64() {
                attributes.push(kv(key, any_value::Value::IntValue(n)));
            }
        }
        if let Some(m) = answer["model"].as_str() {
            attributes.push(kv("gen_ai.response.model", s(m)));
        }
        spans.push(Span {
            trace_id: new_trace.to_vec(),
            span_id: llm_span_id.to_vec(),
            parent_span_id: root_id.to_vec(),
            name: format!("chat {model}"),
            kind: span::SpanKind::Client as i32,
            start_time_unix_nano: started,
            end_time_unix_nano: ended.max(started + 1),
            attributes,
            ..Default::default()
        });
        conversation.push(message.clone());
        if calls.is_empty() {
            if k + 1 < llm.len() {
                diverged_at.get_or_insert(number);
                let _ = writeln!(
                    report,
                    "the new run ended at step {number}; the recorded run made {} more LLM call(s)",
                    llm.len() - k - 1
                );
            }
            break;
        }
        for (id, name, args) in &calls {
            let exact = recorded.iter().position(|(n, a, _, used)| !used && n == name && a == args);
            let any =
                exact.or_else(|| recorded.iter().position(|(n, _, _, used)| !used && n == name));
            let (result, note) = match any {
                Some(i) => {
                    recorded[i].3 = true;
                    let note = if exact.is_some() {
                        "answered from the recording".to_string()
                    } else {
                        format!(
                            "answered with the recorded result of {name} called with {}",
                            recorded[i].1
                        )
                    };
                    (recorded[i].2.clone(), note)
                }
                None => {
                    diverged_at.get_or_insert(number);
                    (
                        json!({"error": format!("no recorded result for tool {name}")}),
                        format!(
                            "DIVERGED: the recorded run never called {name}; answered with an error"
                        ),
                    )
                }
            };
            let _ = writeln!(report, "  tool {name} {args}: {note}: {}", short(&result));
            let content = match &result {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let at = now_ns();
            let tool_span_id: [u8; 8] = rand::random();
            spans.push(Span {
                trace_id: new_trace.to_vec(),
                span_id: tool_span_id.to_vec(),
                parent_span_id: root_id.to_vec(),
                name: format!("execute_tool {name}"),
                kind: span::SpanKind::Internal as i32,
                start_time_unix_nano: at,
                end_time_unix_nano: at + 1,
                attributes: vec![
                    kv("gen_ai.operation.name", s("execute_tool")),
                    kv("gen_ai.tool.name", s(name.clone())),
                    kv("gen_ai.tool.call.id", s(id.clone())),
                    kv("gen_ai.tool.call.arguments", s(args.to_string())),
                    kv("gen_ai.tool.call.result", s(content.clone())),
                    kv("spanlake.replay.step", any_value::Value::IntValue(number as i64)),
                ],
                ..Default::default()
            });
            conversation.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
        }
        if k + 1 == llm.len() {
            diverged_at.get_or_insert(number);
            let _ = writeln!(
                report,
                "the new run goes on calling tools after the recorded run's last LLM call"
            );
        }
    }
    match diverged_at {
        Some(n) => {
            let _ = writeln!(report, "result: diverged at step {n}");
        }
        None => {
            let _ = writeln!(report, "result: same as recorded at every step");
        }
    }
    if let Some(base) = &options.record_to {
        let original_bytes = hex::decode(&original).unwrap_or_default();
        let original_root =
            hex::decode(bundle["root_span_id"].as_str().unwrap_or_default()).unwrap_or_default();
        let mut root_attrs = vec![
            kv("gen_ai.operation.name", s("invoke_agent")),
            kv("gen_ai.agent.name", s("spanlake replay")),
            kv("spanlake.replay.of", s(original.clone())),
            kv("spanlake.replay.endpoint", s(url.clone())),
        ];
        if let Some(n) = diverged_at {
            root_attrs
                .push(kv("spanlake.replay.diverged_at", any_value::Value::IntValue(n as i64)));
        }
        spans.insert(
            0,
            Span {
                trace_id: new_trace.to_vec(),
                span_id: root_id.to_vec(),
                name: format!("replay {original}"),
                kind: span::SpanKind::Internal as i32,
                start_time_unix_nano: run_start,
                end_time_unix_nano: now_ns().max(run_start + 1),
                attributes: root_attrs,
                links: vec![span::Link {
                    trace_id: original_bytes,
                    span_id: original_root,
                    attributes: vec![kv("spanlake.link", s("replay_of"))],
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", s("spanlake-replay"))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
                ..Default::default()
            }],
        };
        let target = format!("{}/v1/traces", base.trim_end_matches('/'));
        let response = client
            .post(&target)
            .header("content-type", "application/x-protobuf")
            .body(request.encode_to_vec())
            .send()
            .await
            .with_context(|| format!("cannot record the re-run at {target}"))?;
        if !response.status().is_success() {
            bail!("recording the re-run at {target} failed: {}", response.status());
        }
        let id = hex::encode(new_trace);
        let _ = writeln!(report, "recorded as trace {id} (links to {original})");
    }
    Ok(Outcome { report, diverged_at })
}
