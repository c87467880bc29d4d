//! The rows of one trace, read from the files and memory batches that hold it without planning
//! a query.
//!
//! `GET /v1/traces/{id}`, the Jaeger and Tempo trace endpoints and `spanlake trace` want every
//! column of the few rows of one trace. Through SQL (`SELECT * FROM spans WHERE trace_id = …`),
//! at 113 M spans, about 2 ms of a 7 ms lookup went to parsing, planning and optimising the
//! statement before a byte was read, and the planner split the trace's file into two byte
//! ranges (one per core) that each loaded its metadata and pruned its row groups. Here the rows
//! are found as that scan finds them — the trace index picks the files
//! ([`spanlake_engine::trace_index`]), the `trace_id` statistics of row groups and pages pick the
//! pages (rows are sorted by trace id), and the id is checked while decoding so that the other
//! columns are decoded for the trace's rows alone — with each file's metadata taken once from
//! the cache DataFusion's scans fill, and its columns read in two halves side by side.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray as _, RecordBatch, StringArray, new_null_array,
};
use datafusion::arrow::compute::kernels::cmp::eq;
use datafusion::arrow::compute::{
    SortColumn, cast, concat_batches, filter_record_batch, lexsort_to_indices, take_record_batch,
};
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::ParquetFileReaderFactory as _;
use datafusion::datasource::physical_plan::parquet::CachedParquetFileReaderFactory;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use futures::TryStreamExt as _;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::arrow_reader::{
    ArrowPredicateFn, ArrowReaderMetadata, ArrowReaderOptions, RowFilter, RowSelection, RowSelector,
};
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use parquet::file::metadata::PageIndexPolicy;
use spanlake_engine::catalog::DataFile;
use spanlake_engine::schema::{col, spans_schema};

use crate::provider::{STORE_URL, SpansTable};

/// The rows of `trace_id` (32 lowercase hex digits) in `table`, with the stored schema, sorted
/// by `(start_time, span_id)`; no batch when no row has the id. The rows' memory is charged to
/// `pool`, so a trace too large for a query's memory is refused like a query.
pub async fn trace_rows(
    table: &SpansTable,
    runtime: &RuntimeEnv,
    pool: &Arc<dyn MemoryPool>,
    trace_id: &str,
) -> Result<Vec<RecordBatch>> {
    let snapshot = table.trace_snapshot(trace_id);
    let schema = spans_schema();
    let mut reservation = MemoryConsumer::new("trace lookup").register(pool);
    let mut rows = Vec::new();
    let wanted = StringArray::new_scalar(trace_id);
    for b in &snapshot.batches {
        let ids = b.batch.column_by_name(col::TRACE_ID).ok_or_else(|| missing(col::TRACE_ID))?;
        let found = filter_record_batch(&b.batch, &eq(ids, &wanted)?)?;
        if found.num_rows() > 0 {
            keep(&mut rows, &mut reservation, conform(&found, &schema)?)?;
        }
    }
    if !snapshot.files.is_empty() {
        let url = ObjectStoreUrl::parse(STORE_URL)?;
        let factory = Arc::new(CachedParquetFileReaderFactory::new(
            runtime.object_store(&url)?,
            runtime.cache_manager.get_file_metadata_cache(),
        ));
        // Files are read side by side (a trace split across compaction levels, or a filter's
        // false positive), the first by this task; the others are aborted if it is dropped.
        // Each read charges the rows it decodes as it decodes them, to a reservation kept
        // until the lookup returns.
        let mut files = snapshot.files.iter();
        let first = files.next().cloned();
        let mut others = tokio::task::JoinSet::new();
        for f in files {
            let (factory, file, id) = (Arc::clone(&factory), Arc::clone(f), trace_id.to_string());
            let charge = reservation.new_empty();
            others.spawn(async move { read_file(&factory, &file, &id, charge).await });
        }
        let mut read = Vec::with_capacity(snapshot.files.len());
        if let Some(file) = first {
            read.push(read_file(&factory, &file, trace_id, reservation.new_empty()).await?);
        }
        while let Some(done) = others.join_next().await {
            read.push(done.map_err(|e| DataFusionError::External(Box::new(e)))??);
        }
        for (batches, charge) in read {
            reservation.grow(charge.free());
            for batch in batches {
                rows.push(conform(&batch, &schema)?);
            }
        }
    }
    if rows.iter().map(RecordBatch::num_rows).sum::<usize>() <= 1 {
        return Ok(rows);
    }
    let all = concat_batches(&schema, &rows)?;
    let by = [col::START_TIME, col::SPAN_ID].map(|c| SortColumn {
        values: Arc::clone(all.column(schema.index_of(c).expect("spans column"))),
        options: None,
    });
    let order = lexsort_to_indices(&by, None)?;
    Ok(vec![take_record_batch(&all, &order)?])
}

/// Charges `batch` (an unflushed batch's rows of the trace) to the lookup's memory and keeps it.
fn keep(
    rows: &mut Vec<RecordBatch>,
    reservation: &mut MemoryReservation,
    batch: RecordBatch,
) -> Result<()> {
    reservation.try_grow(batch.get_array_memory_size())?;
    rows.push(batch);
    Ok(())
}

fn missing(column: &str) -> DataFusionError {
    DataFusionError::Internal(format!("spans batch without a {column} column"))
}

/// The rows of one file with `trace_id`, charged to `charge` as they are decoded (so a trace
/// too large for the query's memory is refused before it is all read), and the charge. The
/// columns are read in two halves side by side (a lookup is mostly decompressing the pages of
/// its text columns), each half checking the id.
async fn read_file(
    factory: &Arc<CachedParquetFileReaderFactory>,
    file: &Arc<DataFile>,
    trace_id: &str,
    charge: MemoryReservation,
) -> Result<(Vec<RecordBatch>, MemoryReservation)> {
    let mut reader = open(factory, file)?;
    let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional);
    let metadata = reader.get_metadata(Some(&options)).await?;
    let metadata = ArrowReaderMetadata::try_new(metadata, options)?;
    let Some((row_groups, selection)) = pages_with(&metadata, trace_id)? else {
        return Ok((Vec::new(), charge));
    };
    let read = Read { metadata, row_groups, selection, trace_id: trace_id.to_string() };
    let [first, second] = read.halves();
    if second.is_empty() {
        return Ok((read.columns(reader, first, &charge).await?, charge));
    }
    let mut other = tokio::task::JoinSet::new();
    {
        let (factory, file, read) = (Arc::clone(factory), Arc::clone(file), read.clone());
        let charge = charge.new_empty();
        other.spawn(async move {
            let batches = read.columns(open(&factory, &file)?, second, &charge).await?;
            Ok::<_, DataFusionError>((batches, charge))
        });
    }
    let first = read.columns(reader, first, &charge).await?;
    let second = match other.join_next().await {
        Some(done) => {
            let (batches, second) = done.map_err(|e| DataFusionError::External(Box::new(e)))??;
            charge.grow(second.free());
            batches
        }
        None => Vec::new(),
    };
    let rows = |half: &[RecordBatch]| half.iter().map(RecordBatch::num_rows).sum::<usize>();
    match (rows(&first), rows(&second)) {
        (0, 0) => return Ok((Vec::new(), charge)),
        (a, b) if a != b => {
            return Err(DataFusionError::Internal(format!(
                "{}: the halves of a trace's columns read {a} and {b} rows",
                file.path
            )));
        }
        _ => {}
    }
    let (first, second) = (concat(first)?, concat(second)?);
    let (fields, columns): (Vec<_>, Vec<_>) = [first, second]
        .iter()
        .flat_map(|b| b.schema_ref().fields().iter().cloned().zip(b.columns().iter().cloned()))
        .unzip();
    Ok((vec![RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?], charge))
}

fn open(
    factory: &CachedParquetFileReaderFactory,
    file: &DataFile,
) -> Result<Box<dyn AsyncFileReader>> {
    let partitioned = PartitionedFile::new(file.path.clone(), file.size);
    Ok(factory.create_reader(0, partitioned, None, &ExecutionPlanMetricsSet::new())?)
}

/// The batches of one half (at least one) as one batch.
fn concat(batches: Vec<RecordBatch>) -> Result<RecordBatch> {
    match <[RecordBatch; 1]>::try_from(batches) {
        Ok([batch]) => Ok(batch),
        Err(batches) => Ok(concat_batches(&batches[0].schema(), &batches)?),
    }
}

/// What to read of one file: the pages of the trace, checking its id.
#[derive(Clone)]
struct Read {
    metadata: ArrowReaderMetadata,
    row_groups: Vec<usize>,
    selection: Option<RowSelection>,
    trace_id: String,
}

impl Read {
    /// The file's columns in two halves of about equal compressed size in the row groups read
    /// (the second empty when there is one column).
    fn halves(&self) -> [Vec<usize>; 2] {
        let parquet = self.metadata.metadata();
        let descr = parquet.file_metadata().schema_descr();
        let mut sizes: Vec<(usize, i64)> =
            (0..descr.root_schema().get_fields().len()).map(|c| (c, 0)).collect();
        for leaf in 0..descr.num_columns() {
            let root = descr.get_column_root_idx(leaf);
            for &g in &self.row_groups {
                sizes[root].1 += parquet.row_group(g).column(leaf).compressed_size();
            }
        }
        sizes.sort_by_key(|&(c, size)| (std::cmp::Reverse(size), c));
        let mut halves = [Vec::new(), Vec::new()];
        let mut totals = [0i64; 2];
        for (c, size) in sizes {
            let i = usize::from(totals[1] < totals[0]);
            totals[i] += size;
            halves[i].push(c);
        }
        halves
    }

    /// The rows of the trace, root columns `columns` of the file, each batch charged to
    /// `charge` as it is decoded.
    async fn columns(
        &self,
        reader: Box<dyn AsyncFileReader>,
        columns: Vec<usize>,
        charge: &MemoryReservation,
    ) -> Result<Vec<RecordBatch>> {
        let descr = self.metadata.metadata().file_metadata().schema_descr_ptr();
        let id_column = self.metadata.schema().index_of(col::TRACE_ID)?;
        let wanted = StringArray::new_scalar(self.trace_id.as_str());
        let has_id =
            ArrowPredicateFn::new(ProjectionMask::roots(&descr, [id_column]), move |batch| {
                eq(&cast(batch.column(0), &DataType::Utf8)?, &wanted)
            });
        let mut builder =
            ParquetRecordBatchStreamBuilder::new_with_metadata(reader, self.metadata.clone())
                .with_row_groups(self.row_groups.clone())
                .with_projection(ProjectionMask::roots(&descr, columns))
                .with_row_filter(RowFilter::new(vec![Box::new(has_id)]));
        if let Some(selection) = &self.selection {
            builder = builder.with_row_selection(selection.clone());
        }
        let mut stream = builder.build()?;
        let mut batches = Vec::new();
        while let Some(batch) = stream.try_next().await? {
            charge.try_grow(batch.get_array_memory_size())?;
            batches.push(batch);
        }
        Ok(batches)
    }
}

/// The row groups of a file whose `trace_id` range holds `trace_id`, and within them the pages
/// whose range does (none when the file has no page index); `None` when no row group does.
fn pages_with(
    metadata: &ArrowReaderMetadata,
    trace_id: &str,
) -> Result<Option<(Vec<usize>, Option<RowSelection>)>> {
    let parquet = metadata.metadata();
    let groups = parquet.row_groups();
    let stats = StatisticsConverter::try_new(
        col::TRACE_ID,
        metadata.schema(),
        parquet.file_metadata().schema_descr(),
    )?;
    let in_range = |mins: ArrayRef, maxes: ArrayRef| -> Result<Vec<bool>> {
        let (mins, maxes) = (cast(&mins, &DataType::Utf8)?, cast(&maxes, &DataType::Utf8)?);
        let (mins, maxes) = (mins.as_string::<i32>(), maxes.as_string::<i32>());
        // Unknown bounds (no statistics) may hold anything.
        Ok((0..mins.len())
            .map(|i| {
                (mins.is_null(i) || mins.value(i) <= trace_id)
                    && (maxes.is_null(i) || trace_id <= maxes.value(i))
            })
            .collect())
    };
    let holds = in_range(stats.row_group_mins(groups)?, stats.row_group_maxes(groups)?)?;
    let candidates: Vec<usize> = (0..groups.len()).filter(|&i| holds[i]).collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    let (Some(column_index), Some(offset_index)) = (parquet.column_index(), parquet.offset_index())
    else {
        return Ok(Some((candidates, None)));
    };
    let Some(page_rows) = stats.data_page_row_counts(offset_index, groups, &candidates)? else {
        return Ok(Some((candidates, None)));
    };
    let pages = in_range(
        stats.data_page_mins(column_index, offset_index, &candidates)?,
        stats.data_page_maxes(column_index, offset_index, &candidates)?,
    )?;
    // Pages come row group by row group; a row group none of whose pages holds the id is
    // left out rather than skipped page by page.
    let (mut row_groups, mut selectors) = (Vec::new(), Vec::new());
    let mut page = 0;
    for &group in &candidates {
        let first = page;
        let mut rows = 0;
        while rows < groups[group].num_rows() as u64 && page < page_rows.len() {
            rows += page_rows.value(page);
            page += 1;
        }
        if pages[first..page].iter().any(|&p| p) {
            row_groups.push(group);
            selectors.extend((first..page).map(|p| {
                let rows = page_rows.value(p) as usize;
                if pages[p] { RowSelector::select(rows) } else { RowSelector::skip(rows) }
            }));
        }
    }
    if row_groups.is_empty() {
        return Ok(None);
    }
    Ok(Some((row_groups, Some(RowSelection::from(selectors)))))
}

/// `batch` with the columns of `schema`, in its order: a column the file was written without
/// is null, one stored with another type is cast.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema_ref().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(Arc::clone(c)),
            Some(c) => Ok(cast(c, f.data_type())?),
            None => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

#[cfg(test)]
mod tests;
