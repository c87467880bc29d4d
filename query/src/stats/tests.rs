use std::sync::Arc;

use datafusion::arrow::array::{AsArray as _, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::joins::HashJoinExec;
use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use spanlake_engine::batch::SpanBatchBuilder;
use spanlake_engine::catalog::Change;
use spanlake_engine::pricing::PriceTable;
use spanlake_engine::record::{SpanRecord, span_type};
use spanlake_engine::store::SpanStore;
use spanlake_engine::writer::{WriterConfig, encode_partitions};

use super::*;
use crate::provider::query_schema;
use crate::{QueryConfig, QueryEngine};

const T0: i64 = 1_764_000_000_000_000_000;

/// Traces `first..first + traces` of `per_trace` spans each, one second apart: an agent root
/// and LLM calls under it; every fourth trace has a failed call.
pub(crate) fn spans(first: u32, traces: u32, per_trace: u32) -> RecordBatch {
    let mut b = SpanBatchBuilder::with_capacity((traces * per_trace) as usize);
    for t in first..first + traces {
        let mut trace_id = [0u8; 16];
        trace_id[..4].copy_from_slice(&t.to_be_bytes());
        let start = T0 + i64::from(t) * 1_000_000_000;
        for s in 0..per_trace {
            let mut span_id = [0u8; 8];
            span_id[..4].copy_from_slice(&t.to_be_bytes());
            span_id[7] = s as u8 + 1;
            let mut root = span_id;
            root[7] = 1;
            b.append(&SpanRecord {
                trace_id,
                span_id,
                parent_span_id: (s > 0).then_some(root),
                name: if s == 0 { "agent" } else { "chat" },
                start_time_ns: start + i64::from(s),
                end_time_ns: start + 1_000,
                span_type: if s == 0 { span_type::AGENT } else { span_type::LLM },
                status_code: if t % 4 == 0 && s == 1 { "error" } else { "ok" },
                ..Default::default()
            });
        }
    }
    b.finish().unwrap()
}

/// A store holding `files` as committed Parquet files and `memory` as unflushed batches.
async fn store(files: &[RecordBatch], memory: Vec<RecordBatch>) -> Arc<SpanStore> {
    store_with(&WriterConfig::default(), files, memory).await
}

/// [`store`] with files written with `config`.
pub(crate) async fn store_with(
    config: &WriterConfig,
    files: &[RecordBatch],
    memory: Vec<RecordBatch>,
) -> Arc<SpanStore> {
    let object_store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let store = SpanStore::new(Arc::clone(&object_store), []);
    let project: Arc<str> = Arc::from("default");
    let mut change = Change::default();
    for file in encode_partitions(files.iter().map(|b| (&project, b)), 0, config).unwrap() {
        let path = object_store::path::Path::from(file.meta.path.as_str());
        object_store.put(&path, PutPayload::from_bytes(file.bytes)).await.unwrap();
        change.add.push(file.meta);
    }
    store.apply(&change, None);
    store.push_batches(
        memory
            .into_iter()
            .enumerate()
            .map(|(i, b)| MemBatch::new(i as u64, Arc::clone(&project), b, 0)),
    );
    Arc::new(store)
}

/// A query engine over `store` with default settings.
pub(crate) async fn engine(store: Arc<SpanStore>) -> QueryEngine {
    QueryEngine::new(
        store,
        None,
        Arc::new(PriceTable::default()),
        &QueryConfig::default(),
        Arc::default(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn estimates_count_rows_traces_and_times_of_files_and_batches() {
    let store = store(&[spans(0, 100, 5), spans(100, 60, 5)], vec![spans(160, 10, 5)]).await;
    let snapshot = store.snapshot(&Default::default());
    let files = Estimate::of_files(&snapshot.files);
    assert_eq!(files.rows, 800);
    assert_eq!(files.traces, Some(160));
    assert_eq!(files.start_ns, Some((T0, T0 + 159 * 1_000_000_000 + 4)));
    assert!(files.bytes.is_some_and(|b| b > 0));
    // 50 unflushed rows, each trace's spans together.
    let memory = Estimate::of_batches(&snapshot.batches);
    assert_eq!(memory.rows, 50);
    assert_eq!(memory.traces, Some(10));
    assert_eq!(memory.start_ns, Some((T0 + 160 * 1_000_000_000, T0 + 169 * 1_000_000_000 + 4)));

    let stats = files.statistics(&query_schema());
    assert_eq!(stats.num_rows, Precision::Inexact(800));
    let trace_id = &stats.column_statistics[query_schema().index_of(col::TRACE_ID).unwrap()];
    assert_eq!(trace_id.distinct_count, Precision::Inexact(160));
    // A projection without the trace id still gets the row count.
    let projected = query_schema().project(&[query_schema().index_of(col::NAME).unwrap()]).unwrap();
    let stats = files.statistics(&projected);
    assert_eq!((stats.num_rows, stats.column_statistics.len()), (Precision::Inexact(800), 1));
}

/// Joining spans with the `traces` view builds the hash table from the traces (one row per
/// trace, fewer after the filter), whether the spans are in files, in memory or both.
#[tokio::test]
async fn joins_with_the_traces_view_build_from_the_traces() {
    let sql = "SELECT t.root_span_name, count(*), sum(s.duration_ms) FROM spans s \
               JOIN traces t ON s.trace_id = t.trace_id \
               WHERE s.span_type = 'llm' AND t.error_count > 0 GROUP BY 1";
    for (files, memory) in [
        (vec![spans(0, 200, 8)], vec![]),
        (vec![spans(0, 100, 8), spans(100, 100, 8)], vec![spans(200, 20, 8)]),
        (vec![], vec![spans(0, 200, 8)]),
    ] {
        let engine = engine(store(&files, memory.clone()).await).await;
        let plan = engine.context().sql(sql).await.unwrap().create_physical_plan().await.unwrap();
        let join = find::<HashJoinExec>(&plan).expect("a hash join");
        let build_aggregates = find::<AggregateExec>(join.left()).is_some();
        assert!(build_aggregates, "the build side is not the traces view:\n{}", display(&plan));
        assert!(find::<AggregateExec>(join.right()).is_none(), "{}", display(&plan));
        // Joined on the 128-bit key, not the text (trace_group::JoinOnTraceKey).
        for (l, r) in join.on() {
            let key = DataType::Decimal128(38, 0);
            assert_eq!(l.data_type(&join.left().schema()).unwrap(), key, "{}", display(&plan));
            assert_eq!(r.data_type(&join.right().schema()).unwrap(), key, "{}", display(&plan));
        }

        // Traces 0..n, 8 spans each (7 LLM calls of 1,000 - s ns); every fourth trace failed.
        let n = (files.iter().chain(&memory).map(RecordBatch::num_rows).sum::<usize>() / 8) as i64;
        let failed = (n + 3) / 4;
        let result = engine.sql(sql).await.unwrap();
        assert_eq!(result.num_rows(), 1);
        let batch = &result.batches.iter().find(|b| b.num_rows() > 0).unwrap();
        assert_eq!(batch.column(1).as_primitive::<Int64Type>().value(0), failed * 7);
        let ms = batch.column(2).as_primitive::<Float64Type>().value(0);
        let expected = failed as f64 * (7_000.0 - 28.0) / 1e6;
        assert!((ms - expected).abs() < 1e-9, "{ms} != {expected}");
    }
}

/// Joins of spans with `traces` on the trace id answer the same on the 128-bit key as on the
/// text (`|| ''` keeps a join on the text), for every kind of join the rewrite applies to and
/// the one it leaves (`NOT IN`).
#[tokio::test]
async fn joins_on_the_trace_key_answer_as_on_the_text() {
    // Traces 0..120 (8 spans each, every fourth failed) in files and memory; `ids` holds
    // traces 100..120.
    let engine = engine(store(&[spans(0, 100, 8)], vec![spans(100, 20, 8)]).await).await;
    let ids = "(SELECT trace_id, error_count FROM traces WHERE trace_id >= '00000064')";
    for (sql, rows, first) in [
        (
            "SELECT count(*), sum(t.error_count) FROM spans s JOIN traces t ON s.trace_id = t.trace_id{}",
            1,
            960,
        ),
        (
            "SELECT count(t.trace_id), count(*) FROM spans s LEFT JOIN {ids} t ON s.trace_id = t.trace_id{}",
            1,
            160,
        ),
        (
            "SELECT count(*), count(s.span_id) FROM {ids} t LEFT JOIN spans s ON t.trace_id{} = s.trace_id",
            1,
            160,
        ),
        (
            "SELECT count(*) FROM spans s FULL JOIN {ids} t ON s.trace_id = t.trace_id{} WHERE t.error_count > 0",
            1,
            40,
        ),
        (
            "SELECT count(*) FROM spans s WHERE s.trace_id IN (SELECT trace_id{} FROM traces WHERE error_count > 0)",
            1,
            240,
        ),
        (
            "SELECT count(*) FROM spans s WHERE NOT EXISTS (SELECT 1 FROM {ids} t WHERE t.trace_id{} = s.trace_id)",
            1,
            800,
        ),
        (
            "SELECT count(*) FROM spans s WHERE s.trace_id NOT IN (SELECT trace_id{} FROM {ids} t)",
            1,
            800,
        ),
        (
            "SELECT count(*) OVER (), s.span_id, t.root_span_name FROM spans s JOIN traces t \
          ON t.trace_id{} = s.trace_id AND s.name = t.root_span_name ORDER BY 2",
            120,
            120,
        ),
    ] {
        let sql = sql.replace("{ids}", ids);
        let key = engine.sql(&sql.replace("{}", "")).await.unwrap();
        let text = engine.sql(&sql.replace("{}", " || ''")).await.unwrap();
        let show = |r: &crate::QueryResult| {
            datafusion::arrow::util::pretty::pretty_format_batches(&r.batches).unwrap().to_string()
        };
        assert_eq!(key.num_rows(), rows, "{sql}");
        let batch = key.batches.iter().find(|b| b.num_rows() > 0).unwrap();
        assert_eq!(batch.column(0).as_primitive::<Int64Type>().value(0), first, "{sql}");
        assert_eq!(show(&key), show(&text), "{sql}");
    }
}

fn find<T: ExecutionPlan>(plan: &Arc<dyn ExecutionPlan>) -> Option<&T> {
    plan.downcast_ref::<T>().or_else(|| plan.children().into_iter().find_map(|c| find::<T>(c)))
}

fn display(plan: &Arc<dyn ExecutionPlan>) -> String {
    datafusion::physical_plan::displayable(plan.as_ref()).indent(false).to_string()
}

/// The `traces` view groups by `trace_key(trace_id)`; a filter on its `trace_id` still
/// reaches the scan as a filter on the stored column, and the rows are those of the trace.
#[tokio::test]
async fn traces_by_id_filter_the_scan_on_the_stored_trace_id() {
    let engine = engine(store(&[spans(0, 100, 8)], vec![spans(100, 10, 8)]).await).await;
    let id = |t: u32| format!("{t:08x}{}", "0".repeat(24));
    for (trace, errors) in [(7, 0), (4, 1), (104, 1), (105, 0)] {
        let sql = format!(
            "SELECT trace_id, root_span_name, span_count, error_count, llm_calls FROM traces \
             WHERE trace_id = '{}'",
            id(trace)
        );
        let plan = engine.context().sql(&sql).await.unwrap().create_physical_plan().await.unwrap();
        let shown = display(&plan);
        // Traces 100.. are only in memory: the trace index then leaves no file to scan.
        let scan = shown.lines().find(|l| l.contains("file_type=parquet"));
        assert_eq!(scan.is_some(), trace < 100, "{shown}");
        let pushed = format!("predicate=trace_id@0 = {}", id(trace));
        assert!(scan.is_none_or(|s| s.contains(&pushed)), "{shown}");
        let result = engine.sql(&sql).await.unwrap();
        let rows: Vec<_> = result.batches.iter().filter(|b| b.num_rows() > 0).collect();
        assert_eq!(result.num_rows(), 1, "{trace}");
        let b = rows[0];
        let text = |c: usize| {
            let c = datafusion::arrow::compute::cast(b.column(c), &DataType::Utf8).unwrap();
            c.as_string::<i32>().value(0).to_owned()
        };
        assert_eq!(text(0), id(trace));
        assert_eq!(text(1), "agent");
        assert_eq!(b.column(2).as_primitive::<Int64Type>().value(0), 8);
        assert_eq!(b.column(3).as_primitive::<Int64Type>().value(0), errors);
        assert_eq!(b.column(4).as_primitive::<Int64Type>().value(0), 7);
    }
    let all = engine.sql("SELECT count(*), count(DISTINCT trace_id) FROM traces").await.unwrap();
    let b = all.batches.iter().find(|b| b.num_rows() > 0).unwrap();
    assert_eq!(b.column(0).as_primitive::<Int64Type>().value(0), 110);
    assert_eq!(b.column(1).as_primitive::<Int64Type>().value(0), 110);
    let err = engine.sql("SELECT trace_key('4BF92F3577B34DA6A3CE929D0E0E4736')").await.unwrap_err();
    assert!(err.to_string().contains("is not a trace id (32 lowercase hex digits)"), "{err}");
}

/// The rows of a one-text-column, one-integer-column result, in order.
fn text_counts(result: &crate::QueryResult) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for b in &result.batches {
        let text = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
        let text = text.as_string::<i32>();
        let n = b.column(1).as_primitive::<Int64Type>();
        out.extend((0..b.num_rows()).map(|i| (text.value(i).to_owned(), n.value(i))));
    }
    out
}

/// A grouping by the stored trace id runs on `trace_key`, in files and in memory, and gives the
/// rows the text grouping gives; groupings by anything else are left alone.
#[tokio::test]
async fn groupings_by_the_stored_trace_id_run_on_the_key() {
    let engine = engine(store(&[spans(0, 100, 8)], vec![spans(100, 10, 8)]).await).await;
    let id = |t: u32| format!("{t:08x}{}", "0".repeat(24));
    let uses_key = |plan: &Arc<dyn ExecutionPlan>| {
        display(plan).lines().any(|l| l.contains("AggregateExec") && l.contains(" as __trace_key_"))
    };
    let cases: [(&str, Vec<(String, i64)>); 6] = [
        (
            "SELECT trace_id, count(*) AS n FROM spans GROUP BY trace_id ORDER BY trace_id",
            (0..110).map(|t| (id(t), 8)).collect(),
        ),
        // Renamed, qualified, filtered and cut by HAVING, ORDER BY and LIMIT.
        (
            "SELECT x.trace_id AS t, count(*) FILTER (WHERE status_code = 'error') AS e \
             FROM (SELECT * FROM spans WHERE span_type = 'llm') x GROUP BY x.trace_id \
             HAVING count(*) FILTER (WHERE status_code = 'error') > 0 ORDER BY t DESC LIMIT 3",
            [108, 104, 100].into_iter().map(|t| (id(t), 1)).collect(),
        ),
        // Through a join with the traces view, grouped by the spans side.
        (
            "SELECT s.trace_id, count(*) FROM spans s JOIN traces t ON s.trace_id = t.trace_id \
             WHERE t.error_count > 0 AND s.span_type = 'llm' GROUP BY s.trace_id ORDER BY 1",
            (0..110).filter(|t| t % 4 == 0).map(|t| (id(t), 7)).collect(),
        ),
        // One of two keys.
        (
            "SELECT trace_id, count(*) FROM spans WHERE trace_id < '00000002' \
             GROUP BY span_type, trace_id ORDER BY trace_id, count(*)",
            vec![(id(0), 1), (id(0), 7), (id(1), 1), (id(1), 7)],
        ),
        // Grouped twice, beside a scalar subquery (planned on its own).
        (
            "SELECT t.trace_id, count(*) FROM (SELECT trace_id, count(*) AS n FROM spans \
             GROUP BY trace_id) t WHERE n > (SELECT count(*) FROM spans) / 1000 \
             GROUP BY t.trace_id ORDER BY 1",
            (0..110).map(|t| (id(t), 1)).collect(),
        ),
        // count(DISTINCT ...) is planned as a grouping by the column.
        ("SELECT 'traces', count(DISTINCT trace_id) FROM spans", vec![("traces".to_owned(), 110)]),
    ];
    for (sql, expected) in cases {
        let plan = engine.context().sql(sql).await.unwrap().create_physical_plan().await.unwrap();
        assert!(uses_key(&plan), "{sql}\n{}", display(&plan));
        assert_eq!(text_counts(&engine.sql(sql).await.unwrap()), expected, "{sql}");
    }
    // Not the stored column: grouped by its text as written.
    for (sql, rows) in [
        ("SELECT lower(trace_id), count(*) FROM spans GROUP BY 1", 110),
        ("SELECT trace_id, count(*) FROM traces GROUP BY trace_id", 110),
        ("SELECT span_id, count(*) FROM spans GROUP BY span_id", 880),
        (
            "SELECT trace_id, count(*) FROM (SELECT concat(trace_id, '') AS trace_id FROM spans) x \
             GROUP BY trace_id",
            110,
        ),
    ] {
        let plan = engine.context().sql(sql).await.unwrap().create_physical_plan().await.unwrap();
        assert!(!uses_key(&plan), "{sql}\n{}", display(&plan));
        assert_eq!(engine.sql(sql).await.unwrap().num_rows(), rows, "{sql}");
    }
}

/// A grouping of many traces and a join with it answer within a cap they exceed, by
/// spilling: the final aggregation's merge of its spill files gets the memory it needs beside
/// the other partitions' aggregations (memory::QueryPool).
#[tokio::test]
async fn traces_spill_within_a_small_cap() {
    // 100,000 traces of 8 spans (an agent and 7 LLM calls); every fourth has a failed call.
    let n = 100_000u32;
    let store = store(&[spans(0, n / 2, 8), spans(n / 2, n / 2, 8)], vec![]).await;
    // About 9 MiB would not spill the grouping; below 6 MiB a merge of spill files does not
    // fit in what the cap leaves it.
    let config = QueryConfig { memory_per_query_bytes: 7 << 20, ..QueryConfig::default() };
    let engine =
        QueryEngine::new(store, None, Arc::new(PriceTable::default()), &config, Arc::default())
            .await
            .unwrap();
    let failed = i64::from(n / 4);
    for (sql, expected) in [
        (
            "SELECT count(*), sum(error_count), sum(span_count) FROM traces",
            [i64::from(n), failed, i64::from(8 * n)],
        ),
        (
            "SELECT count(*), count(DISTINCT s.trace_id), sum(CAST(t.root_span_name = 'agent' AS INT)) \
             FROM spans s JOIN traces t ON s.trace_id = t.trace_id \
             WHERE s.span_type = 'llm' AND t.error_count > 0",
            [7 * failed, failed, 7 * failed],
        ),
    ] {
        let ctx = engine.query_context();
        // Small batches: a merge of spill files holds a batch per file.
        ctx.sql("SET datafusion.execution.batch_size = 1024").await.unwrap();
        let plan = ctx.sql(sql).await.unwrap().create_physical_plan().await.unwrap();
        let batches = datafusion::physical_plan::collect(Arc::clone(&plan), ctx.task_ctx())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let row = batches.iter().find(|b| b.num_rows() > 0).unwrap();
        let got: Vec<i64> =
            (0..3).map(|c| row.column(c).as_primitive::<Int64Type>().value(0)).collect();
        assert_eq!(got, expected, "{sql}");
        assert!(spills(&plan) > 0, "{sql} did not spill");
    }
}

fn spills(plan: &Arc<dyn ExecutionPlan>) -> usize {
    plan.metrics().and_then(|m| m.spill_count()).unwrap_or(0)
        + plan.children().into_iter().map(spills).sum::<usize>()
}
