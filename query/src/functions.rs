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

/// What `current_setting(name)` answers: the settings Postgres clients ask about (Grafana's
/// version probe, search path resolution in table pickers, psql).
pub fn pg_setting(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_lowercase().as_str() {
        "server_version_num" => "160000",
        "server_version" => "16.0",
        "search_path" => "public",
        "timezone" => "UTC",
        "datestyle" => "ISO, MDY",
        "standard_conforming_strings" => "on",
        "client_encoding" | "server_encoding" => "UTF8",
        "integer_datetimes" => "on",
        "max_identifier_length" => "63",
        "transaction_isolation" | "default_transaction_isolation" => "read committed",
        "transaction_read_only" | "default_transaction_read_only" => "on",
        _ => return None,
    })
}

/// The Postgres name of a type as DataFusion's `information_schema.columns.data_type` writes
/// it (`Int64` → `bigint`, a timestamp with a time zone → `timestamp with time zone`, ...).
pub fn pg_type_name(arrow: &str) -> &'static str {
    let base = arrow.split('(').next().unwrap_or(arrow);
    match base {
        "Utf8" | "LargeUtf8" | "Utf8View" => "text",
        "Int64" | "UInt32" => "bigint",
        "Int32" | "UInt16" => "integer",
        "Int16" | "Int8" | "UInt8" => "smallint",
        "UInt64" | "Decimal128" | "Decimal256" => "numeric",
        "Float64" => "double precision",
        "Float32" | "Float16" => "real",
        "Boolean" => "boolean",
        "Date32" | "Date64" => "date",
        "Timestamp" if arrow.contains(',') && !arrow.contains("None") => "timestamp with time zone",
        "Timestamp" => "timestamp without time zone",
        "Interval" | "Duration" => "interval",
        "Binary" | "LargeBinary" | "BinaryView" | "FixedSizeBinary" => "bytea",
        "List" | "LargeList" | "FixedSizeList" => "ARRAY",
        _ => "text",
    }
}

/// Registers the functions spanlake adds to DataFusion's: `llm_cost`, `current_setting` and
/// `pg_type_name`.
pub fn register(ctx: &SessionContext, prices: Arc<PriceTable>) {
    let current_setting = create_udf(
        "current_setting",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Stable,
        Arc::new(|args: &[ColumnarValue]| -> datafusion::error::Result<ColumnarValue> {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let names = cast(&arrays[0], &DataType::Utf8)
                .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?;
            let names = names.as_any().downcast_ref::<StringArray>().expect("utf8");
            let mut out = Vec::with_capacity(names.len());
            for name in names.iter() {
                match name {
                    None => out.push(None),
                    Some(n) => match pg_setting(n) {
                        Some(v) => out.push(Some(v)),
                        None => {
                            return Err(DataFusionError::Plan(format!(
                                "unrecognized configuration parameter \"{n}\""
                            )));
                        }
                    },
                }
            }
            let array: ArrayRef = Arc::new(StringArray::from(out));
            Ok(if args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_))) {
                ColumnarValue::Scalar(datafusion::common::ScalarValue::try_from_array(&array, 0)?)
            } else {
                ColumnarValue::Array(array)
            })
        }),
    );
    ctx.register_udf(current_setting);
    let pg_type = create_udf(
        "pg_type_name",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| -> datafusion::error::Result<ColumnarValue> {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let names = cast(&arrays[0], &DataType::Utf8)
                .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?;
            let names = names.as_any().downcast_ref::<StringArray>().expect("utf8");
            let out: StringArray = names.iter().map(|n| n.map(pg_type_name)).collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    );
    ctx.register_udf(pg_type);
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
