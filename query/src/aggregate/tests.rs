use datafusion::arrow::array::{RecordBatch, StringArray, TimestampNanosecondArray};
use datafusion::arrow::datatypes::{Schema, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};

use super::*;

/// Rows (trace, name, parent, start ns), split over `parts` partitions.
async fn context(rows: &[(&str, Option<&str>, Option<&str>, i64)], parts: usize) -> SessionContext {
    let schema = Arc::new(Schema::new(vec![
        Field::new("trace_id", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("parent_span_id", DataType::Utf8, true),
        Field::new(
            "start_time",
            DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
            false,
        ),
    ]));
    let batch = |rows: &[(&str, Option<&str>, Option<&str>, i64)]| {
        RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(rows.iter().map(|r| Some(r.0)).collect::<StringArray>()),
                Arc::new(rows.iter().map(|r| r.1).collect::<StringArray>()),
                Arc::new(rows.iter().map(|r| r.2).collect::<StringArray>()),
                Arc::new(
                    TimestampNanosecondArray::from(rows.iter().map(|r| r.3).collect::<Vec<_>>())
                        .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap()
    };
    let chunk = rows.len().div_ceil(parts);
    let partitions: Vec<Vec<RecordBatch>> = rows.chunks(chunk).map(|c| vec![batch(c)]).collect();
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(parts));
    ctx.register_table("t", Arc::new(MemTable::try_new(schema, partitions).unwrap())).unwrap();
    ctx.register_udaf(root_value());
    ctx
}

async fn strings(ctx: &SessionContext, sql: &str) -> Vec<Vec<Option<String>>> {
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let mut out = Vec::new();
    for b in &batches {
        for row in 0..b.num_rows() {
            out.push(
                (0..b.num_columns())
                    .map(|c| {
                        let v = ScalarValue::try_from_array(b.column(c), row).unwrap();
                        (!v.is_null()).then(|| v.to_string())
                    })
                    .collect(),
            );
        }
    }
    out
}

const ROWS: &[(&str, Option<&str>, Option<&str>, i64)] = &[
    // a: the root starts after its children.
    ("a", Some("child 1"), Some("r"), 10),
    ("a", Some("root"), None, 20),
    ("a", Some("child 2"), Some("r"), 5),
    // b: no root (its parent was never exported): the earliest span.
    ("b", Some("late"), Some("x"), 9),
    ("b", Some("early"), Some("x"), 3),
    // c: two roots: the earlier one.
    ("c", Some("second root"), None, 8),
    ("c", Some("first root"), None, 7),
    ("c", Some("child"), Some("r"), 1),
    // d: the root has no name.
    ("d", None, None, 4),
    ("d", Some("child"), Some("r"), 2),
];

#[tokio::test]
async fn root_value_answers_as_first_value_ordered_by_rootness_and_start() {
    for parts in [1, 2, 3] {
        let ctx = context(ROWS, parts).await;
        let ours = strings(
            &ctx,
            "SELECT trace_id, root_value(name, parent_span_id, start_time) FROM t \
             GROUP BY trace_id ORDER BY trace_id",
        )
        .await;
        let reference = strings(
            &ctx,
            "SELECT trace_id, first_value(name ORDER BY CASE WHEN parent_span_id IS NULL THEN 0 \
             ELSE 1 END, start_time) FROM t GROUP BY trace_id ORDER BY trace_id",
        )
        .await;
        assert_eq!(ours, reference, "{parts} partitions");
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            ours,
            vec![
                vec![s("a"), s("root")],
                vec![s("b"), s("early")],
                vec![s("c"), s("first root")],
                vec![s("d"), None],
            ]
        );
        // Without GROUP BY: the earliest root is d's, which has no name; a filter skips it.
        let whole = strings(
            &ctx,
            "SELECT root_value(name, parent_span_id, start_time), \
             root_value(name, parent_span_id, start_time) FILTER (WHERE trace_id <> 'd') FROM t",
        )
        .await;
        assert_eq!(whole, vec![vec![None, s("first root")]]);
    }
}

/// Each group holds an index: the values given out hold each distinct name once, however many
/// groups have it, and a better span's name replaces a group's.
#[test]
fn groups_give_out_each_distinct_value_once() {
    let mut groups = Groups::default();
    let names = ["invoke_agent research-planner", "invoke_agent report-writer"];
    let value: ArrayRef = Arc::new(StringViewArray::from_iter(
        (0..1000).map(|i| (i % 7 != 0).then_some(names[i % 2])),
    ));
    // All roots (null parents), starting at 1000 - i: later rows are earlier spans.
    let parent: ArrayRef = Arc::new(StringArray::from(vec![None::<&str>; 1000]));
    let start: ArrayRef = Arc::new(Int64Array::from_iter_values((0..1000).map(|i| 1000 - i)));
    let rows: Vec<usize> = (0..1000).map(|i| i % 100).collect();
    groups.update_batch(&[value, parent, start], &rows, None, 100).unwrap();
    let out = groups.evaluate(EmitTo::All).unwrap();
    let out = out.as_string_view();
    let buffered: usize = out.data_buffers().iter().map(|b| b.len()).sum();
    assert_eq!(buffered, names[0].len() + names[1].len());
    // Group g's earliest span is row 900 + g: a name unless 900 + g is a multiple of 7.
    for g in 0..100 {
        let row = 900 + g;
        let expected = (row % 7 != 0).then_some(names[row % 2]);
        assert_eq!(out.is_valid(g).then(|| out.value(g)), expected, "group {g}");
    }
}
