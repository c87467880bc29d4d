//! API keys: hashed at rest, each with a role and a project, checked on OTLP/HTTP, OTLP/gRPC,
//! the HTTP query APIs and Flight SQL.
//!
//! Keys live in the location, one object per key (`_keys/<id>.json`; `spanlake keys
//! create|list|revoke`), so every node sharing a location shares them; only the SHA-256 of each
//! secret is stored. A secret is `slk_<id>_<32 hex digits>` and is shown once, at creation.
//! Servers re-read the keys every `security.keys_refresh` (default 2 s), so keys created or
//! revoked while they run take effect within that interval. Until the first key is created, nothing is checked — and the server refuses
//! to listen beyond localhost unless `security.allow_unauthenticated_network` says so.
//!
//! Roles: `ingest` may only send spans (OTLP), into its project; `read` may only query, and sees
//! only its project's spans in SQL, views, trace lookup, replay, Jaeger and Tempo APIs and Flight
//! SQL and Postgres sessions; `admin`
//! may do everything, sees every project and sends into its own.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt as _;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode, PutOptions};
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

/// Where keys live in the location: one object per key, so nodes sharing a location share
/// the keys, and creating a key never races another writer (an exclusive create of a fresh id).
const KEYS_PREFIX: &str = "_keys";

fn key_path(id: &str) -> ObjectPath {
    ObjectPath::from(format!("{KEYS_PREFIX}/{id}.json"))
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The key file of the first releases (`<data_dir>/keys.json`): its keys move into the
/// location the first time keys are read.
#[derive(Debug, Default, Deserialize)]
struct LegacyKeyFile {
    keys: Vec<Key>,
}

async fn migrate_legacy(data_dir: &Path, location: &dyn ObjectStore) -> anyhow::Result<()> {
    let path = data_dir.join("keys.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let file: LegacyKeyFile = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a key file", path.display()))?;
    for key in &file.keys {
        // Revocations in the old file win over what the location holds.
        let mode = if key.revoked { PutMode::Overwrite } else { PutMode::Create };
        match put_key(location, key, mode).await {
            Ok(()) | Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e).context("cannot store a key"),
        }
    }
    std::fs::rename(&path, path.with_extension("json.migrated"))?;
    tracing::info!(
        keys = file.keys.len(),
        "API keys moved from {} into the location",
        path.display()
    );
    Ok(())
}

async fn put_key(
    location: &dyn ObjectStore,
    key: &Key,
    mode: PutMode,
) -> Result<(), object_store::Error> {
    let body = serde_json::to_vec_pretty(key).expect("a key serialises");
    location.put_opts(&key_path(&key.id), body.into(), PutOptions::from(mode)).await.map(|_| ())
}

/// A key as read, with the version of its object: a refresh lists the keys and reads again
/// only the objects whose version changed (a revocation rewrites one).
#[derive(Debug, Clone)]
struct StoredKey {
    path: ObjectPath,
    version: (Option<String>, chrono::DateTime<chrono::Utc>, u64),
    key: Key,
}

/// The keys in the location, reusing `known` ones whose objects did not change.
async fn read_keys(
    location: &dyn ObjectStore,
    known: &[StoredKey],
) -> anyhow::Result<Vec<StoredKey>> {
    let prefix = ObjectPath::from(KEYS_PREFIX);
    let metas: Vec<_> =
        location.list(Some(&prefix)).try_collect().await.context("cannot list the API keys")?;
    let mut keys = Vec::with_capacity(metas.len());
    for meta in metas.into_iter().filter(|m| m.location.as_ref().ends_with(".json")) {
        let version = (meta.e_tag, meta.last_modified, meta.size);
        if let Some(k) = known.iter().find(|k| k.path == meta.location && k.version == version) {
            keys.push(k.clone());
            continue;
        }
        let bytes = location.get(&meta.location).await?.bytes().await?;
        let key: Key = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a key", meta.location))?;
        keys.push(StoredKey { path: meta.location, version, key });
    }
    keys.sort_by(|a, b| a.key.created.cmp(&b.key.created).then_with(|| a.key.id.cmp(&b.key.id)));
    Ok(keys)
}

/// Creates a key; returns it and its secret (shown once).
pub async fn create(
    data_dir: &Path,
    location: &dyn ObjectStore,
    name: &str,
    role: Role,
    project: &str,
) -> anyhow::Result<(Key, String)> {
    if project.is_empty()
        || !project.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("invalid project {project:?}: use letters, digits, '-' and '_'");
    }
    migrate_legacy(data_dir, location).await?;
    loop {
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
        match put_key(location, &key, PutMode::Create).await {
            Ok(()) => return Ok((key, secret)),
            // An id taken already (one in four billion): draw another.
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e).context("cannot store the key"),
        }
    }
}

/// All keys.
pub async fn list(data_dir: &Path, location: &dyn ObjectStore) -> anyhow::Result<Vec<Key>> {
    migrate_legacy(data_dir, location).await?;
    Ok(read_keys(location, &[]).await?.into_iter().map(|k| k.key).collect())
}

/// Revokes a key by id (for good: revoked keys are kept for the record).
pub async fn revoke(data_dir: &Path, location: &dyn ObjectStore, id: &str) -> anyhow::Result<()> {
    migrate_legacy(data_dir, location).await?;
    let bytes = match location.get(&key_path(id)).await {
        Ok(r) => r.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => bail!("no key with id {id}"),
        Err(e) => return Err(e).context("cannot read the key"),
    };
    let mut key: Key = serde_json::from_slice(&bytes)?;
    key.revoked = true;
    put_key(location, &key, PutMode::Overwrite).await.context("cannot store the revocation")
}

/// The keys as the server sees them: read from the location at start and every
/// `security.keys_refresh` after, so keys created or revoked on any node take effect within
/// that interval on every node sharing the location.
#[derive(Debug)]
pub struct KeyStore {
    location: Arc<dyn ObjectStore>,
    cache: RwLock<Vec<StoredKey>>,
}

impl KeyStore {
    /// The key store of a location (moving the keys of a `<data_dir>/keys.json` into it).
    pub async fn open(data_dir: &Path, location: Arc<dyn ObjectStore>) -> anyhow::Result<Self> {
        migrate_legacy(data_dir, &*location).await?;
        let keys = read_keys(&*location, &[]).await?;
        Ok(Self { location, cache: RwLock::new(keys) })
    }

    /// Re-reads the keys.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let known = self.cache.read().expect("lock").clone();
        let keys = read_keys(&*self.location, &known).await?;
        *self.cache.write().expect("lock") = keys;
        Ok(())
    }

    /// Re-reads the keys every `every` until the task is dropped; a failed read keeps the keys
    /// last read (and says so).
    pub async fn refresh_every(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.refresh().await {
                tracing::error!(error = %format!("{e:#}"), "cannot read the API keys; keeping the last ones read");
            }
        }
    }
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
    /// Whether authentication is on: once a key has been created, revoked ones included (so
    /// revoking the last key locks everyone out rather than opening the server).
    pub fn enabled(&self) -> bool {
        !self.cache.read().expect("lock").is_empty()
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
            .iter()
            .map(|k| &k.key)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_of_a_legacy_key_file_move_into_the_location() {
        let dir = tempfile::tempdir().unwrap();
        let location: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let key = |id: &str, secret: &str, revoked: bool| Key {
            id: id.into(),
            name: String::new(),
            role: Role::Read,
            project: "p".into(),
            sha256: hash(secret),
            created: "2026-11-01T00:00:00Z".into(),
            revoked,
        };
        // A key already in the location whose revocation only the old file knows.
        put_key(&*location, &key("0000000b", "slk_0000000b_x", false), PutMode::Create)
            .await
            .unwrap();
        let legacy = serde_json::json!({"keys": [
            key("0000000a", "slk_0000000a_x", false),
            key("0000000b", "slk_0000000b_x", true),
        ]});
        std::fs::write(dir.path().join("keys.json"), legacy.to_string()).unwrap();

        let store = KeyStore::open(dir.path(), Arc::clone(&location)).await.unwrap();
        assert!(store.enabled());
        assert_eq!(store.check(Some("slk_0000000a_x"), Access::Read).unwrap().project, "p");
        assert_eq!(
            store.check(Some("slk_0000000b_x"), Access::Read).unwrap_err(),
            Refusal::Invalid
        );
        assert!(!dir.path().join("keys.json").exists());
        assert!(dir.path().join("keys.json.migrated").exists());
        let ids: Vec<String> =
            list(dir.path(), &*location).await.unwrap().into_iter().map(|k| k.id).collect();
        assert_eq!(ids, ["0000000a", "0000000b"]);

        // A refresh reads again what changed: a revocation, a new key.
        revoke(dir.path(), &*location, "0000000a").await.unwrap();
        let (_, secret) = create(dir.path(), &*location, "", Role::Admin, "p").await.unwrap();
        store.refresh().await.unwrap();
        assert_eq!(
            store.check(Some("slk_0000000a_x"), Access::Read).unwrap_err(),
            Refusal::Invalid
        );
        assert_eq!(store.check(Some(&secret), Access::Admin).unwrap().role, Role::Admin);
    }
}
