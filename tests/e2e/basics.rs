//! Fixtures from real instrumentations, bad input, SQL errors, the CLI and DuckDB over the files.

use std::io::Write as _;

use prost::Message as _;
use serde_json::{Value, json};

use crate::harness::{TestServer, fixtures_dir, run_python};

fn fixture(name: &str, ext: &str) -> Vec<u8> {
    std::fs::read(fixtures_dir().join(format!("{name}.otlp.{ext}"))).unwrap()
}

fn index() -> Vec<Value> {
    serde_json::from_slice(&std::fs::read(fixtures_dir().join("index.json")).unwrap()).unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Every fixture, sent as protobuf, gzip protobuf or JSON, normalises to the columns the index
/// says; token sums per fixture match what the test server returned.
#[test]
fn fixtures_from_all_conventions_normalise() {
    let server = TestServer::start();
    let fixtures = index();
    for (i, f) in fixtures.iter().enumerate() {
        let name = f["fixture"].as_str().unwrap();
        let (status, _) = match i % 3 {
            0 => server.post_traces("application/x-protobuf", fixture(name, "pb"), None),
            1 => server.post_traces(
                "application/x-protobuf",
                gzip(&fixture(name, "pb")),
                Some("gzip"),
            ),
            _ => server.post_traces("application/json", fixture(name, "json"), None),
        };
        assert_eq!(status, 200, "{name}");
    }
    for f in &fixtures {
        let name = f["fixture"].as_str().unwrap();
        let service = format!("fixture-{name}");
        for span in f["spans"].as_array().unwrap() {
            let rows = server.rows(&format!(
                "SELECT name, span_type, parent_span_id FROM spans WHERE service_name = '{service}' AND span_id = '{}'",
                span["span_id"].as_str().unwrap()
            ));
            assert_eq!(
                rows,
                vec![vec![
                    span["name"].clone(),
                    span["expected_span_type"].clone(),
                    span["parent_span_id"].clone()
                ]],
                "{name}"
            );
        }
        let usage = f["llm_usage_returned_by_the_mock"].as_array().unwrap();
        let sum = |k: &str| usage.iter().map(|u| u[k].as_i64().unwrap()).sum::<i64>();
        let rows = server.rows(&format!(
            "SELECT sum(input_tokens), sum(output_tokens), sum(total_tokens), count(*) FILTER (WHERE span_type = 'llm'), \
             count(DISTINCT session_id) FROM spans WHERE service_name = '{service}'"
        ));
        assert_eq!(
            rows,
            vec![vec![
                json!(sum("input_tokens")),
                json!(sum("output_tokens")),
                json!(sum("total_tokens")),
                json!(usage.len()),
                json!(1)
            ]],
            "{name}"
        );
        assert_eq!(
            server.scalar(&format!("SELECT DISTINCT session_id FROM spans WHERE service_name = '{service}' AND session_id IS NOT NULL")),
            json!("session-fixture-1")
        );
        assert_eq!(
            server.scalar(&format!("SELECT count(*) FROM spans WHERE service_name = '{service}' AND span_type = 'tool' AND tool_name = 'get_weather'")),
            json!(f["spans"].as_array().unwrap().iter().filter(|s| s["expected_span_type"] == "tool").count())
        );
    }
    let total: usize = fixtures.iter().map(|f| f["spans"].as_array().unwrap().len()).sum();
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(total));
    assert_eq!(server.metric("spanlake_spans_accepted_total"), total as f64);
}

/// Malformed requests get a 4xx naming the problem, the server keeps serving, and valid data
/// (before and beside the bad input) is intact.
#[test]
fn bad_input_is_refused_clearly_and_valid_data_kept() {
    let server = TestServer::start();
    let good = fixture("openai-otel-genai", "pb");
    assert_eq!(server.post_traces("application/x-protobuf", good.clone(), None).0, 200);

    // Error bodies are google.rpc.Status, in the request's encoding.
    let status_body = |(status, body): (u16, Vec<u8>)| -> (u16, Value) {
        let v =
            serde_json::from_slice(&body).unwrap_or_else(|_| match spanlake_proto::Status::decode(
                &body[..],
            ) {
                Ok(st) => json!({"code": st.code, "message": st.message}),
                Err(_) => json!(String::from_utf8_lossy(&body)),
            });
        (status, v)
    };
    // Garbage protobuf.
    let (s, b) = status_body(server.post_traces(
        "application/x-protobuf",
        vec![0x0a, 0xff, 0xff, 0x01],
        None,
    ));
    assert_eq!(s, 400);
    assert_eq!(
        b["message"],
        "invalid OTLP protobuf: ExportTraceServiceRequest.resource_spans: length past the end"
    );
    // Truncated protobuf.
    let (s, b) = status_body(server.post_traces(
        "application/x-protobuf",
        good[..good.len() / 2].to_vec(),
        None,
    ));
    assert_eq!(s, 400, "{b}");
    // Malformed JSON, and JSON of the wrong shape.
    let (s, b) = status_body(server.post_traces(
        "application/json",
        b"{\"resourceSpans\": [".to_vec(),
        None,
    ));
    assert_eq!(s, 400);
    assert!(
        b["message"].as_str().unwrap().starts_with("invalid OTLP JSON at line 1 column"),
        "{b}"
    );
    let (s, b) = status_body(server.post_traces(
        "application/json",
        b"{\"resourceSpans\": 5}".to_vec(),
        None,
    ));
    assert_eq!(s, 400);
    assert!(b["message"].as_str().unwrap().contains("invalid type"), "{b}");
    // Wrong content type and encoding.
    let (s, b) = status_body(server.post_traces("text/plain", b"hello".to_vec(), None));
    assert_eq!(s, 415);
    assert_eq!(
        b["message"],
        "unsupported content type \"text/plain\"; use application/x-protobuf or application/json"
    );
    let (s, _) =
        status_body(server.post_traces("application/x-protobuf", good.clone(), Some("br")));
    assert_eq!(s, 415);
    // Truncated gzip.
    let zipped = gzip(&good);
    let (s, b) = status_body(server.post_traces(
        "application/x-protobuf",
        zipped[..zipped.len() / 2].to_vec(),
        Some("gzip"),
    ));
    assert_eq!(s, 400);
    assert!(b["message"].as_str().unwrap().starts_with("invalid gzip body"), "{b}");

    // Ids of the wrong length: that span is rejected (partial success), its neighbour kept.
    let json_req = json!({"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "bad-ids"}}]},
    "scopeSpans": [{"spans": [
        {"traceId": "0102030405060708090a0b0c0d0e0f", "spanId": "0102030405060708", "name": "short-trace",
         "startTimeUnixNano": "1795468500000000000", "endTimeUnixNano": "1795468501000000000"},
        {"traceId": "0102030405060708090a0b0c0d0e0f10", "spanId": "0102030405060709", "name": "fine",
         "startTimeUnixNano": "1795468500000000000", "endTimeUnixNano": 1795468501000000000u64, "kind": 2}
    ]}]}]});
    let (s, b) = status_body(server.post_traces(
        "application/json",
        serde_json::to_vec(&json_req).unwrap(),
        None,
    ));
    assert_eq!(s, 200);
    assert_eq!(b["partialSuccess"]["rejectedSpans"], json!(1), "{b}");
    assert_eq!(
        b["partialSuccess"]["errorMessage"],
        "rejected 1 span(s): span \"short-trace\" (0102030405060708): trace_id must be 16 bytes, got 15"
    );
    assert_eq!(
        server.rows("SELECT name, kind, duration_ms FROM spans WHERE service_name = 'bad-ids'"),
        vec![vec![json!("fine"), json!("server"), json!(1000.0)]]
    );
    // The same answer over protobuf, decoded with the OTLP types.
    let req = short_trace_id_request();
    let (s, body) = server.post_traces("application/x-protobuf", req, None);
    assert_eq!(s, 200);
    let resp =
        opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse::decode(
            &body[..],
        )
        .unwrap();
    assert_eq!(resp.partial_success.unwrap().rejected_spans, 1);

    // SQL errors: invalid and forbidden statements are 400 with the reason.
    for (sql, want) in [
        ("SELEC 1", "SQL error"),
        ("SELECT nope FROM spans", "No field named nope"),
        ("DROP TABLE spans", "DROP TABLE is not allowed: only read queries"),
        ("INSERT INTO spans (name) VALUES ('x')", "INSERT INTO is not allowed"),
        (
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/etc'",
            "CREATE EXTERNAL TABLE is not allowed",
        ),
        ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY is not allowed"),
        ("SELECT * FROM '/etc/passwd'", "table 'datafusion.public./etc/passwd' not found"),
        ("SET datafusion.execution.target_partitions = 1", "SET"),
        ("SELECT 1; SELECT 2", "exactly one SQL statement per request is accepted, got 2"),
        ("", "empty SQL statement"),
    ] {
        let (status, body) = server.sql_status(sql);
        assert_eq!(status, 400, "{sql}: {body}");
        let err = body["error"].as_str().unwrap();
        assert!(err.contains(want), "{sql}: {err:?} lacks {want:?}");
    }
    let resp = reqwest::blocking::Client::new()
        .post(server.url("/v1/sql"))
        .body("not json")
        .header("content-type", "application/json")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    // Still serving, with the valid data intact: the fixture's 4 spans and the good span.
    assert_eq!(
        server.post_traces("application/json", fixture("openai-openllmetry", "json"), None).0,
        200
    );
    assert_eq!(
        server
            .scalar("SELECT count(*) FROM spans WHERE service_name = 'fixture-openai-otel-genai'"),
        json!(4)
    );
    assert_eq!(
        server
            .scalar("SELECT count(*) FROM spans WHERE service_name = 'fixture-openai-openllmetry'"),
        json!(4)
    );
    assert_eq!(server.scalar("SELECT count(*) FROM spans WHERE name = 'fine2'"), json!(1));
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(10));
}

/// A protobuf request with one span whose trace id is too short and one valid span.
fn short_trace_id_request() -> Vec<u8> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    let span = |trace: Vec<u8>, id: u8, name: &str| Span {
        trace_id: trace,
        span_id: vec![1, 2, 3, 4, 5, 6, 7, id],
        name: name.into(),
        start_time_unix_nano: 1_795_468_500_000_000_000,
        end_time_unix_nano: 1_795_468_501_000_000_000,
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![
                    span((1..16).collect(), 8, "short-trace"),
                    span((1..=16).collect(), 10, "fine2"),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

/// Spans are visible within a second of the acknowledgement (no flush needed), and after a
/// graceful stop DuckDB reading the Parquet files directly counts the same rows.
#[test]
fn graceful_stop_flushes_and_duckdb_reads_the_files() {
    let mut server = TestServer::start();
    for f in index() {
        let name = f["fixture"].as_str().unwrap();
        assert_eq!(server.post_traces("application/json", fixture(name, "json"), None).0, 200);
    }
    let count = server.scalar("SELECT count(*) FROM spans").as_i64().unwrap();
    let tokens = server.scalar("SELECT sum(input_tokens) FROM spans").as_i64().unwrap();
    let by_type =
        server.rows("SELECT span_type, count(*) FROM spans GROUP BY span_type ORDER BY span_type");
    server.stop();

    let data = server.data_dir().join("spans");
    let out = run_python(
        "import duckdb, json, sys\n\
         p = sys.argv[1] + '/**/*.parquet'\n\
         c = duckdb.connect()\n\
         n, t = c.execute(f\"SELECT count(*), sum(input_tokens) FROM read_parquet('{p}', hive_partitioning=true)\").fetchone()\n\
         types = c.execute(f\"SELECT span_type, count(*) FROM read_parquet('{p}') GROUP BY 1 ORDER BY 1\").fetchall()\n\
         proj = c.execute(f\"SELECT DISTINCT project FROM read_parquet('{p}', hive_partitioning=true)\").fetchall()\n\
         print(json.dumps({'count': n, 'tokens': int(t), 'types': [list(r) for r in types], 'projects': [r[0] for r in proj]}))",
        &[data.to_str().unwrap()],
    );
    let duck: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(duck["count"], json!(count));
    assert_eq!(duck["tokens"], json!(tokens));
    assert_eq!(duck["types"], json!(by_type));
    assert_eq!(duck["projects"], json!(["default"]));

    // The CLI reads the same data directory.
    let out = server.cli(&["sql", "SELECT count(*) AS n FROM spans", "--format", "csv"]);
    assert_eq!(out, format!("n\n{count}\n"));
    let out = server.cli(&[
        "sql",
        "SELECT span_type, count(*) AS n FROM spans GROUP BY span_type ORDER BY span_type",
        "--format",
        "json",
    ]);
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["rows"], json!(by_type));
    let table = server.cli(&["sql", "SELECT count(*) AS n FROM spans"]);
    assert!(table.contains("| n ") && table.contains(&format!("| {count} ")), "{table}");
}

/// SQL answers in CSV and Arrow IPC as well as JSON.
#[test]
fn sql_result_formats() {
    let server = TestServer::start();
    assert_eq!(
        server.post_traces("application/x-protobuf", fixture("openai-otel-genai", "pb"), None).0,
        200
    );
    let client = reqwest::blocking::Client::new();
    let q = json!({"sql": "SELECT model, sum(input_tokens) AS input FROM spans WHERE model IS NOT NULL AND span_type = 'llm' GROUP BY model"});
    let csv =
        client.post(server.url("/v1/sql")).header("accept", "text/csv").json(&q).send().unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv");
    assert_eq!(csv.text().unwrap(), "model,input\ngpt-4o-mini,221\n");
    let arrow = client
        .post(server.url("/v1/sql"))
        .header("accept", "application/vnd.apache.arrow.stream")
        .json(&q)
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(arrow.to_vec()), None)
            .unwrap();
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    let text = arrow::util::pretty::pretty_format_batches(&batches).unwrap().to_string();
    assert!(text.contains("| gpt-4o-mini | 221   |"), "{text}");
    let doc = server.sql("SELECT start_time, duration_ms FROM spans ORDER BY start_time LIMIT 1");
    assert_eq!(
        doc["columns"],
        json!([{"name": "start_time", "type": "Timestamp(ns, \"UTC\")"}, {"name": "duration_ms", "type": "Float64"}])
    );
    assert_eq!(doc["rows"][0][0], "2026-11-23T21:57:19.535096321Z");
}

/// Acknowledged spans that were only in memory and the WAL survive `kill -9`, exactly once.
#[test]
fn acknowledged_spans_survive_kill_9() {
    let mut server = TestServer::start_with(crate::harness::ServerOptions {
        args: vec!["--flush-max-age".into(), "1h".into()],
        ..Default::default()
    });
    for f in index() {
        let name = f["fixture"].as_str().unwrap();
        assert_eq!(server.post_traces("application/x-protobuf", fixture(name, "pb"), None).0, 200);
    }
    let before = server.rows("SELECT trace_id, span_id FROM spans ORDER BY trace_id, span_id");
    assert_eq!(before.len(), 28);
    server.kill();
    server.restart();
    assert_eq!(
        server.rows("SELECT trace_id, span_id FROM spans ORDER BY trace_id, span_id"),
        before
    );
    // A graceful stop flushes them to Parquet; after another restart they are read from there once.
    server.stop();
    server.restart();
    assert_eq!(
        server.rows("SELECT trace_id, span_id FROM spans ORDER BY trace_id, span_id"),
        before
    );
    assert!(server.metric("spanlake_data_files") >= 1.0);
    assert_eq!(server.metric("spanlake_buffer_rows"), 0.0);
}

fn span_at(trace: u8, id: u8, start_ns: u64) -> opentelemetry_proto::tonic::trace::v1::Span {
    opentelemetry_proto::tonic::trace::v1::Span {
        trace_id: vec![trace; 16],
        span_id: vec![id; 8],
        name: format!("s{id}"),
        start_time_unix_nano: start_ns,
        end_time_unix_nano: start_ns + 1_000_000,
        ..Default::default()
    }
}

fn request_of(spans: Vec<opentelemetry_proto::tonic::trace::v1::Span>) -> Vec<u8> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

/// A time predicate reads only the files of the hours it covers.
#[test]
fn time_predicates_prune_partitions() {
    let mut server = TestServer::start();
    // 2026-11-23T20:30Z and 2026-11-23T22:30Z.
    let h20 = 1_795_465_800_000_000_000u64;
    let h22 = h20 + 2 * 3_600_000_000_000;
    let body = request_of(vec![span_at(1, 1, h20), span_at(1, 2, h20 + 1), span_at(2, 3, h22)]);
    assert_eq!(server.post_traces("application/x-protobuf", body, None).0, 200);
    server.stop();
    server.restart();
    let plan = |sql: &str| -> String {
        let rows = server.rows(&format!("EXPLAIN {sql}"));
        rows.iter()
            .map(|r| r[1].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let all = plan("SELECT count(*) FROM spans");
    assert!(all.contains("hour=20") && all.contains("hour=22"), "{all}");
    let q = "SELECT count(*) FROM spans WHERE start_time >= '2026-11-23T22:00:00Z' AND start_time < '2026-11-23T23:00:00Z'";
    let one = plan(q);
    assert!(one.contains("hour=22") && !one.contains("hour=20"), "{one}");
    assert_eq!(server.scalar(q), json!(1));
    let q = "SELECT count(*) FROM spans WHERE start_time BETWEEN '2026-11-23T20:00:00Z' AND '2026-11-23T21:00:00Z'";
    assert!(!plan(q).contains("hour=22"));
    assert_eq!(server.scalar(q), json!(2));
}

/// Past the memory budget, clients are told to retry (HTTP 429 with Retry-After, gRPC
/// UNAVAILABLE) and the server keeps serving.
#[test]
fn over_the_memory_budget_clients_are_told_to_retry() {
    let server = TestServer::start_with(crate::harness::ServerOptions {
        args: vec!["--memory-budget".into(), "1KiB".into()],
        ..Default::default()
    });
    let resp = reqwest::blocking::Client::new()
        .post(server.url("/v1/traces"))
        .header("content-type", "application/x-protobuf")
        .body(fixture("openai-otel-genai", "pb"))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let status = spanlake_proto::Status::decode(resp.bytes().unwrap()).unwrap();
    assert!(
        status.message.starts_with("ingest buffer full (0 of 1024 bytes in use)"),
        "{}",
        status.message
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt.block_on(async {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        let mut client = TraceServiceClient::connect(server.grpc_endpoint()).await.unwrap();
        let req = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
            &fixture("openai-otel-genai", "pb")[..],
        )
        .unwrap();
        client.export(req).await.unwrap_err()
    });
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(server.metric("spanlake_spans_refused_total"), 8.0);
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(0));
}

/// Sends raw request bytes over gRPC with tonic's own client, so that malformed messages can be
/// sent too; answers are decoded with the OTLP types.
#[derive(Debug, Clone, Copy, Default)]
struct RawExport;

impl tonic::codec::Codec for RawExport {
    type Encode = Vec<u8>;
    type Decode = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    type Encoder = RawExport;
    type Decoder = RawExport;
    fn encoder(&mut self) -> Self::Encoder {
        RawExport
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawExport
    }
}

impl tonic::codec::Encoder for RawExport {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawExport {
    type Item = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, tonic::Status> {
        Self::Item::decode(buf).map(Some).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// OTLP/gRPC requests are read from their bytes as OTLP/HTTP ones are: valid requests (plain and
/// gzip) land, a request with an invalid span gets a partial success, and a malformed message is
/// INVALID_ARGUMENT naming the field, with the valid data around it kept.
#[test]
fn grpc_requests_land_and_malformed_ones_are_refused_by_name() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    let server = TestServer::start();
    let count = |bytes: &[u8]| -> usize {
        let req = ExportTraceServiceRequest::decode(bytes).unwrap();
        req.resource_spans.iter().flat_map(|rs| &rs.scope_spans).map(|ss| ss.spans.len()).sum()
    };
    let plain = fixture("openai-otel-genai", "pb");
    let zipped = fixture("openai-openinference", "pb");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answers = rt.block_on(async {
        let channel = tonic::transport::Endpoint::new(server.grpc_endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        );
        let mut answers = Vec::new();
        for (bytes, gzip) in [
            (plain.clone(), false),
            (zipped.clone(), true),
            (short_trace_id_request(), false),
            (vec![0x0a, 0xff, 0xff, 0x01], false),
        ] {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            if gzip {
                grpc = grpc.send_compressed(tonic::codec::CompressionEncoding::Gzip);
            }
            grpc.ready().await.unwrap();
            let answer = grpc.unary(tonic::Request::new(bytes), path.clone(), RawExport).await;
            answers.push(answer.map(tonic::Response::into_inner));
        }
        answers
    });
    assert_eq!(answers[0].as_ref().unwrap().partial_success, None);
    assert_eq!(answers[1].as_ref().unwrap().partial_success, None);
    let partial = answers[2].as_ref().unwrap().partial_success.clone().unwrap();
    assert_eq!(partial.rejected_spans, 1);
    assert_eq!(
        partial.error_message,
        "rejected 1 span(s): span \"short-trace\" (0102030405060708): trace_id must be 16 bytes, got 15"
    );
    let err = answers[3].as_ref().unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "invalid OTLP protobuf: ExportTraceServiceRequest.resource_spans: length past the end"
    );
    assert_eq!(server.metric("spanlake_requests_invalid_total"), 1.0);
    let want = count(&plain) + count(&zipped) + 1;
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(want));
    assert_eq!(server.scalar("SELECT count(*) FROM spans WHERE name = 'fine2'"), json!(1));
}
