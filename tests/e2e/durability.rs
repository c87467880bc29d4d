//! Faults below the engine, hostile input, and limits: each has a defined answer, nothing
//! acknowledged is lost, and the server keeps serving.

use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message as _;
use serde_json::{Value, json};

use crate::harness::{ServerOptions, TestServer};

const T0: u64 = 1_795_468_500_000_000_000; // 2026-11-23T21:15:00Z

fn span(trace: u8, id: u8) -> Span {
    Span {
        trace_id: vec![trace; 16],
        span_id: vec![id; 8],
        name: format!("s{id}"),
        start_time_unix_nano: T0 + u64::from(id),
        end_time_unix_nano: T0 + u64::from(id) + 5_000_000,
        ..Default::default()
    }
}

fn body(spans: Vec<Span>) -> Vec<u8> {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn export(server: &TestServer, spans: Vec<Span>) -> (u16, Option<(i64, String)>) {
    let (status, bytes) = server.post_traces("application/x-protobuf", body(spans), None);
    if status != 200 {
        let st = spanlake_proto::Status::decode(&bytes[..]).unwrap();
        return (status, Some((-1, st.message)));
    }
    let resp = ExportTraceServiceResponse::decode(&bytes[..]).unwrap();
    (status, resp.partial_success.map(|p| (p.rejected_spans, p.error_message)))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

fn parquet_files(dir: &std::path::Path) -> Vec<String> {
    fn walk(d: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir.join("spans"), &mut out);
    out
}

/// Failing object-store puts (data files, then catalog commits) make flushes retry with
/// backoff; the data stays queryable and acknowledged meanwhile, no partial or orphan file is
/// left visible, and everything lands once the fault clears.
#[test]
fn object_store_faults_are_retried_without_loss_or_partial_files() {
    let mut server = TestServer::start_with(ServerOptions {
        args: vec!["--flush-max-age".into(), "100ms".into(), "--fault-injection".into()],
        ..Default::default()
    });
    let client = reqwest::blocking::Client::new();
    let faults = |v: Value| {
        let r = client.post(server.url("/debug/faults")).json(&v).send().unwrap();
        assert_eq!(r.status().as_u16(), 200);
    };
    faults(json!({"fail_puts": 3}));
    assert_eq!(export(&server, vec![span(1, 1), span(1, 2)]), (200, None));
    wait_until("three failed flushes", Duration::from_secs(20), || {
        server.metric("spanlake_flush_errors_total") >= 3.0
    });
    wait_until("the flush after the fault clears", Duration::from_secs(20), || {
        server.metric("spanlake_flushes_total") >= 1.0
    });
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(2));

    // A failed catalog commit discards the data file it would have committed.
    faults(json!({"fail_catalog_puts": 2}));
    assert_eq!(export(&server, vec![span(2, 3)]), (200, None));
    wait_until("the commit after the fault clears", Duration::from_secs(20), || {
        server.metric("spanlake_flushes_total") >= 2.0
    });
    assert!(server.metric("spanlake_flush_errors_total") >= 5.0, "{}", server.log_text());
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(3));
    assert_eq!(server.metric("spanlake_data_files"), 2.0);
    assert_eq!(parquet_files(server.data_dir()).len(), 2, "a failed flush left a file behind");

    server.stop();
    server.restart();
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(3));
    assert_eq!(server.scalar("SELECT count(DISTINCT span_id) FROM spans"), json!(3));
}

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

/// Every kind of broken input gets its documented answer, and the valid spans beside it are
/// kept.
#[test]
fn hostile_input_has_defined_outcomes() {
    let server = TestServer::start();
    let now = u64::try_from(chrono_now_ns()).unwrap();

    // All-zero ids, zero and far-future start times: rejected one by one.
    let mut zero_trace = span(0, 1);
    zero_trace.trace_id = vec![0; 16];
    let mut zero_start = span(3, 3);
    zero_start.start_time_unix_nano = 0;
    let mut future = span(3, 4);
    future.start_time_unix_nano = now + 10 * 24 * 3_600_000_000_000;
    future.end_time_unix_nano = future.start_time_unix_nano + 1;
    let (status, partial) =
        export(&server, vec![zero_trace, span(3, 0), zero_start, future, span(3, 5)]);
    assert_eq!(status, 200);
    let (rejected, msg) = partial.unwrap();
    assert_eq!(rejected, 4, "{msg}");
    for part in [
        "trace_id is all zeros",
        "span \"s0\" (0000000000000000): span_id is all zeros",
        "span \"s3\" (0303030303030303): start_time_unix_nano is 0",
        "span \"s4\" (0404040404040404): starts more than 86400s in the future",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg:?}");
    }

    // End before start: kept, duration 0, with a warning.
    let mut backwards = span(4, 1);
    backwards.end_time_unix_nano = backwards.start_time_unix_nano - 1_000;
    let (status, partial) = export(&server, vec![backwards]);
    assert_eq!(status, 200);
    assert_eq!(partial, Some((0, "1 span(s) end before they start; their duration is 0".into())));
    assert_eq!(
        server.scalar(
            "SELECT duration_ms FROM spans WHERE trace_id = '04040404040404040404040404040404'"
        ),
        json!(0.0)
    );

    // Deep nesting and an enormous value: cut, the span and its usage kept.
    let mut deep = any_value::Value::StringValue("leaf".into());
    for _ in 0..20 {
        deep = any_value::Value::ArrayValue(ArrayValue {
            values: vec![AnyValue { value: Some(deep) }],
        });
    }
    let mut big = span(5, 1);
    big.attributes = vec![
        kv("gen_ai.operation.name", any_value::Value::StringValue("chat".into())),
        kv("gen_ai.request.model", any_value::Value::StringValue("gpt-4o".into())),
        kv("gen_ai.usage.input_tokens", any_value::Value::IntValue(123_456)),
        kv("gen_ai.input.messages", any_value::Value::StringValue("x".repeat(1 << 20))),
        kv("deep", deep),
    ];
    let (status, partial) = export(&server, vec![big]);
    assert_eq!(status, 200);
    assert_eq!(
        partial,
        Some((0, "truncated 2 value(s) over the value size limit; replaced 1 value(s) nested over the depth limit".into()))
    );
    let row = server.rows(
        "SELECT model, input_tokens, length(input), json_get_json(attributes, 'deep') FROM spans WHERE trace_id = '05050505050505050505050505050505'",
    );
    let marker = format!("…[truncated: {} of {} bytes]", 128 << 10, 1 << 20);
    assert_eq!(row[0][0], json!("gpt-4o"));
    assert_eq!(row[0][1], json!(123_456));
    assert_eq!(row[0][2], json!((128 << 10) + marker.chars().count()));
    let deep_json: Value = serde_json::from_str(row[0][3].as_str().unwrap()).unwrap();
    let mut v = &deep_json;
    let mut depth = 0;
    while let Some(inner) = v.get(0) {
        v = inner;
        depth += 1;
    }
    assert_eq!((depth, v), (8, &json!("[nesting deeper than 8 levels]")));

    // Invalid UTF-8 in a protobuf string: the request cannot be decoded, 400 naming it.
    let mut bytes = body(vec![span(6, 1)]);
    let pos = bytes.windows(2).position(|w| w == b"s1").unwrap();
    bytes[pos] = 0xff;
    let (status, b) = server.post_traces("application/x-protobuf", bytes, None);
    assert_eq!(status, 400);
    let msg = spanlake_proto::Status::decode(&b[..]).unwrap().message;
    assert_eq!(msg, "invalid OTLP protobuf: Span.name: string is not UTF-8");

    // The same span twice in one request: the second is rejected.
    let (status, partial) = export(&server, vec![span(7, 1), span(7, 1)]);
    assert_eq!(status, 200);
    assert_eq!(
        partial.unwrap().1,
        "rejected 1 span(s): span \"s1\" (0101010101010101): duplicate of an earlier span in this request"
    );

    // A request over the spans-per-request limit keeps the first ones.
    // (The limit is 100 000 by default; the unit tests cover it with a small limit.)

    // Still serving, and exactly the valid spans are there.
    // s5 of trace 3, the backwards span, the big span, and one copy of the duplicate.
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(4));
    assert_eq!(server.metric("spanlake_spans_rejected_total"), 5.0);
}

/// The same request sent twice (a client retrying after a lost acknowledgement) is stored once
/// when flushed.
#[test]
fn requests_sent_twice_are_stored_once() {
    let mut server = TestServer::start_with(ServerOptions {
        args: vec!["--flush-max-age".into(), "1h".into()],
        ..Default::default()
    });
    let spans = vec![span(8, 1), span(8, 2), span(8, 3)];
    assert_eq!(export(&server, spans.clone()).0, 200);
    assert_eq!(export(&server, spans).0, 200);
    server.stop();
    server.restart();
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(3));
}

/// Request bodies over the limits get 413 without being read or inflated past the cap.
#[test]
fn oversized_bodies_are_refused_with_413() {
    let server = TestServer::start();
    let (status, _) = server.post_traces("application/x-protobuf", vec![0u8; 17 << 20], None);
    assert_eq!(status, 413);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut enc, &vec![0u8; 100 << 20]).unwrap();
    let bomb = enc.finish().unwrap();
    let (status, b) = server.post_traces("application/x-protobuf", bomb, Some("gzip"));
    assert_eq!(status, 413);
    let msg = spanlake_proto::Status::decode(&b[..]).unwrap().message;
    assert_eq!(msg, "request body larger than 67108864 bytes after decompression");
    assert_eq!(server.scalar("SELECT 1"), json!(1));
}

fn chrono_now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// Ingest driven far past what the machine absorbs: the server answers with retryable codes
/// instead of queueing, its memory stays bounded, every acknowledged span is stored, and it
/// accepts data normally once the load stops.
#[test]
fn overload_is_answered_with_retry_and_memory_stays_bounded() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let budget_mib = 32u64;
    let server = TestServer::start_with(ServerOptions {
        args: vec![
            "--memory-budget".into(),
            format!("{budget_mib}MiB"),
            "--flush-max-age".into(),
            "1s".into(),
        ],
        ..Default::default()
    });
    let baseline_kb = server.proc_status_kb("VmRSS");
    // 500 spans with 4 KiB prompts: about 2 MiB per request.
    let prompt: Arc<str> = Arc::from("lorem ipsum ".repeat(350));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, retry, other, next) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(1)),
    );
    let url = server.url("/v1/traces");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (stop, ok, retry, other, next, url) = (
                Arc::clone(&stop),
                Arc::clone(&ok),
                Arc::clone(&retry),
                Arc::clone(&other),
                Arc::clone(&next),
                url.clone(),
            );
            let prompt = Arc::clone(&prompt);
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::new();
                while !stop.load(Ordering::Acquire) {
                    let trace = next.fetch_add(1, Ordering::Relaxed);
                    let resp = http
                        .post(&url)
                        .header("content-type", "application/x-protobuf")
                        .body(llm_request(trace, &prompt))
                        .send();
                    match resp
                        .map(|r| (r.status().as_u16(), r.headers().contains_key("retry-after")))
                    {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        Ok((429 | 503, true)) => retry.fetch_add(1, Ordering::Relaxed),
                        _ => other.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::Release);
    for t in threads {
        t.join().unwrap();
    }
    let peak_kb = server.proc_status_kb("VmHWM");
    let (ok, retry, other) =
        (ok.load(Ordering::Relaxed), retry.load(Ordering::Relaxed), other.load(Ordering::Relaxed));
    eprintln!(
        "overload: {ok} requests accepted, {retry} told to retry, {other} other; RSS {} MiB at start, peak {} MiB (budget {budget_mib} MiB)",
        baseline_kb / 1024,
        peak_kb / 1024
    );
    assert_eq!(other, 0, "every answer is 200 or a retryable 429/503 with Retry-After");
    assert!(retry > 0, "the load did not exceed what the server absorbs");
    assert!(ok > 0);
    // Bounded: the budget, plus requests being decoded (8 connections of 2 MiB bodies and
    // their decoded form), plus the process's own baseline.
    assert!(
        peak_kb / 1024 < baseline_kb / 1024 + budget_mib + 400,
        "peak RSS {} MiB",
        peak_kb / 1024
    );
    // Everything acknowledged is there, and the server takes data normally again.
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(ok * 500));
    wait_until("the backlog to flush", Duration::from_secs(60), || {
        server.metric("spanlake_memory_bytes") == 0.0
    });
    assert_eq!(export(&server, vec![span(9, 1)]), (200, None));
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(ok * 500 + 1));
}

/// 500 LLM spans with the given prompt: about 2 MiB.
fn llm_request(trace: u64, prompt: &str) -> Vec<u8> {
    let spans = (0..500u64)
        .map(|i| {
            let mut s = span(0, 0);
            s.trace_id = [trace.to_be_bytes(), 7u64.to_be_bytes()].concat();
            s.span_id = (i + 1).to_be_bytes().to_vec();
            s.attributes = vec![
                kv("gen_ai.operation.name", any_value::Value::StringValue("chat".into())),
                kv(
                    "gen_ai.input.messages",
                    any_value::Value::StringValue(format!("{trace} {i} {prompt}")),
                ),
            ];
            s
        })
        .collect();
    body(spans)
}

/// A full disk is answered with a retryable 503 naming it, and ingest resumes once space
/// returns, with every acknowledged span kept. (Mounts a small tmpfs: needs root, as CI is.)
#[test]
fn full_disk_is_reported_and_ingest_resumes() {
    struct Mount(std::path::PathBuf);
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let mount_point = tmp.path().join("disk");
    std::fs::create_dir_all(&mount_point).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&mount_point)
        .status()
        .expect("mount");
    assert!(status.success(), "mounting a tmpfs needs root");
    let _mount = Mount(mount_point.clone());
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--flush-max-age".into(), "1h".into()],
        data_dir: Some(mount_point.clone()),
        ..Default::default()
    });
    // Leave about 1 MiB free.
    let free = || {
        let out = std::process::Command::new("df")
            .arg("--output=avail")
            .arg("-B1")
            .arg(&mount_point)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse::<u64>().unwrap()
    };
    let filler = mount_point.join("filler");
    std::fs::write(&filler, vec![1u8; (free() - (1 << 20)) as usize]).unwrap();
    let prompt = "all work and no play ".repeat(200);
    let mut acked = 0u64;
    let mut refused = None;
    for trace in 1..200u64 {
        let (status, bytes) =
            server.post_traces("application/x-protobuf", llm_request_n(trace, &prompt, 50), None);
        if status == 200 {
            acked += 50;
            continue;
        }
        refused = Some((status, spanlake_proto::Status::decode(&bytes[..]).unwrap().message));
        break;
    }
    let (status, msg) = refused.expect("the disk never filled up");
    assert_eq!(status, 503, "{msg}");
    assert!(
        msg.starts_with("write-ahead log append failed on")
            && msg.contains("No space left on device"),
        "{msg}"
    );
    assert!(acked > 0);
    // Space returns: ingest resumes, nothing acknowledged was lost.
    std::fs::remove_file(&filler).unwrap();
    let (status, _) =
        server.post_traces("application/x-protobuf", llm_request_n(1000, &prompt, 50), None);
    assert_eq!(status, 200);
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(acked + 50));
}

fn llm_request_n(trace: u64, prompt: &str, n: u64) -> Vec<u8> {
    let spans = (0..n)
        .map(|i| {
            let mut s = span(0, 0);
            s.trace_id = [trace.to_be_bytes(), 9u64.to_be_bytes()].concat();
            s.span_id = (i + 1).to_be_bytes().to_vec();
            s.attributes = vec![kv(
                "gen_ai.input.messages",
                any_value::Value::StringValue(format!("{trace} {i} {prompt}")),
            )];
            s
        })
        .collect();
    body(spans)
}

/// Queries have their own memory limit: a query needing more either spills to disk and answers
/// correctly or fails with a clear "resources exhausted" answer, and ingest goes on.
#[test]
fn queries_over_their_memory_limit_spill_or_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("spanlake.toml");
    std::fs::write(&config, "version = 1\n[query]\nmemory_limit = \"4MiB\"\n").unwrap();
    let server = TestServer::start_with(ServerOptions {
        env: vec![("SPANLAKE_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    });
    let prompt = "the quick brown fox ".repeat(100);
    for trace in 1..=20u64 {
        assert_eq!(
            server
                .post_traces("application/x-protobuf", llm_request_n(trace, &prompt, 100), None)
                .0,
            200
        );
    }
    let (status, body) = server
        .sql_status("SELECT trace_id, span_id, input FROM spans ORDER BY input DESC, span_id");
    match status {
        200 => assert_eq!(body["row_count"], json!(2000)),
        429 => {
            let err = body["error"].as_str().unwrap();
            assert!(
                err.contains("Resources exhausted") || err.contains("Not enough memory"),
                "{err}"
            );
        }
        other => panic!("unexpected answer {other}: {body}"),
    }
    // A narrow sort fits: it spills what does not.
    let (status, body) =
        server.sql_status("SELECT span_id FROM spans ORDER BY span_id DESC, trace_id");
    assert_eq!((status, &body["row_count"]), (200, &json!(2000)), "{body}");
    assert_eq!(
        server.post_traces("application/x-protobuf", llm_request_n(99, &prompt, 10), None).0,
        200
    );
    assert_eq!(server.scalar("SELECT count(*) FROM spans"), json!(2010));
}
