//! `spanlake-bench`: the end-to-end benchmark harness.
//!
//! * `gen` writes generated OTLP requests to files;
//! * `ingest` starts a `spanlake serve` process on a temporary data directory, drives it over
//!   gRPC or HTTP with N connections sending pre-encoded requests, and reports acknowledged
//!   spans/s and MB/s, export latency p50/p99, acknowledged-to-queryable latency, server CPU
//!   and peak RSS, bytes on disk per span — next to the raw `prost` decode rate of the same
//!   payloads measured in the same run.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::{Buf as _, BufMut as _, Bytes};
use clap::{Parser, Subcommand};
use prost::Message as _;
use spanlake_benches::{Generator, Mix};
use spanlake_proto::collector::ExportTraceServiceRequest;

#[derive(Debug, Parser)]
#[command(name = "spanlake-bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Writes generated OTLP protobuf requests, one file per request.
    Gen {
        #[arg(long, default_value = "llm")]
        mix: Mix,
        #[arg(long, default_value_t = 10_000)]
        spans: u64,
        #[arg(long, default_value_t = 500)]
        spans_per_request: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Runs the ingest benchmark against a fresh server.
    Ingest(IngestArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Gen { mix, spans, spans_per_request, seed, out } => {
            std::fs::create_dir_all(&out)?;
            let mut g = Generator::new(mix, seed, now_ns() - 3_600_000_000_000, 3_600_000_000_000);
            for (n, r) in g.requests(spans_per_request, spans, "spanlake-bench").iter().enumerate()
            {
                std::fs::write(out.join(format!("{n:06}.otlp.pb")), r)?;
            }
            println!("wrote {} spans to {}", g.spans(), out.display());
            Ok(())
        }
        Cmd::Ingest(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(ingest(args))
        }
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[derive(Debug, clap::Args)]
struct IngestArgs {
    #[arg(long, default_value = "small")]
    mix: Mix,
    /// Spans to send.
    #[arg(long, default_value_t = 1_000_000)]
    spans: u64,
    #[arg(long, default_value_t = 1000)]
    spans_per_request: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// grpc or http.
    #[arg(long, default_value = "http")]
    protocol: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The spanlake binary to start.
    #[arg(long, default_value = "target/release/spanlake")]
    server: PathBuf,
    /// Extra arguments for `spanlake serve`.
    #[arg(long, allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Keep the data in this directory (for the query benchmark) instead of a temporary one.
    #[arg(long)]
    keep_data: Option<PathBuf>,
    /// Scale of prompt, completion and tool-result sizes (1 = the mix's sizes).
    #[arg(long, default_value_t = 1.0)]
    text_scale: f64,
    /// Spans start this many hours before now...
    #[arg(long, default_value_t = 0.5)]
    hours_ago: f64,
    /// ...and are spread over this many hours.
    #[arg(long, default_value_t = 0.5)]
    spread_hours: f64,
    /// Traces start in the order they are sent (a live fleet), not at random in the window.
    #[arg(long)]
    in_time_order: bool,
}

/// CPU time (user + system) of a process in seconds, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is 0, utime 11, stime 12 (clock ticks, 100 per second).
    (ticks(11) + ticks(12)) / 100.0
}

fn status_kb(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.trim().parse().ok()
        })
        .unwrap_or(0)
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            total += dir_bytes(&p);
        } else if let Ok(m) = e.metadata() {
            total += m.len();
        }
    }
    total
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A gRPC codec that sends pre-encoded request bytes and decodes the answer.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;
#[derive(Debug)]
struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

async fn ingest(a: IngestArgs) -> anyhow::Result<()> {
    // Generate up front.
    let t = Instant::now();
    let hours = |h: f64| (h * 3_600e9) as u64;
    let mut g = Generator::new(a.mix, a.seed, now_ns() - hours(a.hours_ago), hours(a.spread_hours))
        .with_text_scale(a.text_scale);
    if a.in_time_order {
        g = g.in_time_order(a.spans);
    }
    let requests: Vec<Bytes> = g
        .requests(a.spans_per_request, a.spans, "spanlake-bench")
        .into_iter()
        .map(Bytes::from)
        .collect();
    let total_spans = g.spans();
    let total_bytes: usize = requests.iter().map(Bytes::len).sum();
    let spans_per: Vec<u64> = requests
        .iter()
        .map(|r| {
            ExportTraceServiceRequest::decode(&r[..])
                .map(|d| {
                    d.resource_spans
                        .iter()
                        .flat_map(|rs| &rs.scope_spans)
                        .map(|ss| ss.spans.len() as u64)
                        .sum()
                })
                .unwrap_or(0)
        })
        .collect();
    eprintln!(
        "generated {total_spans} spans in {} requests ({:.1} MB, {:.0} B/span) in {:.1?}",
        requests.len(),
        total_bytes as f64 / 1e6,
        total_bytes as f64 / total_spans as f64,
        t.elapsed()
    );

    // Reference: raw prost decode of the same bytes, one thread.
    let t = Instant::now();
    let mut decoded = 0u64;
    for r in &requests {
        decoded += ExportTraceServiceRequest::decode(&r[..])
            .map(|d| d.resource_spans.len() as u64)
            .unwrap_or(0);
    }
    let decode_secs = t.elapsed().as_secs_f64();
    std::hint::black_box(decoded);

    // Server.
    let dir = match &a.keep_data {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tempdir()?,
    };
    let http_port = free_port()?;
    let grpc_port = free_port()?;
    let mut child = std::process::Command::new(&a.server)
        .arg("--data-dir")
        .arg(&dir)
        .arg("--log")
        .arg("warn")
        .arg("serve")
        .arg("--http-listen")
        .arg(format!("127.0.0.1:{http_port}"))
        .arg("--grpc-listen")
        .arg(format!("127.0.0.1:{grpc_port}"))
        .args(&a.server_args)
        .spawn()
        .with_context(|| format!("cannot start {}", a.server.display()))?;
    let pid = child.id();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{http_port}");
    let mut up = false;
    for _ in 0..600 {
        if let Some(status) = child.try_wait()? {
            bail!("server exited before it answered /health: {status}");
        }
        if http.get(format!("{base}/health")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !up {
        let _ = child.kill();
        bail!("server did not answer /health within 30 s");
    }
    let rss_start = status_kb(pid, "VmRSS");
    let cpu_start = cpu_seconds(pid);

    let requests = Arc::new(requests);
    let spans_per = Arc::new(spans_per);
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.connections {
        let (requests, spans_per, next, acked, retried) = (
            Arc::clone(&requests),
            Arc::clone(&spans_per),
            Arc::clone(&next),
            Arc::clone(&acked),
            Arc::clone(&retried),
        );
        let protocol = a.protocol.clone();
        let base = base.clone();
        let grpc_url = format!("http://127.0.0.1:{grpc_port}");
        tasks.push(spanlake_engine::task::spawn(async move {
            let mut latencies = Vec::new();
            let http = reqwest::Client::new();
            let mut grpc = if protocol == "grpc" {
                let channel = tonic::transport::Endpoint::from_shared(grpc_url)?.connect().await?;
                Some(tonic::client::Grpc::new(channel))
            } else {
                None
            };
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                if n >= requests.len() {
                    break;
                }
                loop {
                    let t = Instant::now();
                    let ok = match grpc.as_mut() {
                        Some(client) => {
                            client.ready().await?;
                            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                            );
                            client
                                .unary(tonic::Request::new(requests[n].clone()), path, RawCodec)
                                .await
                                .is_ok()
                        }
                        None => http
                            .post(format!("{base}/v1/traces"))
                            .header("content-type", "application/x-protobuf")
                            .body(requests[n].clone())
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success()),
                    };
                    if ok {
                        latencies.push(t.elapsed().as_secs_f64());
                        acked.fetch_add(spans_per[n], Ordering::Relaxed);
                        break;
                    }
                    retried.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    // Acknowledged-to-queryable: a marker span every 250 ms, polled through SQL until visible.
    let probe = {
        let (http, base) = (http.clone(), base.clone());
        let next = Arc::clone(&next);
        let total = requests.len() as u64;
        spanlake_engine::task::spawn(async move {
            let mut lags = Vec::new();
            let mut k = 0u64;
            while next.load(Ordering::Relaxed) < total {
                k += 1;
                // Seeded by the clock: a data directory kept from an earlier run already
                // holds that run's markers, and a repeated id would count twice.
                let seed = now_ns().wrapping_add(k);
                let mut g = Generator::new(Mix::Small, seed, now_ns() - 1_000_000_000, 1);
                let mut spans = g.trace();
                spans.truncate(1);
                let trace_id = hex::encode(&spans[0].trace_id);
                let body = spanlake_benches::request("probe", spans).encode_to_vec();
                let ok = http
                    .post(format!("{base}/v1/traces"))
                    .header("content-type", "application/x-protobuf")
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    let acked_at = Instant::now();
                    loop {
                        let sql =
                            format!("SELECT count(*) FROM spans WHERE trace_id = '{trace_id}'");
                        let v: serde_json::Value = match http
                            .post(format!("{base}/v1/sql"))
                            .json(&serde_json::json!({"sql": sql}))
                            .send()
                            .await
                        {
                            Ok(r) => r.json().await.unwrap_or_default(),
                            Err(_) => serde_json::Value::Null,
                        };
                        if v["rows"][0][0] == 1 {
                            lags.push(acked_at.elapsed().as_secs_f64());
                            break;
                        }
                        if acked_at.elapsed() > Duration::from_secs(30) {
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            lags
        })
    };
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_start;
    let mut lags = probe.await?;
    let peak_rss = status_kb(pid, "VmHWM");
    latencies.sort_by(f64::total_cmp);
    lags.sort_by(f64::total_cmp);

    // Graceful stop: everything flushed; then bytes on disk per span.
    let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    let status = child.wait()?;
    if !status.success() {
        bail!("server exited with {status}");
    }
    let spans_bytes = dir_bytes(&dir.join("spans"));
    let acked = acked.load(Ordering::Relaxed);
    let result = serde_json::json!({
        "mix": format!("{:?}", a.mix).to_lowercase(),
        "protocol": a.protocol,
        "connections": a.connections,
        "spans": acked,
        "requests": latencies.len(),
        "retried_requests": retried.load(Ordering::Relaxed),
        "wire_bytes_per_span": total_bytes as f64 / total_spans as f64,
        "seconds": wall,
        "spans_per_sec": acked as f64 / wall,
        "mb_per_sec": total_bytes as f64 / 1e6 / wall,
        "export_p50_ms": percentile(&latencies, 0.5) * 1e3,
        "export_p99_ms": percentile(&latencies, 0.99) * 1e3,
        "ack_to_query_p50_ms": percentile(&lags, 0.5) * 1e3,
        "ack_to_query_p99_ms": percentile(&lags, 0.99) * 1e3,
        "server_cpu_cores": cpu / wall,
        "server_rss_start_mib": rss_start / 1024,
        "server_peak_rss_mib": peak_rss / 1024,
        "disk_bytes_per_span": spans_bytes as f64 / acked.max(1) as f64,
        "prost_decode_spans_per_sec_one_core": total_spans as f64 / decode_secs,
        "prost_decode_mb_per_sec_one_core": total_bytes as f64 / 1e6 / decode_secs,
        "ratio_ingest_to_prost_decode": (acked as f64 / wall) / (total_spans as f64 / decode_secs),
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if a.keep_data.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("spanlake-bench-{}-{}", std::process::id(), now_ns()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
