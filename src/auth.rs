//! API keys: hashed at rest, each with a role and a project, checked on OTLP/HTTP, OTLP/gRPC,
//! the HTTP query APIs and Flight SQL.
//!
//! Keys live in `<data_dir>/keys.json` (`spanlake keys create|list|revoke`); only the SHA-256 of
//! each secret is stored. A secret is `slk_<id>_<32 hex digits>` and is shown once, at creation.
//! The server re-reads the file when it changes, so keys created or revoked while it runs take
//! effect on the next request. With no active key, nothing is checked — and the server refuses
//! to listen beyond localhost unless `security.allow_unauthenticated_network` says so.
//!
//! Roles: `ingest` may only send spans (OTLP), into its project; `read` may only query, and sees
//! only its project's spans in SQL, views, trace lookup, replay, Jaeger and Tempo APIs and Flight
//! SQL (Postgres takes admin keys only); `admin`
//! may do everything, sees every project and sends into its own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use anyhow::{Context as _, bail};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use spanlake_query::QueryEngine;
use tower::ServiceExt as _;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Send spans only.
    Ingest,
    /// Query only, one project.
    Read,
    /// Everything, every project.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ingest => "ingest",
            Self::Read => "read",
            Self::Admin => "admin",
        })
    }
}

/// One stored key (no secret: its hash).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Key {
    /// Public id (part of the secret).
    pub id: String,
    /// A name for people.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The project its spans go to and (for `read`) the only one it sees.
    pub project: String,
    /// Hex SHA-256 of the secret.
    pub sha256: String,
    /// Creation time (RFC 3339).
    pub created: String,
    /// Revoked keys are kept for the record and refused.
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KeyFile {
    keys: Vec<Key>,
}

fn keys_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys.json")
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn read_file(path: &Path) -> anyhow::Result<KeyFile> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a key file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeyFile::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_file(path: &Path, file: &KeyFile) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(file)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Creates a key; returns it and its secret (shown once).
pub fn create(
    data_dir: &Path,
    name: &str,
    role: Role,
    project: &str,
) -> anyhow::Result<(Key, String)> {
    if project.is_empty()
        || !project.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("invalid project {project:?}: use letters, digits, '-' and '_'");
    }
    let path = keys_path(data_dir);
    let mut file = read_file(&path)?;
    let id = hex::encode(rand::random::<[u8; 4]>());
    let secret = format!("slk_{id}_{}", hex::encode(rand::random::<[u8; 16]>()));
    let key = Key {
        id,
        name: name.to_string(),
        role,
        project: project.to_string(),
        sha256: hash(&secret),
        created: chrono::Utc::now().to_rfc3339(),
        revoked: false,
    };
    file.keys.push(key.clone());
    write_file(&path, &file)?;
    Ok((key, secret))
}

/// All keys.
pub fn list(data_dir: &Path) -> anyhow::Result<Vec<Key>> {
    Ok(read_file(&keys_path(data_dir))?.keys)
}

/// Revokes a key by id.
pub fn revoke(data_dir: &Path, id: &str) -> anyhow::Result<()> {
    let path = keys_path(data_dir);
    let mut file = read_file(&path)?;
    let Some(key) = file.keys.iter_mut().find(|k| k.id == id) else { bail!("no key with id {id}") };
    key.revoked = true;
    write_file(&path, &file)
}

/// The keys as the server sees them, re-read when the file changes.
#[derive(Debug)]
pub struct KeyStore {
    path: PathBuf,
    cache: RwLock<(Option<SystemTime>, Vec<Key>)>,
}

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No key given.
    Missing,
    /// Unknown, malformed or revoked key.
    Invalid,
    /// The key's role does not allow this.
    Forbidden(String),
}

impl Refusal {
    /// The message for the client.
    pub fn message(&self) -> String {
        match self {
            Self::Missing => {
                "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
                    .into()
            }
            Self::Invalid => "invalid or revoked API key".into(),
            Self::Forbidden(m) => m.clone(),
        }
    }
}

/// The kind of access a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Sending spans.
    Ingest,
    /// Queries and trace views.
    Read,
    /// Deletion and other operator routes.
    Admin,
}

impl KeyStore {
    /// The key store of a data directory.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let store = Self { path: keys_path(data_dir), cache: RwLock::new((None, Vec::new())) };
        store.refresh()?;
        Ok(store)
    }

    fn refresh(&self) -> anyhow::Result<()> {
        // One stat per request (about a microsecond beside a request's decoding): revocation
        // applies to the very next request.
        let mtime = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if self.cache.read().expect("lock").0 == mtime && mtime.is_some() {
            return Ok(());
        }
        let keys = read_file(&self.path)?.keys;
        *self.cache.write().expect("lock") = (mtime, keys);
        Ok(())
    }

    /// Whether any key is active (authentication is on).
    pub fn enabled(&self) -> bool {
        if let Err(e) = self.refresh() {
            tracing::error!(error = %e, "cannot read the API keys; keeping the last ones read");
        }
        self.cache.read().expect("lock").1.iter().any(|k| !k.revoked)
    }

    /// The key a secret belongs to, checked for `access`.
    pub fn check(&self, secret: Option<&str>, access: Access) -> Result<Key, Refusal> {
        let secret = secret.ok_or(Refusal::Missing)?;
        let id = secret
            .strip_prefix("slk_")
            .and_then(|r| r.split('_').next())
            .ok_or(Refusal::Invalid)?;
        let digest = hash(secret);
        let cache = self.cache.read().expect("lock");
        let key = cache
            .1
            .iter()
            .find(|k| k.id == id && !k.revoked && k.sha256 == digest)
            .ok_or(Refusal::Invalid)?;
        let allowed = match access {
            Access::Ingest => matches!(key.role, Role::Ingest | Role::Admin),
            Access::Read => matches!(key.role, Role::Read | Role::Admin),
            Access::Admin => key.role == Role::Admin,
        };
        if !allowed {
            let what = match access {
                Access::Ingest => "sending spans needs an ingest or admin key",
                Access::Read => "queries need a read or admin key",
                Access::Admin => "this operation needs an admin key",
            };
            return Err(Refusal::Forbidden(format!(
                "API key {} has role {}: {what}",
                key.id, key.role
            )));
        }
        Ok(key.clone())
    }
}

/// The secret a request carries (`Authorization: Bearer` or `x-api-key`).
pub fn secret_of(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_string());
    }
    let auth = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
}

/// Builds the query routes of one project.
pub type ProjectRoutes = Box<dyn Fn(Arc<QueryEngine>) -> Router + Send + Sync>;
/// State of the HTTP authentication layer.
pub struct HttpAuth {
    /// The keys.
    pub keys: Arc<KeyStore>,
    /// Query routes over one project's engine.
    pub routes: ProjectRoutes,
    /// A project's engine.
    pub engine: spanlake_query::EngineFor,
    projects: Mutex<HashMap<String, Router>>,
}

impl HttpAuth {
    /// The layer's state.
    pub fn new(
        keys: Arc<KeyStore>,
        routes: ProjectRoutes,
        engine: spanlake_query::EngineFor,
    ) -> Self {
        Self { keys, routes, engine, projects: Mutex::new(HashMap::new()) }
    }

    async fn project_router(&self, project: &str) -> anyhow::Result<Router> {
        if let Some(r) = self.projects.lock().expect("lock").get(project) {
            return Ok(r.clone());
        }
        let engine = (self.engine)(project.to_string()).await.map_err(anyhow::Error::msg)?;
        let router = (self.routes)(engine);
        self.projects.lock().expect("lock").entry(project.to_string()).or_insert(router.clone());
        Ok(router)
    }
}

impl std::fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAuth").field("keys", &self.keys).finish_non_exhaustive()
    }
}

fn refuse(r: &Refusal) -> Response {
    let status = match r {
        Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
        _ => StatusCode::UNAUTHORIZED,
    };
    (status, axum::Json(serde_json::json!({"error": r.message()}))).into_response()
}

/// What an HTTP request needs.
pub fn access_of(method: &axum::http::Method, path: &str) -> Option<Access> {
    if path == "/health" {
        None
    } else if path == "/v1/traces" && method == axum::http::Method::POST {
        Some(Access::Ingest)
    } else if path.starts_with("/v1/admin/") || path.starts_with("/debug/") || path == "/metrics" {
        // Metrics count every project's spans: operators only.
        Some(Access::Admin)
    } else {
        Some(Access::Read)
    }
}

/// The axum middleware: checks the key, sets the ingest project, and sends a project-scoped
/// reader's queries to its project's routes.
pub async fn http_layer(
    State(auth): State<Arc<HttpAuth>>,
    mut req: Request,
    next: Next,
) -> Response {
    if !auth.keys.enabled() {
        return next.run(req).await;
    }
    let Some(access) = access_of(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let key = match auth.keys.check(secret_of(req.headers()).as_deref(), access) {
        Ok(k) => k,
        Err(r) => return refuse(&r),
    };
    match access {
        Access::Ingest => {
            req.extensions_mut()
                .insert(spanlake_ingest::grpc::Project(Arc::from(key.project.as_str())));
            next.run(req).await
        }
        Access::Admin => next.run(req).await,
        Access::Read if key.role == Role::Admin => next.run(req).await,
        Access::Read => match auth.project_router(&key.project).await {
            // A fresh request: the outer router's path parameters must not reach the inner one.
            Ok(router) => match router.oneshot(fresh(req)).await {
                Ok(r) => r,
                Err(e) => match e {},
            },
            Err(e) => {
                tracing::error!(error = %e, project = %key.project, "cannot open the project's query engine");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(serde_json::json!({"error": e.to_string()})),
                )
                    .into_response()
            }
        },
    }
}

/// The same request without the extensions routing added.
fn fresh(req: Request) -> Request {
    let (parts, body) = req.into_parts();
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = parts.uri;
    *out.version_mut() = parts.version;
    *out.headers_mut() = parts.headers;
    out
}

/// The secret a gRPC request carries in its metadata (same headers as HTTP).
fn metadata_secret(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    let mut headers = HeaderMap::new();
    for name in ["authorization", "x-api-key"] {
        if let Some(v) = metadata.get(name).and_then(|v| v.to_str().ok())
            && let Ok(v) = v.parse()
        {
            headers.insert(name, v);
        }
    }
    secret_of(&headers)
}

/// A tonic interceptor for OTLP/gRPC: checks the key and sets the project.
pub fn grpc_interceptor(
    keys: Arc<KeyStore>,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut req: tonic::Request<()>| {
        if !keys.enabled() {
            return Ok(req);
        }
        match keys.check(metadata_secret(req.metadata()).as_deref(), Access::Ingest) {
            Ok(key) => {
                req.extensions_mut()
                    .insert(spanlake_ingest::grpc::Project(Arc::from(key.project.as_str())));
                Ok(req)
            }
            Err(r @ Refusal::Forbidden(_)) => Err(tonic::Status::permission_denied(r.message())),
            Err(r) => Err(tonic::Status::unauthenticated(r.message())),
        }
    }
}

/// A tonic interceptor for Flight SQL: read keys are scoped to their project, admin keys see
/// every project.
pub fn flight_interceptor(
    keys: Arc<KeyStore>,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut req: tonic::Request<()>| {
        if !keys.enabled() {
            return Ok(req);
        }
        match keys.check(metadata_secret(req.metadata()).as_deref(), Access::Read) {
            Ok(key) if key.role == Role::Admin => Ok(req),
            Ok(key) => {
                req.extensions_mut().insert(spanlake_query::flight::FlightProject(key.project));
                Ok(req)
            }
            Err(r @ Refusal::Forbidden(_)) => Err(tonic::Status::permission_denied(r.message())),
            Err(r) => Err(tonic::Status::unauthenticated(r.message())),
        }
    }
}

/// API keys for the Postgres listener: read keys (their project's spans) and admin keys (every
/// project) as passwords.
#[derive(Debug)]
pub struct PgKeys(pub Arc<KeyStore>);

impl spanlake_query::pg::PasswordKeys for PgKeys {
    fn enabled(&self) -> bool {
        self.0.enabled()
    }

    fn accepts(&self, password: &str) -> bool {
        self.0.check(Some(password), Access::Read).is_ok()
    }

    fn project(&self, password: &str) -> Option<String> {
        self.0
            .check(Some(password), Access::Read)
            .ok()
            .filter(|k| k.role != Role::Admin)
            .map(|k| k.project)
    }
}
