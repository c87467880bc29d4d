//! One normalised span, borrowed from the request it came in.
//!
//! Receivers fill a [`SpanRecord`] with references into the decoded request and into their own
//! scratch buffers, and append it to a [`crate::batch::SpanBatchBuilder`]; nothing is copied
//! twice and no per-span heap allocation is needed.

/// Span kinds as stored in the `kind` column.
pub mod kind {
    #![allow(missing_docs)]
    pub const INTERNAL: &str = "internal";
    pub const SERVER: &str = "server";
    pub const CLIENT: &str = "client";
    pub const PRODUCER: &str = "producer";
    pub const CONSUMER: &str = "consumer";
}

/// Status codes as stored in the `status_code` column.
pub mod status {
    #![allow(missing_docs)]
    pub const UNSET: &str = "unset";
    pub const OK: &str = "ok";
    pub const ERROR: &str = "error";
}

/// Span types as stored in the `span_type` column.
pub mod span_type {
    #![allow(missing_docs)]
    pub const LLM: &str = "llm";
    pub const TOOL: &str = "tool";
    pub const AGENT: &str = "agent";
    pub const RETRIEVAL: &str = "retrieval";
    pub const EMBEDDING: &str = "embedding";
    pub const CHAIN: &str = "chain";
    pub const OTHER: &str = "other";
}

/// A span as the receivers hand it to the engine: one future row of the `spans` table.
///
/// Times are nanoseconds since the Unix epoch. The JSON fields hold JSON text as described in
/// [`crate::schema`]. An empty `trace_state` or `status_message` is stored as null.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[allow(missing_docs)]
pub struct SpanRecord<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub trace_state: &'a str,
    pub name: &'a str,
    pub kind: &'static str,
    pub service_name: Option<&'a str>,
    pub start_time_ns: i64,
    pub end_time_ns: i64,
    pub status_code: &'static str,
    pub status_message: &'a str,
    pub span_type: &'static str,
    pub provider: Option<&'a str>,
    pub model: Option<&'a str>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    pub cost_usd: Option<f64>,
    pub tool_name: Option<&'a str>,
    pub agent_name: Option<&'a str>,
    pub session_id: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub input: Option<&'a str>,
    pub output: Option<&'a str>,
    pub attributes: &'a str,
    pub resource_attributes: &'a str,
    pub events: &'a str,
    pub links: &'a str,
    pub scope: &'a str,
}

impl SpanRecord<'_> {
    /// Duration in milliseconds (0 when the end precedes the start).
    pub fn duration_ms(&self) -> f64 {
        let ns = self.end_time_ns.saturating_sub(self.start_time_ns).max(0);
        ns as f64 / 1e6
    }
}

/// Lowercase hex of `bytes` into `out`, which must be twice as long.
pub fn hex_into<'b>(bytes: &[u8], out: &'b mut [u8]) -> &'b str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    debug_assert_eq!(out.len(), bytes.len() * 2);
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[(b >> 4) as usize];
        out[2 * i + 1] = DIGITS[(b & 0xf) as usize];
    }
    // Only ASCII hex digits were written.
    std::str::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase() {
        let mut buf = [0u8; 8];
        assert_eq!(hex_into(&[0x01, 0xab, 0xff, 0x00], &mut buf), "01abff00");
    }

    #[test]
    fn negative_durations_are_zero() {
        let r = SpanRecord { start_time_ns: 10, end_time_ns: 5, ..Default::default() };
        assert_eq!(r.duration_ms(), 0.0);
        let r =
            SpanRecord { start_time_ns: 1_000_000, end_time_ns: 3_500_000, ..Default::default() };
        assert_eq!(r.duration_ms(), 2.5);
    }
}
