//! `spanlake serve`: every listener over one storage engine.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use spanlake_engine::metrics::Exposition;
use spanlake_engine::objstore::{Faults, InstrumentedStore, StoreCounters};
use spanlake_engine::{Engine, task};
use spanlake_ingest::normalize::NormalizeContext;
use spanlake_ingest::service::{IngestMetrics, IngestService};
use spanlake_query::{QueryEngine, QueryMetrics};
use tokio::sync::watch;

use crate::config::Config;

/// Shared state of the HTTP handlers that belong to the binary.
#[derive(Debug, Clone)]
struct AppState {
    engine: Arc<Engine>,
    ingest: Arc<IngestMetrics>,
    query: Arc<QueryMetrics>,
    store: Arc<StoreCounters>,
    redactor: Option<Arc<spanlake_ingest::redact::Redactor>>,
    /// The memory pool all queries share.
    query_memory: Arc<dyn datafusion::execution::memory_pool::MemoryPool>,
    started: Instant,
}

/// Opens the data location and the engine.
pub async fn open_engine(
    config: &Config,
) -> anyhow::Result<(Arc<Engine>, Arc<StoreCounters>, Arc<Faults>)> {
    let url = config.location_url();
    let inner = spanlake_engine::objstore::open_location(&url, &config.location_options)?;
    let instrumented = InstrumentedStore::new(inner);
    let counters = instrumented.counters();
    let faults = instrumented.faults();
    let mut engine_config = config.engine();
    engine_config.release_memory = Some(crate::release_allocator_memory);
    let engine = Engine::open(engine_config, Arc::new(instrumented), Arc::default())
        .await
        .with_context(|| format!("cannot open the storage engine at {url}"))?;
    Ok((engine, counters, faults))
}

/// Runs until SIGINT or SIGTERM, then flushes everything buffered and returns.
pub async fn serve(
    config: Config,
    fault_injection: bool,
    query_runtime: tokio::runtime::Handle,
) -> anyhow::Result<()> {
    let prices = Arc::new(config.prices()?);
    let keys = {
        let url = config.location_url();
        let location = spanlake_engine::objstore::open_location(&url, &config.location_options)?;
        Arc::new(
            crate::auth::KeyStore::open(&config.data_dir, location)
                .await
                .with_context(|| format!("cannot read the API keys in {url}"))?,
        )
    };
    check_exposure(&config, keys.enabled())?;
    let key_refresh = task::spawn(Arc::clone(&keys).refresh_every(config.security.keys_refresh.0));
    let (engine, store_counters, faults) = open_engine(&config).await?;
    let query_metrics: Arc<QueryMetrics> = Arc::default();
    let mut query_config = config.query();
    query_config.runtime = Some(query_runtime.clone());
    let query = Arc::new(
        QueryEngine::new(
            Arc::clone(engine.store()),
            None,
            Arc::clone(&prices),
            &query_config,
            Arc::clone(&query_metrics),
        )
        .await?,
    );
    let ingest_metrics: Arc<IngestMetrics> = Arc::default();
    let redactor = config.redactor()?;
    if let Some(r) = &redactor {
        tracing::info!(redactor = ?r, "redaction at ingest is on");
    }
    let context = NormalizeContext {
        redactor: redactor.clone(),
        prices: Arc::clone(&prices),
        limits: config.span_limits(),
        max_spans: config.ingest.max_spans_per_request,
    };
    let ingest = IngestService::new(
        Arc::clone(&engine),
        context,
        config.request_limits(),
        Arc::clone(&ingest_metrics),
    );

    let state = AppState {
        engine: Arc::clone(&engine),
        ingest: ingest_metrics,
        query: Arc::clone(&query_metrics),
        store: store_counters,
        redactor,
        query_memory: Arc::clone(&query.runtime_env().memory_pool),
        started: Instant::now(),
    };
    let query_routes = |q: Arc<QueryEngine>| {
        Router::new()
            .merge(spanlake_query::http::router(Arc::clone(&q)))
            .merge(spanlake_query::jaeger::router(Arc::clone(&q)))
            .merge(spanlake_query::tempo::router(q))
    };
    // Query engines of single projects (cached), for project-scoped keys on HTTP,
    // Postgres and Flight SQL (one engine per project whichever frontend asks first).
    let project_engines: spanlake_query::EngineFor = {
        let cache: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<QueryEngine>>>> =
            Arc::default();
        let store = Arc::clone(engine.store());
        let prices = Arc::clone(&prices);
        // Every project's queries draw from the one memory pool of `query.memory_limit`.
        let mut query_config = query_config.clone();
        query_config.shared_runtime = Some(query.runtime_env());
        let metrics = Arc::clone(&query_metrics);
        Arc::new(move |project: String| {
            let (cache, store, prices, query_config, metrics) = (
                Arc::clone(&cache),
                Arc::clone(&store),
                Arc::clone(&prices),
                query_config.clone(),
                Arc::clone(&metrics),
            );
            Box::pin(async move {
                if let Some(q) = cache.lock().expect("lock").get(&project) {
                    return Ok(Arc::clone(q));
                }
                let q =
                    QueryEngine::new(store, Some(project.clone()), prices, &query_config, metrics)
                        .await
                        .map_err(|e| e.to_string())?;
                let q = Arc::new(q);
                cache.lock().expect("lock").entry(project).or_insert_with(|| Arc::clone(&q));
                Ok(q)
            })
        })
    };
    let http_auth = Arc::new(crate::auth::HttpAuth::new(
        Arc::clone(&keys),
        Box::new(query_routes),
        Arc::clone(&project_engines),
    ));
    let mut app = Router::new()
        .merge(spanlake_ingest::http::router(ingest.clone()))
        .merge(query_routes(Arc::clone(&query)))
        .merge(spanlake_query::http::admin_router(Arc::clone(&query), Arc::clone(&engine)))
        .merge(
            Router::new()
                .route("/health", get(health))
                .route("/metrics", get(metrics))
                .with_state(state),
        );
    if fault_injection {
        tracing::warn!("fault injection enabled: POST /debug/faults makes object store calls fail");
        app = app.route("/debug/faults", axum::routing::post(set_faults).with_state(faults));
    }

    // Authentication wraps every route (a no-op while no API key exists).
    let app = app.layer(axum::middleware::from_fn_with_state(http_auth, crate::auth::http_layer));
    let (stop_tx, stop_rx) = watch::channel(false);
    let http_listener = tokio::net::TcpListener::bind(config.listen.http)
        .await
        .with_context(|| format!("cannot listen on {} (HTTP)", config.listen.http))?;
    let grpc_listener = tokio::net::TcpListener::bind(config.listen.grpc)
        .await
        .with_context(|| format!("cannot listen on {} (gRPC)", config.listen.grpc))?;
    let flight_listener = tokio::net::TcpListener::bind(config.listen.flight)
        .await
        .with_context(|| format!("cannot listen on {} (Flight SQL)", config.listen.flight))?;
    // The Postgres frontend binds its own listener: check the address first for a clear error.
    std::net::TcpListener::bind(config.listen.postgres)
        .with_context(|| format!("cannot listen on {} (Postgres)", config.listen.postgres))?;
    spanlake_query::pg::install_pg_catalog(&query)?;
    let pg_config = spanlake_query::pg::PgConfig {
        listen: config.listen.postgres,
        tls: match (&config.listen.tls_cert, &config.listen.tls_key) {
            (Some(c), Some(k)) => Some((c.display().to_string(), k.display().to_string())),
            _ => None,
        },
        users: config.postgres.users.iter().map(|u| (u.name.clone(), u.password.clone())).collect(),
        timeout: config.query.timeout.0,
        api_keys: Some(spanlake_query::pg::ApiKeys(Arc::new(crate::auth::PgKeys(Arc::clone(
            &keys,
        ))))),
        projects: Some(spanlake_query::pg::ProjectEngines(Arc::clone(&project_engines))),
        ..Default::default()
    };
    if pg_config.users.is_empty() {
        tracing::info!(
            "Postgres listener accepts any user without a password ([[postgres.users]] sets passwords)"
        );
    }
    // Postgres sessions run on the query runtime, away from the threads that answer ingest.
    let pg = {
        let query = Arc::clone(&query);
        query_runtime.spawn(async move {
            if let Err(e) = spanlake_query::pg::serve(&query, &pg_config).await {
                tracing::error!(error = %e, "Postgres listener stopped");
            }
        })
    };
    tracing::info!(
        http = %http_listener.local_addr()?,
        grpc = %grpc_listener.local_addr()?,
        postgres = %config.listen.postgres,
        flight_sql = %flight_listener.local_addr()?,
        location = %config.location_url(),
        wal = %config.wal_dir().display(),
        "spanlake serving"
    );

    // Ready means every listener answers: wait for the Postgres one before serving HTTP (and so
    // /health).
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(config.listen.postgres).await.is_ok() || pg.is_finished()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let tls = match (&config.listen.tls_cert, &config.listen.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let http = {
        let mut stop = stop_rx.clone();
        let tls = tls.clone();
        task::spawn(async move {
            match tls {
                None => {
                    axum::serve(http_listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stop.wait_for(|s| *s).await;
                        })
                        .await
                }
                Some(acceptor) => serve_tls(http_listener, app, acceptor, stop).await,
            }
        })
    };
    let grpc_keys = Arc::clone(&keys);
    let grpc_tls = match (&config.listen.tls_cert, &config.listen.tls_key) {
        (Some(cert), Some(key)) => Some(tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(
                std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?,
                std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?,
            ),
        )),
        _ => None,
    };
    let grpc = {
        let mut stop = stop_rx.clone();
        let incoming = tokio_stream_listener(grpc_listener);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = grpc_tls {
            builder = builder.tls_config(tls).context("TLS configuration of the gRPC listener")?;
        }
        task::spawn(async move {
            builder
                .add_service(tonic::service::interceptor::InterceptedService::new(
                    spanlake_ingest::grpc::trace_server(ingest),
                    crate::auth::grpc_interceptor(grpc_keys),
                ))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    };

    // Flight SQL queries run on the query runtime too.
    let flight = {
        let mut stop = stop_rx.clone();
        let incoming = tokio_stream_listener(flight_listener);
        let mut server = tonic::transport::Server::builder();
        if let (Some(cert), Some(key)) = (&config.listen.tls_cert, &config.listen.tls_key) {
            let identity = tonic::transport::Identity::from_pem(
                std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?,
                std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?,
            );
            server = server
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .context("TLS configuration of the Flight SQL listener")?;
        }
        let flight_engines = Arc::clone(&project_engines);
        let service = tonic::service::interceptor::InterceptedService::new(
            spanlake_query::flight::service_with_projects(Arc::clone(&query), flight_engines),
            crate::auth::flight_interceptor(Arc::clone(&keys)),
        );
        query_runtime.spawn(async move {
            server
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    };

    shutdown_signal().await;
    tracing::info!("stopping: no new requests; flushing what is buffered");
    let _ = stop_tx.send(true);
    pg.abort();
    key_refresh.abort();
    let (h, g, f) = tokio::join!(http, grpc, flight);
    if let Ok(Err(e)) = f {
        tracing::warn!(error = %e, "Flight SQL server stopped with an error");
    }
    if let Ok(Err(e)) = h {
        tracing::warn!(error = %e, "HTTP server stopped with an error");
    }
    if let Ok(Err(e)) = g {
        tracing::warn!(error = %e, "gRPC server stopped with an error");
    }
    engine
        .shutdown()
        .await
        .context("flush at shutdown failed; the WAL keeps the data for the next start")?;
    tracing::info!("stopped");
    Ok(())
}

/// A TLS acceptor for a PEM certificate chain and PKCS#8 (or RSA/SEC1) key.
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("cannot read {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("{}: not a PEM certificate chain", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("cannot read {}", key.display()))?,
    ))
    .with_context(|| format!("{}: not a PEM private key", key.display()))?
    .with_context(|| format!("{}: no private key found", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("TLS certificate and key do not match")?;
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` over TLS until `stop`, letting open connections finish.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = stop.wait_for(|s| *s) => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let watcher = graceful.watcher();
        task::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn =
                builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), service);
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// Without API keys, listening beyond localhost needs `security.allow_unauthenticated_network`.
fn check_exposure(config: &Config, keys: bool) -> anyhow::Result<()> {
    let l = &config.listen;
    let exposed: Vec<String> =
        [("HTTP", l.http), ("gRPC", l.grpc), ("Postgres", l.postgres), ("Flight SQL", l.flight)]
            .into_iter()
            .filter(|(_, a)| !a.ip().is_loopback())
            .map(|(what, a)| format!("{what} {a}"))
            .collect();
    if keys {
        tracing::info!("API keys are configured: every request must carry one");
    } else if exposed.is_empty() {
        tracing::info!(
            "no API key exists: listening on localhost only, without authentication (create keys with `spanlake keys create`)"
        );
    } else if config.security.allow_unauthenticated_network {
        tracing::warn!(listeners = ?exposed, "listening beyond localhost WITHOUT authentication (security.allow_unauthenticated_network)");
    } else {
        anyhow::bail!(
            "no API key exists and {} would be reachable beyond localhost without authentication: create a key with `spanlake keys create --role admin`, listen on 127.0.0.1, or set security.allow_unauthenticated_network = true",
            exposed.join(", ")
        );
    }
    Ok(())
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((next, l))
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

async fn health(State(s): State<AppState>) -> impl IntoResponse {
    let (used, limit) = s.engine.memory();
    axum::Json(serde_json::json!({
        "status": "ok",
        "node": s.engine.node_id(),
        "uptime_seconds": s.started.elapsed().as_secs(),
        "memory_bytes": used,
        "memory_budget_bytes": limit,
        "resident_bytes": s.engine.resident_memory(),
    }))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let mut e = Exposition::default();
    s.ingest.render(&mut e);
    s.engine.metrics().render(&mut e);
    if let Some(r) = &s.redactor {
        r.render(&mut e);
    }
    s.query.render(&mut e);
    e.gauge(
        "spanlake_query_memory_bytes",
        "Memory held by running queries",
        s.query_memory.reserved() as i64,
    );
    if let datafusion::execution::memory_pool::MemoryLimit::Finite(limit) =
        s.query_memory.memory_limit()
    {
        e.gauge(
            "spanlake_query_memory_limit_bytes",
            "The memory all running queries may hold (query.memory_limit)",
            limit as i64,
        );
    }
    let (used, limit) = s.engine.memory();
    e.gauge("spanlake_memory_bytes", "Bytes held by ingest before Parquet", used as i64);
    e.gauge("spanlake_memory_budget_bytes", "The configured ingest memory budget", limit as i64);
    e.gauge(
        "spanlake_resident_memory_bytes",
        "The process's resident memory, as the memory budget last sampled it",
        s.engine.resident_memory() as i64,
    );
    let usage = s.engine.store().memory_usage();
    e.gauge("spanlake_buffer_rows", "Spans in memory, not yet in Parquet", usage.rows as i64);
    e.gauge(
        "spanlake_wal_queue_requests",
        "Requests waiting for the write-ahead log",
        s.engine.wal_queued() as i64,
    );
    let (filters, filter_bytes) = s.engine.store().trace_index().stats();
    e.gauge(
        "spanlake_trace_index_files",
        "Data files whose trace filter is loaded",
        filters as i64,
    );
    e.gauge("spanlake_trace_index_bytes", "Memory held by trace filters", filter_bytes as i64);
    e.gauge(
        "spanlake_data_files",
        "Committed Parquet data files",
        s.engine.store().files().len() as i64,
    );
    for (op, c) in [
        ("get", &s.store.get),
        ("put", &s.store.put),
        ("head", &s.store.head),
        ("list", &s.store.list),
        ("delete", &s.store.delete),
    ] {
        e.labeled_counter(
            "spanlake_object_store_requests_total",
            "Object store requests",
            "op",
            op,
            c.requests(),
        );
        e.labeled_counter(
            "spanlake_object_store_bytes_total",
            "Object store bytes moved",
            "op",
            op,
            c.bytes(),
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], e.finish()).into_response()
}

/// Body of `POST /debug/faults`: how many of the next calls of each kind fail.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FaultRequest {
    fail_puts: u64,
    fail_catalog_puts: u64,
    fail_gets: u64,
    fail_deletes: u64,
    /// Abort the process at this step of a commit (`flush_before_commit`, ...; see
    /// `spanlake_engine::crash`).
    crash_at: Option<String>,
}

async fn set_faults(
    State(f): State<Arc<Faults>>,
    axum::Json(req): axum::Json<FaultRequest>,
) -> axum::response::Response {
    use std::sync::atomic::Ordering::Release;
    let crash = match req.crash_at.as_deref().map(spanlake_engine::crash::CrashPoint::parse) {
        None => None,
        Some(Some(p)) => Some(p),
        Some(None) => {
            return (
                axum::http::StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": "unknown crash point"})),
            )
                .into_response();
        }
    };
    spanlake_engine::crash::arm(crash);
    f.fail_puts.store(req.fail_puts, Release);
    f.fail_catalog_puts.store(req.fail_catalog_puts, Release);
    f.fail_gets.store(req.fail_gets, Release);
    f.fail_deletes.store(req.fail_deletes, Release);
    axum::Json(serde_json::json!({"ok": true})).into_response()
}
