//! Object-store locations: checkpoint roots and single files (the dataset manifest), opened
//! from an absolute path, a `file://` URL or a path relative to the working directory.

use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload};

use crate::error::{Error, Result};

/// A folder in an object store: the store, the folder's prefix inside it and the URL it was
/// opened from (used to build the URLs of the objects below it).
#[derive(Debug, Clone)]
pub struct StoreRoot {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
}

/// Turns a location (absolute path, `file://` URL or relative path) into a local folder path.
pub fn local_path(url: &str) -> Result<std::path::PathBuf> {
    let bad = |reason: String| Error::BadUrl { url: url.to_string(), reason };
    if url.is_empty() {
        return Err(bad("empty location".into()));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        if scheme != "file" {
            return Err(bad(format!(
                "scheme {scheme}:// is not supported by this build; use a local path or a file:// URL"
            )));
        }
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        return parsed.to_file_path().map_err(|()| bad("not an absolute local file URL".into()));
    }
    let path = std::path::PathBuf::from(url);
    if path.is_absolute() {
        Ok(path)
    } else {
        let cwd = std::env::current_dir().map_err(|e| bad(format!("cannot resolve a relative path: {e}")))?;
        Ok(cwd.join(path))
    }
}

/// Opens the folder at `url` as an object store, creating the folder when it is missing.
pub fn open(url: &str) -> Result<StoreRoot> {
    let dir = local_path(url)?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::BadUrl {
        url: url.to_string(),
        reason: format!("cannot create folder {}: {e}", dir.display()),
    })?;
    let fs = LocalFileSystem::new_with_prefix(&dir)
        .map_err(|source| Error::Store { url: url.to_string(), source })?
        .with_automatic_cleanup(true);
    Ok(StoreRoot { store: Arc::new(fs), prefix: Path::default(), url: url.trim_end_matches('/').to_string() })
}

/// Reads a whole file given by a location (absolute path, `file://` URL or relative path).
pub async fn read_url(url: &str) -> Result<Bytes> {
    let path = local_path(url)?;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Error::BadUrl { url: url.to_string(), reason: "does not name a file".into() });
    };
    let name = name.to_string_lossy().into_owned();
    if !dir.is_dir() {
        return Err(Error::BadUrl { url: url.to_string(), reason: format!("no such folder {}", dir.display()) });
    }
    let fs = LocalFileSystem::new_with_prefix(dir).map_err(|source| Error::Store { url: url.to_string(), source })?;
    let root = StoreRoot { store: Arc::new(fs), prefix: Path::default(), url: url.to_string() };
    root.get(&name).await?.ok_or_else(|| Error::BadUrl { url: url.to_string(), reason: "no such file".into() })
}

impl StoreRoot {
    /// A root over an existing store and prefix; `url` names the prefix in URLs and errors.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path, url: impl Into<String>) -> Self {
        Self { store, prefix, url: url.into().trim_end_matches('/').to_string() }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The root's prefix inside the store.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The URL the root was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The store path of `rel` (a `/`-separated path below the root).
    pub fn path(&self, rel: &str) -> Path {
        rel.split('/').filter(|s| !s.is_empty()).fold(self.prefix.clone(), |p, part| p.child(part))
    }

    /// The URL of `rel` below the root.
    pub fn url_of(&self, rel: &str) -> String {
        format!("{}/{}", self.url, rel.trim_start_matches('/'))
    }

    fn err(&self, rel: &str, source: object_store::Error) -> Error {
        Error::Store { url: self.url_of(rel), source }
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

    /// Writes `rel`, replacing it if it exists.
    pub async fn put(&self, rel: &str, data: impl Into<Bytes>) -> Result<()> {
        self.store.put(&self.path(rel), PutPayload::from(data.into())).await.map_err(|e| self.err(rel, e))?;
        Ok(())
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
        Ok(objects.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_resolve() {
        assert_eq!(local_path("/a/b").unwrap(), std::path::PathBuf::from("/a/b"));
        assert_eq!(local_path("file:///a/b").unwrap(), std::path::PathBuf::from("/a/b"));
        assert!(local_path("rel/x").unwrap().is_absolute());
        let err = local_path("s3://bucket/x").unwrap_err().to_string();
        assert!(err.contains("s3://") && err.contains("not supported"), "{err}");
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
        assert!(root.url_of("latest").ends_with("/latest"));
    }
}
