//! Arrow Flight SQL: columnar results for ADBC and JDBC Flight SQL drivers, and for Grafana's
//! InfluxDB datasource in its SQL mode.
//!
//! What is served:
//! * statements (`CommandStatementQuery` → `FlightInfo` with the result schema → `DoGet`);
//! * prepared statements with `$1`, `$2`, ... parameters: `CreatePreparedStatement` answers the
//!   result and parameter schemas, parameters are bound with `DoPut` (the answer is a new handle
//!   carrying them, so the server keeps no per-client state), `DoGet` runs it,
//!   `ClosePreparedStatement` is accepted;
//! * metadata: catalogs, schemas, tables (with their Arrow schemas on request), table types and
//!   `SqlInfo` (server name and version, read-only).
//!
//! Every statement goes through the same read-only sandbox and limits as the other frontends
//! ([`QueryEngine::query`]); refusals are `PERMISSION_DENIED`, bad SQL `INVALID_ARGUMENT`,
//! the time limit `DEADLINE_EXCEEDED`, all with the message the other frontends give. Updates,
//! ingest, Substrait plans and transactions are refused as unimplemented. A client that goes away
//! cancels its query.

use std::pin::Pin;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::logical_expr::TableType;
use futures::{Stream, TryStreamExt, stream};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{EngineFor, QueryEngine};
use crate::error::Error;
use spanlake_engine::ErrorKind;

type DoGetStream = <FlightSql as FlightService>::DoGetStream;

/// The Flight SQL service over one query engine.
#[derive(Clone)]
pub struct FlightSql {
    query: Arc<QueryEngine>,
    projects: Option<EngineFor>,
    info: Arc<SqlInfoData>,
}

/// Set by an authenticating interceptor: the request may see this project only.
#[derive(Debug, Clone)]
pub struct FlightProject(pub String);

/// The gRPC service to mount on a tonic server.
pub fn service(query: Arc<QueryEngine>) -> FlightServiceServer<FlightSql> {
    FlightServiceServer::new(FlightSql::new(query))
}

/// The service, serving requests marked with a [`FlightProject`] from that project's engine.
pub fn service_with_projects(
    query: Arc<QueryEngine>,
    projects: EngineFor,
) -> FlightServiceServer<FlightSql> {
    let mut svc = FlightSql::new(query);
    svc.projects = Some(projects);
    FlightServiceServer::new(svc)
}

impl std::fmt::Debug for FlightSql {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightSql").field("query", &self.query).finish()
    }
}

impl FlightSql {
    /// A Flight SQL service answering with `query`.
    pub fn new(query: Arc<QueryEngine>) -> Self {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "spanlake");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        info.append(SqlInfo::FlightSqlServerTransaction, 0_i32);
        info.append(SqlInfo::FlightSqlServerCancel, false);
        let info = Arc::new(info.build().expect("static SqlInfo"));
        Self { query, projects: None, info }
    }

    /// The engine a request may use: its project's when an interceptor scoped it.
    async fn engine<T>(&self, request: &Request<T>) -> Result<Arc<QueryEngine>, Status> {
        match (request.extensions().get::<FlightProject>(), &self.projects) {
            (Some(p), Some(engines)) => engines(p.0.clone()).await.map_err(Status::internal),
            (Some(_), None) => {
                Err(Status::permission_denied("project-scoped requests are not served here"))
            }
            (None, _) => Ok(Arc::clone(&self.query)),
        }
    }

    async fn run(
        engine: &QueryEngine,
        sql: &str,
        params: Option<ParamValues>,
    ) -> Result<Response<DoGetStream>, Status> {
        let result = engine.query(sql, params).await.map_err(status)?;
        Ok(Response::new(encode(result.schema, result.batches)))
    }

    async fn tables(engine: &QueryEngine) -> Vec<(String, String, String, TableType, SchemaRef)> {
        let ctx = engine.context();
        let mut out = Vec::new();
        for catalog_name in ctx.catalog_names() {
            let Some(catalog) = ctx.catalog(&catalog_name) else { continue };
            for schema_name in catalog.schema_names() {
                let Some(schema) = catalog.schema(&schema_name) else { continue };
                for table in schema.table_names() {
                    if let Ok(Some(p)) = schema.table(&table).await {
                        out.push((
                            catalog_name.clone(),
                            schema_name.clone(),
                            table,
                            p.table_type(),
                            p.schema(),
                        ));
                    }
                }
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
        out
    }
}

/// A prepared statement's handle: the SQL and, once bound, its parameter values as one Arrow
/// IPC stream with one row (`u32` little-endian SQL length, SQL, IPC bytes).
struct Handle {
    sql: String,
    params: Option<RecordBatch>,
}

impl Handle {
    fn encode(&self) -> Result<Vec<u8>, Status> {
        let mut out = Vec::with_capacity(4 + self.sql.len());
        out.extend_from_slice(&(self.sql.len() as u32).to_le_bytes());
        out.extend_from_slice(self.sql.as_bytes());
        if let Some(batch) = &self.params {
            let mut w = StreamWriter::try_new(&mut out, &batch.schema()).map_err(internal)?;
            w.write(batch).map_err(internal)?;
            w.finish().map_err(internal)?;
        }
        Ok(out)
    }

    fn decode(bytes: &[u8]) -> Result<Self, Status> {
        let bad = || Status::invalid_argument("not a prepared statement handle of this server");
        let len = u32::from_le_bytes(bytes.get(..4).ok_or_else(bad)?.try_into().expect("4"));
        let end = 4 + len as usize;
        let sql = std::str::from_utf8(bytes.get(4..end).ok_or_else(bad)?).map_err(|_| bad())?;
        let rest = &bytes[end..];
        let params = if rest.is_empty() {
            None
        } else {
            let mut reader = StreamReader::try_new(rest, None).map_err(|_| bad())?;
            reader.next().transpose().map_err(|_| bad())?
        };
        Ok(Self { sql: sql.to_string(), params })
    }

    /// The bound values in placeholder order (`$1` is the first column).
    fn param_values(&self) -> Result<Option<ParamValues>, Status> {
        let Some(batch) = &self.params else { return Ok(None) };
        if batch.num_rows() != 1 {
            return Err(Status::invalid_argument(format!(
                "parameters must be bound as exactly one row, got {}",
                batch.num_rows()
            )));
        }
        let values = batch
            .columns()
            .iter()
            .map(|c| ScalarValue::try_from_array(c, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(internal)?;
        Ok(Some(ParamValues::from(values)))
    }
}

fn status(e: Error) -> Status {
    let message = e.to_string();
    match (&e, e.kind()) {
        (Error::Forbidden { .. }, _) => Status::permission_denied(message),
        (Error::Timeout { .. }, _) => Status::deadline_exceeded(message),
        (_, ErrorKind::InvalidInput) => Status::invalid_argument(message),
        (_, ErrorKind::Overloaded) => Status::resource_exhausted(message),
        _ => Status::internal(message),
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn schema_bytes(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let IpcMessage(bytes) =
        SchemaAsIpc::new(schema, &IpcWriteOptions::default()).try_into().map_err(internal)?;
    Ok(bytes)
}

fn encode(schema: SchemaRef, batches: Vec<RecordBatch>) -> DoGetStream {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(stream::iter(batches.into_iter().map(Ok)))
        .map_err(Status::from);
    Box::pin(stream)
}

fn info_for(
    schema: &Schema,
    ticket: Vec<u8>,
    descriptor: FlightDescriptor,
) -> Result<Response<FlightInfo>, Status> {
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(internal)?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

fn one_batch(
    schema: SchemaRef,
    batch: Result<RecordBatch, impl std::fmt::Display>,
) -> Result<Response<DoGetStream>, Status> {
    Ok(Response::new(encode(schema, vec![batch.map_err(internal)?])))
}

fn table_type_name(t: TableType) -> &'static str {
    match t {
        TableType::Base => "TABLE",
        TableType::View => "VIEW",
        TableType::Temporary => "LOCAL TEMPORARY",
    }
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    async fn do_handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        // No session state: the handshake answers an empty token.
        let response = HandshakeResponse { protocol_version: 0, payload: Default::default() };
        Ok(Response::new(Box::pin(stream::once(async { Ok(response) }))))
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let engine = self.engine(&request).await?;
        let plan = engine.plan(&query.query).await.map_err(status)?;
        let schema = crate::engine::plain_schema(plan.schema().as_arrow());
        let ticket = TicketStatementQuery { statement_handle: query.query.into_bytes().into() };
        info_for(&schema, ticket.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let sql = std::str::from_utf8(&ticket.statement_handle)
            .map_err(|_| Status::invalid_argument("statement ticket is not UTF-8 SQL"))?;
        Self::run(&*self.engine(&request).await?, sql, None).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let engine = self.engine(&request).await?;
        let plan = engine.plan(&query.query).await.map_err(status)?;
        let dataset = crate::engine::plain_schema(plan.schema().as_arrow());
        let mut params: Vec<(String, Option<arrow::datatypes::DataType>)> =
            plan.get_parameter_types().map_err(|e| status(e.into()))?.into_iter().collect();
        // `$2` before `$10`: by number, not by text.
        params.sort_by_key(|(name, _)| name.trim_start_matches('$').parse::<u32>().unwrap_or(0));
        let params = Schema::new(
            params
                .into_iter()
                .map(|(name, t)| {
                    Field::new(name, t.unwrap_or(arrow::datatypes::DataType::Null), true)
                })
                .collect::<Vec<_>>(),
        );
        let handle = Handle { sql: query.query, params: None }.encode()?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into(),
            dataset_schema: schema_bytes(&dataset)?,
            parameter_schema: schema_bytes(&params)?,
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let handle = Handle::decode(&query.prepared_statement_handle)?;
        let data = request.into_inner().map_err(FlightError::from);
        let batches: Vec<RecordBatch> =
            arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(data)
                .try_collect()
                .await
                .map_err(|e| Status::invalid_argument(format!("cannot read parameters: {e}")))?;
        let batches: Vec<RecordBatch> = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        let params = match batches.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            _ => {
                return Err(Status::invalid_argument(
                    "parameters must be bound as exactly one row (batches of several rows are not executed)",
                ));
            }
        };
        let bound = Handle { sql: handle.sql, params };
        bound.param_values()?;
        Ok(DoPutPreparedStatementResult { prepared_statement_handle: Some(bound.encode()?.into()) })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let handle = Handle::decode(&cmd.prepared_statement_handle)?;
        let engine = self.engine(&request).await?;
        let plan = engine.plan(&handle.sql).await.map_err(status)?;
        let schema = crate::engine::plain_schema(plan.schema().as_arrow());
        info_for(&schema, cmd.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let handle = Handle::decode(&query.prepared_statement_handle)?;
        let params = handle.param_values()?;
        Self::run(&*self.engine(&request).await?, &handle.sql, params).await
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        Ok(())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        info_for(&schema, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut builder = query.into_builder();
        let engine = self.engine(&request).await?;
        let mut names = engine.context().catalog_names();
        names.sort();
        for name in names {
            builder.append(name);
        }
        one_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        info_for(&schema, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut builder = query.into_builder();
        let engine = self.engine(&request).await?;
        let ctx = engine.context();
        let mut pairs = Vec::new();
        for catalog_name in ctx.catalog_names() {
            if let Some(catalog) = ctx.catalog(&catalog_name) {
                for schema_name in catalog.schema_names() {
                    pairs.push((catalog_name.clone(), schema_name));
                }
            }
        }
        pairs.sort();
        for (c, s) in pairs {
            builder.append(c, s);
        }
        one_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        info_for(&schema, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut builder = query.into_builder();
        for (catalog, schema, table, kind, table_schema) in
            Self::tables(&*self.engine(&request).await?).await
        {
            builder
                .append(catalog, schema, table, table_type_name(kind), &table_schema)
                .map_err(internal)?;
        }
        one_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        info_for(&schema, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut builder = query.into_builder();
        for t in ["TABLE", "VIEW"] {
            builder.append(t);
        }
        one_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.info).schema();
        info_for(&schema, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let builder = query.into_builder(&self.info);
        one_batch(builder.schema(), builder.build())
    }

    async fn do_get_fallback(
        &self,
        _request: Request<Ticket>,
        message: Any,
    ) -> Result<Response<DoGetStream>, Status> {
        Err(Status::unimplemented(format!("unsupported Flight SQL ticket {}", message.type_url)))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn handles_round_trip_with_and_without_parameters() {
        let h = Handle { sql: "SELECT $1".into(), params: None };
        let back = Handle::decode(&h.encode().unwrap()).unwrap();
        assert_eq!(back.sql, "SELECT $1");
        assert!(back.params.is_none());

        let schema = Arc::new(Schema::new(vec![
            Field::new("$1", DataType::Utf8, true),
            Field::new("$2", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(vec!["gpt-4o"])), Arc::new(Int64Array::from(vec![7]))],
        )
        .unwrap();
        let h = Handle { sql: "SELECT 1 WHERE $1 = $2".into(), params: Some(batch) };
        let back = Handle::decode(&h.encode().unwrap()).unwrap();
        let values = back.param_values().unwrap().unwrap();
        let ParamValues::List(values) = values else { panic!("positional") };
        assert_eq!(values[0].value, ScalarValue::Utf8(Some("gpt-4o".into())));
        assert_eq!(values[1].value, ScalarValue::Int64(Some(7)));

        assert!(Handle::decode(b"\xff\xff\xff\xffx").is_err());
        assert!(Handle::decode(b"").is_err());
    }
}
