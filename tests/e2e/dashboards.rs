//! The provisioned Grafana dashboards (`deploy/grafana/dashboards/*.json`): every panel's SQL,
//! expanded as Grafana's PostgreSQL data source expands its macros, runs through a Postgres
//! driver against a server started with the deployment's own configuration
//! (`deploy/spanlake.toml`: data on S3 — here a moto server — and the `grafana` user), and
//! returns the columns and values its panel plots.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, status};
use prost::Message as _;
use serde_json::Value;
use tokio_postgres::types::Type;

use crate::harness::{S3Server, ServerOptions, TestServer, repo_root};

/// 2026-11-23T21:00:00Z in seconds.
pub(crate) const BASE_S: u64 = 1_795_467_600;
const RUNS: u64 = 12;
const AGENTS: [&str; 3] = ["planner", "researcher", "writer"];
const MODELS: [&str; 2] = ["gpt-4o", "claude-sonnet-4"];
const TOOLS: [&str; 2] = ["search", "calculator"];

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue { key: k.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}
fn s(v: &str) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

/// Run `r` (one every 10 minutes from 21:00): an agent span (`AGENTS[r % 3]`, lasting
/// 2000 + 100·r ms), three LLM calls j = 0..3 (model `MODELS[(r + j) % 2]`, input tokens
/// 1000 + 10·r + j, output 100 + j, cost 0.001·(r + 1)·(j + 1) USD, 500 + 100·j ms) and two
/// tool calls (`TOOLS[j]`, 50 + 10·r ms; the second fails when r % 4 == 0). Session and user
/// `s-{r % 4}` / `u-{r % 4}` on every span. LLM calls carry GenAI input and output messages,
/// tool calls their arguments.
pub(crate) fn agent_runs() -> ExportTraceServiceRequest {
    let mut spans = Vec::new();
    for r in 0..RUNS {
        let trace_id: Vec<u8> = [0xd0u8; 8].into_iter().chain(r.to_be_bytes()).collect();
        let start = (BASE_S + r * 600) * 1_000_000_000;
        let ms = 1_000_000u64;
        let common = |extra: Vec<KeyValue>| {
            let mut a = vec![
                kv("session.id", s(&format!("s-{}", r % 4))),
                kv("user.id", s(&format!("u-{}", r % 4))),
            ];
            a.extend(extra);
            a
        };
        let root_id = (r * 16 + 1).to_be_bytes().to_vec();
        spans.push(Span {
            trace_id: trace_id.clone(),
            span_id: root_id.clone(),
            name: format!("invoke_agent {}", AGENTS[(r % 3) as usize]),
            start_time_unix_nano: start,
            end_time_unix_nano: start + (2000 + 100 * r) * ms,
            attributes: common(vec![
                kv("gen_ai.operation.name", s("invoke_agent")),
                kv("gen_ai.agent.name", s(AGENTS[(r % 3) as usize])),
            ]),
            ..Default::default()
        });
        for j in 0..3u64 {
            let at = start + (10 + 600 * j) * ms;
            spans.push(Span {
                trace_id: trace_id.clone(),
                span_id: (r * 16 + 2 + j).to_be_bytes().to_vec(),
                parent_span_id: root_id.clone(),
                name: "chat".into(),
                start_time_unix_nano: at,
                end_time_unix_nano: at + (500 + 100 * j) * ms,
                attributes: common(vec![
                    kv("gen_ai.operation.name", s("chat")),
                    kv("gen_ai.request.model", s(MODELS[((r + j) % 2) as usize])),
                    kv(
                        "gen_ai.usage.input_tokens",
                        any_value::Value::IntValue((1000 + 10 * r + j) as i64),
                    ),
                    kv("gen_ai.usage.output_tokens", any_value::Value::IntValue((100 + j) as i64)),
                    kv(
                        "gen_ai.usage.cost",
                        any_value::Value::DoubleValue(0.001 * (r + 1) as f64 * (j + 1) as f64),
                    ),
                    kv(
                        "gen_ai.input.messages",
                        s(&format!(r#"[{{"role":"user","content":"step {j} of run {r}"}}]"#)),
                    ),
                    kv(
                        "gen_ai.output.messages",
                        s(&format!(r#"[{{"role":"assistant","content":"done {j}"}}]"#)),
                    ),
                ]),
                ..Default::default()
            });
        }
        for j in 0..2u64 {
            let at = start + (1900 + 10 * j) * ms;
            let failed = r % 4 == 0 && j == 1;
            spans.push(Span {
                trace_id: trace_id.clone(),
                span_id: (r * 16 + 8 + j).to_be_bytes().to_vec(),
                parent_span_id: root_id.clone(),
                name: format!("execute_tool {}", TOOLS[j as usize]),
                start_time_unix_nano: at,
                end_time_unix_nano: at + (50 + 10 * r) * ms,
                attributes: common(vec![
                    kv("gen_ai.operation.name", s("execute_tool")),
                    kv("gen_ai.tool.name", s(TOOLS[j as usize])),
                    kv("gen_ai.tool.call.arguments", s(&format!(r#"{{"q":"run {r}"}}"#))),
                ]),
                status: failed.then(|| Status {
                    code: status::StatusCode::Error as i32,
                    message: "tool failed".into(),
                }),
                ..Default::default()
            });
        }
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", s("agent-app"))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
}

/// Grafana's time range for the panels, as its PostgreSQL macro engine formats it.
const FROM: &str = "2026-11-23T20:00:00Z";
const TO: &str = "2026-11-23T23:00:00Z";
const FROM_S: u64 = BASE_S - 3600;
const TO_S: u64 = BASE_S + 2 * 3600;
/// `$__interval` as the panel would get it.
const INTERVAL: &str = "5m";

fn interval_seconds(text: &str) -> u64 {
    let text = text.trim_matches('\'');
    let (n, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = n.parse().expect("interval number");
    n * match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => panic!("interval unit {other}"),
    }
}

/// Expands Grafana's template variables and PostgreSQL macros the way Grafana does
/// (`pkg/tsdb/grafana-postgresql-datasource/macros.go` and the SQL engine's variable step):
/// `$__timeFilter(c)` → `c BETWEEN 'FROM' AND 'TO'`, `$__timeGroup(c, 5m)` →
/// `floor(extract(epoch from c)/300)*300` (with ` AS "time"` for the alias form, or when a comma
/// follows), `$__time(c)`, `$__timeEpoch(c)`, `$__timeFrom()`, `$__timeTo()`,
/// `$__unixEpochFilter(c)`, `$__unixEpochGroup(c, 5m)`.
pub fn expand_grafana_macros(sql: &str) -> String {
    let sql = sql
        .replace("$__interval_ms", &(interval_seconds(INTERVAL) * 1000).to_string())
        .replace("$__interval", INTERVAL)
        .replace("$__unixEpochFrom()", &FROM_S.to_string())
        .replace("$__unixEpochTo()", &TO_S.to_string());
    let mut out = String::new();
    let mut rest = sql.as_str();
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let name_len =
            after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
        let (name, tail) = after.split_at(name_len);
        let Some(args_end) = tail.strip_prefix('(').and_then(|t| t.find(')')) else {
            out.push('$');
            rest = after;
            continue;
        };
        let args: Vec<&str> = tail[1..=args_end].split(',').map(str::trim).collect();
        let following = &tail[args_end + 2..];
        let group = |c: &str, i: &str| {
            let n = interval_seconds(i);
            format!("floor(extract(epoch from {c})/{n})*{n}")
        };
        let expanded = match name {
            "__time" => format!("{} AS \"time\"", args[0]),
            "__timeEpoch" => format!("extract(epoch from {}) as \"time\"", args[0]),
            "__timeFilter" => format!("{} BETWEEN '{FROM}' AND '{TO}'", args[0]),
            "__timeFrom" => format!("'{FROM}'"),
            "__timeTo" => format!("'{TO}'"),
            "__timeGroup" if following.starts_with(',') => {
                format!("{} AS \"time\"", group(args[0], args[1]))
            }
            "__timeGroup" => group(args[0], args[1]),
            "__timeGroupAlias" => format!("{} AS \"time\"", group(args[0], args[1])),
            "__unixEpochFilter" => format!("{0} >= {FROM_S} AND {0} <= {TO_S}", args[0]),
            "__unixEpochGroup" => {
                let n = interval_seconds(args[1]);
                format!("floor(({})/{n})*{n}", args[0])
            }
            other => panic!("macro ${other} is not one Grafana's PostgreSQL data source expands"),
        };
        out.push_str(&expanded);
        rest = following;
    }
    out.push_str(rest);
    out
}

#[test]
fn grafana_macros_expand_as_grafana_does() {
    assert_eq!(
        expand_grafana_macros(
            "SELECT $__timeGroupAlias(start_time, $__interval), x FROM t WHERE $__timeFilter(start_time)"
        ),
        "SELECT floor(extract(epoch from start_time)/300)*300 AS \"time\", x FROM t WHERE start_time BETWEEN '2026-11-23T20:00:00Z' AND '2026-11-23T23:00:00Z'"
    );
    assert_eq!(
        expand_grafana_macros(
            "SELECT $__timeGroup(t, '1h'), $__time(t) WHERE $__unixEpochFilter(e) GROUP BY $__timeGroup(t, 1h)"
        ),
        format!(
            "SELECT floor(extract(epoch from t)/3600)*3600 AS \"time\", t AS \"time\" WHERE e >= {FROM_S} AND e <= {TO_S} GROUP BY floor(extract(epoch from t)/3600)*3600"
        )
    );
}

fn panels() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let dir = repo_root().join("deploy/grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in files {
        let dash: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        for p in dash["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                out.push((
                    p["title"].as_str().unwrap().to_string(),
                    t["format"].as_str().unwrap().to_string(),
                    t["rawSql"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    out
}

const NUMERIC: [Type; 5] = [Type::INT8, Type::INT4, Type::FLOAT8, Type::FLOAT4, Type::NUMERIC];

type Rows = Vec<BTreeMap<String, String>>;

#[test]
fn every_dashboard_panel_runs_through_postgres_after_macro_expansion() {
    let s3 = S3Server::start("spanlake");
    let mut env = s3.env();
    env.push((
        "SPANLAKE_CONFIG".into(),
        repo_root().join("deploy/spanlake.toml").display().to_string(),
    ));
    let server = TestServer::start_with(ServerOptions { env, ..Default::default() });
    let (status, body) =
        server.post_traces("application/x-protobuf", agent_runs().encode_to_vec(), None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let panels = panels();
    assert!(panels.len() >= 12, "{} panels", panels.len());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let results: BTreeMap<String, Rows> = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=grafana password=grafana dbname=spanlake",
                server.pg_port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect as the provisioned grafana user");
        #[expect(clippy::disallowed_methods, reason = "the connection task ends with the runtime")]
        let _conn = tokio::spawn(conn);
        let mut results = BTreeMap::new();
        for (title, format, sql) in &panels {
            let sql = expand_grafana_macros(sql);
            // Column types as RowDescription carries them (what Grafana reads to plot).
            let statement =
                client.prepare(&sql).await.unwrap_or_else(|e| panic!("{title}: {e}\n{sql}"));
            let columns: Vec<(String, Type)> = statement
                .columns()
                .iter()
                .map(|c| (c.name().to_string(), c.type_().clone()))
                .collect();
            for (name, ty) in &columns {
                let ok = match name.as_str() {
                    "time" => NUMERIC.contains(ty) || *ty == Type::TIMESTAMPTZ,
                    "metric" | "trace_id" | "model" | "tool" | "agent" | "root_span"
                    | "service" | "session_id" | "user_id" => *ty == Type::TEXT,
                    "start_time" | "first_time" | "last_time" => *ty == Type::TIMESTAMPTZ,
                    _ => NUMERIC.contains(ty),
                };
                assert!(ok, "{title}: column {name} has type {ty}\n{sql}");
            }
            if format == "time_series" {
                assert_eq!(
                    columns[0].0, "time",
                    "{title}: a time series starts with its time column"
                );
            }
            // The rows, over the simple query protocol as Grafana sends them.
            let mut rows = Vec::new();
            for m in
                client.simple_query(&sql).await.unwrap_or_else(|e| panic!("{title}: {e}\n{sql}"))
            {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                    rows.push(
                        columns
                            .iter()
                            .enumerate()
                            .map(|(i, (n, _))| (n.clone(), r.get(i).unwrap_or("NULL").to_string()))
                            .collect::<BTreeMap<_, _>>(),
                    );
                }
            }
            assert!(!rows.is_empty(), "{title}: no rows\n{sql}");
            results.insert(title.clone(), rows);
        }
        results
    });

    let f = |v: &str| v.parse::<f64>().unwrap_or_else(|_| panic!("not a number: {v}"));
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9 * b.abs().max(1.0);
    let one = |title: &str| results[title][0].clone();
    // Expected values from what was sent (see `agent_runs`).
    let cost = |r: u64, j: u64| 0.001 * (r + 1) as f64 * (j + 1) as f64;
    let total_cost: f64 = (0..RUNS).flat_map(|r| (0..3).map(move |j| cost(r, j))).sum();
    assert!(close(f(&one("LLM cost")["cost_usd"]), total_cost));
    let input: u64 = (0..RUNS).flat_map(|r| (0..3).map(move |j| 1000 + 10 * r + j)).sum();
    assert_eq!(one("Tokens")["input_tokens"], input.to_string());
    assert_eq!(one("Tokens")["output_tokens"], (RUNS * (100 + 101 + 102)).to_string());
    let runs = one("Agent runs");
    assert_eq!(
        (runs["runs"].as_str(), runs["llm_calls"].as_str(), runs["tool_calls"].as_str()),
        ("12", "36", "24")
    );
    assert!(close(f(&one("Error rate")["error_rate"]), 3.0 / 72.0));
    // Time series: 5-minute buckets, one series per model; the values add up to the totals.
    let series = &results["Cost by model"];
    assert!(
        series.iter().all(|r| (f(&r["time"]) as u64).is_multiple_of(300)
            && MODELS.contains(&r["metric"].as_str()))
    );
    assert!(close(series.iter().map(|r| f(&r["cost_usd"])).sum(), total_cost));
    let tokens: f64 = results["Tokens by model"].iter().map(|r| f(&r["tokens"])).sum();
    assert_eq!(tokens as u64, input + RUNS * 303);
    // Latency by model: 18 calls each; the slowest LLM call lasts 700 ms.
    let by_model = &results["LLM latency by model"];
    assert_eq!(by_model.iter().map(|r| r["calls"].as_str()).collect::<Vec<_>>(), ["18", "18"]);
    assert!(by_model.iter().all(|r| f(&r["max_ms"]) == 700.0 && f(&r["p50_ms"]) >= 500.0));
    let tools = &results["Tool latency and errors"];
    let mut tool_errors: Vec<(String, String)> =
        tools.iter().map(|r| (r["tool"].clone(), r["errors"].clone())).collect();
    tool_errors.sort();
    assert_eq!(
        tool_errors,
        [("calculator".to_string(), "3".to_string()), ("search".into(), "0".into())]
    );
    let by_type: BTreeMap<&str, f64> = results["Error rate by span type"]
        .iter()
        .filter(|r| r["metric"] == "tool")
        .map(|r| (r["time"].as_str(), f(&r["error_rate"])))
        .collect();
    // Tool spans of runs 0, 4, 8 (21:00, 21:40, 22:20): one of two fails in those buckets.
    assert_eq!(by_type.values().filter(|v| **v == 0.5).count(), 3, "{by_type:?}");
    let agents: Vec<(String, String, String)> = results["Error rate by agent"]
        .iter()
        .map(|r| (r["agent"].clone(), r["runs"].clone(), r["failed_runs"].clone()))
        .collect();
    assert_eq!(
        agents,
        AGENTS
            .iter()
            .map(|a| (a.to_string(), "4".to_string(), "1".to_string()))
            .collect::<Vec<_>>()
    );
    // Slowest and most expensive: run 11 (3,100 ms; 0.012 · 6 USD).
    let trace_11 = format!("{}{:016x}", "d0".repeat(8), 11);
    let slowest = one("Slowest traces");
    assert_eq!(slowest["trace_id"], trace_11);
    assert_eq!(f(&slowest["duration_ms"]), 3100.0);
    assert_eq!(slowest["root_span"], "invoke_agent writer");
    assert_eq!(slowest["service"], "agent-app");
    let priciest = one("Most expensive traces");
    assert_eq!(priciest["trace_id"], trace_11);
    assert!(close(f(&priciest["cost_usd"]), 0.072));
    let sessions = &results["Sessions"];
    assert_eq!(sessions.len(), 4);
    assert!(
        sessions
            .iter()
            .all(|r| r["traces"] == "3" && r["llm_calls"] == "9" && r["tool_calls"] == "6")
    );
    assert_eq!(sessions[0]["session_id"], "s-3", "latest session first");
    assert_eq!(sessions[0]["user_id"], "u-3");
}
