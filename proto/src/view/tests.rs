//! The borrowing decoder against `prost` on the same bytes.

use std::path::PathBuf;

use prost::Message;

use super::*;
use crate::collector::ExportTraceServiceRequest;
use crate::common::{self, any_value::Value as V};
use crate::{resource, trace};

/// The fixtures: `SPANLAKE_FIXTURES`, else next to the package directory that `cargo test` names
/// when it runs the test (a target directory shared by clones at different paths may hold a
/// binary compiled in another clone), else where it was compiled.
fn fixtures_dir() -> PathBuf {
    std::env::var_os("SPANLAKE_FIXTURES").map_or_else(
        || {
            std::env::var_os("CARGO_MANIFEST_DIR")
                .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
                .join("../../shared/fixtures")
        },
        PathBuf::from,
    )
}

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "pb"))
        .map(|p| (p.display().to_string(), std::fs::read(&p).expect("read")))
        .collect();
    out.sort();
    assert!(out.len() >= 5, "expected the captured fixtures, found {}", out.len());
    out
}

// The view as prost structs, in the normal form `strip` gives prost's own decode.

fn kvs_to_prost(list: &[KeyValue<'_>]) -> Vec<common::KeyValue> {
    list.iter()
        .map(|kv| common::KeyValue {
            key: kv.key.into(),
            value: value_to_prost(&kv.value).map(|v| common::AnyValue { value: Some(v) }),
            ..Default::default()
        })
        .collect()
}

fn value_to_prost(v: &AnyValue<'_>) -> Option<V> {
    Some(match v {
        AnyValue::Empty => return None,
        AnyValue::String(s) => V::StringValue((*s).into()),
        AnyValue::Bool(b) => V::BoolValue(*b),
        AnyValue::Int(i) => V::IntValue(*i),
        AnyValue::Double(d) => V::DoubleValue(*d),
        AnyValue::Bytes(b) => V::BytesValue(b.to_vec()),
        AnyValue::Array(items) => V::ArrayValue(common::ArrayValue {
            values: items.iter().map(|i| common::AnyValue { value: value_to_prost(i) }).collect(),
        }),
        AnyValue::Kvlist(list) => {
            V::KvlistValue(common::KeyValueList { values: kvs_to_prost(list) })
        }
    })
}

fn to_prost(req: &ExportRequest<'_>) -> ExportTraceServiceRequest {
    let resource_spans = req.resource_spans.iter().map(|rs| trace::ResourceSpans {
        resource: Some(resource::Resource {
            attributes: kvs_to_prost(&rs.resource_attributes),
            ..Default::default()
        }),
        scope_spans: rs
            .scope_spans
            .iter()
            .map(|ss| trace::ScopeSpans {
                scope: ss.scope.as_ref().map(|s| common::InstrumentationScope {
                    name: s.name.into(),
                    version: s.version.into(),
                    attributes: kvs_to_prost(&s.attributes),
                    ..Default::default()
                }),
                spans: ss.spans.iter().map(span_to_prost).collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    ExportTraceServiceRequest { resource_spans: resource_spans.collect() }
}

fn span_to_prost(s: &Span<'_>) -> trace::Span {
    trace::Span {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        trace_state: s.trace_state.into(),
        parent_span_id: s.parent_span_id.to_vec(),
        name: s.name.into(),
        kind: s.kind,
        start_time_unix_nano: s.start_time_unix_nano,
        end_time_unix_nano: s.end_time_unix_nano,
        attributes: kvs_to_prost(&s.attributes),
        events: s
            .events
            .iter()
            .map(|e| trace::span::Event {
                time_unix_nano: e.time_unix_nano,
                name: e.name.into(),
                attributes: kvs_to_prost(&e.attributes),
                ..Default::default()
            })
            .collect(),
        links: s
            .links
            .iter()
            .map(|l| trace::span::Link {
                trace_id: l.trace_id.to_vec(),
                span_id: l.span_id.to_vec(),
                trace_state: l.trace_state.into(),
                attributes: kvs_to_prost(&l.attributes),
                ..Default::default()
            })
            .collect(),
        status: s.status.map(|st| trace::Status { message: st.message.into(), code: st.code }),
        ..Default::default()
    }
}

// prost's decode without the fields the view skips, and with "no value" in one form.

fn strip_kvs(list: Vec<common::KeyValue>) -> Vec<common::KeyValue> {
    list.into_iter()
        .map(|kv| common::KeyValue {
            key: kv.key,
            value: kv
                .value
                .and_then(|v| strip_value(v.value))
                .map(|v| common::AnyValue { value: Some(v) }),
            ..Default::default()
        })
        .collect()
}

fn strip_value(v: Option<V>) -> Option<V> {
    match v? {
        V::StringValueStrindex(_) => None,
        V::ArrayValue(a) => Some(V::ArrayValue(common::ArrayValue {
            values: a
                .values
                .into_iter()
                .map(|i| common::AnyValue { value: strip_value(i.value) })
                .collect(),
        })),
        V::KvlistValue(l) => {
            Some(V::KvlistValue(common::KeyValueList { values: strip_kvs(l.values) }))
        }
        other => Some(other),
    }
}

fn strip(req: ExportTraceServiceRequest) -> ExportTraceServiceRequest {
    let resource_spans = req.resource_spans.into_iter().map(|rs| trace::ResourceSpans {
        resource: Some(resource::Resource {
            attributes: strip_kvs(rs.resource.map(|r| r.attributes).unwrap_or_default()),
            ..Default::default()
        }),
        scope_spans: rs
            .scope_spans
            .into_iter()
            .map(|ss| trace::ScopeSpans {
                scope: ss.scope.map(|s| common::InstrumentationScope {
                    name: s.name,
                    version: s.version,
                    attributes: strip_kvs(s.attributes),
                    ..Default::default()
                }),
                spans: ss
                    .spans
                    .into_iter()
                    .map(|s| trace::Span {
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        trace_state: s.trace_state,
                        parent_span_id: s.parent_span_id,
                        name: s.name,
                        kind: s.kind,
                        start_time_unix_nano: s.start_time_unix_nano,
                        end_time_unix_nano: s.end_time_unix_nano,
                        attributes: strip_kvs(s.attributes),
                        events: s
                            .events
                            .into_iter()
                            .map(|e| trace::span::Event {
                                time_unix_nano: e.time_unix_nano,
                                name: e.name,
                                attributes: strip_kvs(e.attributes),
                                ..Default::default()
                            })
                            .collect(),
                        links: s
                            .links
                            .into_iter()
                            .map(|l| trace::span::Link {
                                trace_id: l.trace_id,
                                span_id: l.span_id,
                                trace_state: l.trace_state,
                                attributes: strip_kvs(l.attributes),
                                ..Default::default()
                            })
                            .collect(),
                        status: s.status,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    ExportTraceServiceRequest { resource_spans: resource_spans.collect() }
}

/// Both decoders accept or both refuse; when they accept, they read the same request.
/// Compared as encoded bytes, so that NaN doubles compare by their bits.
fn agree(bytes: &[u8], what: &str) -> bool {
    let ours = decode(bytes);
    let theirs = ExportTraceServiceRequest::decode(bytes);
    match (ours, theirs) {
        (Ok(o), Ok(t)) => {
            assert_eq!(
                to_prost(&o).encode_to_vec(),
                strip(t).encode_to_vec(),
                "{what}: decoded differently"
            );
            true
        }
        (Err(_), Err(_)) => false,
        (o, t) => panic!("{what}: view {:?}, prost {:?}", o.err(), t.err()),
    }
}

#[test]
fn captured_requests_decode_as_prost_decodes_them() {
    for (name, bytes) in fixtures() {
        assert!(agree(&bytes, &name), "{name} must decode");
        let req = decode(&bytes).unwrap();
        let spans: usize =
            req.resource_spans.iter().flat_map(|rs| &rs.scope_spans).map(|s| s.spans.len()).sum();
        assert!(spans > 0, "{name} has spans");
    }
}

#[test]
fn every_truncation_is_refused_or_read_as_prost_reads_it() {
    for (name, bytes) in fixtures() {
        let mut accepted = 0;
        for end in 0..bytes.len() {
            accepted += usize::from(agree(&bytes[..end], &format!("{name} cut at {end}")));
        }
        // A request cut between two top-level resource spans is still valid.
        assert!(accepted >= 1, "{name}");
    }
}

#[test]
fn corrupted_requests_are_refused_or_read_as_prost_reads_them() {
    // xorshift: reproducible without a dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut accepted, mut refused) = (0, 0);
    for (name, bytes) in fixtures() {
        for round in 0..400 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() % b.len() as u64) as usize;
                b[at] = next() as u8;
            }
            if agree(&b, &format!("{name} corruption {round}")) {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
    }
    // Both outcomes are exercised.
    assert!(accepted > 100 && refused > 100, "accepted {accepted}, refused {refused}");
}

#[test]
fn every_value_type_unknown_fields_groups_and_merges_read_as_prost_reads_them() {
    let kv = |k: &str, v: V| common::KeyValue {
        key: k.into(),
        value: Some(common::AnyValue { value: Some(v) }),
        ..Default::default()
    };
    let span = trace::Span {
        trace_id: vec![1; 16],
        span_id: vec![2; 8],
        parent_span_id: vec![3; 8],
        trace_state: "a=b".into(),
        name: "chat gpt-4o".into(),
        kind: -5,
        start_time_unix_nano: u64::MAX,
        end_time_unix_nano: 7,
        flags: 0x301,
        dropped_attributes_count: 4,
        attributes: vec![
            kv("s", V::StringValue("héllo".into())),
            kv("b", V::BoolValue(true)),
            kv("i", V::IntValue(i64::MIN)),
            kv("d", V::DoubleValue(-0.5)),
            kv("nan", V::DoubleValue(f64::NAN)),
            kv("bytes", V::BytesValue(vec![0, 255])),
            kv("idx", V::StringValueStrindex(9)),
            kv(
                "a",
                V::ArrayValue(common::ArrayValue {
                    values: vec![
                        common::AnyValue { value: Some(V::IntValue(1)) },
                        common::AnyValue { value: None },
                    ],
                }),
            ),
            kv(
                "kv",
                V::KvlistValue(common::KeyValueList {
                    values: vec![kv("inner", V::StringValue("x".into()))],
                }),
            ),
            common::KeyValue { key: "none".into(), value: None, key_strindex: 3 },
        ],
        events: vec![trace::span::Event {
            time_unix_nano: 5,
            name: "gen_ai.choice".into(),
            attributes: vec![kv("n", V::IntValue(1))],
            dropped_attributes_count: 1,
        }],
        links: vec![trace::span::Link {
            trace_id: vec![4; 16],
            span_id: vec![5; 8],
            trace_state: "c=d".into(),
            attributes: vec![kv("l", V::BoolValue(false))],
            dropped_attributes_count: 2,
            flags: 1,
        }],
        status: Some(trace::Status { message: "boom".into(), code: 2 }),
        ..Default::default()
    };
    let req = ExportTraceServiceRequest {
        resource_spans: vec![trace::ResourceSpans {
            resource: Some(resource::Resource {
                attributes: vec![kv("service.name", V::StringValue("agent".into()))],
                dropped_attributes_count: 1,
                ..Default::default()
            }),
            scope_spans: vec![trace::ScopeSpans {
                scope: Some(common::InstrumentationScope {
                    name: "openinference".into(),
                    version: "1.0".into(),
                    ..Default::default()
                }),
                spans: vec![span.clone(), trace::Span { name: "second".into(), ..span }],
                schema_url: "https://opentelemetry.io/schemas/1.26.0".into(),
            }],
            schema_url: "x".into(),
        }],
    };
    let bytes = req.encode_to_vec();
    assert!(agree(&bytes, "every field"));
    let view = decode(&bytes).unwrap();
    let s = &view.resource_spans[0].scope_spans[0].spans[1];
    assert_eq!((s.name, s.kind, s.start_time_unix_nano), ("second", -5, u64::MAX));
    assert_eq!(s.attributes[2].value, AnyValue::Int(i64::MIN));
    assert_eq!(s.attributes[6].value, AnyValue::Empty);
    assert_eq!(s.status, Some(Status { message: "boom", code: 2 }));

    // An unknown group (field 7: a varint and a nested group) before the request.
    let mut with_group = vec![7 << 3 | 3, 1 << 3, 5, 8 << 3 | 3, 8 << 3 | 4, 7 << 3 | 4];
    with_group.extend_from_slice(&bytes);
    assert!(agree(&with_group, "unknown group"));
    // A group that never ends, and an end without a start.
    assert!(!agree(&[7 << 3 | 3, 1 << 3, 5], "open group"));
    assert!(!agree(&[7 << 3 | 4], "stray end group"));
    // Two requests back to back are one request with both lists (protobuf merge).
    let twice = [bytes.as_slice(), bytes.as_slice()].concat();
    assert!(agree(&twice, "concatenated"));
    assert_eq!(decode(&twice).unwrap().resource_spans.len(), 2);
}

#[test]
fn errors_name_the_field_and_the_problem() {
    let span = trace::Span { name: "x".into(), ..Default::default() };
    let req = ExportTraceServiceRequest {
        resource_spans: vec![trace::ResourceSpans {
            scope_spans: vec![trace::ScopeSpans { spans: vec![span], ..Default::default() }],
            ..Default::default()
        }],
    };
    let mut bytes = req.encode_to_vec();
    // The span's name is the last byte: make it a lone continuation byte.
    *bytes.last_mut().unwrap() = 0x80;
    assert_eq!(decode(&bytes).unwrap_err().to_string(), "Span.name: string is not UTF-8");
    // A length that runs past the end.
    assert_eq!(
        decode(&[0x0a, 0x05, 0x00]).unwrap_err().to_string(),
        "ExportTraceServiceRequest.resource_spans: length past the end"
    );
    // A known field sent with the wrong wire type.
    assert_eq!(
        decode(&[0x08, 0x01]).unwrap_err().to_string(),
        "ExportTraceServiceRequest.resource_spans: wrong wire type"
    );
    // A varint that never ends.
    assert_eq!(
        decode(&[0xff; 11]).unwrap_err().to_string(),
        "ExportTraceServiceRequest: invalid varint"
    );
}

#[test]
fn values_nested_past_the_limit_are_refused_not_overflowing_the_stack() {
    let mut v = common::AnyValue { value: Some(V::IntValue(1)) };
    for _ in 0..200 {
        v = common::AnyValue { value: Some(V::ArrayValue(common::ArrayValue { values: vec![v] })) };
    }
    let kv = common::KeyValue { key: "deep".into(), value: Some(v), ..Default::default() };
    let req = ExportTraceServiceRequest {
        resource_spans: vec![trace::ResourceSpans {
            resource: Some(resource::Resource { attributes: vec![kv], ..Default::default() }),
            ..Default::default()
        }],
    };
    let e = decode(&req.encode_to_vec()).unwrap_err();
    assert_eq!(e.to_string(), "AnyValue: nested too deep");
}

#[test]
fn span_lists_are_sized_from_the_first_span_but_never_past_the_request() {
    let span = |name: String| trace::Span { name, ..Default::default() };
    let req = |spans: Vec<trace::Span>| {
        ExportTraceServiceRequest {
            resource_spans: vec![trace::ResourceSpans {
                scope_spans: vec![trace::ScopeSpans { spans, ..Default::default() }],
                ..Default::default()
            }],
        }
        .encode_to_vec()
    };
    let capacity =
        |bytes: &[u8]| decode(bytes).unwrap().resource_spans[0].scope_spans[0].spans.capacity();
    // Alike spans: one allocation for all of them.
    let alike: Vec<_> = (0..1000).map(|i| span(format!("{i:0>80}"))).collect();
    let n = capacity(&req(alike));
    assert!((1000..1100).contains(&n), "{n}");
    // An empty first span before one of 1 MB: room for at most one span per 64 bytes (and 1/16).
    let bytes = req(vec![span(String::new()), span("x".repeat(1 << 20))]);
    let n = capacity(&bytes);
    let most = bytes.len() / MIN_RESERVED_SPAN_BYTES;
    assert!(n <= 1 + most + most / 16, "{n} for {} bytes", bytes.len());
}
