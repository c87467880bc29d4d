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

fn spans_of(trace_byte: u8, service: &str, n: u8, text: &str) -> Vec<u8> {
    let spans = (0..n)
        .map(|i| Span {
            trace_id: vec![trace_byte; 16],
            span_id: vec![i + 1; 8],
            parent_span_id: if i == 0 { vec![] } else { vec![1; 8] },
            name: format!("step {i}"),
            start_time_unix_nano: 1_795_467_600_000_000_000 + u64::from(i) * 1_000_000,
            end_time_unix_nano: 1_795_467_600_500_000_000 + u64::from(i) * 1_000_000,
            attributes: vec![
                kv("gen_ai.operation.name", "chat"),
                kv("gen_ai.request.model", "m"),
                kv("note", text),
            ],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(opentelemetry_proto::tonic::resource::v1::Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> (u16, serde_json::Value) {
    let client = reqwest::blocking::Client::new();
    let mut req = client.request(method.parse().unwrap(), server.url(path));
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    if let Some((ct, b)) = body {
        req = req.header("content-type", ct).body(b);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

fn sql_as(server: &TestServer, key: &str, sql: &str) -> (u16, serde_json::Value) {
    call(
        server,
        "POST",
        "/v1/sql",
        Some(key),
        Some(("application/json", serde_json::json!({"sql": sql}).to_string().into_bytes())),
    )
}

#[test]
fn api_keys_roles_and_projects_on_every_interface() {
    let server = TestServer::start();
    let create = |role: &str, project: &str| {
        server.cli(&["keys", "create", "--role", role, "--project", project]).trim().to_string()
    };
    let ingest_a = create("ingest", "a");
    let ingest_b = create("ingest", "b");
    let read_a = create("read", "a");
    let admin = create("admin", "default");
    let listed = server.cli(&["keys", "list"]);
    assert_eq!(listed.lines().count(), 4, "{listed}");
    assert!(!listed.contains(&ingest_a), "secrets are never listed");
    // One object per key in the location (here the data directory), holding its hash only.
    let stored: Vec<String> = std::fs::read_dir(server.data_dir().join("_keys"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(stored.len(), 4);
    for secret in [&ingest_a, &ingest_b, &read_a, &admin] {
        assert!(stored.iter().all(|k| !k.contains(secret.as_str())), "only hashes are stored");
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(secret.as_bytes()));
        assert_eq!(stored.iter().filter(|k| k.contains(&digest)).count(), 1);
    }
    // The running server picks the keys up within `security.keys_refresh`.
    server.wait_for("the keys to be in force", || {
        call(&server, "GET", "/api/services", None, None).0 == 401
    });

    let pb = "application/x-protobuf";
    // No key, a wrong key, a key of the wrong role.
    let (status, body) = call(
        &server,
        "POST",
        "/v1/traces",
        None,
        Some((pb, spans_of(0xa1, "svc-a", 3, "alpha-only"))),
    );
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (401, "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
    );
    let (status, body) = call(
        &server,
        "POST",
        "/v1/traces",
        Some("slk_00000000_0000"),
        Some((pb, spans_of(0xa1, "svc-a", 3, "alpha-only"))),
    );
    assert_eq!((status, body["error"].as_str().unwrap()), (401, "invalid or revoked API key"));
    let (status, body) = call(
        &server,
        "POST",
        "/v1/traces",
        Some(&read_a),
        Some((pb, spans_of(0xa1, "svc-a", 3, "alpha-only"))),
    );
    assert_eq!(status, 403);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .ends_with("has role read: sending spans needs an ingest or admin key"),
        "{body}"
    );
    let (status, body) = sql_as(&server, &ingest_a, "SELECT 1");
    assert_eq!(status, 403);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .ends_with("has role ingest: queries need a read or admin key"),
        "{body}"
    );
    let (status, body) = call(
        &server,
        "POST",
        "/v1/admin/delete",
        Some(&read_a),
        Some(("application/json", br#"{"where": "true"}"#.to_vec())),
    );
    assert_eq!(status, 403);
    assert!(
        body["error"].as_str().unwrap().ends_with("this operation needs an admin key"),
        "{body}"
    );
    assert_eq!(call(&server, "GET", "/health", None, None).0, 200);
    // Metrics count every project's spans: admin keys only.
    assert_eq!(call(&server, "GET", "/metrics", Some(&read_a), None).0, 403);
    assert_eq!(call(&server, "GET", "/metrics", Some(&admin), None).0, 200);
    assert_eq!(server.sql_status("SELECT 1").0, 401);

    // Project a over HTTP, project b over gRPC (x-api-key metadata).
    assert_eq!(
        call(
            &server,
            "POST",
            "/v1/traces",
            Some(&ingest_a),
            Some((pb, spans_of(0xa1, "svc-a", 3, "alpha-only")))
        )
        .0,
        200
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        let mut client = TraceServiceClient::connect(server.grpc_endpoint()).await.unwrap();
        let req = || ExportTraceServiceRequest::decode(spans_of(0xb2, "svc-b", 2, "beta-only").as_slice()).unwrap();
        let e = client.export(req()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
        let mut r = tonic::Request::new(req());
        r.metadata_mut().insert("x-api-key", read_a.parse().unwrap());
        assert_eq!(client.export(r).await.unwrap_err().code(), tonic::Code::PermissionDenied);
        let mut r = tonic::Request::new(req());
        r.metadata_mut().insert("x-api-key", ingest_b.parse().unwrap());
        client.export(r).await.expect("ingest key of project b");
    });
    let tb = "b2".repeat(16);
    let ta = "a1".repeat(16);
    assert_eq!(sql_as(&server, &admin, "SELECT count(*) FROM spans").1["rows"][0][0], 5);
    assert_eq!(
        sql_as(&server, &admin, "SELECT service_name, count(*) FROM spans GROUP BY 1 ORDER BY 1").1
            ["rows"],
        serde_json::json!([["svc-a", 3], ["svc-b", 2]])
    );
    // A reader of project a sees a only, whatever the SQL.
    for (sql, expected) in [
        ("SELECT count(*) FROM spans", serde_json::json!([[3]])),
        (
            &format!("SELECT count(*) FROM spans WHERE trace_id = '{tb}'") as &str,
            serde_json::json!([[0]]),
        ),
        ("SELECT count(*) FROM traces", serde_json::json!([[1]])),
        (
            "SELECT count(*) FROM (SELECT trace_id FROM spans UNION ALL SELECT trace_id FROM spans)",
            serde_json::json!([[6]]),
        ),
        (
            "SELECT count(*) FROM spans s JOIN traces t ON s.trace_id = t.trace_id",
            serde_json::json!([[3]]),
        ),
        (
            "SELECT count(*) FROM spans WHERE trace_id IN (SELECT trace_id FROM spans WHERE service_name = 'svc-b')",
            serde_json::json!([[0]]),
        ),
        (
            "SELECT count(*) FROM spans WHERE attributes LIKE '%beta-only%'",
            serde_json::json!([[0]]),
        ),
        ("SELECT DISTINCT service_name FROM spans", serde_json::json!([["svc-a"]])),
        (
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
            serde_json::json!([["sessions"], ["spans"], ["traces"]]),
        ),
    ] {
        let (status, body) = sql_as(&server, &read_a, sql);
        assert_eq!(status, 200, "{sql}: {body}");
        assert_eq!(body["rows"], expected, "{sql}");
    }
    for (sql, refusal) in [
        ("SELECT * FROM read_parquet('spans/project=b')", "read_parquet"),
        ("SELECT * FROM 'spans/project=b'", "not found"),
        (
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION 'spans/project=b'",
            "CREATE EXTERNAL TABLE is not allowed",
        ),
        ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY is not allowed"),
        ("SET datafusion.execution.batch_size = 1", "SET is not allowed"),
    ] {
        let (status, body) = sql_as(&server, &read_a, sql);
        assert_eq!(status, 400, "{sql}: {body}");
        assert!(body["error"].as_str().unwrap().contains(refusal), "{sql}: {body}");
    }
    let r = call(&server, "GET", &format!("/v1/traces/{tb}"), Some(&read_a), None);
    assert_eq!(r.0, 404, "{r:?}");
    assert_eq!(
        call(&server, "GET", &format!("/v1/traces/{ta}"), Some(&read_a), None).1["span_count"],
        3
    );
    assert_eq!(
        call(&server, "GET", &format!("/v1/traces/{tb}/replay"), Some(&read_a), None).0,
        404
    );
    assert_eq!(call(&server, "GET", &format!("/api/v2/traces/{tb}"), Some(&read_a), None).0, 404);
    assert_eq!(
        call(&server, "GET", "/api/services", Some(&read_a), None).1["data"],
        serde_json::json!(["svc-a"])
    );
    let (_, found) = call(
        &server,
        "GET",
        "/api/traces?service=svc-b&start=0&end=2000000000000000",
        Some(&read_a),
        None,
    );
    assert_eq!(found["data"], serde_json::json!([]));
    assert_eq!(call(&server, "GET", &format!("/api/traces/{tb}"), Some(&read_a), None).0, 404);
    assert_eq!(call(&server, "GET", &format!("/api/traces/{tb}"), Some(&admin), None).0, 200);

    // Flight SQL: no key, the wrong role, a reader of one project, an admin.
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!(
            "http://127.0.0.1:{}",
            server.flight_port
        ))
        .unwrap()
        .connect()
        .await
        .unwrap();
        let mut c = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
        let e = c.execute("SELECT count(*) FROM spans".into(), None).await.unwrap_err().to_string();
        assert!(e.contains("missing API key"), "{e}");
        c.set_token(ingest_a.clone());
        let e = c.execute("SELECT count(*) FROM spans".into(), None).await.unwrap_err().to_string();
        assert!(e.contains("has role ingest: queries need a read or admin key"), "{e}");
        // A read key sees its project only, in statements, prepared statements and metadata.
        let count = |c: &mut arrow_flight::sql::client::FlightSqlServiceClient<
            tonic::transport::Channel,
        >,
                     sql: &'static str| {
            let mut c = c.clone();
            async move {
                let info = c.execute(sql.into(), None).await.unwrap();
                let ticket = info.endpoint[0].ticket.clone().unwrap();
                let batches: Vec<arrow::array::RecordBatch> =
                    futures::TryStreamExt::try_collect(c.do_get(ticket).await.unwrap())
                        .await
                        .unwrap();
                arrow::util::display::array_value_to_string(batches[0].column(0), 0).unwrap()
            }
        };
        c.set_token(read_a.clone());
        assert_eq!(count(&mut c, "SELECT count(*) FROM spans").await, "3");
        assert_eq!(
            count(&mut c, "SELECT count(*) FROM spans WHERE service_name = 'svc-b'").await,
            "0"
        );
        assert_eq!(count(&mut c, "SELECT count(*) FROM traces").await, "1");
        let mut prepared = c
            .prepare("SELECT count(*) FROM spans WHERE service_name <> $1".into(), None)
            .await
            .unwrap();
        prepared
            .set_parameters(
                arrow::array::RecordBatch::try_new(
                    std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
                        arrow::datatypes::Field::new("$1", arrow::datatypes::DataType::Utf8, true),
                    ])),
                    vec![std::sync::Arc::new(arrow::array::StringArray::from(vec!["none"]))],
                )
                .unwrap(),
            )
            .unwrap();
        let info = prepared.execute().await.unwrap();
        let batches: Vec<arrow::array::RecordBatch> = futures::TryStreamExt::try_collect(
            c.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(
            arrow::util::display::array_value_to_string(batches[0].column(0), 0).unwrap(),
            "3"
        );
        c.set_token(admin.clone());
        assert_eq!(count(&mut c, "SELECT count(*) FROM spans").await, "5");
    });

    // Postgres: an admin key as the password (it serves every project); nothing else.
    let psql = |password: &str| {
        let out = std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &server.pg_port.to_string(),
                "-U",
                "grafana",
                "-d",
                "spanlake",
            ])
            .args(["-X", "-A", "-t", "-w", "-c", "SELECT count(*) FROM spans"])
            .env("PGPASSWORD", password)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_eq!(psql(&admin).0, "5");
    // A read key's session sees its project only (simple query protocol, as psql and Grafana).
    assert_eq!(psql(&read_a).0, "3");
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=grafana password={read_a} dbname=spanlake",
                server.pg_port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        #[expect(clippy::disallowed_methods, reason = "the connection task ends with the runtime")]
        let _conn = tokio::spawn(conn);
        let rows = client
            .simple_query("SELECT count(*) FROM spans WHERE service_name = 'svc-b'")
            .await
            .unwrap();
        let n = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        assert_eq!(n.as_deref(), Some("0"));
        // The extended protocol (prepared statements, bound parameters) is planned and run on
        // the project's engine too: B's rows are invisible whatever the parameters say.
        let count_of = client
            .prepare("SELECT count(*) FROM spans WHERE service_name = $1 OR $2")
            .await
            .unwrap();
        for (service, all, expected) in [("svc-a", false, 3), ("svc-b", false, 0), ("x", true, 3)] {
            let row = client.query_one(&count_of, &[&service, &all]).await.unwrap();
            assert_eq!(row.get::<_, i64>(0), expected, "{service} {all}");
        }
        let row = client
            .query_one(
                "SELECT count(*) FROM spans s JOIN traces t ON s.trace_id = t.trace_id \
                 WHERE s.service_name <> $1",
                &[&"svc-a"],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 0);
        let tables: Vec<String> = client
            .query(
                "SELECT DISTINCT table_name FROM information_schema.tables \
                 WHERE table_schema = $1 ORDER BY 1",
                &[&"public"],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(tables, ["sessions", "spans", "traces"]);
        let e = client
            .query("SELECT count(*) FROM read_parquet($1)", &[&"spans/project=b"])
            .await
            .unwrap_err();
        assert!(e.as_db_error().unwrap().message().contains("read_parquet"), "{e:?}");
    });
    for wrong in [ingest_a.as_str(), "", "slk_00000000_00"] {
        let (out, err) = psql(wrong);
        assert!(
            out.is_empty()
                && (err.contains("Password authentication failed for user \"grafana\"")
                    || err.contains("no password supplied")),
            "{wrong}: {out} {err}"
        );
    }

    // Revoked keys are refused once the server has re-read the keys.
    let id = read_a.split('_').nth(1).unwrap();
    server.cli(&["keys", "revoke", id]);
    server.wait_for("the revocation", || sql_as(&server, &read_a, "SELECT 1").0 == 401);
    assert!(
        server.cli(&["keys", "list"]).lines().any(|l| l.starts_with(id) && l.ends_with("revoked"))
    );
}

/// Nodes sharing a location share the keys: created through one node's CLI, revoked through
/// another's, in force on both.
#[test]
fn nodes_on_one_location_share_the_keys() {
    let s3 = crate::harness::S3Server::start("spanlake-keys");
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("spanlake.toml");
    std::fs::write(&config, "version = 1\n[security]\nkeys_refresh = \"200ms\"\n").unwrap();
    let mut env = s3.env();
    env.push(("SPANLAKE_CONFIG".into(), config.display().to_string()));
    env.push(("SPANLAKE_LOCATION".into(), "s3://spanlake-keys/lake".into()));
    let node = |name: &str| {
        TestServer::start_with(ServerOptions {
            env: env.clone(),
            data_dir: Some(tmp.path().join(name)),
            ..Default::default()
        })
    };
    let (a, b) = (node("a"), node("b"));
    assert_eq!(sql_as(&b, "", "SELECT 1").0, 200, "no key yet: open on localhost");
    let admin = a.cli(&["keys", "create", "--role", "admin", "--project", "default"]);
    let admin = admin.trim();
    assert_eq!(s3.list("lake/_keys/").len(), 1);
    for n in [&a, &b] {
        n.wait_for("the key", || sql_as(n, "", "SELECT 1").0 == 401);
        assert_eq!(sql_as(n, admin, "SELECT 1").0, 200);
    }
    assert!(b.cli(&["keys", "list"]).contains("\tadmin\tdefault\t"));
    let id = admin.split('_').nth(1).unwrap();
    b.cli(&["keys", "revoke", id]);
    for n in [&a, &b] {
        n.wait_for("the revocation", || sql_as(n, admin, "SELECT 1").0 == 401);
    }
    // Revoking the last key does not open the nodes: authentication stays on.
    for n in [&a, &b] {
        assert_eq!(sql_as(n, "", "SELECT 1").0, 401);
    }
    assert_eq!(
        b.cli_status(&["keys", "revoke", "00000000"]).2.lines().next(),
        Some("Error: no key with id 00000000")
    );
}

#[test]
fn without_keys_only_localhost_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(crate::harness::binary())
        .arg("--data-dir")
        .arg(tmp.path())
        .args([
            "serve",
            "--http-listen",
            "0.0.0.0:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--pg-listen",
            "127.0.0.1:0",
            "--flight-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no API key exists and HTTP 0.0.0.0:0 would be reachable beyond localhost without authentication"),
        "{err}"
    );

    // The explicit flag lets it start, and the log says what that means.
    let port = crate::harness::free_port();
    let log = tmp.path().join("serve.log");
    let mut child = std::process::Command::new(crate::harness::binary())
        .arg("--data-dir")
        .arg(tmp.path())
        .args(["serve", "--allow-unauthenticated-network", "--http-listen"])
        .arg(format!("0.0.0.0:{port}"))
        .args(["--grpc-listen", "127.0.0.1:0", "--pg-listen", "127.0.0.1:0"])
        .args(["--flight-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let healthy = loop {
        let up = reqwest::blocking::get(format!("http://127.0.0.1:{port}/health"))
            .is_ok_and(|r| r.status().is_success());
        if up || std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break up;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(healthy, "{text}");
    assert!(
        text.contains("listening beyond localhost WITHOUT authentication (security.allow_unauthenticated_network)"),
        "{text}"
    );
}
