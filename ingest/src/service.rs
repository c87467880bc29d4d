//! The export path shared by the gRPC and HTTP receivers.

use std::sync::Arc;
use std::time::Instant;

use spanlake_engine::metrics::{Counter, EngineMetrics, Exposition, Histogram};
use spanlake_engine::pipeline::Pipeline;
use spanlake_engine::pricing::PriceTable;
use spanlake_proto::collector::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};

use crate::error::Result;
use crate::normalize::normalize;

/// Receiver limits.
#[derive(Debug, Clone)]
pub struct IngestLimits {
    /// Largest request body accepted, as sent (compressed) and after decompression, in bytes.
    pub max_request_bytes: usize,
}

impl Default for IngestLimits {
    fn default() -> Self {
        Self { max_request_bytes: 16 << 20 }
    }
}

/// Metrics of the receivers.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    /// Spans received in well-formed requests.
    pub spans_received: Counter,
    /// Spans accepted (admitted to the buffer).
    pub spans_accepted: Counter,
    /// Spans rejected as invalid (OTLP partial success).
    pub spans_rejected: Counter,
    /// Spans refused because the server was overloaded or stopping (client retries).
    pub spans_refused: Counter,
    /// Requests refused as malformed.
    pub requests_invalid: Counter,
    /// Time to handle an export request.
    pub export_seconds: Histogram,
}

impl IngestMetrics {
    /// Appends the receivers' metrics to an exposition.
    pub fn render(&self, e: &mut Exposition) {
        e.counter("spanlake_spans_received_total", "Spans received in well-formed requests", self.spans_received.get());
        e.counter("spanlake_spans_accepted_total", "Spans accepted into the buffer", self.spans_accepted.get());
        e.counter("spanlake_spans_rejected_total", "Spans rejected as invalid", self.spans_rejected.get());
        e.counter("spanlake_spans_refused_total", "Spans refused under overload (retryable)", self.spans_refused.get());
        e.counter("spanlake_requests_invalid_total", "Export requests refused as malformed", self.requests_invalid.get());
        e.histogram("spanlake_export_duration_seconds", "Time to handle an export request", &self.export_seconds);
    }
}

#[derive(Debug)]
struct Inner {
    pipeline: Arc<Pipeline>,
    prices: Arc<PriceTable>,
    metrics: Arc<IngestMetrics>,
    limits: IngestLimits,
}

/// Normalises export requests and admits their rows to the engine.
#[derive(Debug, Clone)]
pub struct IngestService {
    inner: Arc<Inner>,
}

impl IngestService {
    /// A service feeding `pipeline`.
    pub fn new(
        pipeline: Arc<Pipeline>,
        prices: Arc<PriceTable>,
        metrics: Arc<IngestMetrics>,
        limits: IngestLimits,
    ) -> Self {
        Self { inner: Arc::new(Inner { pipeline, prices, metrics, limits }) }
    }

    /// The limits in force.
    pub fn limits(&self) -> &IngestLimits {
        &self.inner.limits
    }

    /// The receivers' metrics.
    pub fn metrics(&self) -> &IngestMetrics {
        &self.inner.metrics
    }

    /// The engine's metrics are not owned here; this renders only the receivers'.
    pub fn render_metrics(&self, e: &mut Exposition, engine: &EngineMetrics) {
        self.inner.metrics.render(e);
        engine.render(e);
    }

    /// Handles one export: valid spans are admitted, invalid ones reported as partial success.
    /// Nothing is admitted when the engine refuses the request (overload, shutdown).
    pub fn export(&self, req: &ExportTraceServiceRequest) -> Result<ExportTraceServiceResponse> {
        let started = Instant::now();
        let m = &self.inner.metrics;
        let normalized = normalize(req, &self.inner.prices);
        let accepted = normalized.rows.len() as u64;
        m.spans_received.add(accepted + normalized.rejected);
        m.spans_rejected.add(normalized.rejected);
        let message = normalized.error_message();
        if let Err(e) = self.inner.pipeline.ingest(normalized.rows) {
            m.spans_refused.add(accepted);
            return Err(e.into());
        }
        m.spans_accepted.add(accepted);
        m.export_seconds.observe(started.elapsed());
        let partial_success = (normalized.rejected > 0).then(|| ExportTracePartialSuccess {
            rejected_spans: normalized.rejected as i64,
            error_message: message,
        });
        Ok(ExportTraceServiceResponse { partial_success })
    }

    /// Counts a malformed request.
    pub fn count_invalid(&self) {
        self.inner.metrics.requests_invalid.add(1);
    }
}
