//! OTLP protobuf decoding and normalisation never panic, whatever the bytes; the in-place
//! decoder accepts exactly what `prost` accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spanlake_ingest::normalize::{NormalizeContext, normalize_request};

fuzz_target!(|data: &[u8]| {
    let view = spanlake_proto::decode_view(data);
    assert_eq!(view.is_ok(), spanlake_proto::decode_protobuf(data).is_ok());
    if let Ok(req) = view {
        let ctx = NormalizeContext::default();
        if let Ok(n) = normalize_request(&req, &ctx) {
            let _ = n.message();
        }
    }
});
