//! The data pipeline's error type: every variant names the file or URL involved and the reason.

/// Everything that can go wrong while writing, indexing or reading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A local file or folder that could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tar shard whose headers could not be parsed.
    #[error("bad tar shard {path}: {reason}")]
    Tar {
        /// The shard.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// A dataset manifest that could not be parsed.
    #[error("invalid dataset manifest {url}: {reason}")]
    Manifest {
        /// Where the manifest lives.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// A path or URL that cannot be used as an object-store location.
    #[error("bad location {url:?}: {reason}")]
    BadUrl {
        /// The location as given.
        url: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// An object (manifest, shard) that does not exist.
    #[error("{url}: not found")]
    NotFound {
        /// The missing location.
        url: String,
    },
    /// Any other object-store failure.
    #[error("object store {url}: {source}")]
    Store {
        /// The location involved.
        url: String,
        /// The underlying error.
        #[source]
        source: object_store::Error,
    },
    /// An image that could not be encoded while writing a dataset.
    #[error("cannot encode image {key}: {reason}")]
    Encode {
        /// The sample key.
        key: String,
        /// What went wrong.
        reason: String,
    },
    /// A tokenizer file that could not be built or written.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// Where it was to be written or read.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// More samples failed to read or decode than the job allows.
    #[error(
        "{count} corrupt samples exceed data.max_corrupt_samples = {limit}; last: sample {key:?} of shard {shard}: {reason}"
    )]
    TooManyCorrupt {
        /// Corrupt samples seen so far.
        count: u64,
        /// The allowed number.
        limit: u64,
        /// The shard of the last corrupt sample.
        shard: String,
        /// The key of the last corrupt sample.
        key: String,
        /// Why it was corrupt.
        reason: String,
    },
    /// Loader options that cannot work.
    #[error("invalid loader options: {0}")]
    Options(String),
    /// A request for a batch past the loader's step range.
    #[error("the loader's step range ends at step {end_step}")]
    Finished {
        /// The first step not produced.
        end_step: u64,
    },
    /// The loader's background thread stopped without reporting why.
    #[error("the data loader thread stopped: {0}")]
    Stopped(String),
}

/// Results of the data pipeline.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on a local path.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().display().to_string(), source }
    }

    /// True when the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// An object-store error on `url`, with "not found" kept distinct.
    pub fn store(url: &str, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => Error::NotFound { url: url.to_string() },
            source => Error::Store { url: url.to_string(), source },
        }
    }
}
