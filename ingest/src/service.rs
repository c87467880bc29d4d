//! The export path shared by the gRPC and HTTP receivers.

use std::sync::Arc;
use std::time::Instant;

use spanlake_engine::Engine;
use spanlake_engine::metrics::{Counter, Exposition, Histogram};
use spanlake_proto::collector::{ExportTracePartialSuccess, ExportTraceServiceResponse};

use crate::error::{Error, Result};
use crate::limits::RequestLimits;
use crate::normalize::{NormalizeContext, normalize, normalize_request};

/// Metrics of the receivers.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    /// Export requests handled.
    pub requests: Counter,
    /// Spans received in well-formed requests.
    pub spans_received: Counter,
    /// Spans accepted (durable and visible).
    pub spans_accepted: Counter,
    /// Spans rejected as invalid (OTLP partial success).
    pub spans_rejected: Counter,
    /// Spans refused because the server was overloaded or stopping (the client retries).
    pub spans_refused: Counter,
    /// Requests refused as malformed.
    pub requests_invalid: Counter,
    /// Requests refused before decoding because the memory budget was exhausted.
    pub requests_refused_early: Counter,
    /// Values truncated, attributes dropped or replaced to stay within the limits.
    pub values_cut: Counter,
    /// Time to handle an export request.
    pub export_seconds: Histogram,
}

impl IngestMetrics {
    /// Appends the receivers' metrics to an exposition.
    pub fn render(&self, e: &mut Exposition) {
        e.counter(
            "spanlake_export_requests_total",
            "OTLP export requests handled",
            self.requests.get(),
        );
        e.counter(
            "spanlake_spans_received_total",
            "Spans received in well-formed requests",
            self.spans_received.get(),
        );
        e.counter(
            "spanlake_spans_accepted_total",
            "Spans accepted (durable and visible)",
            self.spans_accepted.get(),
        );
        e.counter(
            "spanlake_spans_rejected_total",
            "Spans rejected as invalid",
            self.spans_rejected.get(),
        );
        e.counter(
            "spanlake_spans_refused_total",
            "Spans refused under overload (retryable)",
            self.spans_refused.get(),
        );
        e.counter(
            "spanlake_requests_invalid_total",
            "Export requests refused as malformed",
            self.requests_invalid.get(),
        );
        e.counter(
            "spanlake_requests_refused_early_total",
            "Export requests refused before decoding (memory budget exhausted)",
            self.requests_refused_early.get(),
        );
        e.counter(
            "spanlake_values_cut_total",
            "Values truncated or dropped to stay within limits",
            self.values_cut.get(),
        );
        e.histogram(
            "spanlake_export_duration_seconds",
            "Time to handle an export request",
            &self.export_seconds,
        );
    }
}

#[derive(Debug)]
struct Inner {
    engine: Arc<Engine>,
    context: NormalizeContext,
    limits: RequestLimits,
    metrics: Arc<IngestMetrics>,
    /// Requests being decoded and normalised at once; the rest wait holding only their bytes.
    decoding: tokio::sync::Semaphore,
}

/// Normalises export requests and stores their spans through the engine.
#[derive(Debug, Clone)]
pub struct IngestService {
    inner: Arc<Inner>,
}

/// Where a request's bytes come from, for decoding off the IO threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/x-protobuf`.
    Protobuf,
    /// `application/json` (OTLP/JSON).
    Json,
}

impl IngestService {
    /// A service storing into `engine`.
    pub fn new(
        engine: Arc<Engine>,
        context: NormalizeContext,
        limits: RequestLimits,
        metrics: Arc<IngestMetrics>,
    ) -> Self {
        let permits = limits.max_concurrent_decodes.max(1);
        Self {
            inner: Arc::new(Inner {
                engine,
                context,
                limits,
                metrics,
                decoding: tokio::sync::Semaphore::new(permits),
            }),
        }
    }

    /// The request limits in force.
    pub fn limits(&self) -> &RequestLimits {
        &self.inner.limits
    }

    /// The receivers' metrics.
    pub fn metrics(&self) -> &Arc<IngestMetrics> {
        &self.inner.metrics
    }

    /// Decodes and exports a request body (already decompressed).
    pub async fn export_bytes(
        &self,
        project: Arc<str>,
        body: bytes::Bytes,
        encoding: Encoding,
    ) -> Result<ExportTraceServiceResponse> {
        let started = Instant::now();
        let _permit = self.admit().await?;
        let inner = Arc::clone(&self.inner);
        let project_name = Arc::clone(&project);
        let normalized = spanlake_engine::on_cpu(move || -> Result<_> {
            let redactor = inner.context.redactor.as_ref();
            if encoding == Encoding::Protobuf && redactor.is_none() {
                // The common case: spans read in place from the received bytes.
                let req = spanlake_proto::decode_view(&body)?;
                return Ok(normalize_request(&req, &inner.context)?);
            }
            let mut req = match encoding {
                Encoding::Protobuf => spanlake_proto::decode_protobuf(&body)?,
                Encoding::Json => spanlake_proto::decode_json(&body)?,
            };
            if let Some(r) = redactor {
                r.apply(&project_name, &mut req);
            }
            normalize(&req, &inner.context)
        })
        .await
        .map_err(Error::Engine)?;
        let normalized = match normalized {
            Ok(n) => n,
            Err(e) => {
                self.count_invalid();
                return Err(e);
            }
        };
        self.store(project, normalized, started).await
    }

    async fn store(
        &self,
        project: Arc<str>,
        normalized: crate::normalize::Normalized,
        started: Instant,
    ) -> Result<ExportTraceServiceResponse> {
        let m = &self.inner.metrics;
        let accepted = normalized.batch.num_rows() as u64;
        m.spans_received.add(accepted + normalized.rejected);
        m.spans_rejected.add(normalized.rejected);
        let c = normalized.cuts;
        m.values_cut.add(
            c.truncated_values
                + c.dropped_attributes
                + c.too_deep
                + normalized.dropped_events_links,
        );
        let message = normalized.message();
        if let Err(e) = self.inner.engine.ingest(project, normalized.batch).await {
            m.spans_refused.add(accepted);
            return Err(e.into());
        }
        m.spans_accepted.add(accepted);
        m.export_seconds.observe(started.elapsed());
        let partial_success =
            (normalized.rejected > 0 || !message.is_empty()).then_some(ExportTracePartialSuccess {
                rejected_spans: normalized.rejected as i64,
                error_message: message,
            });
        Ok(ExportTraceServiceResponse { partial_success })
    }

    /// Counts a request and waits for a decoding slot; refuses it at once, before any decoding,
    /// while the memory budget is exhausted (also after the wait).
    async fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.inner.metrics.requests.add(1);
        self.refuse_when_full()?;
        let permit = self
            .inner
            .decoding
            .acquire()
            .await
            .map_err(|_| spanlake_engine::Error::ShuttingDown)?;
        self.refuse_when_full()?;
        Ok(permit)
    }

    /// Refuses a request at once, before decoding it, while the memory budget is exhausted.
    fn refuse_when_full(&self) -> Result<()> {
        self.inner.engine.admit().map_err(|e| {
            self.inner.metrics.requests_refused_early.add(1);
            e.into()
        })
    }

    /// Counts a malformed request.
    pub fn count_invalid(&self) {
        self.inner.metrics.requests_invalid.add(1);
    }
}
