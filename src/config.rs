//! Configuration: defaults < TOML file < `SPANLAKE_*` environment < command-line flags.
//!
//! Sizes are human strings (`"256MiB"`, `"1GB"`, or a plain number of bytes) and durations too
//! (`"500ms"`, `"10s"`, `"5m"`, `"30d"`). Every resource limit is a field here; the README lists
//! them all with their defaults.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Format version of this file (1).
    pub version: u32,
    /// Local directory for the write-ahead log, the node id and (by default) the data.
    pub data_dir: PathBuf,
    /// Where Parquet files and the catalog go: `file:///path`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`. Defaults to `data_dir`.
    pub location: Option<String>,
    /// Options of the object store (`endpoint`, `region`, `allow_http`, ...).
    pub location_options: HashMap<String, String>,
    /// Listen addresses.
    pub listen: ListenConfig,
    /// Receiver limits.
    pub ingest: IngestConfig,
    /// Storage engine settings.
    pub storage: StorageConfig,
    /// Compaction of small files.
    pub compaction: CompactionSettings,
    /// The Postgres wire protocol frontend.
    pub postgres: PostgresSettings,
    /// Query engine settings.
    pub query: QuerySettings,
    /// Model prices for `cost_usd`.
    pub pricing: PricingConfig,
    /// Redaction at ingest.
    pub redaction: RedactionSettings,
    /// Authentication.
    pub security: SecuritySettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            version: 1,
            data_dir: PathBuf::from("./spanlake-data"),
            location: None,
            location_options: HashMap::new(),
            listen: ListenConfig::default(),
            ingest: IngestConfig::default(),
            storage: StorageConfig::default(),
            compaction: CompactionSettings::default(),
            postgres: PostgresSettings::default(),
            query: QuerySettings::default(),
            pricing: PricingConfig::default(),
            redaction: RedactionSettings::default(),
            security: SecuritySettings::default(),
        }
    }
}

/// Listen addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// OTLP/gRPC.
    pub grpc: SocketAddr,
    /// OTLP/HTTP, the SQL and trace APIs, `/health` and `/metrics`.
    pub http: SocketAddr,
    /// The Postgres wire protocol (psql, Grafana, BI tools).
    pub postgres: SocketAddr,
    /// Arrow Flight SQL (ADBC/JDBC drivers, Grafana's InfluxDB datasource in SQL mode).
    pub flight: SocketAddr,
    /// PEM certificate for the Postgres and Flight SQL listeners (TLS when `tls_key` is set too).
    pub tls_cert: Option<PathBuf>,
    /// PKCS#8 PEM key for the Postgres and Flight SQL listeners.
    pub tls_key: Option<PathBuf>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            grpc: SocketAddr::from(([127, 0, 0, 1], 4317)),
            http: SocketAddr::from(([127, 0, 0, 1], 4318)),
            postgres: SocketAddr::from(([127, 0, 0, 1], 5433)),
            flight: SocketAddr::from(([127, 0, 0, 1], 4320)),
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Receiver limits (see the `limits` module of `spanlake-ingest`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest request body as sent.
    pub max_request_size: ByteSize,
    /// Largest request body after decompression.
    pub max_decompressed_size: ByteSize,
    /// Most spans per request.
    pub max_spans_per_request: usize,
    /// Requests decoded at once (others wait holding only their body).
    pub max_concurrent_decodes: usize,
    /// Most attributes per span.
    pub max_attributes_per_span: usize,
    /// Longest string value; longer ones are truncated with a marker.
    pub max_value_size: ByteSize,
    /// Deepest nesting of array and map values.
    pub max_value_depth: usize,
    /// Most events per span.
    pub max_events_per_span: usize,
    /// Most links per span.
    pub max_links_per_span: usize,
    /// How far in the future a span may start.
    pub max_future_skew: HumanDuration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        let r = spanlake_ingest::limits::RequestLimits::default();
        let s = spanlake_ingest::limits::SpanLimits::default();
        Self {
            max_request_size: ByteSize(r.max_request_bytes as u64),
            max_decompressed_size: ByteSize(r.max_decompressed_bytes as u64),
            max_spans_per_request: r.max_spans_per_request,
            max_concurrent_decodes: r.max_concurrent_decodes,
            max_attributes_per_span: s.max_attributes,
            max_value_size: ByteSize(s.max_value_bytes as u64),
            max_value_depth: s.max_depth,
            max_events_per_span: s.max_events,
            max_links_per_span: s.max_links,
            max_future_skew: HumanDuration(s.max_future_skew),
        }
    }
}

/// Storage engine settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `fsync` (acknowledged spans survive power loss) or `none` (they survive a process
    /// crash only).
    pub durability: spanlake_engine::wal::Durability,
    /// Memory ingest may hold before Parquet; past it, clients are told to retry.
    pub memory_budget: ByteSize,
    /// Flush to Parquet when this much is in memory.
    pub flush_max_size: ByteSize,
    /// Flush to Parquet when the oldest span in memory is this old.
    pub flush_max_age: HumanDuration,
    /// WAL segment size.
    pub wal_segment_size: ByteSize,
    /// Requests that may wait for the WAL before new ones are refused.
    pub wal_queue_requests: usize,
    /// zstd level of Parquet files.
    pub zstd_level: i32,
    /// zstd level of the text columns (prompts, completions, attributes, events) in files
    /// written by flushes; compaction rewrites them at `zstd_level`.
    pub flush_text_zstd_level: i32,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// Most rows in a Parquet data page. A lookup by trace id decompresses, in each column,
    /// the page holding the trace's rows.
    pub page_rows: usize,
    /// Largest data and dictionary page of the text columns (prompts, completions,
    /// attributes, events). Smaller pages make a lookup by trace id decompress less and the
    /// files a little larger.
    pub text_page_size: ByteSize,
    /// Threads a flush or compaction gathers and encodes Parquet columns on (0: one per core).
    pub encode_threads: usize,
    /// How often to look for catalog commits of other nodes.
    pub catalog_refresh: HumanDuration,
    /// Spans older than this are removed, a whole hour partition at a time (e.g. `"30d"`).
    /// Unset keeps everything.
    pub retention: Option<HumanDuration>,
    /// Files replaced by compaction, retention or deletion are deleted this long after the
    /// catalog commit, so that queries already reading them finish.
    pub file_delete_delay: HumanDuration,
    /// Objects no catalog version references (left by a crash) are deleted once this old.
    pub orphan_grace: HumanDuration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        let e = spanlake_engine::EngineConfig::new(PathBuf::new());
        Self {
            durability: e.durability,
            memory_budget: ByteSize(e.memory_budget_bytes),
            flush_max_size: ByteSize(e.flush_max_bytes),
            flush_max_age: HumanDuration(e.flush_max_age),
            wal_segment_size: ByteSize(e.wal_segment_bytes),
            wal_queue_requests: e.wal_queue_requests,
            zstd_level: e.writer.zstd_level,
            flush_text_zstd_level: e.writer.flush_text_zstd_level,
            row_group_rows: e.writer.row_group_rows,
            page_rows: e.writer.page_rows,
            text_page_size: ByteSize(e.writer.text_page_bytes as u64),
            encode_threads: 0,
            catalog_refresh: HumanDuration(e.catalog_refresh),
            retention: e.maintenance.retention.map(HumanDuration),
            file_delete_delay: HumanDuration(e.maintenance.file_delete_delay),
            orphan_grace: HumanDuration(e.orphan_grace),
        }
    }
}

/// Authentication settings (API keys are managed with `spanlake keys`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    /// Listen beyond localhost while no API key exists (anyone who can reach the ports can
    /// send and read everything).
    pub allow_unauthenticated_network: bool,
    /// How often servers re-read the API keys from the location: keys created or revoked on
    /// any node take effect within this interval.
    pub keys_refresh: HumanDuration,
}

impl Default for SecuritySettings {
    fn default() -> Self {
        Self {
            allow_unauthenticated_network: false,
            keys_refresh: HumanDuration(std::time::Duration::from_secs(2)),
        }
    }
}

/// Redaction at ingest (see `spanlake_ingest::redact`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedactionSettings {
    /// Built-in pattern rules: `email`, `credit_card`, `api_key`.
    pub builtin: Vec<String>,
    /// Attribute key globs (`*` wildcards) whose values are masked whole.
    pub keys: Vec<String>,
    /// Extra pattern rules.
    pub patterns: Vec<RedactionPattern>,
    /// Drop prompt and completion text of every project.
    pub drop_content: bool,
    /// Drop prompt and completion text of these projects.
    pub drop_content_projects: Vec<String>,
}

/// One pattern rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactionPattern {
    /// Rule name (in the mask `[REDACTED:name]` and the metric label).
    pub name: String,
    /// Regular expression (Rust `regex` syntax).
    pub pattern: String,
}

impl Config {
    /// The redactor the configuration asks for, `None` when it redacts nothing.
    pub fn redactor(
        &self,
    ) -> anyhow::Result<Option<std::sync::Arc<spanlake_ingest::redact::Redactor>>> {
        let r = &self.redaction;
        let config = spanlake_ingest::redact::RedactionConfig {
            builtin: r.builtin.clone(),
            patterns: r.patterns.iter().map(|p| (p.name.clone(), p.pattern.clone())).collect(),
            keys: r.keys.clone(),
            drop_content: r.drop_content,
            drop_content_projects: r.drop_content_projects.clone(),
        };
        let redactor = spanlake_ingest::redact::Redactor::new(&config)
            .map_err(|e| anyhow::anyhow!("[redaction]: {e}"))?;
        Ok((!redactor.is_noop()).then(|| std::sync::Arc::new(redactor)))
    }
}

/// Postgres frontend settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresSettings {
    /// Users allowed to connect; none: any user name, no password.
    pub users: Vec<PostgresUser>,
}

/// One Postgres user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresUser {
    /// User name.
    pub name: String,
    /// Password.
    pub password: String,
}

/// Compaction settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactionSettings {
    /// Whether small files are merged in the background.
    pub enabled: bool,
    /// How often compaction and retention look for work.
    pub interval: HumanDuration,
    /// Small files in the current hour's partition that trigger compaction (older partitions
    /// are compacted as soon as they have two).
    pub min_files: usize,
    /// Size of the files compaction writes.
    pub target_file_size: ByteSize,
    /// Memory one compaction job may use for its decoded input.
    pub max_input_memory: ByteSize,
    /// A past hour no flush has added a file to for this long is merged whole instead of in
    /// size tiers.
    pub settle_after: HumanDuration,
}

impl Default for CompactionSettings {
    fn default() -> Self {
        let m = spanlake_engine::compaction::MaintenanceConfig::default();
        Self {
            enabled: m.compaction,
            interval: HumanDuration(m.interval),
            min_files: m.min_files,
            target_file_size: ByteSize(m.target_file_bytes),
            max_input_memory: ByteSize(m.max_input_bytes),
            settle_after: HumanDuration(m.settle_after),
        }
    }
}

/// Query engine settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuerySettings {
    /// Memory all running queries may use together; past it they spill to disk or fail.
    pub memory_limit: ByteSize,
    /// Memory one query may use (within `memory_limit`); past it it spills to disk or fails.
    pub memory_per_query: ByteSize,
    /// Longest a query may run.
    pub timeout: HumanDuration,
    /// Parallelism of one query (defaults to twice the number of cores).
    pub target_partitions: Option<usize>,
    /// Evaluate filters while decoding Parquet (late materialisation).
    pub pushdown_filters: bool,
    /// Memory for Parquet footers kept between queries (shared by all projects).
    pub metadata_cache: ByteSize,
}

impl Default for QuerySettings {
    fn default() -> Self {
        let q = spanlake_query::QueryConfig::default();
        Self {
            memory_limit: ByteSize(q.memory_limit_bytes as u64),
            memory_per_query: ByteSize(q.memory_per_query_bytes as u64),
            timeout: HumanDuration(q.timeout),
            target_partitions: None,
            pushdown_filters: q.pushdown_filters,
            metadata_cache: ByteSize(q.metadata_cache_bytes as u64),
        }
    }
}

/// Model prices.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// A TOML file of `[[model]]` entries (`match`, `input_per_million`, `output_per_million`).
    pub file: Option<PathBuf>,
    /// Entries given inline; they override the built-in defaults with the same prefix.
    pub model: Vec<spanlake_engine::pricing::ModelPrice>,
}

/// A byte size: a number of bytes or a string such as `"256MiB"` or `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Self(n)),
            Raw::S(s) => parse_size(&s).map(Self).map_err(serde::de::Error::custom),
        }
    }
}

/// A duration: a string such as `"500ms"`, `"10s"`, `"5m"`, `"2h"` or `"30d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Self).map_err(serde::de::Error::custom)
    }
}

fn split_number(s: &str) -> (&str, &str) {
    let s = s.trim();
    let end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

/// Parses `"256MiB"`, `"1GB"`, `"512k"` or `"1048576"`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, unit) = split_number(s);
    let n: f64 = num.parse().with_context(|| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => bail!("invalid size {s:?}: unknown unit {other:?}"),
    };
    Ok((n * mult as f64) as u64)
}

/// Parses `"500ms"`, `"10s"`, `"5m"`, `"2h"`, `"30d"` (a bare number is seconds).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = split_number(s);
    let n: f64 = num.parse().with_context(|| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => bail!("invalid duration {s:?}: unknown unit {other:?}"),
    };
    Ok(Duration::from_secs_f64(secs))
}

impl Config {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: Self = toml::from_str(&text)
            .with_context(|| format!("invalid configuration {}", path.display()))?;
        if config.version != 1 {
            bail!("{}: unsupported configuration version {}", path.display(), config.version);
        }
        Ok(config)
    }

    /// The data location URL.
    pub fn location_url(&self) -> String {
        self.location.clone().unwrap_or_else(|| {
            let dir = std::path::absolute(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
            format!("file://{}", dir.display())
        })
    }

    /// The WAL directory.
    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir.join("wal")
    }

    /// The storage engine's configuration.
    pub fn engine(&self) -> spanlake_engine::EngineConfig {
        let s = &self.storage;
        let mut e = spanlake_engine::EngineConfig::new(self.wal_dir());
        e.durability = s.durability;
        e.memory_budget_bytes = s.memory_budget.0;
        e.flush_max_bytes = s.flush_max_size.0;
        e.flush_max_age = s.flush_max_age.0;
        e.wal_segment_bytes = s.wal_segment_size.0;
        e.wal_queue_requests = s.wal_queue_requests;
        e.writer.zstd_level = s.zstd_level;
        e.writer.flush_text_zstd_level = s.flush_text_zstd_level;
        e.writer.row_group_rows = s.row_group_rows;
        e.writer.page_rows = s.page_rows;
        e.writer.text_page_bytes = usize::try_from(s.text_page_size.0).unwrap_or(usize::MAX);
        if s.encode_threads > 0 {
            e.writer.encode_threads = s.encode_threads;
        }
        e.catalog_refresh = s.catalog_refresh.0;
        e.orphan_grace = s.orphan_grace.0;
        let c = &self.compaction;
        e.maintenance = spanlake_engine::compaction::MaintenanceConfig {
            compaction: c.enabled,
            interval: c.interval.0,
            min_files: c.min_files,
            target_file_bytes: c.target_file_size.0,
            max_input_bytes: c.max_input_memory.0,
            settle_after: c.settle_after.0,
            retention: s.retention.map(|r| r.0),
            file_delete_delay: s.file_delete_delay.0,
            // As often as orphans can become collectable, at most hourly.
            orphan_interval: s.orphan_grace.0.max(c.interval.0).min(e.maintenance.orphan_interval),
        };
        e
    }

    /// The query engine's configuration.
    pub fn query(&self) -> spanlake_query::QueryConfig {
        let mut q = spanlake_query::QueryConfig {
            memory_limit_bytes: self.query.memory_limit.0 as usize,
            memory_per_query_bytes: self.query.memory_per_query.0 as usize,
            timeout: self.query.timeout.0,
            spill_dir: Some(self.data_dir.join("spill")),
            pushdown_filters: self.query.pushdown_filters,
            metadata_cache_bytes: self.query.metadata_cache.0 as usize,
            ..Default::default()
        };
        if let Some(n) = self.query.target_partitions {
            q.target_partitions = n;
        }
        q
    }

    /// The receivers' request limits.
    pub fn request_limits(&self) -> spanlake_ingest::limits::RequestLimits {
        spanlake_ingest::limits::RequestLimits {
            max_request_bytes: self.ingest.max_request_size.0 as usize,
            max_decompressed_bytes: self.ingest.max_decompressed_size.0 as usize,
            max_spans_per_request: self.ingest.max_spans_per_request,
            max_concurrent_decodes: self.ingest.max_concurrent_decodes,
        }
    }

    /// The receivers' span limits.
    pub fn span_limits(&self) -> spanlake_ingest::limits::SpanLimits {
        let i = &self.ingest;
        spanlake_ingest::limits::SpanLimits {
            max_attributes: i.max_attributes_per_span,
            max_value_bytes: i.max_value_size.0 as usize,
            max_depth: i.max_value_depth,
            max_events: i.max_events_per_span,
            max_links: i.max_links_per_span,
            max_future_skew: i.max_future_skew.0,
        }
    }

    /// The price table: built-in defaults, overridden by the file, overridden by inline entries.
    pub fn prices(&self) -> anyhow::Result<spanlake_engine::pricing::PriceTable> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct PriceFile {
            #[serde(default)]
            model: Vec<spanlake_engine::pricing::ModelPrice>,
        }
        let mut entries = self.pricing.model.clone();
        if let Some(path) = &self.pricing.file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read price table {}", path.display()))?;
            let file: PriceFile = toml::from_str(&text)
                .with_context(|| format!("invalid price table {}", path.display()))?;
            for m in file.model {
                if !entries.iter().any(|e| e.prefix.eq_ignore_ascii_case(&m.prefix)) {
                    entries.push(m);
                }
            }
        }
        Ok(spanlake_engine::pricing::PriceTable::with_overrides(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("1.5k").unwrap(), 1500);
        assert_eq!(parse_size("42").unwrap(), 42);
        assert!(
            parse_size("12 parsecs").unwrap_err().to_string().contains("unknown unit \"parsecs\"")
        );
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86400));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
    }

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let c: Config = toml::from_str(
            "version = 1\ndata_dir = \"/x\"\n[storage]\ndurability = \"none\"\nmemory_budget = \"64MiB\"\nflush_max_age = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(c.storage.durability, spanlake_engine::wal::Durability::None);
        assert_eq!(c.engine().memory_budget_bytes, 64 << 20);
        assert_eq!(c.engine().flush_max_age, Duration::from_secs(2));
        assert_eq!(c.location_url(), "file:///x");
        assert_eq!(c.query().metadata_cache_bytes, 256 << 20);
        let q: Config = toml::from_str("[query]\nmetadata_cache = \"1GiB\"\n").unwrap();
        assert_eq!(q.query().metadata_cache_bytes, 1 << 30);
        let err = toml::from_str::<Config>("[storage]\nflush_age = \"2s\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `flush_age`"), "{err}");
    }
}
