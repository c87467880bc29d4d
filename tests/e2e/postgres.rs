//! The Postgres wire protocol, through clients nobody here wrote: `psql` and `tokio-postgres`
//! (extended protocol, parameters, binary results), plus what Grafana's PostgreSQL datasource
//! sends (simple protocol, `-- ping`, its version and TimescaleDB probes, macro-expanded time
//! filters).

use std::io::Write as _;
use std::process::Command;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message as _;

use crate::harness::TestServer;

pub(crate) const BASE_NS: u64 = 1_795_468_500_000_000_000; // 2026-11-23T21:15:00Z

/// 40 LLM spans: user u-0..u-3 (10 each), input tokens 100 + i, model m-0/m-1 alternating.
pub(crate) fn send_spans(server: &TestServer) {
    let (status, _) = server.post_traces("application/x-protobuf", spans_body(), None);
    assert_eq!(status, 200);
}

/// The OTLP protobuf body of [`send_spans`].
pub(crate) fn spans_body() -> Vec<u8> {
    let kv = |k: &str, v: any_value::Value| KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    };
    let spans = (0..40u64)
        .map(|i| Span {
            trace_id: [7u8; 8].iter().copied().chain((i / 4).to_be_bytes()).collect(),
            span_id: (i + 1).to_be_bytes().to_vec(),
            name: "chat".into(),
            start_time_unix_nano: BASE_NS + i * 60_000_000_000,
            end_time_unix_nano: BASE_NS + i * 60_000_000_000 + 250_000_000,
            attributes: vec![
                kv("gen_ai.operation.name", any_value::Value::StringValue("chat".into())),
                kv("gen_ai.request.model", any_value::Value::StringValue(format!("m-{}", i % 2))),
                kv("gen_ai.usage.input_tokens", any_value::Value::IntValue(100 + i as i64)),
                kv("gen_ai.usage.output_tokens", any_value::Value::IntValue(1)),
                kv("user.id", any_value::Value::StringValue(format!("u-{}", i % 4))),
            ],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

/// A tokio-postgres session as `user`; its connection task runs on the caller's runtime.
async fn connect(server: &TestServer, user: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user={user} dbname=spanlake", server.pg_port),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    #[expect(clippy::disallowed_methods, reason = "the connection task ends with the runtime")]
    let _conn = tokio::spawn(conn);
    client
}

fn psql(server: &TestServer, sql: &str) -> (bool, String, String) {
    let out = Command::new("psql")
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
        .args(["-X", "-A", "-t", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql is installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn psql_answers_queries_and_describes_tables() {
    let server = TestServer::start();
    send_spans(&server);
    let sum: i64 = (0..40).map(|i| 100 + i).sum();
    assert_eq!(
        psql(&server, "SELECT count(*), sum(input_tokens) FROM spans").1,
        format!("40|{sum}")
    );
    let (ok, out, err) = psql(&server, "\\dt");
    assert!(ok, "{err}");
    assert!(out.contains("public|spans|table"), "{out}");
    let (ok, out, err) = psql(&server, "\\d spans");
    assert!(ok, "{err}");
    assert!(out.contains("trace_id|text"), "{out}");
    assert!(out.contains("start_time|timestamp with time zone"), "{out}");
    assert!(out.contains("input_tokens|bigint"), "{out}");
    // Refused statements say why and leave the server serving.
    let (ok, _, err) = psql(&server, "DROP TABLE spans");
    assert!(!ok);
    assert!(err.contains("DROP TABLE is not allowed: only read queries"), "{err}");
    let (ok, _, err) = psql(&server, "SET datafusion.execution.batch_size = 1");
    assert!(!ok);
    assert!(err.contains("engine settings cannot be changed over the network"), "{err}");
    let (ok, _, err) = psql(&server, "COPY spans TO '/tmp/x.csv'");
    assert!(!ok, "{err}");
    assert_eq!(psql(&server, "SELECT count(*) FROM spans").1, "40");
}

#[test]
fn grafana_queries_run_over_the_simple_protocol() {
    let server = TestServer::start();
    send_spans(&server);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = connect(&server, "grafana").await;
        let text = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<Vec<String>> {
            msgs.into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                        (0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_string()).collect(),
                    ),
                    _ => None,
                })
                .collect()
        };
        // Health check and config page probes.
        client.simple_query("-- ping").await.expect("ping");
        let v = text(
            client
                .simple_query("SELECT current_setting('server_version_num')::int/100 as version")
                .await
                .unwrap(),
        );
        assert_eq!(v, vec![vec!["1600".to_string()]]);
        let ext = text(
            client
                .simple_query("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
                .await
                .unwrap(),
        );
        assert!(ext.is_empty());
        // The table picker of the query editor (Grafana's postgresMetaQuery, verbatim).
        let tables = text(
            client
                .simple_query(
                    "select quote_ident(table_name) as \"table\" from information_schema.tables
    where quote_ident(table_schema) not in ('information_schema',
                             'pg_catalog',
                             '_timescaledb_cache',
                             '_timescaledb_catalog',
                             '_timescaledb_internal',
                             '_timescaledb_config',
                             'timescaledb_information',
                             'timescaledb_experimental')
      and table_type = 'BASE TABLE' and quote_ident(table_schema) IN (
      SELECT
        CASE WHEN trim(s[i]) = '\"$user\"' THEN user ELSE trim(s[i]) END
      FROM
        generate_series(
          array_lower(string_to_array(current_setting('search_path'),','),1),
          array_upper(string_to_array(current_setting('search_path'),','),1)
        ) as i,
        string_to_array(current_setting('search_path'),',') s
      )",
                )
                .await
                .unwrap(),
        );
        // (Grafana's query has no ORDER BY.)
        let mut tables = tables;
        tables.sort();
        assert_eq!(tables, vec![vec!["sessions".to_string()], vec!["spans".into()], vec!["traces".into()]]);
        // The current query editor's schema, table and column pickers
        // (postgresMetaQuery.ts: showSchemas, showTables(schema), showTables(), getSchema).
        let one_column = |rows: Vec<Vec<String>>| rows.into_iter().map(|r| r[0].clone()).collect::<Vec<_>>();
        assert_eq!(one_column(text(client.simple_query(PICKER_SCHEMAS).await.unwrap())), ["public"]);
        for q in [PICKER_TABLES_OF_SCHEMA, PICKER_TABLES] {
            assert_eq!(one_column(text(client.simple_query(q).await.unwrap())), ["sessions", "spans", "traces"]);
        }
        let columns = text(client.simple_query(PICKER_COLUMNS).await.unwrap());
        assert_eq!(columns.len(), 30, "{columns:?}");
        for (name, ty) in [
            ("trace_id", "text"),
            ("start_time", "timestamp with time zone"),
            ("duration_ms", "double precision"),
            ("input_tokens", "bigint"),
        ] {
            assert!(columns.contains(&vec![name.to_string(), ty.to_string()]), "{name}: {columns:?}");
        }
        // Session settings and several statements in one string.
        let rows = text(client.simple_query("SET TIME ZONE 'UTC'; SELECT 1").await.unwrap());
        assert_eq!(rows, vec![vec!["1".to_string()]]);
        // $__timeGroupAlias(start_time, 10m) and $__timeFilter(start_time) as Grafana expands them.
        let rows = text(
            client
                .simple_query(
                    "SELECT floor(extract(epoch from start_time)/600)*600 AS \"time\", model, sum(input_tokens) \
                     FROM spans WHERE start_time BETWEEN '2026-11-23T21:00:00Z' AND '2026-11-23T21:45:00Z' \
                     GROUP BY 1, 2 ORDER BY 1, 2",
                )
                .await
                .unwrap(),
        );
        // Spans i = 0..=30 start in the window (one a minute from 21:15); 10-minute buckets.
        let mut buckets: std::collections::BTreeMap<(i64, i64), i64> = Default::default();
        for i in 0..=30i64 {
            let t = (BASE_NS / 1_000_000_000) as i64 + 60 * i;
            *buckets.entry((t - t.rem_euclid(600), i % 2)).or_default() += 100 + i;
        }
        let expected: Vec<Vec<String>> = buckets
            .into_iter()
            .map(|((t, m), sum)| vec![t.to_string(), format!("m-{m}"), sum.to_string()])
            .collect();
        let got: Vec<Vec<String>> = rows
            .into_iter()
            .map(|r| vec![r[0].trim_end_matches(".0").to_string(), r[1].clone(), r[2].clone()])
            .collect();
        assert_eq!(got, expected);
    });
}

#[test]
fn extended_protocol_with_parameters_and_binary_results() {
    let server = TestServer::start();
    send_spans(&server);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = connect(&server, "app").await;
        let stmt = client
            .prepare("SELECT user_id, count(*) AS n, sum(input_tokens) AS t, min(start_time) AS first, avg(duration_ms) AS d FROM spans WHERE user_id = $1 GROUP BY user_id")
            .await
            .unwrap_or_else(|e| panic!("prepare: {e:?}"));
        let types: Vec<String> = stmt.columns().iter().map(|c| c.type_().name().to_string()).collect();
        assert_eq!(types, ["text", "int8", "int8", "timestamptz", "float8"]);
        for u in 0..4i64 {
            let rows = client
                .query(&stmt, &[&format!("u-{u}")])
                .await
                .unwrap_or_else(|e| panic!("query: {e:?}"));
            assert_eq!(rows.len(), 1);
            let n: i64 = rows[0].get("n");
            let t: i64 = rows[0].get("t");
            let first: std::time::SystemTime = rows[0].get("first");
            let d: f64 = rows[0].get("d");
            let ids: Vec<i64> = (0..40).filter(|i| i % 4 == u).collect();
            assert_eq!(n, 10);
            assert_eq!(t, ids.iter().map(|i| 100 + i).sum::<i64>());
            let first_ns = first.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
            assert_eq!(first_ns, BASE_NS + ids[0] as u64 * 60_000_000_000);
            assert_eq!(d, 250.0);
        }
        let err = client.query("DELETE FROM spans", &[]).await.unwrap_err();
        let msg = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
        assert!(msg.starts_with("DELETE FROM is not allowed: only read queries"), "{err:?}");
        let n: i64 = client.query_one("SELECT count(*) FROM spans", &[]).await.unwrap().get(0);
        assert_eq!(n, 40);
    });
}

#[test]
fn malformed_protocol_messages_leave_the_server_serving() {
    let server = TestServer::start();
    send_spans(&server);
    for garbage in
        [&b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..], b"GET / HTTP/1.1\r\n\r\n", &[0xff; 64]]
    {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server.pg_port)).unwrap();
        let _ = s.write_all(garbage);
        drop(s);
    }
    // A client that goes away in the middle of a query.
    let child = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &server.pg_port.to_string(), "-U", "x", "-X", "-c"])
        .arg("SELECT count(DISTINCT a.span_id || b.span_id || c.span_id || d.span_id) FROM spans a, spans b, spans c, spans d")
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(psql(&server, "SELECT count(*) FROM spans").1, "40");
}

#[test]
fn passwords_are_checked_when_users_are_configured() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("spanlake.toml");
    std::fs::write(
        &config,
        "version = 1\n[[postgres.users]]\nname = \"grafana\"\npassword = \"s3cret\"\n",
    )
    .unwrap();
    let server = crate::harness::TestServer::start_with(crate::harness::ServerOptions {
        env: vec![("SPANLAKE_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    });
    send_spans(&server);
    let run = |user: &str, password: &str| {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &server.pg_port.to_string(), "-U", user, "-d", "x"])
            .args(["-X", "-A", "-t", "-w", "-c", "SELECT count(*) FROM spans"])
            .env("PGPASSWORD", password)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_eq!(run("grafana", "s3cret").0, "40");
    let (out, err) = run("grafana", "wrong");
    assert_eq!(out, "");
    assert!(err.contains("assword authentication failed for user \"grafana\""), "{err}");
    let (out, err) = run("nobody", "s3cret");
    assert_eq!(out, "");
    assert!(err.contains("assword authentication failed for user \"nobody\""), "{err}");
    assert_eq!(run("grafana", "s3cret").0, "40", "still serving");
}

/// A query far too slow to finish (a distinct count over 40^5 rows).
const SLOW: &str = "SELECT count(DISTINCT a.span_id || b.span_id || c.span_id || d.span_id || e.span_id) FROM spans a, spans b, spans c, spans d, spans e";

/// Cancels the query `slow` runs half a second after it starts; returns its SQLSTATE and message.
async fn cancel_during(
    token: &tokio_postgres::CancelToken,
    slow: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>,
) -> (String, String) {
    let slow = tokio::time::timeout(std::time::Duration::from_secs(60), slow);
    let cancel = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    };
    let (result, sent) = tokio::join!(slow, cancel);
    sent.expect("cancel request sent");
    let err = result.expect("cancelled well before 60 s").expect_err("the query was cancelled");
    let db = err.as_db_error().expect("a server error");
    (db.code().code().to_string(), db.message().to_string())
}

#[test]
fn a_cancelled_query_stops_and_the_session_goes_on() {
    let server = TestServer::start();
    send_spans(&server);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = connect(&server, "app").await;
        let token = client.cancel_token();
        let expected = ("57014".to_string(), "canceling statement due to user request".to_string());
        assert_eq!(
            cancel_during(&token, async { client.simple_query(SLOW).await.map(|_| ()) }).await,
            expected
        );
        let rows = client.simple_query("SELECT count(*) FROM spans").await.unwrap();
        let n = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        assert_eq!(n.as_deref(), Some("40"));

        // The same over the extended protocol (parse, bind, execute).
        assert_eq!(
            cancel_during(&token, async { client.query(SLOW, &[]).await.map(|_| ()) }).await,
            expected
        );
        let n: i64 = client.query_one("SELECT count(*) FROM spans", &[]).await.unwrap().get(0);
        assert_eq!(n, 40);
    });
}

#[test]
fn the_query_time_limit_applies() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("spanlake.toml");
    std::fs::write(&config, "version = 1\n[query]\ntimeout = \"1s\"\n").unwrap();
    let server = crate::harness::TestServer::start_with(crate::harness::ServerOptions {
        env: vec![("SPANLAKE_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    });
    send_spans(&server);
    let (ok, _, err) = psql(&server, SLOW);
    assert!(!ok);
    assert!(err.contains("canceling statement due to statement timeout"), "{err}");
    assert_eq!(psql(&server, "SELECT count(*) FROM spans").1, "40");
    // The extended protocol has the same limit.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = connect(&server, "app").await;
        let err = client.query(SLOW, &[]).await.expect_err("over the time limit");
        let db = err.as_db_error().expect("a server error");
        assert_eq!(
            (db.code().code(), db.message()),
            ("57014", "canceling statement due to statement timeout")
        );
        let n: i64 = client.query_one("SELECT count(*) FROM spans", &[]).await.unwrap().get(0);
        assert_eq!(n, 40);
    });
}

/// A hash join whose build side (200,000 rows) needs more than 1 MiB: hash joins cannot spill.
const BIG_JOIN: &str = "SELECT count(*) FROM (SELECT value AS v FROM generate_series(1, 200000)) a \
     JOIN (SELECT value AS v FROM generate_series(1, 200000)) b ON a.v = b.v";

#[test]
fn the_query_memory_limits_apply_per_query_and_sessions_keep_their_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("spanlake.toml");
    std::fs::write(&config, "version = 1\n[query]\nmemory_per_query = \"1MiB\"\n").unwrap();
    let server = crate::harness::TestServer::start_with(crate::harness::ServerOptions {
        env: vec![("SPANLAKE_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    });
    // Over HTTP: refused with the operator, the amounts and the setting named (400: retrying
    // cannot help); a small join and a sort bigger than the cap (it spills) answer exactly.
    let (status, body) = server.sql_status(BIG_JOIN);
    assert_eq!(status, 400, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.starts_with("Resources exhausted: query memory limit reached: HashJoinInput")
            && message.contains("of its 1.0 MiB (query.memory_per_query; largest: HashJoinInput"),
        "{message}"
    );
    assert_eq!(server.scalar(&BIG_JOIN.replace("200000", "1000")), 1000);
    assert_eq!(
        server.scalar(
            "SELECT max(r) FROM (SELECT row_number() OVER (ORDER BY value DESC) AS r \
             FROM generate_series(1, 300000))"
        ),
        300_000
    );
    // Over Postgres: SQLSTATE 53200 (out_of_memory) on both protocols, and the session goes on.
    let (ok, _, err) = psql(&server, BIG_JOIN);
    assert!(!ok && err.contains("query memory limit reached: HashJoinInput"), "{err}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = connect(&server, "app").await;
        let err = client.query(BIG_JOIN, &[]).await.expect_err("over the cap");
        let db = err.as_db_error().expect("a server error");
        assert_eq!(db.code().code(), "53200", "{db:?}");
        assert!(db.message().contains("(query.memory_per_query; largest: "), "{db:?}");
        let n: i64 = client
            .query_one("SELECT count(*) FROM generate_series(1, 7)", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 7);

        // Each session has its own settings: one client's time zone is not another's.
        let other = connect(&server, "other").await;
        client.simple_query("SET TIME ZONE 'Asia/Tokyo'").await.unwrap();
        assert_eq!(time_zone(&client).await, "Asia/Tokyo");
        assert_eq!(time_zone(&other).await, "UTC");
    });
    // Nothing is held once the queries are over.
    assert_eq!(server.metric("spanlake_query_memory_bytes"), 0.0);
    assert_eq!(server.metric("spanlake_query_memory_limit_bytes"), 512.0 * 1024.0 * 1024.0);
}

async fn time_zone(client: &tokio_postgres::Client) -> String {
    let messages = client.simple_query("SHOW TIME ZONE").await.unwrap();
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

const PICKER_SCHEMAS: &str = r#"SELECT schema_name AS "name"
    FROM information_schema.schemata
    WHERE schema_name NOT IN ('information_schema',
                              'pg_catalog',
                              'pg_toast',
                              '_timescaledb_cache',
                              '_timescaledb_catalog',
                              '_timescaledb_internal',
                              '_timescaledb_config',
                              'timescaledb_information',
                              'timescaledb_experimental')
    ORDER BY schema_name"#;

const PICKER_TABLES_OF_SCHEMA: &str = r#"SELECT quote_ident(table_name) AS "table"
      FROM information_schema.tables
      WHERE quote_ident(table_schema) = 'public'
      ORDER BY 1"#;

const PICKER_TABLES: &str = r#"SELECT
    CASE WHEN 
          quote_ident(table_schema) IN (
          SELECT
            CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
          FROM
            generate_series(
              array_lower(string_to_array(current_setting('search_path'),','),1),
              array_upper(string_to_array(current_setting('search_path'),','),1)
            ) as i,
            string_to_array(current_setting('search_path'),',') s
          )
      THEN quote_ident(table_name)
      ELSE quote_ident(table_schema) || '.' || quote_ident(table_name)
    END AS "table"
    FROM information_schema.tables
    WHERE quote_ident(table_schema) NOT IN ('information_schema',
                             'pg_catalog',
                             '_timescaledb_cache',
                             '_timescaledb_catalog',
                             '_timescaledb_internal',
                             '_timescaledb_config',
                             'timescaledb_information',
                             'timescaledb_experimental')
    ORDER BY CASE WHEN 
          quote_ident(table_schema) IN (
          SELECT
            CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
          FROM
            generate_series(
              array_lower(string_to_array(current_setting('search_path'),','),1),
              array_upper(string_to_array(current_setting('search_path'),','),1)
            ) as i,
            string_to_array(current_setting('search_path'),',') s
          ) THEN 0 ELSE 1 END, 1"#;

const PICKER_COLUMNS: &str = r#"SELECT quote_ident(column_name) AS "column", data_type AS "type"
    FROM information_schema.columns
    WHERE
      CASE WHEN array_length(parse_ident('spans'),1) = 2
        THEN quote_ident(table_schema) = (parse_ident('spans'))[1]
          AND quote_ident(table_name) = (parse_ident('spans'))[2]
        ELSE quote_ident(table_name) = 'spans'
          AND 
          quote_ident(table_schema) IN (
          SELECT
            CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
          FROM
            generate_series(
              array_lower(string_to_array(current_setting('search_path'),','),1),
              array_upper(string_to_array(current_setting('search_path'),','),1)
            ) as i,
            string_to_array(current_setting('search_path'),',') s
          )
      END"#;
