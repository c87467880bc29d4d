//! `root_value(value, parent_span_id, start_time)`: an aggregate giving the value of a trace's
//! root span — of the earliest span without a parent, or of the earliest span when none lacks
//! one. It is what `first_value(value ORDER BY CASE WHEN parent_span_id IS NULL THEN 0 ELSE 1
//! END, start_time)` answers (ties go to the first row seen), without carrying the ordering
//! keys through the aggregation: each group keeps one rank, one start time and the index of
//! its value among the distinct values seen. The `traces` view names each trace
//! after its root with it; at 10 M spans the ordered `first_value` took about 1.4 s of a
//! 2 s grouping by trace.

use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray as _, BooleanArray, Int64Array, StringViewArray, StringViewBuilder,
    UInt8Array,
};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Int64Type, UInt8Type};
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};

/// The `root_value` aggregate function.
pub fn root_value() -> AggregateUDF {
    AggregateUDF::from(RootValue { signature: Signature::user_defined(Volatility::Immutable) })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct RootValue {
    signature: Signature,
}

impl AggregateUDFImpl for RootValue {
    fn name(&self) -> &str {
        "root_value"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        let [_, parent, start] = args else {
            return plan_err!("root_value takes (value, parent_span_id, start_time)");
        };
        match start {
            DataType::Timestamp(_, _) | DataType::Int64 => {}
            other => return plan_err!("root_value: start_time must be a timestamp, not {other}"),
        }
        Ok(vec![DataType::Utf8View, parent.clone(), DataType::Int64])
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8View)
    }

    fn state_fields(&self, args: StateFieldsArgs<'_>) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(format!("{}[value]", args.name), DataType::Utf8View, true)),
            Arc::new(Field::new(format!("{}[rank]", args.name), DataType::UInt8, true)),
            Arc::new(Field::new(format!("{}[start]", args.name), DataType::Int64, true)),
        ])
    }

    fn accumulator(&self, _args: AccumulatorArgs<'_>) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(Single(Groups::default())))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs<'_>) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs<'_>,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(Groups::default()))
    }
}

/// How a span ranks: 0 for a root, 1 for others, then its start time; the smallest wins.
type Key = (u8, i64);

/// Per group: the best key seen and its span's value, as an index into the distinct values
/// seen (`NULL` for none). A trace's root names and services repeat across traces (at 100 M
/// spans, 9.8 M traces had 5 root span names), so each group holds 4 bytes rather than its own
/// string, and the arrays given out hold each name once: a join of spans with `traces` charges
/// its build side for the batches it holds, and batches sliced from one array of all the
/// partition's names were each charged for all of them.
#[derive(Debug, Default)]
struct Groups {
    keys: Vec<Option<Key>>,
    values: Vec<u32>,
    names: Names,
}

/// The index of a group without a value.
const NULL: u32 = u32::MAX;

/// Distinct values, each stored once.
#[derive(Debug, Default)]
struct Names {
    index: HashMap<Arc<str>, u32>,
    values: Vec<Arc<str>>,
    bytes: usize,
}

impl Names {
    fn intern(&mut self, value: &str) -> Result<u32> {
        if let Some(&i) = self.index.get(value) {
            return Ok(i);
        }
        let i = match u32::try_from(self.values.len()) {
            Ok(i) if i < NULL => i,
            _ => return exec_err!("root_value: more than {NULL} distinct values in one grouping"),
        };
        let value: Arc<str> = Arc::from(value);
        self.bytes += value.len();
        self.values.push(Arc::clone(&value));
        self.index.insert(value, i);
        Ok(i)
    }

    /// The values of `indices` as one array holding each distinct value once.
    fn array(&self, indices: &[u32]) -> StringViewArray {
        let mut b = StringViewBuilder::with_capacity(indices.len()).with_deduplicate_strings();
        for &i in indices {
            match self.values.get(i as usize) {
                Some(v) => b.append_value(v),
                None => b.append_null(),
            }
        }
        b.finish()
    }

    fn size(&self) -> usize {
        self.bytes
            + self.values.capacity() * size_of::<Arc<str>>()
            + self.index.capacity() * (size_of::<Arc<str>>() + size_of::<u32>() + 8)
    }
}

impl Groups {
    fn offer(&mut self, group: usize, key: Key, value: Option<&str>) -> Result<()> {
        if self.keys[group].is_none_or(|best| key < best) {
            self.keys[group] = Some(key);
            self.values[group] = match value {
                Some(v) => self.names.intern(v)?,
                None => NULL,
            };
        }
        Ok(())
    }

    fn grow(&mut self, groups: usize) {
        if self.keys.len() < groups {
            self.keys.resize(groups, None);
            self.values.resize(groups, NULL);
        }
    }

    /// Offers every row of `values` (value, rank, start) that `filter` keeps.
    fn offer_rows(
        &mut self,
        value: &ArrayRef,
        rank: impl Fn(usize) -> Option<u8>,
        start: &ArrayRef,
        groups: &[usize],
        filter: Option<&BooleanArray>,
    ) -> Result<()> {
        let Some(value) = value.as_string_view_opt() else {
            return exec_err!("root_value: value is {}, not Utf8View", value.data_type());
        };
        let Some(start) = start.as_primitive_opt::<Int64Type>() else {
            return exec_err!("root_value: start_time is {}, not Int64", start.data_type());
        };
        for (row, &group) in groups.iter().enumerate() {
            if filter.is_some_and(|f| !f.is_valid(row) || !f.value(row)) || start.is_null(row) {
                continue;
            }
            let Some(rank) = rank(row) else { continue };
            let v = value.is_valid(row).then(|| value.value(row));
            self.offer(group, (rank, start.value(row)), v)?;
        }
        Ok(())
    }

    fn take(&mut self, emit_to: EmitTo) -> (Vec<Option<Key>>, StringViewArray) {
        let keys = emit_to.take_needed(&mut self.keys);
        let values = emit_to.take_needed(&mut self.values);
        (keys, self.names.array(&values))
    }
}

impl GroupsAccumulator for Groups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let [value, parent, start] = values else {
            return exec_err!("root_value takes 3 arguments, got {}", values.len());
        };
        self.grow(total_num_groups);
        // Roots rank 0: a null parent. The null buffer is read once, not per row.
        let parents = parent.logical_nulls();
        let rank = |row| Some(u8::from(parents.as_ref().is_none_or(|n| n.is_valid(row))));
        self.offer_rows(value, rank, start, group_indices, opt_filter)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        let [value, rank, start] = values else {
            return exec_err!("root_value state has 3 columns, got {}", values.len());
        };
        let Some(rank) = rank.as_primitive_opt::<UInt8Type>() else {
            return exec_err!("root_value: rank state is {}", rank.data_type());
        };
        self.grow(total_num_groups);
        let rank = |row| rank.is_valid(row).then(|| rank.value(row));
        self.offer_rows(value, rank, start, group_indices, None)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let [value, parent, start] = values else {
            return exec_err!("root_value takes 3 arguments, got {}", values.len());
        };
        let ranks: UInt8Array = (0..parent.len())
            .map(|row| {
                let kept = opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row));
                (kept && start.is_valid(row)).then(|| u8::from(parent.is_valid(row)))
            })
            .collect();
        Ok(vec![Arc::clone(value), Arc::new(ranks), Arc::clone(start)])
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let (_, values) = self.take(emit_to);
        Ok(Arc::new(values))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let (keys, values) = self.take(emit_to);
        Ok(vec![
            Arc::new(values),
            Arc::new(keys.iter().map(|k| k.map(|k| k.0)).collect::<UInt8Array>()),
            Arc::new(keys.iter().map(|k| k.map(|k| k.1)).collect::<Int64Array>()),
        ])
    }

    fn size(&self) -> usize {
        self.keys.capacity() * size_of::<Option<Key>>()
            + self.values.capacity() * size_of::<u32>()
            + self.names.size()
    }
}

/// The aggregate over one group (no `GROUP BY`).
#[derive(Debug)]
struct Single(Groups);

impl Single {
    fn value(&self) -> Option<String> {
        let i = *self.0.values.first()?;
        self.0.names.values.get(i as usize).map(|v| v.to_string())
    }
}

impl Accumulator for Single {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let rows = values.first().map_or(0, |v| v.len());
        self.0.update_batch(values, &vec![0; rows], None, 1)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let rows = states.first().map_or(0, |v| v.len());
        self.0.merge_batch(states, &vec![0; rows], 1)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.0.grow(1);
        let key = self.0.keys[0];
        Ok(vec![
            ScalarValue::Utf8View(self.value()),
            ScalarValue::UInt8(key.map(|k| k.0)),
            ScalarValue::Int64(key.map(|k| k.1)),
        ])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.0.grow(1);
        Ok(ScalarValue::Utf8View(self.value()))
    }

    fn size(&self) -> usize {
        size_of::<Self>() + self.0.size()
    }
}

#[cfg(test)]
mod tests;
