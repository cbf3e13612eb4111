//! The coordinator crate's error type and its mapping to gRPC status codes.

/// Everything that can go wrong in the coordinator crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A job file that failed to parse or validate; every problem is listed.
    #[error("invalid job config {origin}:\n  - {}", problems.join("\n  - "))]
    Config {
        /// Where the config came from.
        origin: String,
        /// Every problem found.
        problems: Vec<String>,
    },
    /// A dataset manifest that could not be read.
    #[error("invalid dataset manifest {origin}: {reason}")]
    Manifest {
        /// Where the manifest came from.
        origin: String,
        /// What was wrong.
        reason: String,
    },
    /// An object-store operation failed.
    #[error("object store {url}: {source}")]
    Store {
        /// The location involved.
        url: String,
        /// The underlying error.
        #[source]
        source: object_store::Error,
    },
    /// A URL or path that cannot be used as an object-store location.
    #[error("bad location {url:?}: {reason}")]
    BadUrl {
        /// The location as given.
        url: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A request for another job.
    #[error("job id mismatch: this coordinator runs job {expected:?}, the request is for {got:?}")]
    JobMismatch {
        /// This coordinator's job.
        expected: String,
        /// The job named in the request.
        got: String,
    },
    /// A peer that speaks another protocol version.
    #[error("protocol version mismatch: coordinator speaks {expected}, the peer speaks {got}")]
    ProtocolMismatch {
        /// This coordinator's version.
        expected: u32,
        /// The peer's version.
        got: u32,
    },
    /// A request naming a worker this coordinator does not know (or that was declared dead).
    #[error("unknown worker {0:?}: join again")]
    UnknownWorker(String),
    /// A request that is malformed or does not fit the current state.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A checkpoint commit that failed.
    #[error("checkpoint commit failed: {0}")]
    Checkpoint(String),
    /// A request made for a generation that is not the worker's live generation.
    #[error("worker {worker:?} asked about generation {got}, but {}; rendezvous again", match current {
        Some(g) => format!("its live generation is {g}"),
        None => "it is in no live generation".to_string(),
    })]
    StaleGeneration {
        /// The worker.
        worker: String,
        /// The generation named in the request.
        got: u64,
        /// The worker's live generation, if any.
        current: Option<u64>,
    },
    /// The coordinator could not be reached within the connect timeout.
    #[error("cannot reach coordinator at {addr}: {reason}")]
    Unreachable {
        /// The address tried.
        addr: String,
        /// The last connection error.
        reason: String,
    },
    /// Something that did not happen within its time limit.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The gRPC server failed.
    #[error("coordinator server: {0}")]
    Serve(String),
    /// Credentials or TLS settings that cannot be used (a missing or malformed token or PEM file).
    #[error("security: {0}")]
    Security(String),
    /// The coordinator's journal or lease (see [`crate::journal`]).
    #[error(transparent)]
    Journal(Box<crate::journal::JournalError>),
    /// An RPC the coordinator answered with an error status.
    #[error("coordinator refused {rpc} ({code:?}): {message}")]
    Rpc {
        /// The RPC's name.
        rpc: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The coordinator's message.
        message: String,
    },
}

/// Result with the coordinator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::Config { .. } | Error::InvalidRequest(_) | Error::BadUrl { .. } => tonic::Status::invalid_argument(msg),
            Error::JobMismatch { .. } | Error::ProtocolMismatch { .. } => tonic::Status::failed_precondition(msg),
            Error::UnknownWorker(_) => tonic::Status::not_found(msg),
            Error::Manifest { .. } | Error::Store { .. } | Error::Checkpoint(_) => tonic::Status::internal(msg),
            Error::StaleGeneration { .. } => tonic::Status::aborted(msg),
            Error::Unreachable { .. } => tonic::Status::unavailable(msg),
            Error::Timeout(_) => tonic::Status::deadline_exceeded(msg),
            Error::Serve(_) => tonic::Status::internal(msg),
            Error::Security(_) => tonic::Status::unauthenticated(msg),
            Error::Rpc { code, message, .. } => tonic::Status::new(code, message),
            Error::Journal(_) => tonic::Status::failed_precondition(msg),
        }
    }
}

impl Error {
    /// True when the coordinator could not be reached or did not answer in time (an outage,
    /// not a refusal): a worker keeps training and tries again later.
    pub fn is_outage(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout(_) => true,
            Error::Rpc { code, .. } => {
                matches!(code, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown)
            }
            _ => false,
        }
    }

    /// True when the request named a generation that is no longer the live one: the worker
    /// must rendezvous again.
    pub fn is_stale(&self) -> bool {
        match self {
            Error::StaleGeneration { .. } => true,
            Error::Rpc { code, .. } => matches!(code, tonic::Code::Aborted),
            _ => false,
        }
    }

    /// True when the coordinator no longer knows the worker (declared dead while it was cut
    /// off, or a coordinator without its record): the worker must join again.
    pub fn is_unknown_worker(&self) -> bool {
        match self {
            Error::UnknownWorker(_) => true,
            Error::Rpc { code, .. } => matches!(code, tonic::Code::NotFound),
            _ => false,
        }
    }
}

impl From<crate::journal::JournalError> for Error {
    fn from(e: crate::journal::JournalError) -> Self {
        Error::Journal(Box::new(e))
    }
}
