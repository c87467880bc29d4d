//! SQL functions for the analyses people run every day.
//!
//! * `llm_cost(model, input_tokens, output_tokens)` — the cost in USD of a call at the current
//!   price table (to reprice history after a price change, or price spans sent without cost);
//!   null for unknown models.
//! * The JSON functions of `datafusion-functions-json` reach attributes by key with a type:
//!   `json_get_str(attributes, 'gen_ai.request.model')`, `json_get_int(...)`,
//!   `json_get_float(...)`, `json_get_bool(...)`, `json_get_json(...)` (nested values as JSON
//!   text), `json_contains(...)`, and the operators `attributes->'key'` and `attributes->>'key'`.
//! * `approx_percentile_cont(x, 0.95)` and the rest of DataFusion's aggregates work as
//!   documented by DataFusion.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Builder, Int64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use datafusion::common::DataFusionError;
use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
use datafusion::prelude::SessionContext;
use spanlake_engine::pricing::PriceTable;

/// Registers spanlake's functions.
pub fn register(ctx: &SessionContext, prices: Arc<PriceTable>) {
    let llm_cost = create_udf(
        "llm_cost",
        vec![DataType::Utf8, DataType::Int64, DataType::Int64],
        DataType::Float64,
        Volatility::Stable,
        Arc::new(move |args: &[ColumnarValue]| -> datafusion::error::Result<ColumnarValue> {
            let n = args
                .iter()
                .find_map(|a| match a {
                    ColumnarValue::Array(a) => Some(a.len()),
                    ColumnarValue::Scalar(_) => None,
                })
                .unwrap_or(1);
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let as_type = |a: &ArrayRef, t: &DataType| {
                cast(a, t).map_err(|e| DataFusionError::ArrowError(Box::new(e), None))
            };
            let models = as_type(&arrays[0], &DataType::Utf8)?;
            let input = as_type(&arrays[1], &DataType::Int64)?;
            let output = as_type(&arrays[2], &DataType::Int64)?;
            let models = models.as_any().downcast_ref::<StringArray>().expect("cast to Utf8");
            let input = input.as_any().downcast_ref::<Int64Array>().expect("cast to Int64");
            let output = output.as_any().downcast_ref::<Int64Array>().expect("cast to Int64");
            let mut b = Float64Builder::with_capacity(n);
            for i in 0..models.len() {
                let model = models.is_valid(i).then(|| models.value(i));
                let tokens = |a: &Int64Array| a.is_valid(i).then(|| a.value(i));
                b.append_option(model.and_then(|m| prices.cost(m, tokens(input), tokens(output))));
            }
            Ok(ColumnarValue::Array(Arc::new(b.finish())))
        }),
    );
    ctx.register_udf(llm_cost);
}
