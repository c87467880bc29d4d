//! Nothing acknowledged is lost: concurrent clients stream spans while the server is killed
//! with SIGKILL at random moments and restarted on the same data directory; afterwards every
//! acknowledged span is present exactly once, and no span at all is present twice.
//!
//! `SPANLAKE_CRASH_CYCLES` (default 20) sets the number of kill/restart cycles and
//! `SPANLAKE_CRASH_SEED` the seed of the kill timing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message as _;
use rand::{Rng as _, SeedableRng as _};

use crate::harness::{ServerOptions, TestServer};

const CLIENTS: u64 = 4;
const SPANS_PER_REQUEST: u64 = 50;

/// A request of `SPANS_PER_REQUEST` spans whose ids encode (client, sequence).
fn request(client: u64, seq: u64, now_ns: u64) -> (Vec<u8>, Vec<(String, String)>) {
    let trace_id: Vec<u8> = [client.to_be_bytes(), seq.to_be_bytes()].concat();
    let mut ids = Vec::new();
    let spans = (0..SPANS_PER_REQUEST)
        .map(|i| {
            let span_id = (1 + i).to_be_bytes().to_vec();
            ids.push((hex::encode(&trace_id), hex::encode(&span_id)));
            Span {
                trace_id: trace_id.clone(),
                span_id,
                parent_span_id: if i == 0 { vec![] } else { 1u64.to_be_bytes().to_vec() },
                name: format!("op-{i}"),
                start_time_unix_nano: now_ns + i,
                end_time_unix_nano: now_ns + i + 1_000_000,
                attributes: vec![KeyValue {
                    key: "gen_ai.usage.input_tokens".into(),
                    value: Some(AnyValue { value: Some(any_value::Value::IntValue(i as i64)) }),
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect();
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    };
    (req.encode_to_vec(), ids)
}

#[test]
fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let cycles: u64 =
        std::env::var("SPANLAKE_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let seed: u64 =
        std::env::var("SPANLAKE_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Short flushes, so that kills also land between Parquet commits and WAL deletions.
    let mut server = TestServer::start_with(ServerOptions {
        args: vec!["--flush-max-age".into(), "150ms".into()],
        ..Default::default()
    });
    let url = server.url("/v1/traces");
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let now_ns = 1_795_468_500_000_000_000u64;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (url, acked, stop, attempts) =
                (url.clone(), Arc::clone(&acked), Arc::clone(&stop), Arc::clone(&attempts));
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap();
                let mut seq = 0u64;
                while !stop.load(Ordering::Acquire) {
                    seq += 1;
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let (body, ids) = request(client, seq, now_ns);
                    let ok = http
                        .post(&url)
                        .header("content-type", "application/x-protobuf")
                        .body(body)
                        .send()
                        .is_ok_and(|r| r.status().as_u16() == 200);
                    if ok {
                        acked.lock().unwrap().extend(ids);
                    } else {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        })
        .collect();

    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
        server.kill();
        server.restart();
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Release);
    for c in clients {
        c.join().unwrap();
    }
    server.stop();
    server.restart();

    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() as u64 >= cycles * SPANS_PER_REQUEST,
        "too few acknowledged spans: {}",
        acked.len()
    );
    let dupes = server.rows("SELECT trace_id, span_id, count(*) FROM spans GROUP BY trace_id, span_id HAVING count(*) > 1");
    assert!(dupes.is_empty(), "duplicated spans: {dupes:?}");
    let stored: HashSet<(String, String)> = server
        .rows("SELECT trace_id, span_id FROM spans")
        .into_iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_str().unwrap().to_string()))
        .collect();
    let missing: Vec<_> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged spans lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // Acknowledged ids are unique by construction, so this is "exactly once" by count too.
    let acked_set: HashSet<_> = acked.iter().cloned().collect();
    assert_eq!(acked_set.len(), acked.len());
    let count = server.scalar("SELECT count(*) FROM spans").as_u64().unwrap();
    assert!(
        count >= acked.len() as u64
            && count <= attempts.load(Ordering::Relaxed) * SPANS_PER_REQUEST
    );
    eprintln!(
        "crash test: {cycles} kills, {} spans acknowledged, {count} stored, {} requests attempted",
        acked.len(),
        attempts.load(Ordering::Relaxed)
    );
}
