//! Parquet encoding of span batches.
//!
//! Each flush writes one file per (project, hour) partition. Rows are sorted by
//! `(trace_id, start_time)`: the spans of a trace sit together, so a lookup by trace id reads
//! one page of each column (page index) and the id columns compress well; `trace_id` also
//! carries a bloom filter so that files and row groups without the trace are skipped. Time
//! ranges prune by partition and by the file statistics in the catalog.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::{
    Array, ArrayData, ArrayRef, AsArray, Capacities, MutableArrayData, RecordBatch, UInt32Array,
    make_array,
};
use arrow::compute::{
    SortColumn, concat_batches, interleave, lexsort_to_indices, take_record_batch,
};
use arrow::datatypes::TimestampNanosecondType;
use arrow::error::ArrowError;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_writer::{ArrowColumnChunk, compute_leaves};
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
    /// Largest data page of the text columns (prompts, completions, attributes, events), in
    /// uncompressed bytes. A lookup by trace id decompresses the whole page that holds the
    /// trace's rows, after the column chunk's whole dictionary page: at 1 MiB for both (the
    /// Parquet defaults) these columns were two thirds of a lookup. Both are capped at this.
    /// Smaller pages compress worse: at 128 KiB an LLM span took 6.6 % more disk and a small
    /// span 0.6 B more (29.4 B, against the 30 B target), hence 256 KiB (BENCHMARKS.md).
    pub text_page_bytes: usize,
    /// False-positive rate of the `trace_id` bloom filter.
    pub bloom_fpp: f64,
    /// Threads a flush or compaction gathers and encodes columns on (default: one per core).
    pub encode_threads: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            zstd_level: 3,
            flush_text_zstd_level: 1,
            row_group_rows: 256 * 1024,
            page_rows: 8 * 1024,
            text_page_bytes: 256 * 1024,
            bloom_fpp: 0.01,
            encode_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
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

/// Encodes rows of any projects and hours as one sorted file per (project, hour partition of
/// `start_time`), dropping exact repeats of a span (see [`sort_for_storage`]).
pub fn encode_partitions<'a>(
    batches: impl IntoIterator<Item = (&'a Arc<str>, &'a RecordBatch)>,
    level: u8,
    config: &WriterConfig,
) -> Result<Vec<EncodedFile>> {
    let mut by_project: BTreeMap<&Arc<str>, Vec<RecordBatch>> = BTreeMap::new();
    for (project, batch) in batches {
        by_project.entry(project).or_default().push(batch.clone());
    }
    let mut files = Vec::new();
    for (project, batches) in by_project {
        sort_by_partition(batches, config.encode_threads, |partition, batch, duplicates| {
            let mut file = encode_sorted(project, partition, &batch, level, config)?;
            file.duplicates = duplicates;
            files.push(file);
            Ok(())
        })?;
    }
    Ok(files)
}

/// Rows grouped by hour partition of `start_time`, for ids of any length.
fn split_hours(batches: &[&RecordBatch]) -> Result<BTreeMap<HourPartition, Vec<RecordBatch>>> {
    let mut out: BTreeMap<HourPartition, Vec<RecordBatch>> = BTreeMap::new();
    for batch in batches {
        let mut groups: BTreeMap<HourPartition, Vec<u32>> = BTreeMap::new();
        for (i, t) in start_times(batch).iter().enumerate() {
            groups.entry(HourPartition::of_ns(*t)).or_default().push(i as u32);
        }
        for (p, idx) in groups {
            let taken = take_record_batch(batch, &UInt32Array::from(idx))
                .map_err(|source| Error::Arrow { source })?;
            out.entry(p).or_default().push(taken);
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
/// Compaction calls it with the rows of one partition, decoded from its files: it gives them up
/// so that each column of them is freed once copied (see [`Sources`]).
pub fn sort_for_storage(batches: Vec<RecordBatch>, threads: usize) -> Result<(RecordBatch, usize)> {
    let mut sorted = Vec::new();
    let mut dropped = 0;
    sort_by_partition(batches, threads, |_, batch, d| {
        sorted.push(batch);
        dropped += d;
        Ok(())
    })?;
    let batch = match <[_; 1]>::try_from(sorted) {
        Ok([one]) => one,
        Err(many) => {
            concat_batches(&spans_schema(), &many).map_err(|source| Error::Arrow { source })?
        }
    };
    Ok((batch, dropped))
}

/// Hands `each` one sorted batch per hour partition of `start_time` (in partition order), each
/// sorted by `(trace_id, start_time, span_id)` without exact repeats of a span, and how many
/// repeats were dropped from it. One copy of the rows: they are gathered straight into their
/// place, one partition at a time, so that a backfill's flush (rows of many hours) holds one
/// hour's sorted copy at once beside the memory table rather than a copy of all of it.
fn sort_by_partition(
    batches: Vec<RecordBatch>,
    threads: usize,
    mut each: impl FnMut(HourPartition, RecordBatch, usize) -> Result<()>,
) -> Result<()> {
    let arrow_err = |source| Error::Arrow { source };
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    let Some(mut keys) = row_keys(&refs) else {
        for (partition, parts) in split_hours(&refs)? {
            let (batch, dropped) = sort_by_columns(&parts)?;
            each(partition, batch, dropped)?;
        }
        return Ok(());
    };
    // `at` breaks ties, so the first copy of a repeated span received is the one kept.
    keys.sort_unstable();
    let sources = Sources::new(batches);
    let mut first = 0;
    while first < keys.len() {
        let hour = keys[first].hour;
        let end = first + keys[first..].partition_point(|k| k.hour == hour);
        let run = &keys[first..end];
        let order: Vec<(usize, usize)> = run
            .iter()
            .enumerate()
            .filter(|(i, k)| *i == 0 || !k.same_span(&run[i - 1]))
            .map(|(_, k)| (k.at.0 as usize, k.at.1 as usize))
            .collect();
        let last = end == keys.len();
        let batch = gather(&sources, &order, threads, last).map_err(arrow_err)?;
        each(HourPartition { epoch_hour: hour }, batch, run.len() - order.len())?;
        first = end;
    }
    Ok(())
}

/// The columns of the batches being sorted: for each column, its array in every batch. The
/// last gather takes each column's arrays and drops them as soon as that column is copied, so
/// rows nothing else holds (compaction's decoded inputs; not the memory table's) are freed
/// column by column: the inputs and their sorted copy are never both held whole.
struct Sources(Vec<Mutex<Vec<ArrayRef>>>);

impl Sources {
    fn new(batches: Vec<RecordBatch>) -> Self {
        let mut columns: Vec<Vec<ArrayRef>> =
            (0..spans_schema().fields().len()).map(|_| Vec::with_capacity(batches.len())).collect();
        for batch in batches {
            for (i, column) in batch.columns().iter().enumerate() {
                columns[i].push(Arc::clone(column));
            }
        }
        Self(columns.into_iter().map(Mutex::new).collect())
    }

    /// Column `i`'s arrays: taken from here when `take`, else shared.
    fn column(&self, i: usize, take: bool) -> Vec<ArrayRef> {
        let mut arrays = self.0[i].lock().unwrap_or_else(|e| e.into_inner());
        if take { std::mem::take(&mut *arrays) } else { arrays.clone() }
    }
}

/// The rows at `order` ((batch, row) pairs) as one batch of the spans schema, gathered column by
/// column (taking each column's arrays from `sources` when `last`). Requests usually carry whole
/// traces, so the sorted order is mostly runs of neighbouring rows of one batch; those are copied
/// a run at a time (far fewer scattered reads than row by row).
fn gather(
    sources: &Sources,
    order: &[(usize, usize)],
    threads: usize,
    last: bool,
) -> Result<RecordBatch, ArrowError> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new(); // (batch, first row, end row)
    for &(b, row) in order {
        match runs.last_mut() {
            Some((rb, _, end)) if *rb == b && *end == row => *end += 1,
            _ => runs.push((b, row, row + 1)),
        }
    }
    let scattered = runs.len() * 2 > order.len();
    let columns = per_column(threads, spans_schema().fields().len(), |i| {
        let arrays = sources.column(i, last);
        if scattered {
            let arrays: Vec<&dyn Array> = arrays.iter().map(|a| a.as_ref()).collect();
            return interleave(&arrays, order);
        }
        let data: Vec<ArrayData> = arrays.iter().map(|a| a.to_data()).collect();
        // Text columns get their exact size up front (growing by doubling copies it again).
        let text: Option<Vec<&[i32]>> =
            arrays.iter().map(|a| a.as_string_opt::<i32>().map(|s| s.value_offsets())).collect();
        let capacity = match text {
            Some(offsets) => {
                let bytes = runs
                    .iter()
                    .map(|&(b, first, end)| (offsets[b][end] - offsets[b][first]) as usize)
                    .sum();
                Capacities::Binary(order.len(), Some(bytes))
            }
            None => Capacities::Array(order.len()),
        };
        let mut out = MutableArrayData::with_capacities(data.iter().collect(), false, capacity);
        for &(b, first, end) in &runs {
            out.try_extend(b, first, end)?;
        }
        Ok(make_array(out.freeze()))
    })
    .into_iter()
    .collect::<Result<_, ArrowError>>()?;
    RecordBatch::try_new(spans_schema(), columns)
}

/// `f` for every column index `0..columns`, in column order, run on up to `threads` threads
/// (each takes the next column not yet started). A flush or compaction gathers and encodes
/// column by column, and the columns are independent of each other.
fn per_column<T: Send>(threads: usize, columns: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = threads.min(columns);
    if threads <= 1 {
        return (0..columns).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut out: Vec<Option<T>> = (0..columns).map(|_| None).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= columns {
                            return done;
                        }
                        done.push((i, f(i)));
                    }
                })
            })
            .collect();
        for worker in workers {
            match worker.join() {
                Ok(done) => done.into_iter().for_each(|(i, v)| out[i] = Some(v)),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    out.into_iter().map(|v| v.expect("every column was done")).collect()
}

/// The sort key of one row: ids as written by [`crate::batch::SpanBatchBuilder`] (lowercase hex of
/// 16- and 8-byte ids), read as big-endian integers, which order as the strings do.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RowKey {
    hour: i64,
    trace: (u128, u128),
    start: i64,
    span: u128,
    /// (batch, row) the row comes from.
    at: (u32, u32),
}

impl RowKey {
    fn same_span(&self, other: &Self) -> bool {
        (self.trace, self.start, self.span) == (other.trace, other.start, other.span)
    }
}

/// The sort keys of every row, or `None` if an id is not of the usual length (the rows are then
/// sorted by comparing the columns).
fn row_keys(batches: &[&RecordBatch]) -> Option<Vec<RowKey>> {
    fn be(bytes: &[u8]) -> u128 {
        let mut word = [0u8; 16];
        word[16 - bytes.len()..].copy_from_slice(bytes);
        u128::from_be_bytes(word)
    }
    let mut keys = Vec::with_capacity(batches.iter().map(|b| b.num_rows()).sum());
    for (b, batch) in batches.iter().enumerate() {
        let traces = batch.column_by_name(col::TRACE_ID)?.as_string_opt::<i32>()?;
        let spans = batch.column_by_name(col::SPAN_ID)?.as_string_opt::<i32>()?;
        let starts = start_times(batch);
        if starts.len() != batch.num_rows() {
            return None;
        }
        for (row, &start) in starts.iter().enumerate() {
            let (trace, span) = (traces.value(row).as_bytes(), spans.value(row).as_bytes());
            if trace.len() != 32 || span.len() != 16 || traces.is_null(row) || spans.is_null(row) {
                return None;
            }
            keys.push(RowKey {
                hour: HourPartition::of_ns(start).epoch_hour,
                trace: (be(&trace[..16]), be(&trace[16..])),
                start,
                span: be(span),
                at: (b as u32, row as u32),
            });
        }
    }
    Some(keys)
}

/// [`sort_for_storage`] for ids of any length.
fn sort_by_columns(batches: &[RecordBatch]) -> Result<(RecordBatch, usize)> {
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

/// The columns holding large free text: prompts, completions, attributes and events.
const TEXT_COLUMNS: [&str; 4] = [col::INPUT, col::OUTPUT, col::ATTRIBUTES, col::EVENTS];

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

/// The per-column choices: encodings, prompts without a dictionary, names uncompressed.
fn with_column_layout(
    mut props: parquet::file::properties::WriterPropertiesBuilder,
) -> parquet::file::properties::WriterPropertiesBuilder {
    for (column, encoding) in COLUMN_ENCODINGS {
        let path = ColumnPath::from(column);
        props = props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_encoding(path, encoding);
    }
    for column in UNDICTIONARIED_TEXT_COLUMNS {
        props = props.set_column_dictionary_enabled(ColumnPath::from(column), false);
    }
    for column in UNCOMPRESSED_COLUMNS {
        props = props.set_column_compression(ColumnPath::from(column), Compression::UNCOMPRESSED);
    }
    props
}

/// Text columns written without a dictionary: prompts and completions. They differ row by row
/// (a conversation's history grows with every call), so the dictionary filled within the first
/// rows of each column chunk and the rest was plain anyway; zstd finds the repeats within a
/// page either way. But every read of the chunk, a trace lookup's included, decompressed and
/// decoded that dictionary page (up to `text_page_bytes`) first. 1 M generated LLM spans:
/// 856.8 bytes per span with the dictionary and without; `SELECT *` of a trace p50 7.5-7.9 ms
/// with it, 6.2-7.1 ms without (BENCHMARKS.md, fourteenth session). Attributes keep theirs:
/// small spans' attribute sets repeat.
const UNDICTIONARIED_TEXT_COLUMNS: [&str; 2] = [col::INPUT, col::OUTPUT];

/// Columns stored without compression: names with a handful of distinct values per file,
/// which queries group and filter by. Their dictionary page holds those few values and their
/// data pages are run-length-coded indices, which zstd hardly shrinks: over 2 M generated small
/// spans these columns took about 0.02 bytes per span more uncompressed, all eight together
/// (`kind`, whose values alternate within a trace, took 0.12 more and stays compressed).
/// Reading a compressed column chunk costs more than its pages: the Parquet reader creates a
/// zstd compression and a decompression context for every column chunk it opens (parquet 59),
/// which two profiles of trace lookups put at 7 and 10 % of their CPU. A query grouping by
/// model or span type opens these columns in every row group of every file.
const UNCOMPRESSED_COLUMNS: [&str; 8] = [
    col::SERVICE_NAME,
    col::STATUS_CODE,
    col::SPAN_TYPE,
    col::PROVIDER,
    col::MODEL,
    col::TOOL_NAME,
    col::AGENT_NAME,
    col::TRACE_STATE,
];

/// Encodes the rows of one partition as a sorted, zstd-compressed Parquet file. Takes the
/// batches, as [`sort_for_storage`] does, so that rows nothing else holds are freed as they are
/// copied.
pub fn encode_file(
    project: &str,
    partition: HourPartition,
    batches: Vec<RecordBatch>,
    level: u8,
    config: &WriterConfig,
) -> Result<EncodedFile> {
    let (batch, duplicates) = sort_for_storage(batches, config.encode_threads)?;
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
        for c in TEXT_COLUMNS {
            props = props.set_column_compression(ColumnPath::from(c), text);
        }
    }
    for c in TEXT_COLUMNS {
        // The dictionary page too (attributes, events): every read of a column chunk first
        // decompresses and decodes its whole dictionary. Values that differ row by row (most
        // attribute sets) overflow it within a few hundred rows and later pages are plain;
        // values that repeat still fit.
        let page = config.text_page_bytes.max(1);
        props = props
            .set_column_data_page_size_limit(ColumnPath::from(c), page)
            .set_column_dictionary_page_size_limit(ColumnPath::from(c), page);
    }
    let props = with_column_layout(props)
        .set_max_row_group_row_count(Some(config.row_group_rows.max(1)))
        .set_data_page_row_count_limit(config.page_rows.max(1))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_column_bloom_filter_enabled(trace_id.clone(), true)
        .set_column_bloom_filter_fpp(trace_id.clone(), config.bloom_fpp)
        .set_column_bloom_filter_max_ndv(trace_id, (traces as u64).max(1))
        .build();
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() / 4);
    let schema = Arc::clone(batch.schema_ref());
    let writer =
        ArrowWriter::try_new(&mut buf, Arc::clone(&schema), Some(props)).map_err(parquet_err)?;
    // Row group by row group, the columns encoded in parallel (see `per_column`).
    let (mut file, row_groups) = writer.into_serialized_writer().map_err(parquet_err)?;
    let group_rows = config.row_group_rows.max(1);
    for (index, start) in (0..batch.num_rows()).step_by(group_rows).enumerate() {
        let part = batch.slice(start, group_rows.min(batch.num_rows() - start));
        let writers: Vec<Mutex<_>> = row_groups
            .create_column_writers(index)
            .map_err(parquet_err)?
            .into_iter()
            .map(|w| Mutex::new(Some(w)))
            .collect();
        let chunks = per_column(
            config.encode_threads,
            writers.len(),
            |i| -> parquet::errors::Result<ArrowColumnChunk> {
                let taken = writers[i].lock().ok().and_then(|mut w| w.take());
                let mut w = taken.expect("each column writer is taken once");
                for leaf in compute_leaves(schema.field(i), part.column(i))? {
                    w.write(&leaf)?;
                }
                w.close()
            },
        );
        let mut group = file.next_row_group().map_err(parquet_err)?;
        for chunk in chunks {
            chunk.and_then(|c| c.append_to_row_group(&mut group)).map_err(parquet_err)?;
        }
        group.close().map_err(parquet_err)?;
    }
    file.close().map_err(parquet_err)?;
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
    fn key_sort_orders_and_drops_repeats_as_the_column_sort_does() {
        // Three batches; the third repeats every fifth span of the first (a re-sent request).
        let hour_ns = 1_800_000 * 3_600_000_000_000i64;
        let batch = |seed: u32, step: u32| {
            let mut b = SpanBatchBuilder::with_capacity(200);
            for i in (0..200u32).step_by(step as usize) {
                let x = (i + seed).wrapping_mul(0x9e37_79b9);
                let mut trace_id = [0u8; 16];
                trace_id[0] = (x >> 29) as u8 & 3; // few traces, ids differing in either half
                trace_id[15] = (x >> 27) as u8 & 1;
                b.append(&SpanRecord {
                    trace_id,
                    span_id: u64::from(x).to_be_bytes(),
                    name: "step",
                    start_time_ns: hour_ns + i64::from(x % 50) * 1_000,
                    end_time_ns: hour_ns + 99_000,
                    attributes: "{}",
                    ..Default::default()
                });
            }
            b.finish().unwrap()
        };
        let batches = [batch(0, 1), batch(1_000, 1), batch(0, 5)];
        let refs: Vec<&RecordBatch> = batches.iter().collect();
        assert!(row_keys(&refs).is_some(), "ids of the usual length take the key sort");
        let (by_key, dropped) = sort_for_storage(batches.to_vec(), 2).unwrap();
        let (by_columns, dropped_by_columns) = sort_by_columns(&batches).unwrap();
        assert_eq!(dropped, 40);
        assert_eq!(dropped, dropped_by_columns);
        assert_eq!(by_key.num_rows(), 400);
        assert_eq!(by_key, by_columns);

        // Requests of whole traces, which the sorted order takes a run of rows at a time.
        let traces = |first_trace: u8| {
            let mut b = SpanBatchBuilder::with_capacity(100);
            for i in 0..100u8 {
                let trace = first_trace + i / 10;
                b.append(&SpanRecord {
                    trace_id: [trace.wrapping_mul(37); 16],
                    span_id: [trace, i % 10, 0, 0, 0, 0, 0, 1],
                    parent_span_id: (i % 10 != 0).then_some([trace, 0, 0, 0, 0, 0, 0, 1]),
                    name: "step",
                    start_time_ns: hour_ns + i64::from(i % 10) * 1_000,
                    end_time_ns: hour_ns + 99_000,
                    attributes: if i % 10 < 3 { "{}" } else { r#"{"k":1}"# },
                    ..Default::default()
                });
            }
            b.finish().unwrap()
        };
        let batches = [traces(0), traces(10), traces(5)];
        let (by_key, dropped) = sort_for_storage(batches.to_vec(), 2).unwrap();
        assert_eq!((by_key.num_rows(), dropped), (200, 100));
        assert_eq!((by_key, dropped), sort_by_columns(&batches).unwrap());
    }

    #[test]
    fn flushed_rows_go_to_one_sorted_file_per_project_and_hour() {
        let hour_ns = 1_800_000 * 3_600_000_000_000i64;
        // Span i starts in hour i % 2; its trace id falls as i rises.
        let batch = |spans: std::ops::Range<u8>| {
            let mut b = SpanBatchBuilder::with_capacity(spans.len());
            for i in spans {
                b.append(&SpanRecord {
                    trace_id: [100 - i; 16],
                    span_id: [i; 8],
                    name: "step",
                    start_time_ns: hour_ns + i64::from(i % 2) * 3_600_000_000_000 + 5,
                    end_time_ns: hour_ns + 2 * 3_600_000_000_000,
                    attributes: "{}",
                    ..Default::default()
                });
            }
            b.finish().unwrap()
        };
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let (first, resent, other) = (batch(0..10), batch(6..10), batch(0..3));
        let files = encode_partitions(
            [(&b, &other), (&a, &first), (&a, &resent)],
            0,
            &WriterConfig::default(),
        )
        .unwrap();
        let summary: Vec<_> = files
            .iter()
            .map(|f| {
                let reader = ParquetRecordBatchReaderBuilder::try_new(f.bytes.clone()).unwrap();
                let rows = reader.build().unwrap().next().unwrap().unwrap();
                let ids = rows.column_by_name(col::SPAN_ID).unwrap().as_string::<i32>();
                let ids: Vec<&str> = ids.iter().flatten().map(|s| &s[..2]).collect();
                let dir: Vec<&str> = f.meta.path.split('/').collect();
                format!("{} {}: {} ({} repeats)", dir[1], dir[3], ids.join(" "), f.duplicates)
            })
            .collect();
        assert_eq!(
            summary,
            [
                "project=a hour=00: 08 06 04 02 00 (2 repeats)",
                "project=a hour=01: 09 07 05 03 01 (2 repeats)",
                "project=b hour=00: 02 00 (0 repeats)",
                "project=b hour=01: 01 (0 repeats)",
            ]
        );
    }

    /// A reader of `file` that has loaded its page index.
    fn with_page_index(file: &EncodedFile) -> ParquetRecordBatchReaderBuilder<Bytes> {
        let options = parquet::arrow::arrow_reader::ArrowReaderOptions::new()
            .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Required);
        ParquetRecordBatchReaderBuilder::try_new_with_options(file.bytes.clone(), options).unwrap()
    }

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
        // One row group, and three (128 + 128 + 44 rows) encoded one after another.
        for (row_group_rows, groups) in [(WriterConfig::default().row_group_rows, 1), (128, 3)] {
            let config = WriterConfig { row_group_rows, ..WriterConfig::default() };
            let file = encode_file("p", partition, vec![batch.clone()], 0, &config).unwrap();
            let reader = with_page_index(&file);
            let meta = reader.metadata().clone();
            assert_eq!(meta.num_row_groups(), groups);
            assert!(meta.offset_index().is_some() && meta.column_index().is_some());
            for rg in meta.row_groups() {
                let trace = rg.columns().iter().find(|c| c.column_path().string() == col::TRACE_ID);
                assert!(trace.unwrap().bloom_filter_offset().is_some());
            }
            let sizes: Vec<i64> = meta.row_groups().iter().map(|rg| rg.num_rows()).collect();
            assert_eq!(sizes.iter().sum::<i64>(), 300, "{sizes:?}");
            let read: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
            let read = concat_batches(&spans_schema(), &read).unwrap();
            let (sorted, _) = sort_for_storage(vec![batch.clone()], 2).unwrap();
            assert_eq!(read, sorted);
        }
        let file =
            encode_file("p", partition, vec![batch.clone()], 0, &WriterConfig::default()).unwrap();
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
        // The few-valued name columns are stored uncompressed, every other column with zstd.
        for c in meta.row_group(0).columns() {
            let name = c.column_path().string();
            let zstd = matches!(c.compression(), Compression::ZSTD(_));
            assert_eq!(zstd, !UNCOMPRESSED_COLUMNS.contains(&name.as_str()), "{name}");
            assert!(zstd || c.compression() == Compression::UNCOMPRESSED, "{name}");
        }
        let read: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
        let read = concat_batches(&spans_schema(), &read).unwrap();
        let (sorted, _) = sort_for_storage(vec![batch], 1).unwrap();
        assert_eq!(read, sorted);
    }

    #[test]
    fn text_pages_and_their_dictionary_are_capped() {
        // 400 distinct 2 KB prompts of hard-to-compress text (800 KB), and distinct 1 KB
        // attribute sets. A 16 KiB cap makes the prompts take one page per ~8 rows; prompts
        // have no dictionary, and the attributes' dictionary page, every lookup's first read
        // of that column, stays within the cap.
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let prompts: Vec<String> = (0..400)
            .map(|_| {
                (0..256)
                    .map(|_| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        format!("{:08x}", rng as u32)
                    })
                    .collect()
            })
            .collect();
        let attributes: Vec<String> =
            prompts.iter().map(|p| format!("{{\"p\":\"{}\"}}", &p[..1024])).collect();
        let hour_ns = 1_800_000 * 3_600_000_000_000i64;
        let mut b = SpanBatchBuilder::with_capacity(prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            b.append(&SpanRecord {
                trace_id: [(i / 4) as u8; 16],
                span_id: (i as u64 + 1).to_le_bytes(),
                name: "chat",
                start_time_ns: hour_ns + i as i64,
                end_time_ns: hour_ns + i as i64 + 1,
                input: Some(prompt),
                attributes: &attributes[i],
                ..Default::default()
            });
        }
        let batch = b.finish().unwrap();
        let cap = 16 * 1024;
        let config = WriterConfig { text_page_bytes: cap, ..WriterConfig::default() };
        let file = encode_file("p", HourPartition::of_ns(hour_ns), vec![batch.clone()], 0, &config)
            .unwrap();
        let reader = with_page_index(&file);
        let meta = reader.metadata().clone();
        let column = |name: &str| {
            let rg = meta.row_group(0);
            (0..rg.num_columns()).find(|&i| rg.column(i).column_path().string() == name).unwrap()
        };
        let input = column(col::INPUT);
        let chunk = meta.row_group(0).column(input);
        let pages = &meta.offset_index().unwrap()[0][input].page_locations;
        // 800 KB of prompts in pages of at most 16 KiB plus one 2 KB value: at least 50 pages.
        assert!(pages.len() >= 50, "{} pages", pages.len());
        for p in pages {
            assert!(p.compressed_page_size as usize <= cap + 2 * 1024 + 64, "{p:?}");
        }
        assert_eq!(chunk.dictionary_page_offset(), None);
        assert!(!chunk.encodings().any(|e| e == Encoding::RLE_DICTIONARY));
        // The attributes start dictionary-encoded; their dictionary page is capped.
        let attrs = meta.row_group(0).column(column(col::ATTRIBUTES));
        assert!(attrs.encodings().any(|e| e == Encoding::RLE_DICTIONARY));
        let dict = attrs.dictionary_page_offset().expect("a dictionary page");
        let dict_bytes = attrs.data_page_offset() - dict;
        assert!(dict_bytes as usize <= cap + 1024 + 64, "dictionary page {dict_bytes} B");
        let read: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
        let read = concat_batches(&spans_schema(), &read).unwrap();
        let (sorted, _) = sort_for_storage(vec![batch], 1).unwrap();
        assert_eq!(read, sorted);
    }
}
