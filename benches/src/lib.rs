//! Load generation for spanlake's benchmarks: realistic, seeded, reproducible agent traces.
//!
//! Two mixes:
//!
//! * [`Mix::Llm`] — agent runs: a root agent span; 1–8 LLM calls whose prompts carry a repeated
//!   system prompt and a conversation history that grows call by call (1–8 KB of messages), with
//!   completions of 1–8 KB; tool calls with arguments and results; retrievals; a nested
//!   sub-agent in a third of the runs; about 2% of spans in error. Conventions alternate between
//!   OpenTelemetry GenAI, OpenInference and OpenLLMetry, as a real fleet sends.
//! * [`Mix::Small`] — ~300-byte spans with a few attributes (an HTTP service's spans), ten per
//!   trace.
//!
//! Requests are encoded once, up front ([`Generator::requests`]), so that a load run spends its
//! CPU on sending, not on building spans.

use opentelemetry_proto_types as otlp;
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// OTLP types, through the proto crate.
mod opentelemetry_proto_types {
    pub(crate) use spanlake_proto::collector::ExportTraceServiceRequest;
    pub(crate) use spanlake_proto::common::{AnyValue, InstrumentationScope, KeyValue, any_value};
    pub(crate) use spanlake_proto::resource::Resource;
    pub(crate) use spanlake_proto::trace::{ResourceSpans, ScopeSpans, Span, Status, span};
}

/// What kind of spans to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// Agent runs with LLM calls of 1–8 KB prompts and completions.
    Llm,
    /// ~300-byte spans.
    Small,
}

impl std::str::FromStr for Mix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "llm" => Ok(Self::Llm),
            "small" => Ok(Self::Small),
            other => Err(format!("unknown mix {other:?}: use llm or small")),
        }
    }
}

const MODELS: &[&str] =
    &["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "gemini-2.5-flash", "gpt-4.1-mini"];
const TOOLS: &[&str] =
    &["search_web", "get_weather", "run_sql", "read_file", "send_email", "calculator"];
const AGENTS: &[&str] = &["planner", "researcher", "coder", "reviewer"];
const WORDS: &[&str] = &[
    "the", "agent", "calls", "a", "tool", "to", "find", "weather", "in", "paris", "and", "then",
    "writes", "summary", "for", "user", "with", "sources", "cost", "latency", "tokens", "model",
    "answer", "query",
];
const SYSTEM_PROMPT: &str = "You are a careful assistant. Use the tools when they help, cite your sources, \
    keep answers short and correct, and never invent data. When a tool fails, say so and try another.";

fn kv(key: &str, v: otlp::any_value::Value) -> otlp::KeyValue {
    otlp::KeyValue {
        key: key.into(),
        value: Some(otlp::AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn s(key: &str, v: impl Into<String>) -> otlp::KeyValue {
    kv(key, otlp::any_value::Value::StringValue(v.into()))
}

fn i(key: &str, v: i64) -> otlp::KeyValue {
    kv(key, otlp::any_value::Value::IntValue(v))
}

/// A seeded generator of OTLP requests.
#[derive(Debug)]
pub struct Generator {
    rng: StdRng,
    mix: Mix,
    /// Start of generated time (ns since the epoch).
    pub start_ns: u64,
    /// Generated spans spread over this many nanoseconds.
    pub spread_ns: u64,
    spans: u64,
    text_scale: f64,
    ordered_total: Option<u64>,
}

impl Generator {
    /// A generator of `mix`, seeded, with spans starting in `[start_ns, start_ns + spread_ns)`.
    pub fn new(mix: Mix, seed: u64, start_ns: u64, spread_ns: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            mix,
            start_ns,
            spread_ns: spread_ns.max(1),
            spans: 0,
            text_scale: 1.0,
            ordered_total: None,
        }
    }

    /// Prompts, completions, questions and tool results `scale` times their usual size (to
    /// fit a large data set on a small disk; the default is 1).
    pub fn with_text_scale(mut self, scale: f64) -> Self {
        self.text_scale = scale.max(0.0);
        self
    }

    /// Traces start in the order they are generated, spread evenly over the window for `total`
    /// spans, as a live fleet sends them (by default each starts at a random point of it).
    pub fn in_time_order(mut self, total: u64) -> Self {
        self.ordered_total = Some(total.max(1));
        self
    }

    fn id<const N: usize>(&mut self) -> Vec<u8> {
        let mut b = [0u8; N];
        self.rng.fill(&mut b[..]);
        b[0] |= 1;
        b.to_vec()
    }

    fn text(&mut self, bytes: usize) -> String {
        let bytes = (bytes as f64 * self.text_scale) as usize;
        let mut out = String::with_capacity(bytes + 16);
        while out.len() < bytes {
            out.push_str(WORDS[self.rng.random_range(0..WORDS.len())]);
            out.push(' ');
        }
        out
    }

    /// The spans of one trace (one agent run, or ten small spans).
    pub fn trace(&mut self) -> Vec<otlp::Span> {
        let start = self.start_ns
            + match self.ordered_total {
                Some(total) => {
                    (u128::from(self.spread_ns) * u128::from(self.spans.min(total))
                        / u128::from(total)) as u64
                }
                None => self.rng.random_range(0..self.spread_ns),
            };
        let spans = match self.mix {
            Mix::Small => self.small_trace(start),
            Mix::Llm => self.agent_run(start),
        };
        self.spans += spans.len() as u64;
        spans
    }

    fn span(
        &mut self,
        trace_id: &[u8],
        parent: Option<&[u8]>,
        name: String,
        start: u64,
        dur: u64,
    ) -> otlp::Span {
        let error = self.rng.random_bool(0.02);
        otlp::Span {
            trace_id: trace_id.to_vec(),
            span_id: self.id::<8>(),
            parent_span_id: parent.map(<[u8]>::to_vec).unwrap_or_default(),
            name,
            kind: otlp::span::SpanKind::Internal as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + dur,
            status: error.then(|| otlp::Status { code: 2, message: "upstream error".into() }),
            ..Default::default()
        }
    }

    fn small_trace(&mut self, start: u64) -> Vec<otlp::Span> {
        let trace = self.id::<16>();
        let root = {
            let mut r = self.span(&trace, None, "GET /api/orders".into(), start, 40_000_000);
            r.kind = otlp::span::SpanKind::Server as i32;
            r.attributes = vec![
                s("http.request.method", "GET"),
                s("http.route", "/api/orders"),
                i("http.response.status_code", 200),
            ];
            r
        };
        let root_id = root.span_id.clone();
        let mut out = vec![root];
        for n in 0..9u64 {
            let dur = self.rng.random_range(100_000..5_000_000);
            let mut c = self.span(
                &trace,
                Some(&root_id),
                format!("SELECT orders.{n}"),
                start + n * 3_000_000,
                dur,
            );
            c.kind = otlp::span::SpanKind::Client as i32;
            let rows = self.rng.random_range(0..500);
            let shard = self.rng.random_range(0..16);
            c.attributes = vec![
                s("db.system", "postgresql"),
                s("db.operation", "SELECT"),
                s(
                    "db.statement",
                    "SELECT id, status, total FROM orders WHERE customer_id = $1 LIMIT 50",
                ),
                s("server.address", format!("orders-db-{shard}.internal")),
                i("server.port", 5432),
                i("db.rows", rows),
            ];
            out.push(c);
        }
        out
    }

    fn agent_run(&mut self, start: u64) -> Vec<otlp::Span> {
        let trace = self.id::<16>();
        let convention = self.rng.random_range(0..3u8);
        let agent = AGENTS[self.rng.random_range(0..AGENTS.len())];
        let session = format!("session-{}", self.rng.random_range(0..5000u32));
        let user = format!("user-{}", self.rng.random_range(0..500u32));
        let mut root = self.span(&trace, None, format!("invoke_agent {agent}"), start, 0);
        root.attributes = vec![
            s("gen_ai.operation.name", "invoke_agent"),
            s("gen_ai.agent.name", agent),
            s("session.id", session.clone()),
            s("user.id", user.clone()),
        ];
        let root_id = root.span_id.clone();
        let mut spans = vec![];
        let mut t = start + 1_000_000;
        let calls = self.rng.random_range(1..=8u32);
        let mut history = Vec::new();
        let question = {
            let n = self.rng.random_range(200..800);
            self.text(n)
        };
        history.push(format!("{{\"role\":\"user\",\"content\":\"{question}\"}}"));
        let parent_for_sub = root_id.clone();
        for call in 0..calls {
            let model = MODELS[self.rng.random_range(0..MODELS.len())];
            let completion = {
                let n = self.rng.random_range(1000..8000);
                self.text(n)
            };
            let messages = format!(
                "[{{\"role\":\"system\",\"content\":\"{SYSTEM_PROMPT}\"}},{}]",
                history.join(",")
            );
            let input_tokens = (messages.len() / 4) as i64;
            let output_tokens = (completion.len() / 4) as i64;
            let dur = self.rng.random_range(300_000_000..4_000_000_000u64);
            let mut llm = self.span(&trace, Some(&root_id), format!("chat {model}"), t, dur);
            llm.kind = otlp::span::SpanKind::Client as i32;
            llm.attributes = match convention {
                0 => vec![
                    s("gen_ai.operation.name", "chat"),
                    s("gen_ai.provider.name", "openai"),
                    s("gen_ai.request.model", model),
                    i("gen_ai.usage.input_tokens", input_tokens),
                    i("gen_ai.usage.output_tokens", output_tokens),
                    s("gen_ai.input.messages", messages.clone()),
                    s(
                        "gen_ai.output.messages",
                        format!("[{{\"role\":\"assistant\",\"content\":\"{completion}\"}}]"),
                    ),
                    s("gen_ai.conversation.id", session.clone()),
                ],
                1 => vec![
                    s("openinference.span.kind", "LLM"),
                    s("llm.system", "openai"),
                    s("llm.model_name", model),
                    i("llm.token_count.prompt", input_tokens),
                    i("llm.token_count.completion", output_tokens),
                    i("llm.token_count.total", input_tokens + output_tokens),
                    s("input.value", messages.clone()),
                    s("output.value", completion.clone()),
                    s("session.id", session.clone()),
                    s("user.id", user.clone()),
                ],
                _ => vec![
                    s("llm.request.type", "chat"),
                    s("gen_ai.system", "openai"),
                    s("gen_ai.request.model", model),
                    i("gen_ai.usage.prompt_tokens", input_tokens),
                    i("gen_ai.usage.completion_tokens", output_tokens),
                    s("gen_ai.prompt.0.role", "system"),
                    s("gen_ai.prompt.0.content", SYSTEM_PROMPT),
                    s("gen_ai.prompt.1.role", "user"),
                    s("gen_ai.prompt.1.content", question.clone()),
                    s("gen_ai.completion.0.role", "assistant"),
                    s("gen_ai.completion.0.content", completion.clone()),
                    s("traceloop.association.properties.session_id", session.clone()),
                ],
            };
            spans.push(llm);
            t += dur;
            history.push(format!(
                "{{\"role\":\"assistant\",\"content\":\"{}\"}}",
                &completion[..completion.len().min(1500)]
            ));
            if call + 1 < calls {
                let tool = TOOLS[self.rng.random_range(0..TOOLS.len())];
                let dur = self.rng.random_range(5_000_000..800_000_000u64);
                let mut span =
                    self.span(&trace, Some(&root_id), format!("execute_tool {tool}"), t, dur);
                let args = format!("{{\"query\":\"{}\"}}", self.text(60));
                let result = {
                    let n = self.rng.random_range(100..1500);
                    self.text(n)
                };
                span.attributes = vec![
                    s("gen_ai.operation.name", "execute_tool"),
                    s("gen_ai.tool.name", tool),
                    s("gen_ai.tool.call.arguments", args),
                    s("gen_ai.tool.call.result", result.clone()),
                ];
                spans.push(span);
                t += dur;
                history.push(format!(
                    "{{\"role\":\"tool\",\"content\":\"{}\"}}",
                    &result[..result.len().min(500)]
                ));
            }
            if call == 0 && self.rng.random_bool(0.5) {
                let dur = self.rng.random_range(20_000_000..200_000_000u64);
                let mut r = self.span(&trace, Some(&root_id), "retrieve documents".into(), t, dur);
                r.attributes = vec![
                    s("openinference.span.kind", "RETRIEVER"),
                    s("input.value", question.clone()),
                ];
                spans.push(r);
                t += dur;
            }
        }
        if self.rng.random_bool(0.33) {
            let dur = self.rng.random_range(500_000_000..3_000_000_000u64);
            let mut sub =
                self.span(&trace, Some(&parent_for_sub), "invoke_agent reviewer".into(), t, dur);
            sub.attributes = vec![
                s("gen_ai.operation.name", "invoke_agent"),
                s("gen_ai.agent.name", "reviewer"),
            ];
            let sub_id = sub.span_id.clone();
            spans.push(sub);
            let mut llm =
                self.span(&trace, Some(&sub_id), "chat gpt-4o-mini".into(), t + 1_000_000, dur / 2);
            llm.attributes = vec![
                s("gen_ai.operation.name", "chat"),
                s("gen_ai.request.model", "gpt-4o-mini"),
                i("gen_ai.usage.input_tokens", 900),
                i("gen_ai.usage.output_tokens", 120),
                s(
                    "gen_ai.input.messages",
                    format!("[{{\"role\":\"system\",\"content\":\"{SYSTEM_PROMPT}\"}}]"),
                ),
            ];
            spans.push(llm);
            t += dur;
        }
        root.end_time_unix_nano = t + 1_000_000;
        spans.insert(0, root);
        spans
    }

    /// Encoded requests of about `spans_per_request` spans each (whole traces), until `total`
    /// spans are generated.
    pub fn requests(
        &mut self,
        spans_per_request: usize,
        total: u64,
        service: &str,
    ) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let goal = self.spans + total;
        while self.spans < goal {
            let mut spans = Vec::with_capacity(spans_per_request + 16);
            while spans.len() < spans_per_request && self.spans < goal {
                spans.extend(self.trace());
            }
            out.push(request(service, spans).encode_to_vec());
        }
        out
    }

    /// Spans generated so far.
    pub fn spans(&self) -> u64 {
        self.spans
    }
}

/// An export request of `spans` from `service`.
pub fn request(service: &str, spans: Vec<otlp::Span>) -> otlp::ExportTraceServiceRequest {
    otlp::ExportTraceServiceRequest {
        resource_spans: vec![otlp::ResourceSpans {
            resource: Some(otlp::Resource {
                attributes: vec![
                    s("service.name", service),
                    s("deployment.environment.name", "bench"),
                ],
                ..Default::default()
            }),
            scope_spans: vec![otlp::ScopeSpans {
                scope: Some(otlp::InstrumentationScope {
                    name: "spanlake-bench".into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_reproducible() {
        let a = Generator::new(Mix::Llm, 42, 0, 1_000_000_000).requests(200, 1000, "svc");
        let b = Generator::new(Mix::Llm, 42, 0, 1_000_000_000).requests(200, 1000, "svc");
        assert_eq!(a, b);
        let mut g = Generator::new(Mix::Small, 1, 0, 1);
        let reqs = g.requests(100, 1000, "svc");
        assert_eq!(g.spans(), 1000);
        let bytes: usize = reqs.iter().map(Vec::len).sum();
        // About 300 bytes per small span on the wire... give or take the encoding.
        assert!((150..450).contains(&(bytes / 1000)), "{} bytes per span", bytes / 1000);
    }

    #[test]
    fn time_order_and_text_scale() {
        let (start, spread) = (1_000_000_000_000u64, 3_600_000_000_000u64);
        let mut g = Generator::new(Mix::Llm, 7, start, spread).in_time_order(10_000);
        let mut roots = vec![];
        while g.spans() < 10_000 {
            roots.push(g.trace()[0].start_time_unix_nano);
        }
        assert!(roots.is_sorted(), "traces start in the order they are generated");
        assert_eq!(roots[0], start);
        assert!(roots.iter().all(|&t| t < start + spread));
        assert!(*roots.last().unwrap() > start + spread * 9 / 10);

        let size = |scale: f64| -> usize {
            let mut g = Generator::new(Mix::Llm, 7, start, spread).with_text_scale(scale);
            g.requests(200, 5_000, "svc").iter().map(Vec::len).sum()
        };
        let (full, quarter) = (size(1.0), size(0.25));
        assert!(quarter * 2 < full && quarter * 5 > full, "{quarter} of {full} bytes");
    }
}
