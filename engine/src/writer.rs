//! Parquet encoding of span batches.
//!
//! Each flush writes one file per (project, hour) partition. Rows are sorted by
//! `(trace_id, start_time)`: the spans of a trace sit together, so a lookup by trace id reads
//! one page of each column (page index) and the id columns compress well; `trace_id` also
//! carries a bloom filter so that files and row groups without the trace are skipped. Time
//! ranges prune by partition and by the file statistics in the catalog.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use arrow::datatypes::TimestampNanosecondType;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::catalog::DataFile;
use crate::error::{Error, Result};
use crate::layout::HourPartition;
use crate::schema::{col, spans_schema};
use crate::trace_index::TraceFilter;

/// How Parquet files are written.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// zstd level (1–22).
    pub zstd_level: i32,
    /// zstd level of the large text columns (prompts, completions, attributes, events) in
    /// files written by flushes, which are on the ingest path; compaction rewrites them at
    /// `zstd_level`. Level 1 compresses this text about twice as fast as level 3.
    pub flush_text_zstd_level: i32,
    /// Rows per row group.
    pub row_group_rows: usize,
    /// Rows per data page (smaller pages make lookups by trace id read less).
    pub page_rows: usize,
    /// False-positive rate of the `trace_id` bloom filter.
    pub bloom_fpp: f64,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            zstd_level: 3,
            flush_text_zstd_level: 1,
            row_group_rows: 256 * 1024,
            page_rows: 8 * 1024,
            bloom_fpp: 0.01,
        }
    }
}

/// One encoded file, ready to put.
#[derive(Debug)]
pub struct EncodedFile {
    /// The Parquet bytes.
    pub bytes: Bytes,
    /// Its catalog entry.
    pub meta: DataFile,
    /// Repeated spans dropped.
    pub duplicates: usize,
    /// Its trace filter (see [`crate::trace_index`]).
    pub trace_filter: TraceFilter,
}

/// The partition key of a file: project and hour.
pub type PartitionKey = (Arc<str>, HourPartition);

/// Splits batches by project and hour partition of `start_time`.
pub fn split_by_partition<'a>(
    batches: impl IntoIterator<Item = (&'a Arc<str>, &'a RecordBatch)>,
) -> Result<BTreeMap<PartitionKey, Vec<RecordBatch>>> {
    let mut out: BTreeMap<PartitionKey, Vec<RecordBatch>> = BTreeMap::new();
    for (project, batch) in batches {
        let times = start_times(batch);
        let first = times.first().map(|t| HourPartition::of_ns(*t));
        if let Some(p) = first
            && times.iter().all(|t| HourPartition::of_ns(*t) == p)
        {
            out.entry((Arc::clone(project), p)).or_default().push(batch.clone());
            continue;
        }
        let mut groups: BTreeMap<HourPartition, Vec<u32>> = BTreeMap::new();
        for (i, t) in times.iter().enumerate() {
            groups.entry(HourPartition::of_ns(*t)).or_default().push(i as u32);
        }
        for (p, idx) in groups {
            let taken = take_record_batch(batch, &UInt32Array::from(idx))
                .map_err(|source| Error::Arrow { source })?;
            out.entry((Arc::clone(project), p)).or_default().push(taken);
        }
    }
    Ok(out)
}

fn start_times(batch: &RecordBatch) -> &[i64] {
    batch
        .column_by_name(col::START_TIME)
        .map(|c| c.as_primitive::<TimestampNanosecondType>().values().as_ref())
        .unwrap_or_default()
}

/// Sorts `batches` by `(trace_id, start_time, span_id)` into one batch, dropping exact
/// repeats of a span (same trace id, span id and start time: a client that re-sent a request
/// whose acknowledgement it lost). Returns the batch and how many repeats were dropped.
pub fn sort_for_storage(batches: &[RecordBatch]) -> Result<(RecordBatch, usize)> {
    let arrow_err = |source| Error::Arrow { source };
    let batch = concat_batches(&spans_schema(), batches).map_err(arrow_err)?;
    let column = |name: &str| Arc::clone(batch.column_by_name(name).expect("spans schema column"));
    let order = lexsort_to_indices(
        &[
            SortColumn { values: column(col::TRACE_ID), options: None },
            SortColumn { values: column(col::START_TIME), options: None },
            SortColumn { values: column(col::SPAN_ID), options: None },
        ],
        None,
    )
    .map_err(arrow_err)?;
    let sorted = take_record_batch(&batch, &order).map_err(arrow_err)?;
    let traces = sorted.column_by_name(col::TRACE_ID).expect("trace_id").as_string::<i32>();
    let spans = sorted.column_by_name(col::SPAN_ID).expect("span_id").as_string::<i32>();
    let starts = start_times(&sorted);
    let keep: Vec<u32> = (0..sorted.num_rows())
        .filter(|&i| {
            i == 0
                || traces.value(i) != traces.value(i - 1)
                || spans.value(i) != spans.value(i - 1)
                || starts[i] != starts[i - 1]
        })
        .map(|i| i as u32)
        .collect();
    let dropped = sorted.num_rows() - keep.len();
    if dropped == 0 {
        return Ok((sorted, 0));
    }
    let deduped = take_record_batch(&sorted, &UInt32Array::from(keep)).map_err(arrow_err)?;
    Ok((deduped, dropped))
}

/// Encodings chosen per column for files sorted by trace id. Bytes per generated small span:
/// files written with every column dictionary-encoded (10 M spans) → one of those files
/// (473,146 spans) rewritten with these encodings (BENCHMARKS.md, fifth session):
///
/// * ids: `DELTA_BYTE_ARRAY`. Span ids are unique, so a dictionary only adds an index per row
///   (`span_id` 10.7 → 9.4); sorted trace ids share prefixes (`trace_id` 1.95 → 1.72,
///   `parent_span_id` 1.21 → 0.97).
/// * `start_time`: `DELTA_BINARY_PACKED`. Within a trace start times rise, so deltas are small
///   (4.7 → 0.95).
/// * `end_time`: `BYTE_STREAM_SPLIT` (5.2 → 3.9): not monotonic, but its high bytes repeat.
/// * `duration_ms`: `PLAIN` (7.4 → 6.6): nearly every value is distinct.
///
/// All are standard Parquet encodings that DuckDB, Spark and Trino read.
const COLUMN_ENCODINGS: [(&str, Encoding); 6] = [
    (col::SPAN_ID, Encoding::DELTA_BYTE_ARRAY),
    (col::PARENT_SPAN_ID, Encoding::DELTA_BYTE_ARRAY),
    (col::TRACE_ID, Encoding::DELTA_BYTE_ARRAY),
    (col::START_TIME, Encoding::DELTA_BINARY_PACKED),
    (col::END_TIME, Encoding::BYTE_STREAM_SPLIT),
    (col::DURATION_MS, Encoding::PLAIN),
];

fn with_column_encodings(
    mut props: parquet::file::properties::WriterPropertiesBuilder,
) -> parquet::file::properties::WriterPropertiesBuilder {
    for (column, encoding) in COLUMN_ENCODINGS {
        let path = ColumnPath::from(column);
        props = props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_encoding(path, encoding);
    }
    props
}

/// Encodes the rows of one partition as a sorted, zstd-compressed Parquet file.
pub fn encode_file(
    project: &str,
    partition: HourPartition,
    batches: &[RecordBatch],
    level: u8,
    config: &WriterConfig,
) -> Result<EncodedFile> {
    let (batch, duplicates) = sort_for_storage(batches)?;
    let mut file = encode_sorted(project, partition, &batch, level, config)?;
    file.duplicates = duplicates;
    Ok(file)
}

/// Splits a batch sorted by trace id into slices of about `max_rows` rows, cut only between
/// traces (a trace larger than `max_rows` stays whole).
pub fn split_at_traces(batch: &RecordBatch, max_rows: usize) -> Vec<RecordBatch> {
    let n = batch.num_rows();
    let max_rows = max_rows.max(1);
    if n <= max_rows {
        return vec![batch.clone()];
    }
    let ids = batch.column_by_name(col::TRACE_ID).expect("trace_id").as_string::<i32>();
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = (start + max_rows).min(n);
        while end < n && ids.value(end) == ids.value(end - 1) {
            end += 1;
        }
        out.push(batch.slice(start, end - start));
        start = end;
    }
    out
}

/// Encodes rows already sorted by [`sort_for_storage`] as one Parquet file, with its trace
/// filter.
pub fn encode_sorted(
    project: &str,
    partition: HourPartition,
    batch: &RecordBatch,
    level: u8,
    config: &WriterConfig,
) -> Result<EncodedFile> {
    let path = partition.new_file_path(project);
    let parquet_err = |source| Error::Parquet { path: path.clone(), source };
    let rows = batch.num_rows() as u64;
    let times = start_times(batch);
    let min_start_ns = times.iter().copied().min().unwrap_or(0);
    let max_start_ns = times.iter().copied().max().unwrap_or(0);
    let ids = batch.column_by_name(col::TRACE_ID).expect("trace_id").as_string::<i32>();
    let (min_trace_id, max_trace_id) = match ids.len() {
        0 => (String::new(), String::new()),
        n => (ids.value(0).to_string(), ids.value(n - 1).to_string()),
    };
    // Sorted by trace id: distinct ids are where the value changes.
    let traces = (0..ids.len()).filter(|&i| i == 0 || ids.value(i) != ids.value(i - 1)).count();
    let trace_filter = TraceFilter::build(ids.iter().flatten(), traces);
    let mem_bytes = batch.get_array_memory_size() as u64;

    let zstd = ZstdLevel::try_new(config.zstd_level).map_err(parquet_err)?;
    let trace_id = ColumnPath::from(col::TRACE_ID);
    let mut props = WriterProperties::builder().set_compression(Compression::ZSTD(zstd));
    if level == 0 && config.flush_text_zstd_level != config.zstd_level {
        let text = Compression::ZSTD(
            ZstdLevel::try_new(config.flush_text_zstd_level).map_err(parquet_err)?,
        );
        for c in [col::INPUT, col::OUTPUT, col::ATTRIBUTES, col::EVENTS] {
            props = props.set_column_compression(ColumnPath::from(c), text);
        }
    }
    let props = with_column_encodings(props)
        .set_max_row_group_row_count(Some(config.row_group_rows.max(1)))
        .set_data_page_row_count_limit(config.page_rows.max(1))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_column_bloom_filter_enabled(trace_id.clone(), true)
        .set_column_bloom_filter_fpp(trace_id.clone(), config.bloom_fpp)
        .set_column_bloom_filter_max_ndv(trace_id, (traces as u64).max(1))
        .build();
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() / 4);
    let mut writer = ArrowWriter::try_new(&mut buf, Arc::clone(batch.schema_ref()), Some(props))
        .map_err(parquet_err)?;
    writer.write(batch).map_err(parquet_err)?;
    writer.close().map_err(parquet_err)?;
    let meta = DataFile {
        path: path.to_string(),
        project: project.to_string(),
        hour: partition.epoch_hour,
        size: buf.len() as u64,
        rows,
        min_start_ns,
        max_start_ns,
        min_trace_id,
        max_trace_id,
        trace_id_bloom: true,
        traces: traces as u64,
        mem_bytes,
        trace_index: true,
        level,
        created_ms: chrono::Utc::now().timestamp_millis(),
    };
    Ok(EncodedFile { bytes: Bytes::from(buf), meta, duplicates: 0, trace_filter })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SpanBatchBuilder;
    use crate::record::SpanRecord;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    #[test]
    fn files_use_the_chosen_encodings_and_read_back_unchanged() {
        let mut b = SpanBatchBuilder::with_capacity(300);
        let hour_ns = 1_800_000 * 3_600_000_000_000i64;
        for i in 0..300u32 {
            let t = (i / 10) as u8;
            b.append(&SpanRecord {
                trace_id: [t; 16],
                span_id: u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes(),
                parent_span_id: (i % 10 != 0).then_some([t; 8]),
                name: "step",
                start_time_ns: hour_ns + i64::from(i) * 1_000,
                end_time_ns: hour_ns + i64::from(i) * 1_000 + i64::from(i % 7) * 333_333,
                attributes: "{}",
                ..Default::default()
            });
        }
        let batch = b.finish().unwrap();
        let partition = HourPartition::of_ns(hour_ns);
        let file =
            encode_file("p", partition, std::slice::from_ref(&batch), 0, &WriterConfig::default())
                .unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file.bytes.clone()).unwrap();
        let meta = reader.metadata().clone();
        let chunk = |name: &str| {
            let rg = meta.row_group(0);
            (0..rg.num_columns())
                .map(|i| rg.column(i))
                .find(|c| c.column_path().string() == name)
                .unwrap()
                .encodings()
                .collect::<Vec<_>>()
        };
        for (name, encoding) in COLUMN_ENCODINGS {
            let used = chunk(name);
            assert!(used.contains(&encoding), "{name}: {used:?}");
            assert!(!used.contains(&Encoding::RLE_DICTIONARY), "{name}: {used:?}");
        }
        assert!(chunk(col::NAME).contains(&Encoding::RLE_DICTIONARY));
        let read: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
        let read = concat_batches(&spans_schema(), &read).unwrap();
        let (sorted, _) = sort_for_storage(&[batch]).unwrap();
        assert_eq!(read, sorted);
    }
}
