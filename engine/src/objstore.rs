//! Data locations: object stores by URL, with request accounting and fault injection.
//!
//! * `file:///path` or a plain path: a local directory (created if missing);
//! * `s3://bucket/prefix`: Amazon S3 or an S3-compatible server. Credentials, region and
//!   endpoint come from the standard `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
//!   web-identity and instance/container credentials), overridden by explicit options
//!   (`endpoint`, `region`, `allow_http`, `access_key_id`, ... as `object_store` names them);
//! * `gs://bucket/prefix` and `az://container/prefix` (also `abfs://`): Google Cloud Storage
//!   and Azure Blob Storage through the same code path, configured from `GOOGLE_*` and
//!   `AZURE_*` environment variables and options;
//! * `memory://`: an in-memory store (tests).
//!
//! Every store is wrapped in an [`InstrumentedStore`] that counts requests and bytes by
//! operation (exported as metrics, and used by tests to prove that a lookup reads a bounded
//! number of objects) and can inject failures ([`Faults`]) for fault tests.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use crate::error::{Error, Result};

/// Opens the data location `url` with extra `options` (keys as `object_store`'s builders name
/// them, with or without the `aws_`/`google_`/`azure_` prefix).
pub fn open_location(url: &str, options: &HashMap<String, String>) -> Result<Arc<dyn ObjectStore>> {
    let bad = |reason: String| Error::Location { location: url.to_string(), reason };
    if !url.contains("://") || url.starts_with("file://") {
        let path = url.strip_prefix("file://").unwrap_or(url);
        std::fs::create_dir_all(path).map_err(|e| bad(e.to_string()))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
            .map_err(|e| bad(e.to_string()))?;
        return Ok(Arc::new(fs));
    }
    let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    let bucket_prefix = Path::from(parsed.path().trim_matches('/'));
    let store: Arc<dyn ObjectStore> = match parsed.scheme() {
        "s3" | "s3a" => {
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(url);
            if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
                b = b.with_endpoint(endpoint);
            }
            for (k, v) in options {
                let key = if k.starts_with("aws_") { k.clone() } else { format!("aws_{k}") };
                let key = key.parse().map_err(|e: object_store::Error| bad(e.to_string()))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        "gs" => {
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url);
            for (k, v) in options {
                let key = if k.starts_with("google_") { k.clone() } else { format!("google_{k}") };
                let key = key.parse().map_err(|e: object_store::Error| bad(e.to_string()))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        "az" | "azure" | "abfs" | "abfss" => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url);
            for (k, v) in options {
                let key = if k.starts_with("azure_") { k.clone() } else { format!("azure_{k}") };
                let key = key.parse().map_err(|e: object_store::Error| bad(e.to_string()))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        "memory" => Arc::new(object_store::memory::InMemory::new()),
        other => return Err(bad(format!("unsupported scheme {other:?}"))),
    };
    if bucket_prefix.as_ref().is_empty() || matches!(parsed.scheme(), "memory") {
        return Ok(store);
    }
    Ok(Arc::new(PrefixStore::new(store, bucket_prefix)))
}

/// Request counters of one operation.
#[derive(Debug, Default)]
pub struct OpCounter {
    /// Requests.
    pub requests: AtomicU64,
    /// Bytes moved.
    pub bytes: AtomicU64,
}

impl OpCounter {
    fn add(&self, bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Requests so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Bytes so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Requests made to the object store, by operation.
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// GETs (whole objects and ranges).
    pub get: OpCounter,
    /// PUTs (including multipart uploads).
    pub put: OpCounter,
    /// HEADs.
    pub head: OpCounter,
    /// LISTs.
    pub list: OpCounter,
    /// DELETEs.
    pub delete: OpCounter,
}

/// Failures to inject: the next `n` operations of a kind fail.
#[derive(Debug, Default)]
pub struct Faults {
    /// PUTs (and multipart uploads) of data files to fail.
    pub fail_puts: AtomicU64,
    /// PUTs of catalog objects (under `_catalog/`) to fail.
    pub fail_catalog_puts: AtomicU64,
    /// GETs to fail.
    pub fail_gets: AtomicU64,
    /// DELETEs to fail.
    pub fail_deletes: AtomicU64,
}

impl Faults {
    fn take(counter: &AtomicU64) -> bool {
        counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
    }
}

fn injected(op: &str, path: &Path) -> object_store::Error {
    object_store::Error::Generic {
        store: "fault-injection",
        source: format!("injected {op} failure on {path}").into(),
    }
}

/// An object store that counts what is asked of it and can fail on purpose.
#[derive(Debug)]
pub struct InstrumentedStore {
    inner: Arc<dyn ObjectStore>,
    counters: Arc<StoreCounters>,
    faults: Arc<Faults>,
}

impl InstrumentedStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self { inner, counters: Arc::default(), faults: Arc::default() }
    }

    /// The request counters.
    pub fn counters(&self) -> Arc<StoreCounters> {
        Arc::clone(&self.counters)
    }

    /// The fault switches.
    pub fn faults(&self) -> Arc<Faults> {
        Arc::clone(&self.faults)
    }
}

impl fmt::Display for InstrumentedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Instrumented({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for InstrumentedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let fault = if location.as_ref().starts_with("_catalog/") {
            &self.faults.fail_catalog_puts
        } else {
            &self.faults.fail_puts
        };
        if Faults::take(fault) {
            return Err(injected("put", location));
        }
        self.counters.put.add(payload.content_length() as u64);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        if Faults::take(&self.faults.fail_puts) {
            return Err(injected("put", location));
        }
        self.counters.put.add(0);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if Faults::take(&self.faults.fail_gets) {
            return Err(injected("get", location));
        }
        let head = options.head;
        let result = self.inner.get_opts(location, options).await?;
        let len = result.range.end - result.range.start;
        if head {
            self.counters.head.add(0);
        } else {
            self.counters.get.add(len);
        }
        Ok(result)
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        if Faults::take(&self.faults.fail_gets) {
            return Err(injected("get", location));
        }
        let out = self.inner.get_ranges(location, ranges).await?;
        for b in &out {
            self.counters.get.add(b.len() as u64);
        }
        Ok(out)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let counters = Arc::clone(&self.counters);
        let faults = Arc::clone(&self.faults);
        let locations = locations
            .map(move |p| {
                let p = p?;
                if Faults::take(&faults.fail_deletes) {
                    return Err(injected("delete", &p));
                }
                counters.delete.add(0);
                Ok(p)
            })
            .boxed();
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.counters.list.add(0);
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.counters.list.add(0);
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.counters.list.add(0);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.counters.put.add(0);
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt as _;

    #[tokio::test]
    async fn counts_and_injects() {
        let store = InstrumentedStore::new(Arc::new(object_store::memory::InMemory::new()));
        let p = Path::from("a/b");
        store.put(&p, PutPayload::from_static(b"hello")).await.unwrap();
        assert_eq!(store.get(&p).await.unwrap().bytes().await.unwrap().as_ref(), b"hello");
        assert_eq!(store.counters.put.requests(), 1);
        assert_eq!(store.counters.put.bytes(), 5);
        assert_eq!(store.counters.get.bytes(), 5);
        store.faults.fail_puts.store(1, Ordering::Release);
        let err = store.put(&p, PutPayload::from_static(b"x")).await.unwrap_err();
        assert!(err.to_string().contains("injected put failure"), "{err}");
        store.put(&p, PutPayload::from_static(b"y")).await.unwrap();
        store.delete(&p).await.unwrap();
        assert_eq!(store.counters.delete.requests(), 1);
    }

    #[test]
    fn local_paths_and_bad_schemes() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/data", dir.path().display());
        open_location(&url, &HashMap::new()).unwrap();
        assert!(dir.path().join("data").is_dir());
        let err = open_location("ftp://x/y", &HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("unsupported scheme \"ftp\""), "{err}");
    }
}
