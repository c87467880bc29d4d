use datafusion::arrow::util::pretty::pretty_format_batches;
use spanlake_engine::writer::{WriterConfig, encode_partitions};

use super::*;
use crate::provider::to_stored;
use crate::stats::tests::{engine, spans, store_with};
use crate::{QueryConfig, QueryEngine};

/// Small row groups, so that a file holds many and some traces span two.
fn small_row_groups() -> WriterConfig {
    WriterConfig { row_group_rows: 64, ..WriterConfig::default() }
}

/// The id of trace `t` of [`spans`].
fn id(t: u32) -> String {
    format!("{t:08x}{}", "0".repeat(24))
}

fn text(batches: &[RecordBatch]) -> String {
    pretty_format_batches(batches).unwrap().to_string()
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

async fn by_sql(engine: &QueryEngine, t: u32) -> Vec<RecordBatch> {
    let sql =
        format!("SELECT * FROM spans WHERE trace_id = '{}' ORDER BY start_time, span_id", id(t));
    to_stored(&engine.sql(&sql).await.unwrap().batches).unwrap()
}

#[tokio::test]
async fn a_trace_read_without_a_plan_is_what_sql_returns() {
    // Two files of 500 and 300 spans; unflushed: ten more traces, and trace 5 again with two
    // more spans (its first five repeat the file's, as a WAL replay can leave them).
    let store = store_with(
        &small_row_groups(),
        &[spans(0, 100, 5), spans(100, 60, 5)],
        vec![spans(160, 10, 5), spans(5, 1, 7)],
    )
    .await;
    let engine = engine(store).await;
    let expected = [(0, 5), (5, 12), (12, 5), (63, 5), (99, 5), (100, 5), (159, 5), (165, 5)];
    for (t, count) in expected {
        let direct = engine.trace_rows(&id(t)).await.unwrap();
        assert_eq!(rows(&direct), count, "trace {t}");
        assert!(direct.iter().all(|b| b.schema() == spans_schema()), "trace {t}");
        assert_eq!(text(&direct), text(&by_sql(&engine, t).await), "trace {t}");
    }
    // Trace 5's rows: the file's and the memory's, by start time, each span twice but the
    // last two.
    let five = engine.trace_rows(&id(5)).await.unwrap();
    let span_ids = five[0].column_by_name(col::SPAN_ID).unwrap().as_string::<i32>();
    let last_bytes: Vec<&str> = span_ids.iter().map(|s| &s.unwrap()[14..]).collect();
    assert_eq!(
        last_bytes,
        ["01", "01", "02", "02", "03", "03", "04", "04", "05", "05", "06", "07"]
    );
    // Ids in no file's range and ids inside a range that no row has.
    for missing in [id(500), format!("{}1", &id(50)[..31])] {
        assert!(engine.trace_rows(&missing).await.unwrap().is_empty(), "{missing}");
    }
}

#[tokio::test]
async fn a_trace_larger_than_a_query_may_hold_is_refused() {
    let store = store_with(&small_row_groups(), &[spans(0, 3, 200)], Vec::new()).await;
    let config = QueryConfig { memory_per_query_bytes: 4 << 10, ..QueryConfig::default() };
    let engine =
        QueryEngine::new(store, None, Arc::default(), &config, Arc::default()).await.unwrap();
    let e = engine.trace_rows(&id(1)).await.unwrap_err().to_string();
    assert!(e.contains("trace lookup") && e.contains(crate::memory::PER_QUERY_SETTING), "{e}");
}

#[test]
fn only_the_pages_whose_ids_may_hold_the_trace_are_read() {
    // 10,000 rows in row groups of 4,096 and pages of 1,024 (the writer cuts pages between
    // its batches of 1,024 values).
    let project: Arc<str> = Arc::from("default");
    let batch = spans(0, 2000, 5);
    let config = WriterConfig { row_group_rows: 4096, page_rows: 1024, ..WriterConfig::default() };
    let file = encode_partitions([(&project, &batch)], 0, &config).unwrap().remove(0);
    let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required);
    let metadata = ArrowReaderMetadata::load(&file.bytes, options).unwrap();
    assert_eq!(metadata.metadata().row_groups().len(), 3);
    let pages = metadata.metadata().offset_index().unwrap()[0][0].page_locations().len();
    assert_eq!(pages, 4);
    // Trace 819 is rows 4095..4100: the last row of row group 0 (its last page) and the first
    // four of row group 1 (its first page).
    let (row_groups, selection) = pages_with(&metadata, &id(819)).unwrap().unwrap();
    assert_eq!(row_groups, [0, 1]);
    let selectors: Vec<RowSelector> = selection.unwrap().into();
    assert_eq!(
        selectors,
        [RowSelector::skip(3072), RowSelector::select(2048), RowSelector::skip(3072)]
    );
    // Between the ids of traces 819 and 820: only row group 1's first page may hold it.
    let between = format!("{}1", &id(819)[..31]);
    let (row_groups, selection) = pages_with(&metadata, &between).unwrap().unwrap();
    assert_eq!(row_groups, [1]);
    let selectors: Vec<RowSelector> = selection.unwrap().into();
    assert_eq!(selectors, [RowSelector::select(1024), RowSelector::skip(3072)]);
    // Beyond the last id.
    assert!(pages_with(&metadata, &id(2000)).unwrap().is_none());
}
