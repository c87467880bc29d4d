//! `trace_key(trace_id)` and `trace_key_hex(key)`: a trace id as one 128-bit number and back.
//!
//! Stored trace ids are 32 lowercase hex digits (ingest writes every id from its 16 bytes). As
//! text, grouping by them hashes and compares 32 bytes per span and keeps each new id's bytes;
//! as one 128-bit number (`Decimal128(38, 0)`, an opaque key and not meant as a quantity) the
//! grouping is a primitive hash table. The `traces` view groups by `trace_key(trace_id)` and
//! names each row `trace_key_hex(...)`.
//!
//! `trace_key_hex(trace_key(x))` simplifies to `x`: a filter on the view's `trace_id` pushed
//! below the grouping becomes a filter on the stored column again, which the scan prunes with
//! the trace index, bloom filters and page statistics. That is exact because the stored ids
//! are canonical; `trace_key` refuses any other text with an error naming it, so it never
//! merges two different texts into one key.
//!
//! DataFusion estimates a grouping's rows from the distinct count of its key only when the key
//! is a plain column, so [`TraceKeyStatistics`] tells the planner that grouping by
//! `trace_key(trace_id)` yields as many rows as there are distinct trace ids. Without it a join
//! of spans with `traces` would build its hash table from the spans side.

use std::sync::Arc;

use datafusion::arrow::array::ByteView;
use datafusion::arrow::array::{Array, ArrayRef, AsArray as _, Decimal128Array, StringViewBuilder};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Field, FieldRef};
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::{Transformed, TreeNode as _};
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::{ExecutionPlan, StatisticsArgs, StatisticsContext};

use crate::stats::WithStatistics;

const KEY_TYPE: DataType = DataType::Decimal128(38, 0);
const TRACE_KEY: &str = "trace_key";
pub(crate) const TRACE_KEY_HEX: &str = "trace_key_hex";

/// The `trace_key` function.
pub fn trace_key() -> ScalarUDF {
    ScalarUDF::from(TraceKey { signature: Signature::user_defined(Volatility::Immutable) })
}

/// The `trace_key_hex` function.
pub fn trace_key_hex() -> ScalarUDF {
    ScalarUDF::from(TraceKeyHex { signature: Signature::user_defined(Volatility::Immutable) })
}

/// Eight lowercase hex digits (`chunk`, the first digit first) as four bytes, or `None` when
/// any byte is not one. SWAR: every step works on all eight bytes of one word at once.
fn digits8(chunk: [u8; 8]) -> Option<u32> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let x = u64::from_le_bytes(chunk);
    // For bytes below 0x80, adding 0x80 - k sets a byte's high bit exactly when it is >= k,
    // and no byte carries into the next.
    let at_least = |k: u8| x.wrapping_add(ONES * u64::from(0x80 - k)) & HIGH;
    let digit = at_least(b'0') & !at_least(b'9' + 1);
    let letter = at_least(b'a') & !at_least(b'f' + 1);
    if x & HIGH != 0 || (digit | letter) != HIGH {
        return None;
    }
    // '0'..'9' are 0x30..0x39 and 'a'..'f' 0x61..0x66: the low nibble, plus 9 for letters.
    let v = (x & (ONES * 0x0f)) + ((x >> 6) & ONES) * 9;
    // Pair each digit with the next (the first is the high nibble), then keep every other byte.
    let pairs = ((v << 4) | (v >> 8)) & 0x00ff_00ff_00ff_00ff;
    let pairs = (pairs | (pairs >> 8)) & 0x0000_ffff_0000_ffff;
    Some(((pairs | (pairs >> 16)) & 0xffff_ffff) as u32)
}

/// The key of a canonical trace id, or `None` when `id` is not 32 lowercase hex digits.
fn key_of(id: &[u8]) -> Option<i128> {
    let id: &[u8; 32] = id.try_into().ok()?;
    let mut bytes = [0u8; 16];
    for (out, chunk) in bytes.chunks_exact_mut(4).zip(id.as_chunks::<8>().0) {
        out.copy_from_slice(&digits8(*chunk)?.to_le_bytes());
    }
    Some(i128::from_be_bytes(bytes))
}

fn hex_of(key: i128, out: &mut [u8; 32]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in key.to_be_bytes().into_iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0x0f)];
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct TraceKey {
    signature: Signature,
}

impl ScalarUDFImpl for TraceKey {
    fn name(&self) -> &str {
        TRACE_KEY
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        match args {
            [DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null] => {
                Ok(vec![DataType::Utf8View])
            }
            _ => plan_err!("trace_key takes one text argument (a trace id), got {args:?}"),
        }
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(KEY_TYPE)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs<'_>) -> Result<FieldRef> {
        Ok(Arc::new(Field::new(self.name(), KEY_TYPE, nullable(&args))))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [arg] = args.args.as_slice() else {
            return exec_err!("trace_key takes one argument");
        };
        let ids = arg.to_array(args.number_rows)?;
        let Some(ids) = ids.as_string_view_opt() else {
            return exec_err!("trace_key: argument is {}, not Utf8View", ids.data_type());
        };
        let mut keys = Vec::with_capacity(ids.len());
        let buffers = ids.data_buffers();
        for (row, &view) in ids.views().iter().enumerate() {
            // A 32-byte value lives in a data buffer; shorter ones (never an id) are inline.
            let view = ByteView::from(view);
            let offset = view.offset as usize;
            let id = match buffers.get(view.buffer_index as usize) {
                Some(b) if view.length == 32 => b.get(offset..offset + 32).unwrap_or_default(),
                _ => &[],
            };
            match key_of(id) {
                Some(k) => keys.push(k),
                None if ids.is_null(row) => keys.push(0),
                None => {
                    return exec_err!(
                        "trace_key: {:?} is not a trace id (32 lowercase hex digits)",
                        String::from_utf8_lossy(id)
                    );
                }
            }
        }
        let keys = Decimal128Array::new(keys.into(), ids.nulls().cloned())
            .with_data_type(KEY_TYPE.clone());
        scalar_if(arg, Arc::new(keys))
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct TraceKeyHex {
    signature: Signature,
}

impl ScalarUDFImpl for TraceKeyHex {
    fn name(&self) -> &str {
        TRACE_KEY_HEX
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        match args {
            [DataType::Decimal128(_, 0) | DataType::Null] => Ok(vec![KEY_TYPE]),
            _ => plan_err!("trace_key_hex takes one trace_key value, got {args:?}"),
        }
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8View)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs<'_>) -> Result<FieldRef> {
        Ok(Arc::new(Field::new(self.name(), DataType::Utf8View, nullable(&args))))
    }

    fn simplify(&self, args: Vec<Expr>, _info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        match args.as_slice() {
            [Expr::ScalarFunction(ScalarFunction { func, args: inner })]
                if func.name() == TRACE_KEY && inner.len() == 1 =>
            {
                Ok(ExprSimplifyResult::Simplified(inner[0].clone()))
            }
            _ => Ok(ExprSimplifyResult::Original(args)),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [arg] = args.args.as_slice() else {
            return exec_err!("trace_key_hex takes one argument");
        };
        let keys = arg.to_array(args.number_rows)?;
        let Some(keys) = keys.as_primitive_opt::<Decimal128Type>() else {
            return exec_err!("trace_key_hex: argument is {}, not a trace key", keys.data_type());
        };
        let mut text = [0u8; 32];
        let mut ids = StringViewBuilder::with_capacity(keys.len());
        for key in keys.iter() {
            match key {
                Some(k) => {
                    hex_of(k, &mut text);
                    // Hex digits are ASCII, so this never fails.
                    ids.append_value(std::str::from_utf8(&text).unwrap_or_default());
                }
                None => ids.append_null(),
            }
        }
        scalar_if(arg, Arc::new(ids.finish()))
    }
}

/// A key or id is null exactly when its argument is, so a non-null stored `trace_id` keeps
/// its non-null field through `trace_key` and back (the grouping rewrite relies on it).
fn nullable(args: &ReturnFieldArgs<'_>) -> bool {
    args.arg_fields.iter().any(|f| f.is_nullable())
}

/// `array` as the result of a call on `arg`: a scalar when the argument was one.
fn scalar_if(arg: &ColumnarValue, array: ArrayRef) -> Result<ColumnarValue> {
    Ok(match arg {
        ColumnarValue::Scalar(_) => ColumnarValue::Scalar(ScalarValue::try_from_array(&array, 0)?),
        ColumnarValue::Array(_) => ColumnarValue::Array(array),
    })
}

/// A physical optimizer rule (to run before join selection): a grouping by
/// `trace_key(trace_id)` reports the distinct trace ids below it as its rows.
#[derive(Debug, Default)]
pub struct TraceKeyStatistics;

impl TraceKeyStatistics {
    /// The distinct trace ids under `agg` when it completes a grouping by `trace_key` of a
    /// column (a single-stage grouping, or the final stage over its partial one).
    fn distinct_keys(agg: &AggregateExec) -> Result<Option<usize>> {
        let source = match agg.mode() {
            AggregateMode::Single | AggregateMode::SinglePartitioned => agg,
            AggregateMode::Final | AggregateMode::FinalPartitioned => {
                match agg.input().downcast_ref::<AggregateExec>() {
                    Some(partial) if *partial.mode() == AggregateMode::Partial => partial,
                    _ => return Ok(None),
                }
            }
            AggregateMode::Partial | AggregateMode::PartialReduce => return Ok(None),
        };
        let group = source.group_expr();
        let [(expr, _)] = group.expr() else { return Ok(None) };
        let Some(call) = expr.downcast_ref::<ScalarFunctionExpr>() else { return Ok(None) };
        let Some(column) = (match call.args() {
            [arg] if call.name() == TRACE_KEY => arg.downcast_ref::<Column>(),
            _ => None,
        }) else {
            return Ok(None);
        };
        if group.has_grouping_set() {
            return Ok(None);
        }
        let input =
            StatisticsContext::new().compute(source.input().as_ref(), &StatisticsArgs::new())?;
        Ok(input
            .column_statistics
            .get(column.index())
            .and_then(|c| c.distinct_count.get_value().copied()))
    }
}

impl PhysicalOptimizerRule for TraceKeyStatistics {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(agg) = node.downcast_ref::<AggregateExec>() else {
                return Ok(Transformed::no(node));
            };
            let Some(traces) = Self::distinct_keys(agg)? else {
                return Ok(Transformed::no(node));
            };
            let mut stats =
                (*StatisticsContext::new().compute(node.as_ref(), &StatisticsArgs::new())?).clone();
            let estimated = stats.num_rows.get_value().copied();
            let rows = estimated.map_or(traces, |n| n.min(traces));
            stats.num_rows = Precision::Inexact(rows);
            // Join selection compares sizes first: scale the size to the rows.
            stats.total_byte_size = match (stats.total_byte_size.get_value(), estimated) {
                (Some(&bytes), Some(n)) if n > 0 => {
                    Precision::Inexact((bytes as u128 * rows as u128 / n as u128) as usize)
                }
                _ => Precision::Absent,
            };
            if let Some(key) = stats.column_statistics.first_mut() {
                key.distinct_count = Precision::Inexact(rows);
            }
            Ok(Transformed::yes(Arc::new(WithStatistics::new(node, stats)) as _))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "trace_key_statistics"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_refuse_other_text() {
        for id in [
            "00000000000000000000000000000001",
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "ffffffffffffffffffffffffffffffff",
            "80000000000000000000000000000000",
        ] {
            let key = key_of(id.as_bytes()).unwrap();
            let mut out = [0u8; 32];
            hex_of(key, &mut out);
            assert_eq!(std::str::from_utf8(&out).unwrap(), id);
        }
        assert_eq!(key_of(b"00000000000000000000000000000010"), Some(16));
        // Every byte value at every position of a word, against a plain digit-by-digit parse.
        let reference = |chunk: [u8; 8]| {
            let text = std::str::from_utf8(&chunk).ok()?;
            let valid = text.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
            valid.then(|| u32::from_str_radix(text, 16).unwrap().swap_bytes())
        };
        for position in 0..8 {
            for byte in 0..=255u8 {
                let mut chunk = *b"0123abcd";
                chunk[position] = byte;
                assert_eq!(digits8(chunk), reference(chunk), "{chunk:?}");
            }
        }
        for bad in [
            "4BF92F3577B34DA6A3CE929D0E0E4736",
            "4bf92f3577b34da6a3ce929d0e0e473",
            "4bf92f3577b34da6a3ce929d0e0e47360",
            "4bf92f3577b34da6a3ce929d0e0e473g",
            "",
        ] {
            assert_eq!(key_of(bad.as_bytes()), None, "{bad}");
        }
    }
}
