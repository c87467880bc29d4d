//! Runs the `.slt` files under `tests/slt/` against the query engine.
//!
//! Each file gets its own engine over an in-memory object store holding the shared fixtures
//! (`../shared/fixtures`): the first half of them as committed Parquet files, the rest as
//! memory batches not yet flushed, so every query also checks that both parts read as one
//! table. Values print as the Postgres text format would (NULL as `NULL`).
//!
//! Every file runs twice: against the engine directly (label `direct`) and through the Postgres
//! frontend with `tokio-postgres` (label `postgres`; `onlyif`/`skipif` mark what differs).
//!
//! `cargo test -p spanlake-query --test sqllogictests -- [FILTER] [--complete]`: `--complete`
//! rewrites the expected output of the selected files.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use spanlake_engine::catalog::Change;
use spanlake_engine::pricing::PriceTable;
use spanlake_engine::store::{MemBatch, SpanStore};
use spanlake_engine::writer::{WriterConfig, encode_partitions};
use spanlake_ingest::normalize::{NormalizeContext, normalize};
use spanlake_query::{QueryConfig, QueryEngine};
use sqllogictest::{DBOutput, DefaultColumnType};

fn fixtures_dir() -> PathBuf {
    std::env::var_os("SPANLAKE_FIXTURES")
        .map_or_else(|| manifest_dir().join("../../shared/fixtures"), PathBuf::from)
}

async fn fixture_store() -> Arc<SpanStore> {
    let object_store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let store = SpanStore::new(Arc::clone(&object_store), []);
    let mut names: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".otlp.pb"))
        .collect();
    names.sort();
    let project: Arc<str> = Arc::from("default");
    let half = names.len() / 2;
    for (i, path) in names.iter().enumerate() {
        let req = spanlake_proto::decode_protobuf(&std::fs::read(path).unwrap()).unwrap();
        let batch = normalize(&req, &NormalizeContext::default()).unwrap().batch;
        if i < half {
            let files =
                encode_partitions([(&project, &batch)], 0, &WriterConfig::default()).unwrap();
            let mut change = Change::default();
            for file in files {
                let p = object_store::path::Path::from(file.meta.path.as_str());
                object_store.put(&p, PutPayload::from_bytes(file.bytes)).await.unwrap();
                change.add.push(file.meta);
            }
            store.apply(&change, None);
        } else {
            store.push_batches([MemBatch::new(i as u64, Arc::clone(&project), batch, 0)]);
        }
    }
    Arc::new(store)
}

struct Db {
    engine: QueryEngine,
}

#[derive(Debug)]
struct DbError(String);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DbError {}

fn column_type(t: &DataType) -> DefaultColumnType {
    match t {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => DefaultColumnType::Integer,
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) => {
            DefaultColumnType::FloatingPoint
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => DefaultColumnType::Text,
        _ => DefaultColumnType::Any,
    }
}

fn rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for b in batches {
        let formatters: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            out.push(
                formatters
                    .iter()
                    .zip(b.columns())
                    .map(|(f, c)| {
                        // Booleans as Postgres writes them in text format.
                        if let Some(b) = c.as_any().downcast_ref::<arrow::array::BooleanArray>()
                            && b.is_valid(i)
                        {
                            return if b.value(i) { "t" } else { "f" }.to_string();
                        }
                        let s = f.value(i).to_string();
                        if c.is_valid(i) && s.is_empty() { "(empty)".to_string() } else { s }
                    })
                    .collect(),
            );
        }
    }
    out
}

#[async_trait]
impl sqllogictest::AsyncDB for Db {
    type Error = DbError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DbError> {
        let result = self.engine.sql(sql).await.map_err(|e| DbError(e.to_string()))?;
        let types = result.schema.fields().iter().map(|f| column_type(f.data_type())).collect();
        Ok(DBOutput::Rows { types, rows: rows(&result.batches) })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "spanlake"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

/// The same engine behind the Postgres frontend, queried by `tokio-postgres`: column types
/// from the prepared statement's RowDescription, values in text format over the simple query
/// protocol (as psql and Grafana read them).
struct PgDb {
    client: tokio_postgres::Client,
    _server: tokio::task::JoinHandle<()>,
    _connection: tokio::task::JoinHandle<()>,
}

fn pg_column_type(t: &tokio_postgres::types::Type) -> DefaultColumnType {
    use tokio_postgres::types::Type;
    match *t {
        Type::INT2 | Type::INT4 | Type::INT8 => DefaultColumnType::Integer,
        Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC => DefaultColumnType::FloatingPoint,
        Type::TEXT | Type::VARCHAR => DefaultColumnType::Text,
        _ => DefaultColumnType::Any,
    }
}

#[async_trait]
impl sqllogictest::AsyncDB for PgDb {
    type Error = DbError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DbError> {
        let error = |e: tokio_postgres::Error| {
            DbError(e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string()))
        };
        let messages = self.client.simple_query(sql).await.map_err(error)?;
        let mut columns = None;
        let mut rows = Vec::new();
        for m in messages {
            match m {
                tokio_postgres::SimpleQueryMessage::RowDescription(c) => columns = Some(c),
                tokio_postgres::SimpleQueryMessage::Row(r) => rows.push(
                    (0..r.len())
                        .map(|i| match r.get(i) {
                            None => "NULL".to_string(),
                            Some("") => "(empty)".to_string(),
                            Some(v) => v.to_string(),
                        })
                        .collect(),
                ),
                _ => {}
            }
        }
        let Some(columns) = columns else { return Ok(DBOutput::StatementComplete(0)) };
        let types = match self.client.prepare(sql).await {
            Ok(statement) => {
                statement.columns().iter().map(|c| pg_column_type(c.type_())).collect()
            }
            Err(_) => vec![DefaultColumnType::Any; columns.len()],
        };
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "spanlake-postgres"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

async fn make_pg_db() -> Result<PgDb, DbError> {
    let engine = std::sync::Arc::new(make_db().await?.engine);
    spanlake_query::pg::install_pg_catalog(&engine).map_err(|e| DbError(e.to_string()))?;
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = spanlake_query::pg::PgConfig { listen, ..Default::default() };
    #[expect(clippy::disallowed_methods, reason = "the server ends with the test runtime")]
    let server = tokio::spawn(async move {
        let _ = spanlake_query::pg::serve(&engine, &config).await;
    });
    let mut attempt = 0;
    let (client, connection) = loop {
        match tokio_postgres::connect(
            &format!("host=127.0.0.1 port={} user=slt dbname=spanlake", listen.port()),
            tokio_postgres::NoTls,
        )
        .await
        {
            Ok(c) => break c,
            Err(e) if attempt > 200 => return Err(DbError(e.to_string())),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    };
    #[expect(clippy::disallowed_methods, reason = "the connection ends with the test runtime")]
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(PgDb { client, _server: server, _connection: connection })
}

async fn make_db() -> Result<Db, DbError> {
    let store = fixture_store().await;
    let engine = QueryEngine::new(
        store,
        None,
        Arc::new(PriceTable::default()),
        &QueryConfig::default(),
        Arc::default(),
    )
    .await
    .map_err(|e| DbError(e.to_string()))?;
    Ok(Db { engine })
}

fn slt_files(filter: Option<&str>) -> Vec<PathBuf> {
    let dir = manifest_dir().join("tests/slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/slt")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .filter(|p| filter.is_none_or(|f| p.to_string_lossy().contains(f)))
        .collect();
    files.sort();
    files
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let complete = args.iter().any(|a| a == "--complete");
    let filter = args.iter().find(|a| !a.starts_with('-')).map(String::as_str);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut failed = 0;
    let files = slt_files(filter);
    for file in &files {
        let result = rt.block_on(async {
            let mut runner = sqllogictest::Runner::new(make_db);
            runner.add_label("direct");
            if complete {
                runner
                    .update_test_file(
                        file,
                        " ",
                        sqllogictest::default_validator,
                        sqllogictest::default_normalizer,
                        sqllogictest::default_column_validator,
                    )
                    .await
                    .map_err(|e| e.to_string())
            } else {
                runner.run_file_async(file).await.map_err(|e| e.display(true).to_string())
            }
        });
        // The same file through the Postgres frontend (labels: `postgres`).
        let result = result.and_then(|()| {
            rt.block_on(async {
                let mut runner = sqllogictest::Runner::new(make_pg_db);
                runner.add_label("postgres");
                runner
                    .run_file_async(file)
                    .await
                    .map_err(|e| format!("through Postgres: {}", e.display(true)))
            })
        });
        match result {
            Ok(()) => println!("ok   {}", file.display()),
            Err(e) => {
                failed += 1;
                println!("FAIL {}\n{e}", file.display());
            }
        }
    }
    println!("{} file(s), {failed} failed", files.len());
    if failed > 0 {
        std::process::exit(1);
    }
}

/// The package directory: from the environment `cargo test` sets when it runs the test (a
/// target directory shared by clones at different paths may hold a binary built elsewhere),
/// else where it was compiled.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        std::path::PathBuf::from,
    )
}
