//! Redaction at ingest: secrets in every place a span can carry text are masked before the
//! write-ahead log, memory or Parquet see them; content can be dropped entirely.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prost::Message as _;

use crate::harness::{ServerOptions, TestServer, fixtures_dir, run_python};

const SECRETS: [&str; 7] = [
    "alice@example.com",
    "4111 1111 1111 1111",
    "sk-proj-Abcdefghijklmnopqrstuvwx1234",
    "hunter2-very-secret",
    "TICKET-123456",
    "bob@example.org",
    "carol@example.net",
];
const MARKER: &str = "MARKER-visible-text";

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(v.into())) }),
        ..Default::default()
    }
}

fn secret_span() -> ExportTraceServiceRequest {
    let messages = serde_json::json!([{"role": "user", "parts": [{"type": "text",
        "content": format!("my card is {} and my key {} ({MARKER})", SECRETS[1], SECRETS[2])}]}]);
    let span = Span {
        trace_id: vec![0x3c; 16],
        span_id: vec![2; 8],
        name: "chat gpt-4o".into(),
        start_time_unix_nano: 1_795_467_600_000_000_000,
        end_time_unix_nano: 1_795_467_601_000_000_000,
        attributes: vec![
            kv("gen_ai.operation.name", "chat"),
            kv("gen_ai.request.model", "gpt-4o"),
            kv("gen_ai.input.messages", &messages.to_string()),
            kv("user.contact", &format!("contact {}", SECRETS[0])),
            kv("db.password", SECRETS[3]),
            kv("note", &format!("{} resolved", SECRETS[4])),
        ],
        events: vec![span::Event {
            name: "feedback".into(),
            attributes: vec![kv("from", SECRETS[5])],
            ..Default::default()
        }],
        status: Some(Status {
            code: status::StatusCode::Error as i32,
            message: format!("failed for {}", SECRETS[6]),
        }),
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans { spans: vec![span], ..Default::default() }],
            ..Default::default()
        }],
    }
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .collect()
}

#[test]
fn redaction_masks_secrets_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("spanlake.toml");
    std::fs::write(
        &config,
        "[redaction]\nbuiltin = [\"email\", \"credit_card\", \"api_key\"]\nkeys = [\"*.password\"]\n\
         [[redaction.patterns]]\nname = \"ticket\"\npattern = 'TICKET-\\d{6}'\n",
    )
    .unwrap();
    let mut server = TestServer::start_with(ServerOptions {
        env: vec![("SPANLAKE_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    });
    assert_eq!(
        server.post_traces("application/x-protobuf", secret_span().encode_to_vec(), None).0,
        200
    );

    let row = &server.rows(
        "SELECT input, json_get_str(attributes, 'user.contact'), json_get_str(attributes, 'db.password'), \
         json_get_str(attributes, 'note'), status_message, events FROM spans",
    )[0];
    let input = row[0].as_str().unwrap();
    assert!(
        input.contains(&format!(
            "my card is [REDACTED:credit_card] and my key [REDACTED:api_key] ({MARKER})"
        )),
        "{input}"
    );
    assert_eq!(row[1], "contact [REDACTED:email]");
    assert_eq!(row[2], "[REDACTED]");
    assert_eq!(row[3], "[REDACTED:ticket] resolved");
    assert_eq!(row[4], "failed for [REDACTED:email]");
    assert!(row[5].as_str().unwrap().contains("\"from\":\"[REDACTED:email]\""), "{row:?}");
    for (rule, n) in [
        ("email", 3.0),
        ("credit_card", 1.0),
        ("api_key", 1.0),
        ("ticket", 1.0),
        ("attribute_key", 1.0),
    ] {
        assert_eq!(
            server.metric(&format!("spanlake_redactions_total{{rule=\"{rule}\"}}")),
            n,
            "{rule}"
        );
    }
    // The write-ahead log holds the span now: the marker is there verbatim, no secret is.
    let dir = server.data_dir().to_path_buf();
    assert!(
        !files_containing(&dir, MARKER).is_empty(),
        "the check must be able to see text in the WAL"
    );
    for secret in SECRETS {
        assert!(
            files_containing(&dir, secret).is_empty(),
            "{secret} is in {:?}",
            files_containing(&dir, secret)
        );
    }
    // After the flush, the Parquet files read back (decoded, by DuckDB) hold no secret either.
    server.stop();
    let dump = run_python(
        "import sys, duckdb; print(repr(duckdb.sql(f\"SELECT * REPLACE (CAST(start_time AS VARCHAR) AS start_time, CAST(end_time AS VARCHAR) AS end_time) FROM read_parquet('{sys.argv[1]}/spans/**/*.parquet')\").fetchall()))",
        &[dir.to_str().unwrap()],
    );
    assert!(dump.contains(MARKER), "{dump}");
    for secret in SECRETS {
        assert!(!dump.contains(secret), "{secret} in the Parquet data");
        assert!(files_containing(&dir, secret).is_empty(), "{secret} in a file");
    }
}

#[test]
fn dropping_content_keeps_no_prompt_or_completion_text() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("spanlake.toml");
    std::fs::write(&config, "[redaction]\ndrop_content = true\n").unwrap();
    let server = TestServer::start_with(ServerOptions {
        env: vec![("SPANLAKE_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    });
    for name in ["openai-openinference", "openai-openllmetry", "openai-otel-genai"] {
        let body = std::fs::read(fixtures_dir().join(format!("{name}.otlp.pb"))).unwrap();
        assert_eq!(server.post_traces("application/x-protobuf", body, None).0, 200);
    }
    // Spans, tokens and models are kept; no prompt or completion text is.
    assert_eq!(server.scalar("SELECT count(*) FROM spans WHERE span_type = 'llm'"), 6);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures_dir().join("index.json")).unwrap()).unwrap();
    let sent_tokens: i64 = index
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            ["openai-openinference", "openai-openllmetry", "openai-otel-genai"]
                .contains(&f["fixture"].as_str().unwrap())
        })
        .flat_map(|f| f["llm_usage_returned_by_the_mock"].as_array().unwrap().clone())
        .map(|u| u["input_tokens"].as_i64().unwrap())
        .sum();
    assert_eq!(server.scalar("SELECT sum(input_tokens) FROM spans"), sent_tokens);
    assert_eq!(
        server.scalar("SELECT count(*) FROM spans WHERE input IS NOT NULL AND span_type = 'llm'"),
        0
    );
    assert_eq!(
        server.scalar("SELECT count(*) FROM spans WHERE output IS NOT NULL AND span_type = 'llm'"),
        0
    );
    for text in ["What's the weather in Paris?", "It is sunny and 22 degrees Celsius in Paris."] {
        let n = server.scalar(&format!(
            "SELECT count(*) FROM spans WHERE attributes LIKE '%{}%' OR events LIKE '%{}%'",
            text.replace('\'', "''"),
            text.replace('\'', "''")
        ));
        assert_eq!(n, 0, "{text}");
        assert!(files_containing(server.data_dir(), text).is_empty(), "{text}");
    }
    assert!(server.metric("spanlake_content_dropped_total") > 0.0);
}
