//! Object-store locations for manifests, shards and checkpoint parts, as the data pipeline sees
//! them: [`braid_coordinator::store`] with errors in the pipeline's [`Error`] and a blocking
//! entry point ([`block_on`]) for plain threads.
//!
//! A location is a local path or a URL of any backend that store knows (`file://`, `s3://`,
//! `gs://`, `az://`, `abfs://`, `memory://`); references inside a manifest resolve against the
//! manifest's own URL.

use std::ops::Range;
use std::sync::OnceLock;

use braid_coordinator::manifest::DatasetManifest;
use braid_coordinator::store as shared;
use bytes::Bytes;
use url::Url;

use super::error::{Error, Result};

/// Threads of the runtime that drives object-store I/O for [`block_on`].
const IO_THREADS: usize = 2;

/// One object in an object store, with the URL that names it in messages.
#[derive(Debug, Clone)]
pub struct Location(shared::Location);

/// The pipeline's error for a store error: a missing object becomes [`Error::NotFound`].
fn lift(e: braid_coordinator::Error) -> Error {
    match e {
        braid_coordinator::Error::Store { url, source } => Error::store(&url, source),
        braid_coordinator::Error::BadUrl { url, reason } => Error::BadUrl { url, reason },
        other => Error::BadUrl { url: String::new(), reason: other.to_string() },
    }
}

/// Turns a local path or a URL into an absolute URL (relative paths against the current folder).
pub fn parse_location(location: &str) -> Result<Url> {
    shared::parse_location(location).map_err(lift)
}

/// Opens a local path or URL.
pub fn open(location: &str) -> Result<Location> {
    shared::Location::open(location).map(Location).map_err(lift)
}

/// Opens an absolute URL with the backend its scheme names.
pub fn open_url(url: &Url) -> Result<Location> {
    shared::Location::from_url(url).map(Location).map_err(lift)
}

/// Resolves `reference` (a relative path, an absolute path or a URL) against `base`, the URL of
/// a file such as a manifest: `shard-000000.tar` next to `file:///d/train/manifest.json` is
/// `file:///d/train/shard-000000.tar`.
pub fn resolve(base: &Url, reference: &str) -> Result<Url> {
    shared::resolve(base, reference).map_err(lift)
}

impl Location {
    /// The absolute URL of the object.
    pub fn url(&self) -> &str {
        self.0.url()
    }

    /// The shared store's location underneath.
    pub fn inner(&self) -> &shared::Location {
        &self.0
    }

    /// The location `reference` names relative to this object's folder, sharing this store
    /// when both live in the same one.
    pub fn join(&self, reference: &str) -> Result<Location> {
        self.0.join(reference).map(Location).map_err(lift)
    }

    /// Reads the whole object.
    pub async fn read_all(&self) -> Result<Bytes> {
        self.0.read_all().await.map_err(lift)
    }

    /// Reads the bytes `range` of the object; a range past the end is an error.
    pub async fn read_range(&self, range: Range<u64>) -> Result<Bytes> {
        let want = range.end - range.start;
        let bytes = self.0.read_range(range).await.map_err(lift)?;
        if bytes.len() as u64 != want {
            return Err(Error::Tar {
                path: self.url().to_string(),
                reason: format!("short read: wanted {want} bytes, got {}", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// Writes the whole object, replacing what was there; large objects go up in parts.
    pub async fn put(&self, bytes: Bytes) -> Result<()> {
        self.0.put(bytes).await.map_err(lift)
    }

    /// Writes the object as the concatenation of `chunks`, without joining them in memory.
    pub async fn put_chunks(&self, chunks: Vec<Bytes>) -> Result<()> {
        self.0.put_chunks(chunks).await.map_err(lift)
    }

    /// The object's size in bytes.
    pub async fn size(&self) -> Result<u64> {
        self.0.size().await.map_err(lift)
    }
}

impl From<shared::Location> for Location {
    fn from(location: shared::Location) -> Self {
        Self(location)
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

/// The process-wide runtime whose threads keep the backends' connections alive between
/// [`block_on`] calls.
fn io_runtime() -> Result<&'static tokio::runtime::Handle> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(IO_THREADS)
                .thread_name("braid-store-io")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map(tokio::runtime::Runtime::handle)
        .map_err(|e| Error::Stopped(format!("cannot start the object-store I/O runtime: {e}")))
}

/// Runs `future` to completion on a fresh thread, with the process-wide I/O runtime driving
/// its I/O, so it may be called from plain threads and from inside async code alike.
pub fn block_on<F>(future: F) -> Result<F::Output>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    let handle = io_runtime()?;
    std::thread::scope(|scope| {
        scope.spawn(|| handle.block_on(future)).join().map_err(|_| Error::Stopped("the I/O thread panicked".into()))
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
        let err = block_on(by_url.read_range(8..12)).unwrap().unwrap_err();
        assert!(matches!(err, Error::Tar { .. }) && err.to_string().contains("short read"), "{err}");
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
        let err = open("hdfs://name/train/manifest.json").unwrap_err().to_string();
        assert!(err.contains("hdfs://name/train/manifest.json") && err.contains("no object-store backend"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("manifest.json");
        let err = load_manifest(missing.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("manifest.json"), "{err}");
        let err = open("file://host/x").unwrap_err().to_string();
        assert!(err.contains("file://host/x"), "{err}");
    }

    #[test]
    fn manifests_and_shards_resolve_inside_any_store() {
        let manifest = open("memory://data-store-test/train/manifest.json").unwrap();
        let shard = manifest.join("shard-000000.tar").unwrap();
        assert_eq!(shard.url(), "memory://data-store-test/train/shard-000000.tar");
        block_on(shard.put(Bytes::from_static(b"tar bytes"))).unwrap().unwrap();
        let again = open("memory://data-store-test/train/shard-000000.tar").unwrap();
        assert_eq!(block_on(again.read_all()).unwrap().unwrap(), "tar bytes");
        let err = block_on(manifest.read_all()).unwrap().unwrap_err();
        assert!(
            err.is_not_found() && err.to_string().contains("memory://data-store-test/train/manifest.json"),
            "{err}"
        );
    }

    #[test]
    fn block_on_runs_inside_async_code() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let inner = runtime.block_on(async { block_on(async { 41 + 1 }) }).unwrap();
        assert_eq!(inner, 42);
        block_on(async { tokio::time::sleep(std::time::Duration::from_millis(1)).await }).unwrap();
    }
}
