//! Arrow record batches of the `spans` schema, built column by column from [`SpanRecord`]s.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float64Builder, Int64Builder, RecordBatch, StringBuilder, TimestampNanosecondBuilder,
};

use crate::error::{Error, Result};
use crate::record::{SpanRecord, hex_into};
use crate::schema::spans_schema;

/// Builds one `RecordBatch` of the `spans` schema.
#[derive(Debug)]
pub struct SpanBatchBuilder {
    trace_id: StringBuilder,
    span_id: StringBuilder,
    parent_span_id: StringBuilder,
    trace_state: StringBuilder,
    name: StringBuilder,
    kind: StringBuilder,
    service_name: StringBuilder,
    start_time: TimestampNanosecondBuilder,
    end_time: TimestampNanosecondBuilder,
    duration_ms: Float64Builder,
    status_code: StringBuilder,
    status_message: StringBuilder,
    span_type: StringBuilder,
    provider: StringBuilder,
    model: StringBuilder,
    input_tokens: Int64Builder,
    output_tokens: Int64Builder,
    total_tokens: Int64Builder,
    cost_usd: Float64Builder,
    tool_name: StringBuilder,
    agent_name: StringBuilder,
    session_id: StringBuilder,
    user_id: StringBuilder,
    input: StringBuilder,
    output: StringBuilder,
    attributes: StringBuilder,
    resource_attributes: StringBuilder,
    events: StringBuilder,
    links: StringBuilder,
    scope: StringBuilder,
    rows: usize,
}

/// Bytes of text expected in the large columns of a batch, so that their buffers are allocated
/// once instead of doubling (each doubling copies everything written so far).
#[derive(Debug, Clone, Copy, Default)]
pub struct TextCapacity {
    /// `attributes` (JSON text).
    pub attributes: usize,
    /// `input` (prompts, tool arguments).
    pub input: usize,
    /// `output` (completions, tool results).
    pub output: usize,
    /// `events` (JSON text).
    pub events: usize,
}

impl SpanBatchBuilder {
    /// A builder with room for `rows` rows.
    pub fn with_capacity(rows: usize) -> Self {
        Self::with_text_capacity(rows, TextCapacity::default())
    }

    /// A builder with room for `rows` rows and at least `text` bytes in the large columns.
    pub fn with_text_capacity(rows: usize, text: TextCapacity) -> Self {
        let s = |bytes_per_row: usize| StringBuilder::with_capacity(rows, rows * bytes_per_row);
        let big = |bytes: usize, bytes_per_row: usize| {
            StringBuilder::with_capacity(rows, bytes.max(rows * bytes_per_row))
        };
        let t = || TimestampNanosecondBuilder::with_capacity(rows).with_timezone("UTC");
        Self {
            trace_id: s(32),
            span_id: s(16),
            parent_span_id: s(16),
            trace_state: s(0),
            name: s(16),
            kind: s(8),
            service_name: s(8),
            start_time: t(),
            end_time: t(),
            duration_ms: Float64Builder::with_capacity(rows),
            status_code: s(5),
            status_message: s(0),
            span_type: s(5),
            provider: s(0),
            model: s(0),
            input_tokens: Int64Builder::with_capacity(rows),
            output_tokens: Int64Builder::with_capacity(rows),
            total_tokens: Int64Builder::with_capacity(rows),
            cost_usd: Float64Builder::with_capacity(rows),
            tool_name: s(0),
            agent_name: s(0),
            session_id: s(0),
            user_id: s(0),
            input: big(text.input, 0),
            output: big(text.output, 0),
            attributes: big(text.attributes, 64),
            resource_attributes: s(32),
            events: big(text.events, 2),
            links: s(2),
            scope: s(16),
            rows: 0,
        }
    }

    /// Rows appended so far.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no row was appended.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends one row.
    pub fn append(&mut self, r: &SpanRecord<'_>) {
        let mut hex = [0u8; 32];
        self.trace_id.append_value(hex_into(&r.trace_id, &mut hex));
        self.span_id.append_value(hex_into(&r.span_id, &mut hex[..16]));
        match &r.parent_span_id {
            Some(p) => self.parent_span_id.append_value(hex_into(p, &mut hex[..16])),
            None => self.parent_span_id.append_null(),
        }
        non_empty(&mut self.trace_state, r.trace_state);
        self.name.append_value(r.name);
        self.kind.append_value(r.kind);
        self.service_name.append_option(r.service_name);
        self.start_time.append_value(r.start_time_ns);
        self.end_time.append_value(r.end_time_ns);
        self.duration_ms.append_value(r.duration_ms());
        self.status_code.append_value(r.status_code);
        non_empty(&mut self.status_message, r.status_message);
        self.span_type.append_value(r.span_type);
        self.provider.append_option(r.provider);
        self.model.append_option(r.model);
        self.input_tokens.append_option(r.input_tokens);
        self.output_tokens.append_option(r.output_tokens);
        self.total_tokens.append_option(r.total_tokens);
        self.cost_usd.append_option(r.cost_usd);
        self.tool_name.append_option(r.tool_name);
        self.agent_name.append_option(r.agent_name);
        self.session_id.append_option(r.session_id);
        self.user_id.append_option(r.user_id);
        self.input.append_option(r.input);
        self.output.append_option(r.output);
        self.attributes.append_value(r.attributes);
        self.resource_attributes.append_value(r.resource_attributes);
        self.events.append_value(r.events);
        self.links.append_value(r.links);
        self.scope.append_value(r.scope);
        self.rows += 1;
    }

    /// The batch of every row appended; the builder is empty afterwards.
    pub fn finish(&mut self) -> Result<RecordBatch> {
        self.rows = 0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.trace_id.finish()),
            Arc::new(self.span_id.finish()),
            Arc::new(self.parent_span_id.finish()),
            Arc::new(self.trace_state.finish()),
            Arc::new(self.name.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.service_name.finish()),
            Arc::new(self.start_time.finish()),
            Arc::new(self.end_time.finish()),
            Arc::new(self.duration_ms.finish()),
            Arc::new(self.status_code.finish()),
            Arc::new(self.status_message.finish()),
            Arc::new(self.span_type.finish()),
            Arc::new(self.provider.finish()),
            Arc::new(self.model.finish()),
            Arc::new(self.input_tokens.finish()),
            Arc::new(self.output_tokens.finish()),
            Arc::new(self.total_tokens.finish()),
            Arc::new(self.cost_usd.finish()),
            Arc::new(self.tool_name.finish()),
            Arc::new(self.agent_name.finish()),
            Arc::new(self.session_id.finish()),
            Arc::new(self.user_id.finish()),
            Arc::new(self.input.finish()),
            Arc::new(self.output.finish()),
            Arc::new(self.attributes.finish()),
            Arc::new(self.resource_attributes.finish()),
            Arc::new(self.events.finish()),
            Arc::new(self.links.finish()),
            Arc::new(self.scope.finish()),
        ];
        RecordBatch::try_new(spans_schema(), columns).map_err(|source| Error::Arrow { source })
    }
}

fn non_empty(b: &mut StringBuilder, s: &str) {
    if s.is_empty() { b.append_null() } else { b.append_value(s) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{kind, span_type, status};
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, Int64Type};

    #[test]
    fn builds_all_columns() {
        let mut b = SpanBatchBuilder::with_capacity(2);
        b.append(&SpanRecord {
            trace_id: [0xab; 16],
            span_id: [0x01; 8],
            parent_span_id: Some([0x02; 8]),
            name: "chat",
            kind: kind::CLIENT,
            start_time_ns: 1_000_000,
            end_time_ns: 3_500_000,
            status_code: status::OK,
            span_type: span_type::LLM,
            input_tokens: Some(7),
            attributes: "{}",
            ..Default::default()
        });
        b.append(&SpanRecord { attributes: "{\"a\":1}", ..Default::default() });
        assert_eq!(b.len(), 2);
        let batch = b.finish().unwrap();
        assert!(b.is_empty());
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.num_columns(), spans_schema().fields().len());
        let ids = batch.column_by_name("trace_id").unwrap().as_string::<i32>();
        assert_eq!(ids.value(0), "ab".repeat(16));
        let parents = batch.column_by_name("parent_span_id").unwrap().as_string::<i32>();
        assert_eq!(parents.value(0), "0202020202020202");
        assert!(parents.is_null(1));
        let tokens = batch.column_by_name("input_tokens").unwrap().as_primitive::<Int64Type>();
        assert_eq!(tokens.value(0), 7);
        assert!(tokens.is_null(1));
        let dur = batch.column_by_name("duration_ms").unwrap().as_primitive::<Float64Type>();
        assert_eq!(dur.value(0), 2.5);
        assert!(batch.column_by_name("trace_state").unwrap().is_null(0));
    }
}
