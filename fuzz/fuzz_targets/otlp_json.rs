//! OTLP/JSON decoding and normalisation never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spanlake_ingest::normalize::{NormalizeContext, normalize};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = spanlake_proto::decode_json(data) {
        let ctx = NormalizeContext::default();
        if let Ok(n) = normalize(&req, &ctx) {
            let _ = n.message();
        }
    }
});
