//! Throughput of each pipeline stage on generated agent traces, next to raw `prost` decode of
//! the same bytes: OTLP decode in place, decode + normalisation into Arrow, Parquet encoding,
//! WAL record encoding and framing.
//!
//! `cargo bench -p spanlake-benches --bench pipeline`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message as _;
use spanlake_benches::{Generator, Mix};
use spanlake_engine::layout::HourPartition;
use spanlake_engine::wal::format::{encode_payload, frame_record};
use spanlake_engine::writer::{WriterConfig, encode_file};
use spanlake_ingest::normalize::{NormalizeContext, normalize_request};
use spanlake_proto::collector::ExportTraceServiceRequest;

fn payload(mix: Mix) -> (Vec<u8>, u64) {
    let mut g = Generator::new(mix, 7, 1_795_468_500_000_000_000, 60_000_000_000);
    let reqs = g.requests(5_000, 5_000, "bench");
    let spans = g.spans();
    (reqs.into_iter().next().expect("one request"), spans)
}

fn stages(c: &mut Criterion) {
    for mix in [Mix::Small, Mix::Llm] {
        let (bytes, spans) = payload(mix);
        let name = format!("{mix:?}").to_lowercase();
        let ctx = NormalizeContext::default();
        let mut g = c.benchmark_group(format!("decode_{name}"));
        g.throughput(Throughput::Elements(spans));
        g.bench_function("prost_only", |b| {
            b.iter(|| ExportTraceServiceRequest::decode(black_box(&bytes[..])).unwrap())
        });
        g.bench_function("decode_in_place_only", |b| {
            b.iter(|| spanlake_proto::decode_view(black_box(&bytes[..])).unwrap())
        });
        g.bench_function("decode_and_normalize_to_arrow", |b| {
            b.iter(|| {
                let req = spanlake_proto::decode_view(black_box(&bytes[..])).unwrap();
                normalize_request(&req, &ctx).unwrap()
            })
        });
        g.finish();

        let batch =
            normalize_request(&spanlake_proto::decode_view(&bytes).unwrap(), &ctx).unwrap().batch;
        // Size beside speed: the same batch as a flush writes it and as compaction rewrites it.
        for (what, level) in [("flush", 0), ("compacted", 1)] {
            let file = encode_file(
                "default",
                HourPartition::of_ns(0),
                vec![batch.clone()],
                level,
                &WriterConfig::default(),
            )
            .unwrap();
            eprintln!(
                "{name}: Parquet as {what}: {:.1} bytes/span",
                file.bytes.len() as f64 / spans as f64
            );
        }
        let mut g = c.benchmark_group(format!("store_{name}"));
        g.throughput(Throughput::Elements(spans));
        g.bench_function("wal_record_encode_and_frame", |b| {
            let mut out = Vec::new();
            b.iter(|| {
                out.clear();
                let p = encode_payload("default", black_box(&batch)).unwrap();
                frame_record(1, &p, &mut out);
                out.len()
            })
        });
        for (bench, level) in [("parquet_encode_flush", 0), ("parquet_encode_compaction", 1)] {
            g.bench_function(bench, |b| {
                b.iter(|| {
                    encode_file(
                        "default",
                        HourPartition::of_ns(0),
                        vec![black_box(&batch).clone()],
                        level,
                        &WriterConfig::default(),
                    )
                    .unwrap()
                })
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(3));
    targets = stages
}
criterion_main!(benches);
