//! Groupings by the stored trace id run on its 128-bit key.
//!
//! `SELECT trace_id, sum(cost_usd) FROM spans GROUP BY trace_id` is how analysts ask for
//! per-trace figures. Grouping by the 32-character text hashes and compares 32 bytes per span
//! and keeps every new id's bytes in the hash table; at 100 M spans (10 M traces) that made the
//! grouping the slowest query of the benchmark suite. [`GroupByTraceKey`] rewrites a grouping
//! by the stored `spans.trace_id` column into a grouping by `trace_key(trace_id)` (one
//! `Decimal128`, a primitive hash table) and names each group `trace_key_hex(key)` again above
//! it, under the column's own name and qualifier, so the rest of the plan and the result are
//! unchanged.
//!
//! The rewrite is exact only for canonical ids, which is why it applies only to the stored
//! column: ingest writes every `trace_id` from its 16 bytes as 32 lowercase hex digits and
//! refuses spans whose id has another length (see `spanlake_ingest::normalize`), so
//! `trace_key` maps the column's values one to one. A grouping by anything else (an expression,
//! another table's column, the `traces` view's output) is left as it is.
//!
//! [`JoinOnTraceKey`] does the same for joins of the stored column with the `traces` view's
//! `trace_id` (which the view computes as `trace_key_hex(key)`): `s.trace_id = t.trace_id`
//! becomes `trace_key(s.trace_id) = key`. The hash join then hashes and compares one 128-bit
//! number instead of 32 bytes, and its build side holds the 16-byte key instead of each
//! trace's id as new text (48 bytes as a string view): at 100 M spans the build side of a
//! join with `traces` is millions of traces, and a hash join cannot spill.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::Transformed;
use datafusion::common::{Column, Result};
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{Aggregate, Expr, Join, JoinType, LogicalPlan, Projection};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

use crate::provider::SpansTable;

/// The logical optimizer rule; see the module docs.
#[derive(Debug, Default)]
pub struct GroupByTraceKey;

/// The name of the `i`-th group key after the rewrite.
fn key_name(i: usize) -> String {
    format!("__trace_key_{i}")
}

impl OptimizerRule for GroupByTraceKey {
    fn name(&self) -> &str {
        "group_by_trace_key"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Aggregate(agg) = plan else { return Ok(Transformed::no(plan)) };
        let keys: Vec<usize> = if agg.group_expr.iter().any(|e| matches!(e, Expr::GroupingSet(_))) {
            Vec::new()
        } else {
            (0..agg.group_expr.len()).filter(|&i| is_stored_trace_id(&agg, i)).collect()
        };
        if keys.is_empty() {
            return Ok(Transformed::no(LogicalPlan::Aggregate(agg)));
        }
        let trace_key = Arc::new(crate::trace_key::trace_key());
        let trace_key_hex = Arc::new(crate::trace_key::trace_key_hex());
        let group_expr = agg
            .group_expr
            .iter()
            .enumerate()
            .map(|(i, e)| {
                if !keys.contains(&i) {
                    return e.clone();
                }
                let column = match e {
                    Expr::Alias(a) => a.expr.as_ref().clone(),
                    e => e.clone(),
                };
                Expr::ScalarFunction(ScalarFunction::new_udf(Arc::clone(&trace_key), vec![column]))
                    .alias(key_name(i))
            })
            .collect();
        let grouped =
            Aggregate::try_new(Arc::clone(&agg.input), group_expr, agg.aggr_expr.clone())?;
        // The aggregate's fields again, in order, under their names and qualifiers.
        let names = grouped
            .schema
            .iter()
            .zip(agg.schema.iter())
            .enumerate()
            .map(|(i, ((new_q, new_f), (q, f)))| {
                let field = Expr::Column(Column::new(new_q.cloned(), new_f.name()));
                if keys.contains(&i) {
                    let hex = ScalarFunction::new_udf(Arc::clone(&trace_key_hex), vec![field]);
                    Expr::ScalarFunction(hex).alias_qualified(q.cloned(), f.name())
                } else {
                    field
                }
            })
            .collect();
        let projection = Projection::try_new(names, Arc::new(LogicalPlan::Aggregate(grouped)))?;
        Ok(Transformed::yes(LogicalPlan::Projection(projection)))
    }
}

/// Whether the aggregate's `i`-th group expression is the stored trace id of spans (the
/// column, possibly renamed).
fn is_stored_trace_id(agg: &Aggregate, i: usize) -> bool {
    let column = match &agg.group_expr[i] {
        Expr::Column(c) => c,
        Expr::Alias(a) => match a.expr.as_ref() {
            Expr::Column(c) => c,
            _ => return false,
        },
        _ => return false,
    };
    agg.schema.field(i).data_type() == &DataType::Utf8View
        && agg.input.schema().index_of_column(column).is_ok_and(|at| stored(&agg.input, at))
}

/// Whether the `index`-th output column of `plan` is spans' `trace_id` as stored: the scanned
/// column passed up unchanged through renames, filters, sorts, limits, joins and unions.
fn stored(plan: &LogicalPlan, index: usize) -> bool {
    match plan {
        LogicalPlan::TableScan(scan) => {
            scan.projected_schema.fields().get(index).is_some_and(|f| f.name() == "trace_id")
                && source_as_provider(&scan.source).is_ok_and(|p| p.is::<SpansTable>())
        }
        LogicalPlan::Projection(p) => {
            let mut expr = p.expr.get(index);
            while let Some(Expr::Alias(a)) = expr {
                expr = Some(a.expr.as_ref());
            }
            match expr {
                Some(Expr::Column(c)) => {
                    p.input.schema().index_of_column(c).is_ok_and(|at| stored(&p.input, at))
                }
                _ => false,
            }
        }
        // Same columns as their input, in the same order.
        LogicalPlan::Filter(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Limit(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::Repartition(_) => {
            let [input] = plan.inputs()[..] else { return false };
            stored(input, index)
        }
        LogicalPlan::Join(join) => {
            let left = join.left.schema().fields().len();
            let right = join.right.schema().fields().len();
            match join.join_type {
                JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full => {
                    if index < left {
                        stored(&join.left, index)
                    } else {
                        stored(&join.right, index - left)
                    }
                }
                JoinType::LeftSemi | JoinType::LeftAnti | JoinType::LeftMark => {
                    index < left && stored(&join.left, index)
                }
                JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark => {
                    index < right && stored(&join.right, index)
                }
            }
        }
        LogicalPlan::Union(union) => union.inputs.iter().all(|input| stored(input, index)),
        _ => false,
    }
}

/// The logical optimizer rule for joins; see the module docs.
#[derive(Debug, Default)]
pub struct JoinOnTraceKey;

/// The name of the key column a side of a join gains.
const JOIN_KEY: &str = "__trace_key_join";

impl OptimizerRule for JoinOnTraceKey {
    fn name(&self) -> &str {
        "join_on_trace_key"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Join(join) = plan else { return Ok(Transformed::no(plan)) };
        let plain = matches!(
            join.join_type,
            JoinType::Inner
                | JoinType::Left
                | JoinType::Right
                | JoinType::Full
                | JoinType::LeftSemi
                | JoinType::RightSemi
                | JoinType::LeftAnti
                | JoinType::RightAnti
        );
        if !plain || join.null_aware {
            return Ok(Transformed::no(LogicalPlan::Join(join)));
        }
        // The first pair of keys that is the stored id on one side and the view's id on the
        // other; one rewritten key is what the hash join needs.
        let found = join.on.iter().enumerate().find_map(|(i, (l, r))| {
            let (left, right) = (&join.left, &join.right);
            view_side(left, l, right, r)
                .map(|exposed| (i, false, exposed))
                .or_else(|| view_side(right, r, left, l).map(|exposed| (i, true, exposed)))
        });
        let Some((i, key_on_left, exposed)) = found else {
            return Ok(Transformed::no(LogicalPlan::Join(join)));
        };
        let key_column = last_column(&exposed);
        let trace_key = Arc::new(crate::trace_key::trace_key());
        let mut on = join.on.clone();
        let stored_key = |e: &Expr| {
            Expr::ScalarFunction(ScalarFunction::new_udf(Arc::clone(&trace_key), vec![e.clone()]))
        };
        on[i] = if key_on_left {
            (key_column, stored_key(&on[i].1))
        } else {
            (stored_key(&on[i].0), key_column)
        };
        let (left, right) = if key_on_left {
            (Arc::new(exposed), Arc::clone(&join.right))
        } else {
            (Arc::clone(&join.left), Arc::new(exposed))
        };
        let rewritten = Join::try_new(
            left,
            right,
            on,
            join.filter.clone(),
            join.join_type,
            join.join_constraint,
            join.null_equality,
            join.null_aware,
        )?;
        // The join's own columns again, without the key.
        let columns = join
            .schema
            .iter()
            .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
            .collect();
        let projection = Projection::try_new(columns, Arc::new(LogicalPlan::Join(rewritten)))?;
        Ok(Transformed::yes(LogicalPlan::Projection(projection)))
    }
}

/// The index in `plan`'s output of `expr` when it is a plain column.
fn column_of(plan: &LogicalPlan, expr: &Expr) -> Option<usize> {
    match expr {
        Expr::Column(c) => plan.schema().index_of_column(c).ok(),
        _ => None,
    }
}

/// When `stored_key` is spans' stored trace id in `stored_plan` and `view_key` the `traces`
/// view's id in `view_plan`, `view_plan` with the view's 128-bit key as its last column.
fn view_side(
    stored_plan: &LogicalPlan,
    stored_key: &Expr,
    view_plan: &LogicalPlan,
    view_key: &Expr,
) -> Option<LogicalPlan> {
    let s = column_of(stored_plan, stored_key)?;
    let t = column_of(view_plan, view_key)?;
    if stored(stored_plan, s) { expose_key(view_plan, t) } else { None }
}

/// The last output column of `plan`, as a column expression.
fn last_column(plan: &LogicalPlan) -> Expr {
    let schema = plan.schema();
    let (q, f) = schema.qualified_field(schema.fields().len() - 1);
    Expr::Column(Column::new(q.cloned(), f.name()))
}

/// When the `index`-th output column of `plan` is `trace_key_hex(key)` (passed up through
/// renames, filters, sorts and limits), `plan` with `key` as one more column at the end.
fn expose_key(plan: &LogicalPlan, index: usize) -> Option<LogicalPlan> {
    match plan {
        LogicalPlan::Projection(p) => {
            let mut expr = p.expr.get(index)?;
            while let Expr::Alias(a) = expr {
                expr = a.expr.as_ref();
            }
            let (input, key) = match expr {
                Expr::ScalarFunction(f)
                    if f.func.name() == crate::trace_key::TRACE_KEY_HEX && f.args.len() == 1 =>
                {
                    (Arc::clone(&p.input), f.args[0].clone())
                }
                Expr::Column(c) => {
                    let at = p.input.schema().index_of_column(c).ok()?;
                    let input = expose_key(&p.input, at)?;
                    let key = last_column(&input);
                    (Arc::new(input), key)
                }
                _ => return None,
            };
            let mut exprs = p.expr.clone();
            exprs.push(key.alias(JOIN_KEY));
            Projection::try_new(exprs, input).ok().map(LogicalPlan::Projection)
        }
        LogicalPlan::Filter(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Limit(_)
        | LogicalPlan::SubqueryAlias(_) => {
            let [input] = plan.inputs()[..] else { return None };
            let input = expose_key(input, index)?;
            plan.with_new_exprs(plan.expressions(), vec![input]).ok()
        }
        _ => None,
    }
}
