//! Limits on what one request and one span may carry.
//!
//! | limit | default | over it |
//! |---|---|---|
//! | `max_request_bytes` | 16 MiB | HTTP 413 / gRPC `RESOURCE_EXHAUSTED`; nothing is read past it |
//! | `max_decompressed_bytes` | 64 MiB | HTTP 413 / gRPC `RESOURCE_EXHAUSTED`; decompression stops at the cap, so a gzip bomb is never inflated |
//! | `max_spans_per_request` | 100 000 | the spans past it are rejected (OTLP partial success names the count) |
//! | `max_concurrent_decodes` | 2 × cores | further requests wait for a slot holding only their body bytes |
//! | `max_attributes` | 256 per span (and per nested map) | the attributes past it are dropped; the answer carries a warning |
//! | `max_value_bytes` | 128 KiB | the string is cut on a character boundary and ends with `…[truncated: KEPT of ORIGINAL bytes]`; ids, timing, model and token counts are never cut |
//! | `max_depth` | 8 | a deeper array or map is replaced by the string `[nesting deeper than N levels]` |
//! | `max_events` / `max_links` | 128 / 128 per span | the ones past it are dropped; the answer carries a warning |
//! | `max_future_skew` | 1 day | a span starting further in the future than this is rejected |
//!
//! Nothing over a limit crashes or stalls the server, and the valid spans of a request are
//! always kept.

use std::time::Duration;

/// Limits on one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLimits {
    /// Largest request body as sent (compressed), in bytes.
    pub max_request_bytes: usize,
    /// Largest request body after decompression, in bytes.
    pub max_decompressed_bytes: usize,
    /// Most spans one request may carry; those past it are rejected.
    pub max_spans_per_request: usize,
    /// Requests decoded and normalised at once; others wait with only their body in memory.
    pub max_concurrent_decodes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_request_bytes: 16 << 20,
            max_decompressed_bytes: 64 << 20,
            max_spans_per_request: 100_000,
            max_concurrent_decodes: 2 * std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// Limits on one span.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanLimits {
    /// Attributes per span (and per nested key-value list).
    pub max_attributes: usize,
    /// Bytes of one string value (attributes, input, output).
    pub max_value_bytes: usize,
    /// Nesting depth of array and key-value list values.
    pub max_depth: usize,
    /// Events per span.
    pub max_events: usize,
    /// Links per span.
    pub max_links: usize,
    /// How far in the future a span may start.
    pub max_future_skew: Duration,
}

impl Default for SpanLimits {
    fn default() -> Self {
        Self {
            max_attributes: 256,
            max_value_bytes: 128 << 10,
            max_depth: 8,
            max_events: 128,
            max_links: 128,
            max_future_skew: Duration::from_secs(24 * 3600),
        }
    }
}
