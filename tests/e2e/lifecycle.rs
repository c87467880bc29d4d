//! The life of data on local disk and on a real S3-compatible server (moto): ingest → flushes →
//! compaction (with repeats across flushes removed) → retention → trace lookup by id alone →
//! deletion by predicate → a replacement node with an empty disk sees everything; plus
//! bounded object reads for lookups, crashes at every commit step, and DuckDB agreement.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message as _;
use serde_json::Value;

use crate::harness::{S3Server, ServerOptions, TestServer, run_python};

const NS_PER_HOUR: i64 = 3_600_000_000_000;

/// One span to send.
#[derive(Debug, Clone)]
struct S {
    trace: u64,
    span: u64,
    parent: Option<u64>,
    start_ns: i64,
    user: String,
    tokens: i64,
}

fn trace_hex(trace: u64) -> String {
    // Spread the ids over the whole id space, as real random ids are.
    let a = trace.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5bd1_e995;
    let b = trace.rotate_left(17).wrapping_mul(0xc2b2_ae3d_27d4_eb4f) | 1;
    format!("{a:016x}{b:016x}")
}

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

fn encode(spans: &[S]) -> Vec<u8> {
    let spans = spans
        .iter()
        .map(|s| Span {
            trace_id: hex::decode(trace_hex(s.trace)).unwrap(),
            span_id: (s.span + 1).to_be_bytes().to_vec(),
            parent_span_id: s.parent.map(|p| (p + 1).to_be_bytes().to_vec()).unwrap_or_default(),
            name: format!("op-{}", s.span),
            start_time_unix_nano: s.start_ns as u64,
            end_time_unix_nano: (s.start_ns + 2_000_000) as u64,
            attributes: vec![
                kv("gen_ai.operation.name", any_value::Value::StringValue("chat".into())),
                kv("gen_ai.request.model", any_value::Value::StringValue("gpt-4o-mini".into())),
                kv("gen_ai.usage.input_tokens", any_value::Value::IntValue(s.tokens)),
                kv("gen_ai.usage.output_tokens", any_value::Value::IntValue(1)),
                kv("user.id", any_value::Value::StringValue(s.user.clone())),
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

fn send(server: &TestServer, spans: &[S]) {
    let (status, body) = server.post_traces("application/x-protobuf", encode(spans), None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

fn current_hour_ns() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        as i64;
    now - now.rem_euclid(NS_PER_HOUR)
}

/// Traces of `spans_per_trace` spans (a root and children) starting in hour `hour_start`.
fn traces(first: u64, n: u64, spans_per_trace: u64, hour_start: i64, user: &str) -> Vec<S> {
    let mut out = Vec::new();
    for t in first..first + n {
        for i in 0..spans_per_trace {
            out.push(S {
                trace: t,
                span: i,
                parent: (i > 0).then_some(0),
                start_ns: hour_start + (t % 1000) as i64 * 1_000_000_000 + i as i64 * 1_000_000,
                user: user.to_string(),
                tokens: (t * 10 + i) as i64,
            });
        }
    }
    out
}

/// A configuration that flushes and compacts at once and deletes replaced files after
/// `file_delete_delay` (a query planned before a compaction commit reads the files it replaced
/// for that long).
fn config_file(dir: &Path, file_delete_delay: &str, extra: &str) -> String {
    let path = dir.join("spanlake.toml");
    let text = format!(
        "version = 1\n[storage]\nflush_max_age = \"100ms\"\nfile_delete_delay = \"{file_delete_delay}\"\n\
         orphan_grace = \"1s\"\n{extra}\n[compaction]\ninterval = \"300ms\"\nmin_files = 3\nsettle_after = \"1s\"\n"
    );
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn count(server: &TestServer, sql: &str) -> i64 {
    server.scalar(sql).as_i64().unwrap_or_else(|| panic!("{sql}: not an integer"))
}

fn trace_json(server: &TestServer, id: &str) -> (u16, Value) {
    let r = reqwest::blocking::get(server.url(&format!("/v1/traces/{id}"))).unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap())
}

/// The whole life of data at one location.
fn lifecycle(location: &str, env: Vec<(String, String)>) {
    let tmp = tempfile::tempdir().unwrap();
    let config = config_file(tmp.path(), "0s", "retention = \"72h\"");
    let mut env = env;
    env.push(("SPANLAKE_CONFIG".into(), config));
    let options = ServerOptions {
        args: vec!["--location".into(), location.into()],
        env,
        data_dir: Some(tmp.path().join("node-a")),
        ..Default::default()
    };
    let mut server = TestServer::start_with(options);

    let h = current_hour_ns();
    let (h2, h3, old) = (h - 2 * NS_PER_HOUR, h - 3 * NS_PER_HOUR, h - 100 * NS_PER_HOUR);
    // Six requests, each flushed on its own (flush_max_age 100 ms): several small files in
    // each of two closed hour partitions, plus one partition past the retention period.
    let mut expected = 0i64;
    for r in 0..6u64 {
        let user = if r % 2 == 0 { "u-even" } else { "u-odd" };
        let mut batch = traces(r * 10, 10, 3, h2, user);
        batch.extend(traces(1000 + r * 10, 5, 2, h3, user));
        expected += batch.len() as i64;
        send(&server, &batch);
        std::thread::sleep(Duration::from_millis(300));
    }
    send(&server, &traces(5000, 4, 2, old, "u-old"));
    // A trace whose spans arrive minutes apart in real life: here in three requests, in two
    // partitions, after the other data was flushed.
    let straddle = 9999u64;
    let parts = [
        vec![S {
            trace: straddle,
            span: 0,
            parent: None,
            start_ns: h3 + NS_PER_HOUR - 1_000_000_000,
            user: "u-s".into(),
            tokens: 7,
        }],
        vec![S {
            trace: straddle,
            span: 1,
            parent: Some(0),
            start_ns: h2 + 5_000_000_000,
            user: "u-s".into(),
            tokens: 11,
        }],
        vec![S {
            trace: straddle,
            span: 2,
            parent: Some(1),
            start_ns: h2 + 6_000_000_000,
            user: "u-s".into(),
            tokens: 13,
        }],
    ];
    for p in &parts {
        send(&server, p);
        std::thread::sleep(Duration::from_millis(300));
    }
    expected += 3;
    // A client re-sends a request whose answer it lost, after the first copy was flushed.
    send(&server, &traces(0, 10, 3, h2, "u-even"));

    // Compaction leaves one file per remaining partition; retention removes the old one.
    server.wait_for("compaction and retention", || {
        // The buffer first: once it is empty no flush adds files, so the file count that
        // follows is after the last flush.
        server.metric("spanlake_buffer_rows") == 0.0
            && server.metric("spanlake_retention_files_total") >= 1.0
            && server.metric("spanlake_data_files") == 2.0
    });
    assert!(server.metric("spanlake_compactions_total") >= 2.0);
    assert_eq!(
        count(&server, "SELECT count(*) FROM spans"),
        expected,
        "repeats removed, old data gone"
    );
    assert_eq!(
        count(&server, "SELECT count(*) FROM (SELECT DISTINCT trace_id, span_id FROM spans)"),
        expected
    );
    assert_eq!(count(&server, "SELECT count(*) FROM spans WHERE user_id = 'u-old'"), 0);
    let tokens_h2: i64 = (0..60u64).flat_map(|t| (0..3).map(move |i| (t * 10 + i) as i64)).sum();
    assert_eq!(
        count(
            &server,
            &format!(
                "SELECT sum(input_tokens) FROM spans WHERE start_time >= to_timestamp_nanos({h2}) \
                 AND start_time < to_timestamp_nanos({}) AND user_id <> 'u-s'",
                h2 + NS_PER_HOUR
            )
        ),
        tokens_h2
    );

    // The straddling trace by id alone: whole, as a tree.
    let id = trace_hex(straddle);
    let (status, tree) = trace_json(&server, &id);
    assert_eq!(status, 200, "{tree}");
    assert_eq!(tree["span_count"], 3);
    assert_eq!(tree["input_tokens"], 31);
    let roots = tree["spans"].as_array().unwrap();
    assert_eq!(roots.len(), 1);
    assert_eq!(roots[0]["name"], "op-0");
    assert_eq!(roots[0]["children"][0]["name"], "op-1");
    assert_eq!(roots[0]["children"][0]["children"][0]["name"], "op-2");
    assert_eq!(roots[0]["children"][0]["children"][0]["attributes"]["user.id"], "u-s");
    assert_eq!(
        tree["duration_ms"],
        (h2 + 6_002_000_000 - (h3 + NS_PER_HOUR - 1_000_000_000)) as f64 / 1e6
    );
    let (status, body) = trace_json(&server, &trace_hex(123_456));
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (404, format!("trace {} not found", trace_hex(123_456)).as_str())
    );
    let (status, body) = trace_json(&server, "not-a-trace");
    assert_eq!(status, 400, "{body}");

    // Deletion of one user's spans, through the CLI against the running server.
    let odd = count(&server, "SELECT count(*) FROM spans WHERE user_id = 'u-odd'");
    assert_eq!(odd, 3 * (10 * 3 + 5 * 2));
    let out = server.cli(&["delete", "--where", "user_id = 'u-odd'", "--url", &server.url("")]);
    assert!(out.starts_with(&format!("deleted {odd} spans, rewrote 2 of 2 files")), "{out}");
    assert_eq!(count(&server, "SELECT count(*) FROM spans WHERE user_id = 'u-odd'"), 0);
    assert_eq!(count(&server, "SELECT count(*) FROM spans"), expected - odd);
    let (status, body) = reqwest::blocking::Client::new()
        .post(server.url("/v1/admin/delete"))
        .json(&serde_json::json!({"where": "no_such_column = 1"}))
        .send()
        .map(|r| (r.status().as_u16(), r.text().unwrap()))
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("no_such_column"), "{body}");

    // A replacement node: empty local disk, same location.
    server.stop();
    server.restart_on_empty_disk(tmp.path().join("node-b"));
    assert_eq!(count(&server, "SELECT count(*) FROM spans"), expected - odd);
    server.wait_for("trace index loaded", || {
        server.metric("spanlake_trace_index_files") == server.metric("spanlake_data_files")
    });
    let (status, tree) = trace_json(&server, &id);
    assert_eq!((status, tree["span_count"].clone()), (200, Value::from(3)));
    let text = server.cli(&["--location", location, "trace", &id]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with(&format!("trace {id}  3 spans")), "{text}");
    assert!(lines[0].contains("tokens 31/3"), "{text}");
    assert!(lines[1].starts_with("  op-0 [llm] 2.0 ms  model=gpt-4o-mini  tokens=7/1"), "{text}");
    assert!(lines[2].starts_with("    op-1 [llm]"), "{text}");
    assert!(lines[3].starts_with("      op-2 [llm]"), "{text}");
    server.stop();
}

#[test]
fn lifecycle_on_local_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let location = tmp.path().join("lake");
    lifecycle(&format!("file://{}", location.display()), Vec::new());
    // The layout is open: DuckDB over the files agrees with what spanlake stored.
    let counts = run_python(
        "import duckdb,sys\n\
         r=duckdb.sql(f\"SELECT count(*), count(DISTINCT (trace_id, span_id)), sum(input_tokens) FROM read_parquet('{sys.argv[1]}/spans/**/*.parquet', hive_partitioning=true)\").fetchall()[0]\n\
         print(r[0], r[1], r[2])",
        &[location.to_str().unwrap()],
    );
    let expected_rows = 6 * (10 * 3 + 5 * 2) + 3 - 3 * (10 * 3 + 5 * 2);
    let parts: Vec<i64> = counts.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(parts[0], expected_rows, "{counts}");
    assert_eq!(parts[1], expected_rows, "{counts}");
}

#[test]
fn lifecycle_on_s3() {
    let s3 = S3Server::start("spanlake-test");
    lifecycle("s3://spanlake-test/lake", s3.env());
    let keys = s3.list("lake/");
    assert!(keys.iter().any(|k| k.starts_with("lake/_catalog/v1/log/")), "{keys:?}");
    let parquet: Vec<&String> = keys.iter().filter(|k| k.ends_with(".parquet")).collect();
    assert_eq!(parquet.len(), 2, "one file per partition after compaction: {keys:?}");
    assert!(parquet.iter().all(|k| k.starts_with("lake/spans/project=default/date=")), "{keys:?}");
}

/// GETs and bytes read by `f`.
fn reads(server: &TestServer, f: impl FnOnce()) -> (f64, f64) {
    let get = |s: &TestServer| {
        (
            s.metric("spanlake_object_store_requests_total{op=\"get\"}"),
            s.metric("spanlake_object_store_bytes_total{op=\"get\"}"),
        )
    };
    let before = get(server);
    f();
    let after = get(server);
    (after.0 - before.0, after.1 - before.1)
}

#[test]
fn lookups_read_a_bounded_number_of_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config_file(tmp.path(), "0s", "");
    let mut server = TestServer::start_with(ServerOptions {
        env: vec![("SPANLAKE_CONFIG".into(), config)],
        ..Default::default()
    });
    let h = current_hour_ns();
    let target = 777_777u64;
    let measure = |server: &mut TestServer, partitions: i64| {
        server.wait_for("one file per partition", || {
            server.metric("spanlake_buffer_rows") == 0.0
                && server.metric("spanlake_data_files") == partitions as f64
        });
        server.stop();
        server.restart();
        // The index is loaded before the server answers: a lookup right after a start does
        // not open every file.
        assert_eq!(server.metric("spanlake_trace_index_files"), partitions as f64);
        let id = trace_hex(target);
        let lookup = reads(server, || assert_eq!(trace_json(server, &id).1["span_count"], 4));
        let q = format!(
            "SELECT count(*) FROM spans WHERE start_time >= to_timestamp_nanos({}) AND start_time < to_timestamp_nanos({})",
            h - 2 * NS_PER_HOUR,
            h - NS_PER_HOUR
        );
        let window = reads(server, || assert_eq!(count(server, &q), 4 + 200 * 3));
        (lookup, window)
    };
    // The target trace and others in hour h-2; other data in 3 older partitions.
    for part in 0..2 {
        let mut b = traces(part * 100, 100, 3, h - 2 * NS_PER_HOUR, "u");
        if part == 0 {
            b.extend(traces(target, 1, 4, h - 2 * NS_PER_HOUR, "u"));
        }
        send(&server, &b);
        std::thread::sleep(Duration::from_millis(300));
    }
    for p in 3..6 {
        for part in 0..2 {
            send(
                &server,
                &traces(10_000 * p as u64 + part * 100, 100, 3, h - p * NS_PER_HOUR, "u"),
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let (lookup_4, window_4) = measure(&mut server, 4);
    // Twelve more older partitions.
    for p in 6..18 {
        for part in 0..2 {
            send(
                &server,
                &traces(10_000 * p as u64 + part * 100, 100, 3, h - p * NS_PER_HOUR, "u"),
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let (lookup_16, window_16) = measure(&mut server, 16);
    eprintln!(
        "trace lookup: {lookup_4:?} -> {lookup_16:?}; one-hour query: {window_4:?} -> {window_16:?} (GETs, bytes)"
    );
    assert_eq!(lookup_4, lookup_16, "a trace lookup reads the same with 4 or 16 partitions");
    assert_eq!(window_4, window_16, "a one-hour query reads the same with 4 or 16 partitions");
    // One file is read: its footer and page index, then the pages of each of the 30 columns
    // that hold the trace (range reads, counted one each; S3 coalesces neighbouring ranges).
    assert!(lookup_4.0 <= (2 * 30 + 4) as f64, "lookup range reads: {lookup_4:?}");
    assert!(lookup_4.1 <= 64.0 * 1024.0, "lookup bytes: {lookup_4:?}");
    assert!(window_4.0 <= 4.0, "one-hour query range reads: {window_4:?}");
}

/// Kills the server at each step of each commit protocol and checks that nothing is lost,
/// nothing duplicated, and no half-done change is visible.
#[test]
fn crashes_at_every_commit_step_lose_nothing() {
    let h = current_hour_ns() - 2 * NS_PER_HOUR;
    for point in [
        "flush_before_commit",
        "flush_after_commit",
        "compaction_before_commit",
        "compaction_after_commit",
        "delete_before_commit",
        "delete_after_commit",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let config = config_file(tmp.path(), "0s", "");
        let location = tmp.path().join("lake");
        let mut server = TestServer::start_with(ServerOptions {
            args: vec![
                "--fault-injection".into(),
                "--location".into(),
                format!("file://{}", location.display()),
            ],
            env: vec![("SPANLAKE_CONFIG".into(), config)],
            data_dir: Some(tmp.path().join("node")),
            ..Default::default()
        });
        let arm = |server: &TestServer| {
            let r = reqwest::blocking::Client::new()
                .post(server.url("/debug/faults"))
                .json(&serde_json::json!({ "crash_at": point }))
                .send()
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        };
        let mut sent = 0i64;
        let flush_point = point.starts_with("flush");
        if flush_point || point.starts_with("compaction") {
            arm(&server);
        }
        // Two flushes' worth (the first crashes at a flush point).
        for r in 0..2u64 {
            let b = traces(r * 100, 50, 2, h, if r == 0 { "gone" } else { "kept" });
            sent += b.len() as i64;
            let (status, _) = server.post_traces("application/x-protobuf", encode(&b), None);
            assert_eq!(status, 200, "{point}: acknowledged before the crash");
            if flush_point {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        if point.starts_with("delete") {
            server.wait_for("flushed", || server.metric("spanlake_buffer_rows") == 0.0);
            arm(&server);
            let _ = reqwest::blocking::Client::new()
                .post(server.url("/v1/admin/delete"))
                .json(&serde_json::json!({"where": "user_id = 'gone'"}))
                .send();
        }
        server.wait_exit();
        assert!(server.log_text().contains("crash point reached"), "{point}");
        server.restart();
        let total = count(&server, "SELECT count(*) FROM spans");
        let distinct =
            count(&server, "SELECT count(*) FROM (SELECT DISTINCT trace_id, span_id FROM spans)");
        let gone = count(&server, "SELECT count(*) FROM spans WHERE user_id = 'gone'");
        let kept = count(&server, "SELECT count(*) FROM spans WHERE user_id = 'kept'");
        assert_eq!(total, distinct, "{point}: no duplicates");
        match point {
            "delete_after_commit" => {
                assert_eq!((gone, kept), (0, 100), "{point}: the deletion is whole")
            }
            "delete_before_commit" => {
                assert_eq!((gone, kept), (100, 100), "{point}: the deletion did not happen")
            }
            _ => assert_eq!(total, sent, "{point}: every acknowledged span is there"),
        }
        // What the crash left unreferenced is collected: the files on disk are the committed ones.
        server.wait_for("orphans collected", || {
            let files = walk(&location.join("spans"));
            files.len() as f64 == server.metric("spanlake_data_files")
        });
        let by_user: BTreeMap<String, i64> = server
            .rows("SELECT user_id, count(*) FROM spans GROUP BY user_id")
            .into_iter()
            .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_i64().unwrap()))
            .collect();
        assert_eq!(by_user.values().sum::<i64>(), total, "{point}");
        server.stop();
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    out
}
