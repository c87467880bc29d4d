//! The `spanlake` binary: command line, configuration and wiring.

mod auth;
mod config;
mod replay;
mod serve;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::Config;

// The server's allocator is the C library's (glibc malloc on Linux, see
// `fix_malloc_mmap_threshold`). mimalloc, the allocator of the earlier sessions, is kept behind
// the `mimalloc` feature for comparison: with its purge delay at 0 (needed to hold a backfill
// near the memory budget) it ingested LLM spans at 151-155 MB/s where glibc takes 184-196, and
// backfilled at 140-141 MB/s peaking at 960-1,001 MiB where glibc takes 159-175 MB/s and
// 598-643 MiB (BENCHMARKS.md, fifteenth session). With its default delay it was as fast but a
// backfill peaked at 1,346 MiB at a 1 GiB budget.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's collection and options (`mimalloc.h`), in the library the allocator above links.
#[cfg(feature = "mimalloc")]
unsafe extern "C" {
    fn mi_collect(force: bool);
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_allow_thp` in the `mi_option_t` of mimalloc 3.3 (`libmimalloc-sys` 0.1.49 builds
/// v3 unless its `v2` feature is on, and names options only up to 21).
#[cfg(feature = "mimalloc")]
const MI_OPTION_ALLOW_THP: std::ffi::c_int = 43;

/// `mi_option_purge_delay` in the same enum (15 in v2 as well).
#[cfg(feature = "mimalloc")]
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Keeps the process's memory off transparent huge pages: a 2 MiB page stays resident while any
/// of it is in use. An LLM backfill at a 1 GiB memory budget beside 550 stored files peaked at
/// 1,268-1,794 MiB resident with them (0.78 GiB in huge pages, mimalloc) and 993-999 MiB
/// without (BENCHMARKS.md, eleventh session). Called first thing in `main`.
/// `SPANLAKE_HUGE_PAGES=1` leaves them on.
fn disable_transparent_huge_pages() {
    if std::env::var_os("SPANLAKE_HUGE_PAGES").is_some_and(|v| v == "1") {
        return;
    }
    // SAFETY: setting an option is safe at any time; PR_SET_THP_DISABLE takes no pointers and
    // only sets a flag of this process.
    unsafe {
        #[cfg(feature = "mimalloc")]
        mi_option_set(MI_OPTION_ALLOW_THP, 0);
        #[cfg(target_os = "linux")]
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// With glibc malloc, gives every allocation of 1 MiB or more its own mapping, handed back to
/// the OS when it is freed. glibc otherwise raises that threshold (up to 32 MiB) each time such a
/// block is freed, after which large buffers (request bodies, Arrow columns, Parquet pages) come
/// from its heaps and stay resident once freed. Measured (BENCHMARKS.md, fifteenth session):
/// 2 M-span LLM backfills beside 108 M stored spans peaked at 598-643 MiB with it and 949-985
/// MiB without; compaction catching up at a median 467 MiB (max 704) against 932 (max 1,224);
/// the price is LLM ingest into recent hours at 184-196 MB/s against 212-229. `GLIBC_TUNABLES` in the
/// environment leaves malloc as it says.
fn fix_malloc_mmap_threshold() {
    #[cfg(all(not(feature = "mimalloc"), target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt takes plain integers; called first thing in `main`.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    }
}

/// With mimalloc, has it hand freed memory back to the OS at once rather than after its purge
/// delay (1 s), during which a busy process holds seconds' worth of freed request and flush
/// buffers (BENCHMARKS.md, twelfth session). `MIMALLOC_PURGE_DELAY` in the environment takes
/// precedence.
fn purge_freed_memory_at_once() {
    #[cfg(feature = "mimalloc")]
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is safe at any time from any thread.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

/// Gives the memory the allocator holds freed back to the OS now. The engine calls it after a
/// flush (which frees a slice of the memory table and its sorted copy at once) while resident
/// memory holds ingest back, and on its maintenance thread after each compaction job.
/// Collecting after every flush slowed small-span ingest (BENCHMARKS.md, ninth session).
pub(crate) fn release_allocator_memory() {
    // SAFETY: no arguments to uphold; collection is safe at any time from any thread.
    #[cfg(feature = "mimalloc")]
    unsafe {
        mi_collect(true)
    };
    // SAFETY: as above, for glibc's allocator (every arena's free memory, not only the top).
    #[cfg(all(not(feature = "mimalloc"), target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0)
    };
}

/// Storage engine and SQL backend for AI-agent traces.
#[derive(Debug, Parser)]
#[command(name = "spanlake", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

/// Settings every command shares. Precedence: defaults < file < environment < flags.
#[derive(Debug, Args)]
struct CommonArgs {
    /// TOML configuration file.
    #[arg(long, global = true, env = "SPANLAKE_CONFIG")]
    config: Option<PathBuf>,
    /// Local directory for the WAL and, by default, the data.
    #[arg(long, global = true, env = "SPANLAKE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where Parquet files and the catalog go (file://, s3://, gs://, az://).
    #[arg(long, global = true, env = "SPANLAKE_LOCATION")]
    location: Option<String>,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, global = true, env = "SPANLAKE_LOG", default_value = "info")]
    log: String,
    /// Worker threads (defaults to the number of cores).
    #[arg(long, global = true, env = "SPANLAKE_THREADS")]
    threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: OTLP in (gRPC and HTTP), SQL out.
    Serve(ServeArgs),
    /// Run one SQL query over a data directory and print the result.
    Sql(SqlArgs),
    /// Print one trace, found by id alone, as an indented tree with durations, tokens and cost.
    Trace(TraceArgs),
    /// Delete every span matching a SQL condition (e.g. a user's, for an erasure request),
    /// through a running server.
    Delete(DeleteArgs),
    /// Replay bundles of agent runs: export them, or re-run one against an OpenAI-compatible
    /// endpoint and see where it diverges.
    Replay(ReplayArgs),
    /// Write any query's result to a file (JSON lines or Parquet), with a progress bar.
    Export(ExportArgs),
    /// Manage API keys (stored hashed in the data directory).
    Keys(KeysArgs),
}

#[derive(Debug, Args)]
struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key and print its secret (shown only now).
    Create {
        /// What the key may do.
        #[arg(long, value_enum)]
        role: auth::Role,
        /// The project its spans go to and (for read keys) the only one it sees.
        #[arg(long, default_value = "default")]
        project: String,
        /// A name for people.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List keys (ids, roles, projects; never secrets).
    List,
    /// Revoke a key by id; running servers refuse it from the next request.
    Revoke {
        /// The key id.
        id: String,
    },
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[command(subcommand)]
    command: ReplayCommand,
}

#[derive(Debug, Subcommand)]
enum ReplayCommand {
    /// Print the replay bundle of a trace (format spanlake.replay/v1), or with --sql write the
    /// bundles of every trace id the query returns as JSON lines.
    Export {
        /// The trace id.
        trace_id: Option<String>,
        /// A query whose first column is trace ids (e.g. "SELECT DISTINCT trace_id FROM spans
        /// WHERE status_code = 'error'").
        #[arg(long)]
        sql: Option<String>,
        /// Write here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Re-run a recorded run against an OpenAI-compatible endpoint, answering tool calls from
    /// the recording, and report step by step where the new run diverges.
    Run {
        /// The trace id of the recorded run.
        trace_id: String,
        /// The OpenAI-compatible API base URL (e.g. http://localhost:8000/v1).
        #[arg(long)]
        endpoint: String,
        /// Bearer token for the endpoint.
        #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Send every request to this model instead of the recorded one.
        #[arg(long)]
        model: Option<String>,
        /// STEP=FILE: send the JSON array of messages in FILE at LLM step STEP (repeatable).
        #[arg(long = "override")]
        overrides: Vec<String>,
        /// Read the bundle from this file (from `replay export`) instead of the data directory.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// The spanlake server that records the re-run (defaults to the configured HTTP
        /// listen address).
        #[arg(long)]
        url: Option<String>,
        /// Do not record the re-run as a trace. (Exit status: 0 when every step matched the
        /// recording, 3 when the run diverged.)
        #[arg(long)]
        no_record: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExportFormat {
    Jsonl,
    Parquet,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// The query.
    #[arg(long)]
    sql: String,
    /// File format.
    #[arg(long, value_enum, default_value = "jsonl")]
    format: ExportFormat,
    /// Output file.
    file: PathBuf,
}

#[derive(Debug, Args)]
struct TraceArgs {
    /// The trace id (32 hex digits).
    trace_id: String,
    /// Print the tree as JSON (the shape of `GET /v1/traces/{id}`).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DeleteArgs {
    /// SQL condition over the `spans` columns, e.g. "user_id = 'u-42'".
    #[arg(long = "where")]
    predicate: String,
    /// Only this project's spans.
    #[arg(long)]
    project: Option<String>,
    /// The server (defaults to the configured HTTP listen address).
    #[arg(long)]
    url: Option<String>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// OTLP/HTTP, SQL and API listen address.
    #[arg(long, env = "SPANLAKE_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,
    /// OTLP/gRPC listen address.
    #[arg(long, env = "SPANLAKE_GRPC_LISTEN")]
    grpc_listen: Option<std::net::SocketAddr>,
    /// Postgres wire protocol listen address (default 127.0.0.1:5433).
    #[arg(long, env = "SPANLAKE_PG_LISTEN")]
    pg_listen: Option<std::net::SocketAddr>,
    /// Arrow Flight SQL listen address (default 127.0.0.1:4320).
    #[arg(long, env = "SPANLAKE_FLIGHT_LISTEN")]
    flight_listen: Option<std::net::SocketAddr>,
    /// `fsync` (default) or `none`.
    #[arg(long, env = "SPANLAKE_DURABILITY")]
    durability: Option<String>,
    /// Flush to Parquet when the oldest span in memory is this old (e.g. `10s`).
    #[arg(long, env = "SPANLAKE_FLUSH_MAX_AGE")]
    flush_max_age: Option<String>,
    /// Memory ingest may hold before Parquet (e.g. `1GiB`).
    #[arg(long, env = "SPANLAKE_MEMORY_BUDGET")]
    memory_budget: Option<String>,
    /// Listen beyond localhost while no API key exists: no authentication at all, anyone who
    /// can reach the ports can send and read everything (`security.allow_unauthenticated_network`).
    #[arg(long, env = "SPANLAKE_ALLOW_UNAUTHENTICATED_NETWORK")]
    allow_unauthenticated_network: bool,
    /// Enables `POST /debug/faults`, which makes object store calls fail on purpose (for fault
    /// tests; never in production).
    #[arg(long, env = "SPANLAKE_FAULT_INJECTION", hide = true)]
    fault_injection: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Args)]
struct SqlArgs {
    /// The query.
    query: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
}

fn load_config(common: &CommonArgs) -> anyhow::Result<Config> {
    let mut config = match &common.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(d) = &common.data_dir {
        config.data_dir.clone_from(d);
    }
    if let Some(l) = &common.location {
        config.location = Some(l.clone());
    }
    Ok(config)
}

fn apply_serve_flags(config: &mut Config, args: &ServeArgs) -> anyhow::Result<()> {
    if let Some(a) = args.http_listen {
        config.listen.http = a;
    }
    if let Some(a) = args.grpc_listen {
        config.listen.grpc = a;
    }
    if let Some(a) = args.pg_listen {
        config.listen.postgres = a;
    }
    if let Some(a) = args.flight_listen {
        config.listen.flight = a;
    }
    if let Some(d) = &args.durability {
        config.storage.durability = match d.as_str() {
            "fsync" => spanlake_engine::wal::Durability::Fsync,
            "none" => spanlake_engine::wal::Durability::None,
            other => anyhow::bail!("invalid durability {other:?}: use fsync or none"),
        };
    }
    if let Some(a) = &args.flush_max_age {
        config.storage.flush_max_age = config::HumanDuration(config::parse_duration(a)?);
    }
    if let Some(m) = &args.memory_budget {
        config.storage.memory_budget = config::ByteSize(config::parse_size(m)?);
    }
    if args.allow_unauthenticated_network {
        config.security.allow_unauthenticated_network = true;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    disable_transparent_huge_pages();
    fix_malloc_mmap_threshold();
    purge_freed_memory_at_once();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.common.log)
                .context("invalid --log filter")?,
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = load_config(&cli.common)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("spanlake");
    if let Some(n) = cli.common.threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime.build().context("cannot start the runtime")?;
    match cli.command {
        Command::Serve(args) => {
            apply_serve_flags(&mut config, &args)?;
            // Queries run on their own runtime, so that a heavy query cannot occupy the
            // threads that answer ingest requests.
            let mut query_runtime = tokio::runtime::Builder::new_multi_thread();
            query_runtime.enable_all().thread_name("spanlake-query");
            if let Some(n) = cli.common.threads {
                query_runtime.worker_threads(n.max(1));
            }
            let query_runtime = query_runtime.build().context("cannot start the query runtime")?;
            let result = runtime.block_on(serve::serve(
                config,
                args.fault_injection,
                query_runtime.handle().clone(),
            ));
            query_runtime.shutdown_background();
            result
        }
        Command::Sql(args) => runtime.block_on(sql(config, args)),
        Command::Trace(args) => runtime.block_on(trace(config, args)),
        Command::Delete(args) => runtime.block_on(delete(config, args)),
        Command::Replay(args) => runtime.block_on(replay_command(config, args)),
        Command::Export(args) => runtime.block_on(export(config, args)),
        Command::Keys(args) => runtime.block_on(keys_command(&config, args)),
    }
}

async fn local_query_engine(config: &Config) -> anyhow::Result<spanlake_query::QueryEngine> {
    let url = config.location_url();
    let location = spanlake_engine::objstore::open_location(&url, &config.location_options)?;
    let store = spanlake_engine::engine::open_snapshot(&config.wal_dir(), location)
        .await
        .with_context(|| format!("cannot read {url}"))?;
    let prices = Arc::new(config.prices()?);
    Ok(spanlake_query::QueryEngine::new(store, None, prices, &config.query(), Arc::default())
        .await?)
}

async fn trace(config: Config, args: TraceArgs) -> anyhow::Result<()> {
    let engine = local_query_engine(&config).await?;
    let Some(tree) = spanlake_query::trace::trace_tree(&engine, &args.trace_id).await? else {
        anyhow::bail!("trace {} not found", args.trace_id.to_ascii_lowercase());
    };
    let text = if args.json {
        serde_json::to_string_pretty(&tree)? + "\n"
    } else {
        spanlake_query::trace::render_text(&tree)
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

async fn delete(config: Config, args: DeleteArgs) -> anyhow::Result<()> {
    let base = args.url.unwrap_or_else(|| format!("http://{}", config.listen.http));
    let url = format!("{}/v1/admin/delete", base.trim_end_matches('/'));
    let body = serde_json::json!({"where": args.predicate, "project": args.project});
    let response = reqwest::Client::new()
        .post(&url)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("{status}: {}", answer["error"].as_str().unwrap_or("no details"));
    }
    println!(
        "deleted {} spans, rewrote {} of {} files",
        answer["deleted_spans"], answer["files_rewritten"], answer["files_scanned"]
    );
    Ok(())
}

async fn sql(config: Config, args: SqlArgs) -> anyhow::Result<()> {
    let engine = local_query_engine(&config).await?;
    let result = engine.sql(&args.query).await?;
    let format = match args.format {
        OutputFormat::Table => spanlake_query::format::Format::Table,
        OutputFormat::Json => spanlake_query::format::Format::Json,
        OutputFormat::Csv => spanlake_query::format::Format::Csv,
    };
    let bytes = spanlake_query::format::encode(&result, format)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)?;
    if !bytes.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    Ok(())
}

async fn replay_command(config: Config, args: ReplayArgs) -> anyhow::Result<()> {
    match args.command {
        ReplayCommand::Export { trace_id, sql, output } => {
            let engine = local_query_engine(&config).await?;
            let ids: Vec<String> = match (trace_id, sql) {
                (Some(id), None) => vec![id],
                (None, Some(sql)) => {
                    let result = engine.sql(&sql).await?;
                    let mut ids = Vec::new();
                    for b in &result.batches {
                        let c =
                            arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)?;
                        let c =
                            c.as_any().downcast_ref::<arrow::array::StringArray>().expect("utf8");
                        ids.extend(c.iter().flatten().map(str::to_string));
                    }
                    ids
                }
                _ => anyhow::bail!("give either a trace id or --sql"),
            };
            let mut out: Box<dyn std::io::Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let many = ids.len() != 1
                || output.as_ref().is_some_and(|p| p.extension().is_some_and(|e| e == "jsonl"));
            for id in &ids {
                let Some(bundle) = spanlake_query::replay::replay_bundle(&engine, id).await? else {
                    anyhow::bail!("trace {} not found", id.to_ascii_lowercase());
                };
                let text = if many {
                    serde_json::to_string(&bundle)?
                } else {
                    serde_json::to_string_pretty(&bundle)?
                };
                writeln!(out, "{text}")?;
            }
            out.flush()?;
            if let Some(path) = output {
                eprintln!("wrote {} replay bundle(s) to {}", ids.len(), path.display());
            }
            Ok(())
        }
        ReplayCommand::Run {
            trace_id,
            endpoint,
            api_key,
            model,
            overrides,
            bundle,
            url,
            no_record,
        } => {
            let bundle: serde_json::Value = match bundle {
                Some(path) => serde_json::from_slice(
                    &std::fs::read(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )
                .with_context(|| format!("{}: not a replay bundle", path.display()))?,
                None => {
                    let engine = local_query_engine(&config).await?;
                    spanlake_query::replay::replay_bundle(&engine, &trace_id).await?.with_context(
                        || format!("trace {} not found", trace_id.to_ascii_lowercase()),
                    )?
                }
            };
            let options = replay::RunOptions {
                endpoint,
                api_key,
                model,
                overrides: overrides
                    .iter()
                    .map(|o| replay::parse_override(o))
                    .collect::<anyhow::Result<_>>()?,
                record_to: (!no_record)
                    .then(|| url.unwrap_or_else(|| format!("http://{}", config.listen.http))),
            };
            let outcome = replay::run(&bundle, &options).await?;
            print!("{}", outcome.report);
            std::io::stdout().flush()?;
            if outcome.diverged_at.is_some() {
                // Scripts (and tests built from failing traces) see a divergence in the status.
                std::process::exit(3);
            }
            Ok(())
        }
    }
}

async fn export(config: Config, args: ExportArgs) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let engine = local_query_engine(&config).await?;
    let plan = engine.plan(&args.sql).await?;
    let df = engine.context().execute_logical_plan(plan).await?;
    let schema = std::sync::Arc::new(df.schema().as_arrow().clone());
    let mut stream = df.execute_stream().await?;
    let file = std::fs::File::create(&args.file)
        .with_context(|| format!("cannot create {}", args.file.display()))?;
    let progress = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {human_pos} rows written ({per_sec}) {elapsed}",
        )
        .expect("progress template"),
    );
    enum Writer {
        Jsonl(arrow::json::LineDelimitedWriter<std::io::BufWriter<std::fs::File>>),
        Parquet(parquet::arrow::ArrowWriter<std::fs::File>),
    }
    let mut writer = match args.format {
        ExportFormat::Jsonl => {
            Writer::Jsonl(arrow::json::LineDelimitedWriter::new(std::io::BufWriter::new(file)))
        }
        ExportFormat::Parquet => {
            let props = parquet::file::properties::WriterProperties::builder()
                .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
                .build();
            Writer::Parquet(parquet::arrow::ArrowWriter::try_new(file, schema, Some(props))?)
        }
    };
    let mut rows = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        match &mut writer {
            Writer::Jsonl(w) => w.write(&batch)?,
            Writer::Parquet(w) => w.write(&batch)?,
        }
        rows += batch.num_rows() as u64;
        progress.set_position(rows);
    }
    match writer {
        Writer::Jsonl(mut w) => {
            w.finish()?;
            w.into_inner().flush()?;
        }
        Writer::Parquet(w) => {
            w.close()?;
        }
    }
    progress.finish_and_clear();
    eprintln!("wrote {rows} rows to {}", args.file.display());
    Ok(())
}

async fn keys_command(config: &Config, args: KeysArgs) -> anyhow::Result<()> {
    let url = config.location_url();
    let location = spanlake_engine::objstore::open_location(&url, &config.location_options)?;
    let (dir, location) = (&config.data_dir, &*location);
    match args.command {
        KeysCommand::Create { role, project, name } => {
            let (key, secret) = auth::create(dir, location, &name, role, &project).await?;
            eprintln!(
                "created key {} (role {}, project {}); its secret, shown only now:",
                key.id, key.role, key.project
            );
            println!("{secret}");
        }
        KeysCommand::List => {
            for k in auth::list(dir, location).await? {
                println!(
                    "{}\t{}\t{}\t{}\t{}{}",
                    k.id,
                    k.role,
                    k.project,
                    k.created,
                    k.name,
                    if k.revoked { "\trevoked" } else { "" }
                );
            }
        }
        KeysCommand::Revoke { id } => {
            auth::revoke(dir, location, &id).await?;
            eprintln!("revoked key {id}");
        }
    }
    Ok(())
}
