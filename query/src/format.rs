//! Query results as JSON, CSV, Arrow IPC or a table for people.
//!
//! JSON is `{"columns": [{"name", "type"}], "rows": [[...]], "row_count": n}`: integers and
//! floats as JSON numbers (non-finite floats as null), booleans as booleans, strings as strings,
//! timestamps as RFC 3339 strings, and any other type in its Arrow display form.

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::{Map, Value};

use crate::engine::QueryResult;
use crate::error::{Error, Result};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON document with columns and rows.
    Json,
    /// CSV with a header line.
    Csv,
    /// Arrow IPC stream.
    Arrow,
    /// An aligned text table.
    Table,
}

impl Format {
    /// The media type of the format.
    pub fn content_type(&self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Csv => "text/csv",
            Self::Arrow => "application/vnd.apache.arrow.stream",
            Self::Table => "text/plain; charset=utf-8",
        }
    }
}

/// Encodes a result.
pub fn encode(result: &QueryResult, format: Format) -> Result<Vec<u8>> {
    let enc = |source| Error::Encode { source };
    match format {
        Format::Json => Ok(to_json(result)?.to_string().into_bytes()),
        Format::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(&mut buf);
                if result.batches.is_empty() {
                    w.write(&RecordBatch::new_empty(result.schema.clone())).map_err(enc)?;
                }
                for b in &result.batches {
                    w.write(b).map_err(enc)?;
                }
            }
            Ok(buf)
        }
        Format::Arrow => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, &result.schema)
                    .map_err(enc)?;
                for b in &result.batches {
                    w.write(b).map_err(enc)?;
                }
                w.finish().map_err(enc)?;
            }
            Ok(buf)
        }
        Format::Table => {
            if result.batches.is_empty() {
                return Ok(arrow::util::pretty::pretty_format_batches(&[RecordBatch::new_empty(
                    result.schema.clone(),
                )])
                .map_err(enc)?
                .to_string()
                .into_bytes());
            }
            let mut s = arrow::util::pretty::pretty_format_batches(&result.batches)
                .map_err(enc)?
                .to_string();
            s.push('\n');
            Ok(s.into_bytes())
        }
    }
}

/// The JSON document of a result.
pub fn to_json(result: &QueryResult) -> Result<Value> {
    let columns: Vec<Value> = result
        .schema
        .fields()
        .iter()
        .map(|f| {
            let mut m = Map::new();
            m.insert("name".into(), Value::String(f.name().clone()));
            m.insert("type".into(), Value::String(f.data_type().to_string()));
            Value::Object(m)
        })
        .collect();
    let n: usize = result.batches.iter().map(RecordBatch::num_rows).sum();
    let mut rows: Vec<Vec<Value>> = Vec::with_capacity(n);
    for batch in &result.batches {
        let start = rows.len();
        rows.extend((0..batch.num_rows()).map(|_| Vec::with_capacity(batch.num_columns())));
        for column in batch.columns() {
            let values = column_values(column)?;
            for (row, v) in rows[start..].iter_mut().zip(values) {
                row.push(v);
            }
        }
    }
    let mut doc = Map::new();
    doc.insert("columns".into(), Value::Array(columns));
    doc.insert("rows".into(), Value::Array(rows.into_iter().map(Value::Array).collect()));
    doc.insert("row_count".into(), Value::from(n));
    Ok(Value::Object(doc))
}

fn column_values(a: &ArrayRef) -> Result<Vec<Value>> {
    macro_rules! prim {
        ($t:ty) => {{
            let arr = a.as_primitive::<$t>();
            (0..arr.len())
                .map(|i| if arr.is_null(i) { Value::Null } else { Value::from(arr.value(i)) })
                .collect()
        }};
    }
    macro_rules! float {
        ($t:ty) => {{
            let arr = a.as_primitive::<$t>();
            (0..arr.len())
                .map(|i| {
                    if arr.is_null(i) {
                        Value::Null
                    } else {
                        serde_json::Number::from_f64(f64::from(arr.value(i)))
                            .map_or(Value::Null, Value::Number)
                    }
                })
                .collect()
        }};
    }
    Ok(match a.data_type() {
        DataType::Null => vec![Value::Null; a.len()],
        DataType::Boolean => {
            let arr = a.as_boolean();
            (0..arr.len())
                .map(|i| if arr.is_null(i) { Value::Null } else { Value::Bool(arr.value(i)) })
                .collect()
        }
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::Float32 => float!(Float32Type),
        DataType::Float64 => float!(Float64Type),
        DataType::Utf8 => strings(a.as_string::<i32>().iter()),
        DataType::LargeUtf8 => strings(a.as_string::<i64>().iter()),
        DataType::Utf8View => strings(a.as_string_view().iter()),
        _ => {
            let options = FormatOptions::default().with_null("\u{0}");
            let fmt = ArrayFormatter::try_new(a.as_ref(), &options)
                .map_err(|source| Error::Encode { source })?;
            (0..a.len())
                .map(|i| {
                    if a.is_null(i) { Value::Null } else { Value::String(fmt.value(i).to_string()) }
                })
                .collect()
        }
    })
}

fn strings<'a>(it: impl Iterator<Item = Option<&'a str>>) -> Vec<Value> {
    it.map(|s| s.map_or(Value::Null, |s| Value::String(s.to_string()))).collect()
}
