//! Object-store locations for the whole project: checkpoint roots, dataset manifests, shards and
//! checkpoint parts.
//!
//! A location is a local path (`/abs/path`, `relative/path`) or a URL. Every location is turned
//! into an absolute URL first, so references inside a manifest resolve against it with ordinary
//! URL rules, whatever the backend. The backend is chosen by scheme in [`connect`]:
//!
//! | scheme | backend | configured from |
//! | --- | --- | --- |
//! | `file://`, plain paths | local file system | |
//! | `s3://bucket/prefix` (`s3a://`) | Amazon S3 and S3-compatible stores | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` / `AWS_ENDPOINT` (an `http://` endpoint allows plain HTTP) |
//! | `gs://bucket/prefix` | Google Cloud Storage | `GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_SERVICE_ACCOUNT_KEY`, or application default credentials |
//! | `az://container/prefix`, `abfs[s]://` | Azure Blob Storage | `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_CLIENT_ID`, ... |
//! | `memory://name/prefix` | a store in this process's memory, shared by every location naming `name` | |
//!
//! Credentials come from the environment only. A URL that carries a password, a query or (outside
//! Azure's `container@account` form) a user name is refused, and every URL shown in an error is
//! redacted first; errors from a backend are scrubbed of the secrets found in the environment.
//! [`Location`] and [`StoreRoot`] print only their URL in `Debug` and `Display`.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Component, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload, WriteMultipart};
use url::Url;

use crate::error::{Error, Result};

/// Objects larger than this are written with a multipart upload; smaller ones with one put.
pub const MULTIPART_THRESHOLD: usize = 32 * 1024 * 1024;

/// The size of each part of a multipart upload (S3 needs at least 5 MiB for all parts but the last).
pub const PART_SIZE: usize = 16 * 1024 * 1024;

/// Parts of one multipart upload sent at the same time.
const PARTS_IN_FLIGHT: usize = 4;

/// Environment variables holding secrets that backends read; their values are scrubbed from
/// every backend error.
const SECRET_VARIABLES: &[&str] = &[
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_TOKEN",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
    "AZURE_STORAGE_CLIENT_SECRET",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
];

/// Schemes whose user name is part of the address (`abfss://container@account.dfs.core.windows.net`).
const USER_NAME_SCHEMES: &[&str] = &["az", "abfs", "abfss"];

/// The text shown for a redacted part of a URL.
const REDACTED: &str = "***";

/// Turns a local path or a URL into an absolute URL (relative paths against the current folder,
/// `.` and `..` removed lexically).
pub fn parse_location(location: &str) -> Result<Url> {
    if location.is_empty() {
        return Err(Error::BadUrl { url: String::new(), reason: "empty location".into() });
    }
    if location.contains("://") {
        return Url::parse(location).map_err(|e| Error::BadUrl { url: redact(location), reason: e.to_string() });
    }
    let bad = |reason: String| Error::BadUrl { url: location.to_string(), reason };
    let absolute = std::path::absolute(location).map_err(|e| bad(format!("cannot resolve a relative path: {e}")))?;
    Url::from_file_path(normalize(&absolute)).map_err(|()| bad("cannot be written as a file:// URL".into()))
}

/// Removes `.` and resolves `..` lexically, without touching the file system.
fn normalize(path: &std::path::Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Resolves `reference` (a relative path, an absolute path or a URL) against `base`, the URL of
/// an object such as a manifest: `shard-000000.tar` next to `s3://b/train/manifest.json` is
/// `s3://b/train/shard-000000.tar`.
pub fn resolve(base: &Url, reference: &str) -> Result<Url> {
    if reference.contains("://") || std::path::Path::new(reference).is_absolute() {
        return parse_location(reference);
    }
    base.join(reference).map_err(|e| Error::BadUrl {
        url: redact(reference),
        reason: format!("cannot resolve against {}: {e}", redact(base.as_str())),
    })
}

/// `location` with any password, user name (outside Azure's `container@account` form) and query
/// replaced by `***`, for messages. Plain paths are returned unchanged.
pub fn redact(location: &str) -> String {
    let Some((scheme, rest)) = location.split_once("://") else { return location.to_string() };
    let Ok(mut url) = Url::parse(location) else {
        let authority = rest.split('/').next().unwrap_or_default();
        return if authority.contains('@') || rest.contains('?') {
            format!("{scheme}://{REDACTED}")
        } else {
            location.to_string()
        };
    };
    let mut changed = false;
    if url.password().is_some() {
        changed |= url.set_password(Some(REDACTED)).is_ok();
    }
    if !url.username().is_empty() && !USER_NAME_SCHEMES.contains(&url.scheme()) {
        changed |= url.set_username(REDACTED).is_ok();
    }
    if url.query().is_some() {
        url.set_query(Some(REDACTED));
        changed = true;
    }
    if changed {
        url.to_string()
    } else {
        location.to_string()
    }
}

/// Refuses URLs that carry credentials or options: braid takes both from the environment.
fn check_no_credentials(url: &Url) -> Result<()> {
    let user_name = !url.username().is_empty() && !USER_NAME_SCHEMES.contains(&url.scheme());
    if url.password().is_some() || user_name || url.query().is_some() {
        return Err(Error::BadUrl {
            url: redact(url.as_str()),
            reason: "a location must not carry credentials or a query; braid takes credentials from the \
                     environment (AWS_*, GOOGLE_*, AZURE_* variables)"
                .into(),
        });
    }
    Ok(())
}

/// The bucket or container a URL names as its host.
fn bucket(url: &Url) -> Result<&str> {
    url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| Error::BadUrl {
        url: redact(url.as_str()),
        reason: format!("a {}:// URL needs a bucket: {}://<bucket>/<prefix>", url.scheme(), url.scheme()),
    })
}

/// The in-process stores of `memory://` URLs, by name.
fn memory_store(name: &str) -> Arc<InMemory> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let mut stores = STORES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    stores.entry(name.to_string()).or_insert_with(|| Arc::new(InMemory::new())).clone()
}

/// Opens the backend that `url`'s scheme names and returns it with the object path of `url`
/// inside it. Cloud backends read their credentials and options from the environment.
pub fn connect(url: &Url) -> Result<(Arc<dyn ObjectStore>, ObjectPath)> {
    check_no_credentials(url)?;
    let shown = url.as_str();
    let backend_error = |source: object_store::Error| store_error(shown, source);
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "file" => {
            if url.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
                return Err(Error::BadUrl {
                    url: shown.to_string(),
                    reason: "a file URL needs an absolute path (file:///...), not a host".into(),
                });
            }
            Arc::new(LocalFileSystem::new())
        }
        "s3" | "s3a" => s3_store(url, AmazonS3Builder::from_env())?,
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket(url)?).build().map_err(backend_error)?,
        ),
        "az" | "abfs" | "abfss" => {
            bucket(url)?;
            Arc::new(MicrosoftAzureBuilder::from_env().with_url(shown).build().map_err(backend_error)?)
        }
        "memory" => memory_store(bucket(url)?),
        scheme => {
            return Err(Error::BadUrl {
                url: shown.to_string(),
                reason: format!(
                    "scheme {scheme}:// has no object-store backend; use a local path, file://, s3://, gs://, \
                     az://, abfs:// or memory://"
                ),
            })
        }
    };
    let path = ObjectPath::from_url_path(url.path())
        .map_err(|e| Error::BadUrl { url: shown.to_string(), reason: e.to_string() })?;
    Ok((store, path))
}

/// The S3 store for the bucket of `url`, configured by `builder` (the environment's settings);
/// plain HTTP is allowed when the endpoint is an `http://` URL.
fn s3_store(url: &Url, builder: AmazonS3Builder) -> Result<Arc<dyn ObjectStore>> {
    let mut builder = builder.with_bucket_name(bucket(url)?);
    if builder.get_config_value(&AmazonS3ConfigKey::Endpoint).is_some_and(|e| e.starts_with("http://")) {
        builder = builder.with_allow_http(true);
    }
    Ok(Arc::new(builder.build().map_err(|e| store_error(url.as_str(), e))?))
}

/// The environment's secrets that backends may use (at least 4 characters long).
fn environment_secrets() -> Vec<String> {
    SECRET_VARIABLES.iter().filter_map(|v| std::env::var(v).ok()).filter(|s| s.len() >= 4).collect()
}

/// `source` with every occurrence of `secrets` replaced by `***`; the error's kind (not found,
/// already exists, precondition) is kept.
fn scrub_error(source: object_store::Error, secrets: &[String]) -> object_store::Error {
    let text = format!("{source} {source:?}");
    if !secrets.iter().any(|s| text.contains(s.as_str())) {
        return source;
    }
    let scrub = |t: String| secrets.iter().fold(t, |t, s| t.replace(s.as_str(), REDACTED));
    let reason: Box<dyn std::error::Error + Send + Sync> = scrub(source.to_string()).into();
    match source {
        object_store::Error::NotFound { path, .. } => {
            object_store::Error::NotFound { path: scrub(path), source: reason }
        }
        object_store::Error::AlreadyExists { path, .. } => {
            object_store::Error::AlreadyExists { path: scrub(path), source: reason }
        }
        object_store::Error::Precondition { path, .. } => {
            object_store::Error::Precondition { path: scrub(path), source: reason }
        }
        _ => object_store::Error::Generic { store: "object store", source: reason },
    }
}

/// A backend error on the object at `url`, scrubbed of the environment's secrets.
fn store_error(url: &str, source: object_store::Error) -> Error {
    Error::Store { url: redact(url), source: scrub_error(source, &environment_secrets()) }
}

/// Writes `data` to `path`: one put up to [`MULTIPART_THRESHOLD`] bytes, a multipart upload of
/// [`PART_SIZE`] parts above it (aborted when a part fails).
async fn write_object(store: &dyn ObjectStore, path: &ObjectPath, data: Bytes) -> object_store::Result<()> {
    write_object_with(store, path, data, MULTIPART_THRESHOLD, PART_SIZE).await
}

/// Writes the concatenation of `chunks` to `path` without joining them in memory: one put up
/// to [`MULTIPART_THRESHOLD`] bytes in all, otherwise a multipart upload that takes the chunks
/// as they are (zero-copy) and sends [`PART_SIZE`] parts.
async fn write_chunks(store: &dyn ObjectStore, path: &ObjectPath, chunks: Vec<Bytes>) -> object_store::Result<()> {
    write_chunks_with(store, path, chunks, MULTIPART_THRESHOLD, PART_SIZE).await
}

async fn write_object_with(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    data: Bytes,
    threshold: usize,
    part_size: usize,
) -> object_store::Result<()> {
    write_chunks_with(store, path, vec![data], threshold, part_size).await
}

async fn write_chunks_with(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    chunks: Vec<Bytes>,
    threshold: usize,
    part_size: usize,
) -> object_store::Result<()> {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    if total <= threshold {
        store.put(path, PutPayload::from_iter(chunks)).await?;
        return Ok(());
    }
    let mut upload = WriteMultipart::new_with_chunk_size(store.put_multipart(path).await?, part_size);
    for chunk in chunks {
        for start in (0..chunk.len()).step_by(part_size) {
            if let Err(e) = upload.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = upload.abort().await;
                return Err(e);
            }
            upload.put(chunk.slice(start..(start + part_size).min(chunk.len())));
        }
    }
    if let Err(e) = upload.wait_for_capacity(0).await {
        let _ = upload.abort().await;
        return Err(e);
    }
    upload.finish().await?;
    Ok(())
}

/// One object in an object store, named by an absolute URL.
#[derive(Clone)]
pub struct Location {
    url: Url,
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Location").field("url", &self.url.as_str()).finish()
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.url.as_str())
    }
}

impl Location {
    /// Opens a local path or URL.
    pub fn open(location: &str) -> Result<Self> {
        Self::from_url(&parse_location(location)?)
    }

    /// Opens an absolute URL with the backend its scheme names.
    pub fn from_url(url: &Url) -> Result<Self> {
        let (store, path) = connect(url)?;
        Ok(Self { url: url.clone(), store, path })
    }

    /// The absolute URL of the object.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// The absolute URL of the object, parsed.
    pub fn parsed_url(&self) -> &Url {
        &self.url
    }

    /// The object's path inside its store.
    pub fn path(&self) -> &ObjectPath {
        &self.path
    }

    /// The store holding the object.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The location `reference` names relative to this object's folder, sharing this store (and
    /// its connections) when both live in the same bucket, container or file system.
    pub fn join(&self, reference: &str) -> Result<Self> {
        let url = resolve(&self.url, reference)?;
        let same_store = url.scheme() == self.url.scheme()
            && url.host_str() == self.url.host_str()
            && url.port() == self.url.port()
            && url.username() == self.url.username();
        if !same_store {
            return Self::from_url(&url);
        }
        check_no_credentials(&url)?;
        let path = ObjectPath::from_url_path(url.path())
            .map_err(|e| Error::BadUrl { url: redact(url.as_str()), reason: e.to_string() })?;
        Ok(Self { url, store: self.store.clone(), path })
    }

    fn err(&self, source: object_store::Error) -> Error {
        store_error(self.url(), source)
    }

    /// Reads the whole object; a missing object is an [`Error::Store`] whose source is
    /// `object_store::Error::NotFound`.
    pub async fn read_all(&self) -> Result<Bytes> {
        let got = self.store.get(&self.path).await.map_err(|e| self.err(e))?;
        got.bytes().await.map_err(|e| self.err(e))
    }

    /// Reads the whole object; `None` when it does not exist.
    pub async fn get(&self) -> Result<Option<Bytes>> {
        match self.store.get(&self.path).await {
            Ok(got) => Ok(Some(got.bytes().await.map_err(|e| self.err(e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Reads the bytes `range` of the object (fewer when the object ends inside the range).
    pub async fn read_range(&self, range: Range<u64>) -> Result<Bytes> {
        self.store.get_range(&self.path, range).await.map_err(|e| self.err(e))
    }

    /// Writes the whole object, replacing what was there; large objects go up in parts.
    pub async fn put(&self, data: impl Into<Bytes>) -> Result<()> {
        write_object(self.store.as_ref(), &self.path, data.into()).await.map_err(|e| self.err(e))
    }

    /// Writes the object as the concatenation of `chunks`, without joining them in memory.
    pub async fn put_chunks(&self, chunks: Vec<Bytes>) -> Result<()> {
        write_chunks(self.store.as_ref(), &self.path, chunks).await.map_err(|e| self.err(e))
    }

    /// Writes the object only if it does not exist yet; `Ok(false)` when it already existed.
    pub async fn put_create(&self, data: impl Into<Bytes>) -> Result<bool> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(&self.path, PutPayload::from(data.into()), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Metadata of the object; `None` when it does not exist.
    pub async fn head(&self) -> Result<Option<ObjectMeta>> {
        match self.store.head(&self.path).await {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// The object's size in bytes; a missing object is an error.
    pub async fn size(&self) -> Result<u64> {
        Ok(self.store.head(&self.path).await.map_err(|e| self.err(e))?.size)
    }
}

/// A folder in an object store: the store, the folder's prefix inside it and the URL it was
/// opened from (used to build the URLs of the objects below it).
#[derive(Clone)]
pub struct StoreRoot {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
    /// The folder on disk, for `file` roots: emptied folders are removed below it.
    local_dir: Option<PathBuf>,
}

impl std::fmt::Debug for StoreRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreRoot").field("url", &self.url).finish()
    }
}

impl std::fmt::Display for StoreRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Opens the folder at `url` (a local path or a URL of any backend) as an object store; a local
/// folder is created when it is missing.
pub fn open(url: &str) -> Result<StoreRoot> {
    let parsed = parse_location(url.trim_end_matches('/'))?;
    let (store, prefix) = connect(&parsed)?;
    let local_dir = if parsed.scheme() == "file" {
        let dir = parsed
            .to_file_path()
            .map_err(|()| Error::BadUrl { url: url.to_string(), reason: "not an absolute local file URL".into() })?;
        std::fs::create_dir_all(&dir).map_err(|e| Error::BadUrl {
            url: url.to_string(),
            reason: format!("cannot create folder {}: {e}", dir.display()),
        })?;
        Some(dir)
    } else {
        None
    };
    Ok(StoreRoot { store, prefix, url: url.trim_end_matches('/').to_string(), local_dir })
}

/// Reads a whole object given by a location (a local path or a URL of any backend).
pub async fn read_url(url: &str) -> Result<Bytes> {
    let location = Location::open(url)?;
    location.get().await?.ok_or_else(|| Error::BadUrl { url: redact(url), reason: "no such file".into() })
}

impl StoreRoot {
    /// A root over an existing store and prefix; `url` names the prefix in URLs and errors.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: ObjectPath, url: impl Into<String>) -> Self {
        Self { store, prefix, url: url.into().trim_end_matches('/').to_string(), local_dir: None }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The root's prefix inside the store.
    pub fn prefix(&self) -> &ObjectPath {
        &self.prefix
    }

    /// The URL the root was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The store path of `rel` (a `/`-separated path below the root).
    pub fn path(&self, rel: &str) -> ObjectPath {
        rel.split('/').filter(|s| !s.is_empty()).fold(self.prefix.clone(), |p, part| p.child(part))
    }

    /// The URL of `rel` below the root.
    pub fn url_of(&self, rel: &str) -> String {
        format!("{}/{}", self.url, rel.trim_start_matches('/'))
    }

    fn err(&self, rel: &str, source: object_store::Error) -> Error {
        store_error(&self.url_of(rel), source)
    }

    /// Reads `rel`; `None` when it does not exist.
    pub async fn get(&self, rel: &str) -> Result<Option<Bytes>> {
        match self.store.get(&self.path(rel)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| self.err(rel, e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Metadata of `rel`; `None` when it does not exist.
    pub async fn head(&self, rel: &str) -> Result<Option<ObjectMeta>> {
        match self.store.head(&self.path(rel)).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Writes `rel`, replacing it if it exists; large objects go up in parts.
    pub async fn put(&self, rel: &str, data: impl Into<Bytes>) -> Result<()> {
        write_object(self.store.as_ref(), &self.path(rel), data.into()).await.map_err(|e| self.err(rel, e))
    }

    /// Writes `rel` only if it does not exist yet; `Ok(false)` when it already existed.
    pub async fn put_create(&self, rel: &str, data: impl Into<Bytes>) -> Result<bool> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(&self.path(rel), PutPayload::from(data.into()), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Names of the folders directly below `rel` (`""` for the root).
    pub async fn folders(&self, rel: &str) -> Result<Vec<String>> {
        let base = self.path(rel);
        let listing = self.store.list_with_delimiter(Some(&base)).await.map_err(|e| self.err(rel, e))?;
        Ok(listing.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect())
    }

    /// Deletes every object below `rel`; returns how many were deleted.
    pub async fn delete_folder(&self, rel: &str) -> Result<usize> {
        use futures::TryStreamExt;
        let base = self.path(rel);
        let objects: Vec<ObjectMeta> =
            self.store.list(Some(&base)).try_collect().await.map_err(|e| self.err(rel, e))?;
        for meta in &objects {
            match self.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err(meta.location.as_ref(), e)),
            }
        }
        if let Some(dir) = &self.local_dir {
            let folder = rel.split('/').filter(|s| !s.is_empty()).fold(dir.clone(), |d, part| d.join(part));
            if folder != *dir {
                remove_empty_folders(&folder);
            }
        }
        Ok(objects.len())
    }
}

/// Removes `dir` and the folders below it, deepest first, as far as they are empty.
fn remove_empty_folders(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_folders(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY";

    #[test]
    fn paths_and_file_urls_name_the_same_location() {
        assert_eq!(parse_location("/a/b").unwrap().as_str(), "file:///a/b");
        assert_eq!(parse_location("file:///a/b").unwrap().as_str(), "file:///a/b");
        assert_eq!(parse_location("/a/./b/../c.tar").unwrap().as_str(), "file:///a/c.tar");
        assert!(parse_location("rel/x").unwrap().to_file_path().unwrap().is_absolute());
        let err = Location::open("file://host/x").unwrap_err().to_string();
        assert!(err.contains("file://host/x") && err.contains("not a host"), "{err}");
        let err = Location::open("hdfs://name/x").unwrap_err().to_string();
        assert!(err.contains("hdfs://") && err.contains("no object-store backend"), "{err}");
    }

    #[test]
    fn references_resolve_against_the_object_folder() {
        let base = parse_location("s3://bucket/set/train/manifest.json").unwrap();
        assert_eq!(resolve(&base, "shard-000001.tar").unwrap().as_str(), "s3://bucket/set/train/shard-000001.tar");
        assert_eq!(resolve(&base, "../eval/s.tar").unwrap().as_str(), "s3://bucket/set/eval/s.tar");
        assert_eq!(resolve(&base, "/other/s.tar").unwrap().as_str(), "file:///other/s.tar");
        assert_eq!(resolve(&base, "gs://b2/x").unwrap().as_str(), "gs://b2/x");
    }

    #[test]
    fn cloud_urls_open_without_touching_the_network() {
        let s3 = Location::open("s3://bucket/ckpt/latest").unwrap();
        assert_eq!(s3.path().as_ref(), "ckpt/latest");
        let part = s3.join("step-000005/manifest.json").unwrap();
        assert_eq!(part.url(), "s3://bucket/ckpt/step-000005/manifest.json");
        assert!(Arc::ptr_eq(s3.store(), part.store()), "a join inside one bucket shares the store");
        let gs = Location::open("gs://bucket/data/manifest.json").unwrap();
        assert_eq!(gs.path().as_ref(), "data/manifest.json");
        if let Err(err) = Location::open("az://container/data/manifest.json") {
            assert!(err.to_string().contains("az://container/data/manifest.json"), "{err}");
        }
        let err = Location::open("s3:///no-bucket").unwrap_err().to_string();
        assert!(err.contains("needs a bucket"), "{err}");
    }

    #[test]
    fn credentials_in_urls_are_refused_and_redacted() {
        for url in [
            format!("s3://AKIDEXAMPLE:{SECRET}@bucket/x"),
            format!("s3://{SECRET}@bucket/x"),
            format!("gs://bucket/x?token={SECRET}"),
            format!("az://container/x?sig={SECRET}"),
        ] {
            let err = Location::open(&url).unwrap_err();
            let text = format!("{err} {err:?}");
            assert!(!text.contains(SECRET), "{text}");
            assert!(text.contains("credentials"), "{text}");
            assert!(!open(&url).unwrap_err().to_string().contains(SECRET));
        }
        assert_eq!(redact("s3://key:pw@bucket/x?a=b"), "s3://***:***@bucket/x?***");
        assert_eq!(redact("abfss://fs@account.dfs.core.windows.net/x"), "abfss://fs@account.dfs.core.windows.net/x");
        assert_eq!(redact("s3://a:b@c d e"), "s3://***");
        assert_eq!(redact("/plain/path"), "/plain/path");
    }

    #[tokio::test]
    async fn an_s3_location_never_shows_its_secret_key() {
        use object_store::RetryConfig;
        let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let builder = AmazonS3Builder::new()
            .with_access_key_id("AKIDEXAMPLE")
            .with_secret_access_key(SECRET)
            .with_token(SECRET)
            .with_region("us-east-1")
            .with_endpoint(format!("http://127.0.0.1:{closed_port}"))
            .with_retry(RetryConfig {
                max_retries: 0,
                retry_timeout: std::time::Duration::from_secs(1),
                ..Default::default()
            });
        let url = Url::parse("s3://bucket/ckpt/latest").unwrap();
        let location =
            Location { url: url.clone(), store: s3_store(&url, builder).unwrap(), path: "ckpt/latest".into() };
        let shown = format!("{location} {location:?}");
        assert!(!shown.contains(SECRET) && shown.contains("s3://bucket/ckpt/latest"), "{shown}");
        let err = location.read_all().await.unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(text.contains("s3://bucket/ckpt/latest"), "{text}");
        assert!(!text.contains(SECRET), "{text}");
        let root = StoreRoot::new(location.store().clone(), "ckpt".into(), "s3://bucket/ckpt");
        assert!(!format!("{root} {root:?}").contains(SECRET));
    }

    #[test]
    fn backend_errors_are_scrubbed_of_secrets() {
        let secrets = vec![SECRET.to_string()];
        let leaky = object_store::Error::Generic { store: "S3", source: format!("signature {SECRET} rejected").into() };
        let scrubbed = scrub_error(leaky, &secrets);
        let text = format!("{scrubbed} {scrubbed:?}");
        assert!(!text.contains(SECRET) && text.contains("signature *** rejected"), "{text}");
        let missing = object_store::Error::NotFound { path: format!("x/{SECRET}"), source: "gone".into() };
        assert!(
            matches!(scrub_error(missing, &secrets), object_store::Error::NotFound { path, .. } if path == "x/***")
        );
        let clean = object_store::Error::NotFound { path: "x".into(), source: "gone".into() };
        assert!(matches!(scrub_error(clean, &secrets), object_store::Error::NotFound { .. }));
    }

    #[tokio::test]
    async fn large_objects_go_up_in_parts() {
        let store = InMemory::new();
        let path = ObjectPath::from("big");
        let data: Bytes = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>().into();
        write_object_with(&store, &path, data.clone(), 1024, 3000).await.unwrap();
        assert_eq!(store.get(&path).await.unwrap().bytes().await.unwrap(), data);
        write_object_with(&store, &path, Bytes::from_static(b"small"), 1024, 3000).await.unwrap();
        assert_eq!(store.get(&path).await.unwrap().bytes().await.unwrap(), "small");
    }

    #[tokio::test]
    async fn memory_locations_share_a_named_store() {
        let a = Location::open("memory://store-test/x/a.bin").unwrap();
        a.put(Bytes::from_static(b"0123456789")).await.unwrap();
        let b = Location::open("memory://store-test/x/a.bin").unwrap();
        assert_eq!(b.read_all().await.unwrap(), "0123456789");
        assert_eq!(b.read_range(2..5).await.unwrap(), "234");
        assert_eq!(b.size().await.unwrap(), 10);
        assert!(!b.put_create(Bytes::from_static(b"x")).await.unwrap());
        let missing = b.join("missing").unwrap();
        assert!(missing.get().await.unwrap().is_none());
        let err = missing.read_all().await.unwrap_err();
        assert!(
            matches!(&err, Error::Store { source: object_store::Error::NotFound { .. }, url } if url == "memory://store-test/x/missing"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn put_create_refuses_an_existing_object() {
        let dir = tempfile::tempdir().unwrap();
        let root = open(dir.path().to_str().unwrap()).unwrap();
        assert!(root.put_create("step-000001/manifest.json", "a").await.unwrap());
        assert!(!root.put_create("step-000001/manifest.json", "b").await.unwrap());
        assert_eq!(root.get("step-000001/manifest.json").await.unwrap().unwrap(), "a");
        assert_eq!(root.folders("").await.unwrap(), vec!["step-000001".to_string()]);
        assert_eq!(root.delete_folder("step-000001").await.unwrap(), 1);
        assert!(root.get("step-000001/manifest.json").await.unwrap().is_none());
        assert!(root.folders("").await.unwrap().is_empty(), "the emptied folder is removed");
        assert!(dir.path().is_dir(), "the root itself stays");
        assert!(root.url_of("latest").ends_with("/latest"));
    }

    #[tokio::test]
    async fn memory_roots_commit_like_file_roots() {
        let root = open("memory://root-test/job/ckpt/").unwrap();
        assert_eq!(root.url(), "memory://root-test/job/ckpt");
        assert!(root.put_create("step-000002/manifest.json", "m").await.unwrap());
        root.put("step-000002/attempt-a/rank-0.safetensors", vec![7u8; 100]).await.unwrap();
        root.put("latest", "step-000002/manifest.json").await.unwrap();
        assert_eq!(root.folders("").await.unwrap(), vec!["step-000002".to_string()]);
        assert_eq!(read_url("memory://root-test/job/ckpt/latest").await.unwrap(), "step-000002/manifest.json");
        assert_eq!(root.head("step-000002/attempt-a/rank-0.safetensors").await.unwrap().unwrap().size, 100);
        assert_eq!(root.delete_folder("step-000002").await.unwrap(), 2);
        assert!(root.folders("").await.unwrap().is_empty());
        let err = read_url("memory://root-test/job/ckpt/missing").await.unwrap_err().to_string();
        assert!(err.contains("memory://root-test/job/ckpt/missing") && err.contains("no such file"), "{err}");
    }
}
