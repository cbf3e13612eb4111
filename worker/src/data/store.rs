//! Object-store locations for manifests and shards.
//!
//! A location is given as a local path (`/abs/path`, `relative/path`) or a URL (`file:///abs`).
//! Every location is turned into an absolute URL first, so references inside a manifest resolve
//! against it with ordinary URL rules, whatever the backend. Backends are chosen by scheme in
//! [`open_url`]; only `file` exists in this build.

use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use braid_coordinator::manifest::DatasetManifest;
use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use url::Url;

use super::error::{Error, Result};

/// One object in an object store, with the URL that names it in messages.
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

/// Turns a local path or a URL into an absolute URL (relative paths against the current folder).
pub fn parse_location(location: &str) -> Result<Url> {
    if location.is_empty() {
        return Err(Error::BadUrl { url: String::new(), reason: "empty location".into() });
    }
    if location.contains("://") {
        return Url::parse(location).map_err(|e| Error::BadUrl { url: location.to_string(), reason: e.to_string() });
    }
    let absolute = std::path::absolute(location).map_err(|e| Error::io(location, e))?;
    Url::from_file_path(normalize(&absolute))
        .map_err(|()| Error::BadUrl { url: location.to_string(), reason: "cannot be written as a file:// URL".into() })
}

/// Removes `.` and resolves `..` lexically, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
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

/// Opens a local path or URL.
pub fn open(location: &str) -> Result<Location> {
    open_url(&parse_location(location)?)
}

/// Opens an absolute URL with the backend its scheme names.
pub fn open_url(url: &Url) -> Result<Location> {
    match url.scheme() {
        "file" => open_file_url(url, Arc::new(LocalFileSystem::new())),
        scheme => Err(Error::UnsupportedScheme { url: url.to_string(), scheme: scheme.to_string() }),
    }
}

fn open_file_url(url: &Url, store: Arc<dyn ObjectStore>) -> Result<Location> {
    if url.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
        return Err(Error::BadUrl {
            url: url.to_string(),
            reason: "a file URL needs an absolute path (file:///...), not a host".into(),
        });
    }
    let path = ObjectPath::from_url_path(url.path())
        .map_err(|e| Error::BadUrl { url: url.to_string(), reason: e.to_string() })?;
    Ok(Location { url: url.clone(), store, path })
}

/// Resolves `reference` (a relative path, an absolute path or a URL) against `base`, the URL of
/// a file such as a manifest: `shard-000000.tar` next to `file:///d/train/manifest.json` is
/// `file:///d/train/shard-000000.tar`.
pub fn resolve(base: &Url, reference: &str) -> Result<Url> {
    if reference.contains("://") || Path::new(reference).is_absolute() {
        return parse_location(reference);
    }
    base.join(reference).map_err(|e| Error::BadUrl {
        url: reference.to_string(),
        reason: format!("cannot resolve against {base}: {e}"),
    })
}

impl Location {
    /// The absolute URL of the object.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// The location `reference` names relative to this object's folder, sharing this store
    /// when both live in the same one.
    pub fn join(&self, reference: &str) -> Result<Location> {
        let url = resolve(&self.url, reference)?;
        let same_store = url.scheme() == self.url.scheme() && url.host_str() == self.url.host_str();
        match (same_store, url.scheme()) {
            (true, "file") => open_file_url(&url, self.store.clone()),
            _ => open_url(&url),
        }
    }

    /// Reads the whole object.
    pub async fn read_all(&self) -> Result<Bytes> {
        let got = self.store.get(&self.path).await.map_err(|e| Error::store(self.url(), e))?;
        got.bytes().await.map_err(|e| Error::store(self.url(), e))
    }

    /// Reads the bytes `range` of the object; a range past the end is an error.
    pub async fn read_range(&self, range: Range<u64>) -> Result<Bytes> {
        let want = range.end - range.start;
        let bytes = self.store.get_range(&self.path, range).await.map_err(|e| Error::store(self.url(), e))?;
        if bytes.len() as u64 != want {
            return Err(Error::Tar {
                path: self.url().to_string(),
                reason: format!("short read: wanted {want} bytes, got {}", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// Writes the whole object, replacing what was there.
    pub async fn put(&self, bytes: Bytes) -> Result<()> {
        self.store.put(&self.path, bytes.into()).await.map_err(|e| Error::store(self.url(), e))?;
        Ok(())
    }

    /// The object's size in bytes.
    pub async fn size(&self) -> Result<u64> {
        let meta = self.store.head(&self.path).await.map_err(|e| Error::store(self.url(), e))?;
        Ok(meta.size)
    }
}

/// Reads and parses the manifest at `location`.
pub async fn read_manifest(location: &Location) -> Result<DatasetManifest> {
    let bytes = location.read_all().await?;
    DatasetManifest::from_json(&bytes, location.url()).map_err(|e| Error::Manifest {
        url: location.url().to_string(),
        reason: match e {
            braid_coordinator::error::Error::Manifest { reason, .. } => reason,
            other => other.to_string(),
        },
    })
}

/// The location of every shard of `manifest`, resolved against the manifest's own location.
pub fn shard_locations(manifest_location: &Location, manifest: &DatasetManifest) -> Result<Vec<Location>> {
    manifest.shards.iter().map(|s| manifest_location.join(&s.url)).collect()
}

/// Runs `future` to completion on a private runtime on a fresh thread, so it may be called from
/// plain threads and from inside async code alike.
pub fn block_on<F>(future: F) -> Result<F::Output>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::Stopped(format!("cannot start an I/O runtime: {e}")))?;
                Ok(runtime.block_on(future))
            })
            .join()
            .map_err(|_| Error::Stopped("the I/O thread panicked".into()))?
    })
}

/// Opens and reads the manifest at a local path or URL, blocking the calling thread.
pub fn load_manifest(location: &str) -> Result<DatasetManifest> {
    let location = open(location)?;
    block_on(read_manifest(&location))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_file_urls_name_the_same_object() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a b.txt");
        std::fs::write(&file, b"0123456789").unwrap();
        let by_path = open(file.to_str().unwrap()).unwrap();
        let by_url = open(Url::from_file_path(&file).unwrap().as_str()).unwrap();
        assert_eq!(by_path.url(), by_url.url());
        let all = block_on(by_path.read_all()).unwrap().unwrap();
        assert_eq!(&all[..], b"0123456789");
        let part = block_on(by_url.read_range(2..5)).unwrap().unwrap();
        assert_eq!(&part[..], b"234");
        assert_eq!(block_on(by_url.size()).unwrap().unwrap(), 10);
    }

    #[test]
    fn references_resolve_against_the_manifest_folder() {
        let base = parse_location("/data/set/train/manifest.json").unwrap();
        assert_eq!(resolve(&base, "shard-000001.tar").unwrap().as_str(), "file:///data/set/train/shard-000001.tar");
        assert_eq!(resolve(&base, "../eval/s.tar").unwrap().as_str(), "file:///data/set/eval/s.tar");
        assert_eq!(resolve(&base, "/other/s.tar").unwrap().as_str(), "file:///other/s.tar");
        assert_eq!(parse_location("/a/./b/../c.tar").unwrap().as_str(), "file:///a/c.tar");
    }

    #[test]
    fn errors_name_the_location() {
        let err = open("s3://bucket/train/manifest.json").unwrap_err().to_string();
        assert!(err.contains("s3://bucket/train/manifest.json") && err.contains("not supported yet"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("manifest.json");
        let err = load_manifest(missing.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("manifest.json"), "{err}");
        let err = open("file://host/x").unwrap_err().to_string();
        assert!(err.contains("file://host/x"), "{err}");
    }
}
