//! Arrow Flight SQL, through clients nobody here wrote: arrow-flight's `FlightSqlServiceClient`
//! (statements, prepared statements with parameters, metadata, the request Grafana's InfluxDB
//! datasource sends in SQL mode) and the ADBC Flight SQL driver from Python.

use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use arrow_flight::FlightInfo;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{CommandGetDbSchemas, CommandGetTables, SqlInfo};
use futures::TryStreamExt as _;
use tonic::transport::Channel;

use crate::harness::{TestServer, run_python};
use crate::postgres::send_spans;

async fn client(server: &TestServer) -> FlightSqlServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", server.flight_port))
        .unwrap()
        .connect()
        .await
        .expect("connect to Flight SQL");
    FlightSqlServiceClient::new(channel)
}

async fn fetch(client: &mut FlightSqlServiceClient<Channel>, info: FlightInfo) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.expect("ticket");
        let stream = client.do_get(ticket).await.expect("do_get");
        out.extend(stream.try_collect::<Vec<_>>().await.expect("batches"));
    }
    out
}

fn strings(batches: &[RecordBatch], col: &str) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| {
            let c =
                arrow::compute::cast(b.column_by_name(col).expect(col), &DataType::Utf8).unwrap();
            let c = c.as_string::<i32>().clone();
            (0..c.len()).map(move |i| c.value(i).to_string()).collect::<Vec<_>>()
        })
        .collect()
}

fn ints(batches: &[RecordBatch], col: &str) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            let c =
                arrow::compute::cast(b.column_by_name(col).expect(col), &DataType::Int64).unwrap();
            c.as_primitive::<Int64Type>().values().to_vec()
        })
        .collect()
}

/// Sum of input tokens of model `m-{parity}` in the 40 spans of `send_spans`.
fn tokens_of(parity: i64) -> i64 {
    (0..40i64).filter(|i| i % 2 == parity).map(|i| 100 + i).sum()
}

#[test]
fn flight_sql_statements_prepared_statements_and_metadata() {
    let server = TestServer::start();
    send_spans(&server);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = client(&server).await;

        // A statement: schema in the FlightInfo, rows through DoGet.
        let info = c
            .execute(
                "SELECT model, sum(input_tokens) AS tokens, count(*) AS calls FROM spans GROUP BY model ORDER BY model"
                    .into(),
                None,
            )
            .await
            .expect("execute");
        let schema = info.clone().try_decode_schema().unwrap();
        assert_eq!(
            schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>(),
            ["model", "tokens", "calls"]
        );
        assert_eq!(schema.field(1).data_type(), &DataType::Int64);
        let batches = fetch(&mut c, info).await;
        assert_eq!(strings(&batches, "model"), ["m-0", "m-1"]);
        assert_eq!(ints(&batches, "tokens"), [tokens_of(0), tokens_of(1)]);
        assert_eq!(ints(&batches, "calls"), [20, 20]);

        // A prepared statement with two parameters, bound twice.
        let mut prepared = c
            .prepare(
                "SELECT count(*) AS n, sum(input_tokens) AS tokens FROM spans WHERE model = $1 AND input_tokens >= $2"
                    .into(),
                None,
            )
            .await
            .expect("prepare");
        let params = prepared.parameter_schema().unwrap().clone();
        assert_eq!(params.fields().len(), 2, "{params:?}");
        assert_eq!(params.field(0).name(), "$1");
        assert_eq!(params.field(0).data_type(), &DataType::Utf8);
        assert_eq!(params.field(1).data_type(), &DataType::Int64);
        for (model, min) in [("m-1", 120i64), ("m-0", 0)] {
            let batch = RecordBatch::try_new(
                Arc::new(Schema::new(vec![
                    Field::new("$1", DataType::Utf8, true),
                    Field::new("$2", DataType::Int64, true),
                ])),
                vec![Arc::new(StringArray::from(vec![model])), Arc::new(Int64Array::from(vec![min]))],
            )
            .unwrap();
            prepared.set_parameters(batch).unwrap();
            let info = prepared.execute().await.expect("execute prepared");
            let batches = fetch(&mut c, info).await;
            let parity = if model == "m-1" { 1 } else { 0 };
            let matching: Vec<i64> =
                (0..40i64).filter(|i| i % 2 == parity && 100 + i >= min).map(|i| 100 + i).collect();
            assert_eq!(ints(&batches, "n"), [matching.len() as i64], "{model} >= {min}");
            assert_eq!(ints(&batches, "tokens"), [matching.iter().sum::<i64>()]);
        }
        prepared.close().await.expect("close");

        // What Grafana's InfluxDB datasource sends in SQL mode: a bearer token and a database
        // in the metadata, `date_bin` and `cast('<RFC3339>' as timestamp)` from its macros.
        let mut g = client(&server).await;
        g.set_token("grafana-token".into());
        g.set_header("database", "spanlake");
        let info = g
            .execute(
                "SELECT date_bin(interval '10 minutes', start_time, timestamp '1970-01-01T00:00:00Z') AS time, \
                 sum(input_tokens) AS tokens FROM spans \
                 WHERE start_time >= cast('2026-11-23T21:00:00Z' as timestamp) \
                 AND start_time <= cast('2026-11-23T21:45:00Z' as timestamp) GROUP BY 1 ORDER BY 1"
                    .into(),
                None,
            )
            .await
            .expect("grafana query");
        let batches = fetch(&mut g, info).await;
        // Spans start once a minute from 21:15:00; 21:15..21:45 inclusive is i = 0..=30.
        let mut expected = std::collections::BTreeMap::<u64, i64>::new();
        for i in 0..=30u64 {
            let t = crate::postgres::BASE_NS / 1_000_000_000 + 60 * i;
            *expected.entry(t - t % 600).or_default() += 100 + i as i64;
        }
        assert_eq!(ints(&batches, "tokens"), expected.values().copied().collect::<Vec<_>>());
        assert!(matches!(batches[0].schema().field(0).data_type(), DataType::Timestamp(..)));

        // Metadata.
        let info = c.get_catalogs().await.unwrap();
        assert_eq!(strings(&fetch(&mut c, info).await, "catalog_name"), ["datafusion"]);
        let info = c
            .get_db_schemas(CommandGetDbSchemas { catalog: None, db_schema_filter_pattern: Some("pub%".into()) })
            .await
            .unwrap();
        assert_eq!(strings(&fetch(&mut c, info).await, "db_schema_name"), ["public"]);
        let info = c
            .get_tables(CommandGetTables {
                catalog: None,
                db_schema_filter_pattern: Some("public".into()),
                table_name_filter_pattern: None,
                table_types: vec![],
                include_schema: true,
            })
            .await
            .unwrap();
        let tables = fetch(&mut c, info).await;
        assert_eq!(strings(&tables, "table_name"), ["sessions", "spans", "traces"]);
        assert_eq!(strings(&tables, "table_type"), ["VIEW", "TABLE", "VIEW"]);
        let encoded = tables[0].column_by_name("table_schema").unwrap().as_binary::<i32>().value(1).to_vec();
        let spans_schema = arrow::ipc::convert::try_schema_from_ipc_buffer(&encoded).unwrap();
        assert!(spans_schema.field_with_name("trace_id").is_ok());
        assert!(spans_schema.field_with_name("input_tokens").is_ok());
        let info = c.get_table_types().await.unwrap();
        assert_eq!(strings(&fetch(&mut c, info).await, "table_type"), ["TABLE", "VIEW"]);
        let info = c.get_sql_info(vec![SqlInfo::FlightSqlServerName, SqlInfo::FlightSqlServerReadOnly]).await.unwrap();
        let info_batches = fetch(&mut c, info).await;
        assert_eq!(ints(&info_batches, "info_name"), [SqlInfo::FlightSqlServerName as i64, SqlInfo::FlightSqlServerReadOnly as i64]);

        // Refusals and errors name the problem; the server keeps serving.
        let e = c.execute("DROP TABLE spans".into(), None).await.unwrap_err().to_string();
        assert!(e.contains("PermissionDenied") || e.contains("permission"), "{e}");
        assert!(e.contains("DROP TABLE is not allowed: only read queries"), "{e}");
        let e = c.execute("SELECT nope FROM spans".into(), None).await.unwrap_err().to_string();
        assert!(e.contains("InvalidArgument") || e.contains("invalid"), "{e}");
        assert!(e.contains("nope"), "{e}");
        let e = c.execute("SELECT * FROM read_parquet('/etc/passwd')".into(), None).await.unwrap_err().to_string();
        assert!(e.contains("read_parquet"), "{e}");
        let info = c.execute("SELECT count(*) AS n FROM spans".into(), None).await.unwrap();
        assert_eq!(ints(&fetch(&mut c, info).await, "n"), [40]);
    });
}

#[test]
fn adbc_flight_sql_driver_reads_spans() {
    let server = TestServer::start();
    send_spans(&server);
    let uri = format!("grpc://127.0.0.1:{}", server.flight_port);
    let out = run_python(
        r#"
import sys, json
import adbc_driver_flightsql.dbapi as flight_sql
conn = flight_sql.connect(sys.argv[1])
cur = conn.cursor()
cur.execute("SELECT model, sum(input_tokens) AS tokens FROM spans GROUP BY model ORDER BY model")
rows = cur.fetchall()
cur.execute("SELECT count(*) AS n FROM spans WHERE user_id = $1", parameters=("u-3",))
n = cur.fetchall()
cur.execute("SELECT trace_id, input_tokens FROM spans ORDER BY input_tokens LIMIT 3")
table = cur.fetch_arrow_table()
objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
tables = sorted(t["table_name"] for c in objects for s in c["catalog_db_schemas"] or [] if s["db_schema_name"] == "public" for t in s["db_schema_tables"] or [])
print(json.dumps({"rows": [list(r) for r in rows], "n": n[0][0], "types": [str(f.type) for f in table.schema], "tokens": table.column("input_tokens").to_pylist(), "tables": tables}))
"#,
        &[&uri],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    assert_eq!(v["rows"], serde_json::json!([["m-0", tokens_of(0)], ["m-1", tokens_of(1)]]));
    assert_eq!(v["n"], 10);
    assert_eq!(v["types"], serde_json::json!(["string", "int64"]));
    assert_eq!(v["tokens"], serde_json::json!([100, 101, 102]));
    assert_eq!(v["tables"], serde_json::json!(["sessions", "spans", "traces"]));
}

/// With `listen.tls_cert` and `listen.tls_key` set, every listener speaks TLS: OTLP/HTTP and SQL
/// over HTTPS (curl), OTLP/gRPC (tonic), and psql connects to the Postgres listener over
/// TLS (`sslmode=require`) and a Flight SQL client over TLS trusting that certificate.
#[test]
fn every_listener_speaks_tls_when_a_certificate_is_configured() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = tmp.path().join("spanlake.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\ntls_cert = {:?}\ntls_key = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    let server = TestServer::start_with(crate::harness::ServerOptions {
        env: vec![("SPANLAKE_CONFIG".into(), config.display().to_string())],
        https: true,
        ..Default::default()
    });
    // OTLP/HTTP and the SQL API over HTTPS (curl trusting the certificate).
    let body = tmp.path().join("spans.pb");
    std::fs::write(&body, crate::postgres::spans_body()).unwrap();
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-S", "--cacert"])
            .arg(&cert)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let base = format!("https://localhost:{}", server.http_port);
    curl(&[
        "-f",
        "-H",
        "content-type: application/x-protobuf",
        "--data-binary",
        &format!("@{}", body.display()),
        &format!("{base}/v1/traces"),
    ]);
    let answer = curl(&[
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"sql": "SELECT count(*) AS n FROM spans"}"#,
        &format!("{base}/v1/sql"),
    ]);
    assert!(answer.contains("\"rows\":[[40]]"), "{answer}");

    let out = std::process::Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=tls dbname=spanlake sslmode=require",
            server.pg_port
        ))
        .args(["-X", "-A", "-t", "-c", "SELECT count(*) FROM spans", "-c", "\\conninfo"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("40\n"), "{stdout}");
    assert!(stdout.contains("SSL connection (protocol: TLSv1.3"), "{stdout}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(&cert).unwrap()))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://127.0.0.1:{}", server.flight_port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("TLS connection to Flight SQL");
        let mut c = FlightSqlServiceClient::new(channel);
        let info = c.execute("SELECT count(*) AS n FROM spans".into(), None).await.unwrap();
        assert_eq!(ints(&fetch(&mut c, info).await, "n"), [40]);
        // OTLP/gRPC over TLS.
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(&cert).unwrap()))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://127.0.0.1:{}", server.grpc_port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("TLS connection to OTLP/gRPC");
        let req = <opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest as prost::Message>::decode(
            crate::postgres::spans_body().as_slice(),
        )
        .unwrap();
        TraceServiceClient::new(channel).export(req).await.expect("export over TLS");
        // A plaintext client gets no answer from the TLS listener.
        let mut plain = client(&server).await;
        assert!(plain.execute("SELECT 1".into(), None).await.is_err());
    });
}
