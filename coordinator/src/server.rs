//! Running the coordinator: open the checkpoint root and resume, load the dataset manifest,
//! serve gRPC on a listener and tick the state machine until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_proto::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::commit;
use crate::config::JobConfig;
use crate::error::{Error, Result};
use crate::manifest::DatasetManifest;
use crate::service::CoordinatorService;
use crate::state::{Coordinator, Progress};
use crate::store;

/// How often the state machine is ticked (dead workers, rendezvous grace).
pub const TICK_INTERVAL: Duration = Duration::from_millis(200);

/// Builds the service for `config`: opens the checkpoint root, resumes from `latest` when
/// `checkpoint.resume` is set, and loads the training dataset's manifest.
pub async fn prepare(config: JobConfig) -> Result<CoordinatorService> {
    let manifest_bytes = store::read_url(&config.data.train).await.map_err(|e| Error::Manifest {
        origin: config.data.train.clone(),
        reason: match e {
            Error::BadUrl { reason, .. } => reason,
            other => other.to_string(),
        },
    })?;
    let dataset = DatasetManifest::from_json(&manifest_bytes, &config.data.train)?;
    let root = config.checkpoint.url.as_deref().map(store::open).transpose()?;
    let resume = match (&root, config.checkpoint.resume) {
        (Some(root), true) => commit::find_resumable(root).await?,
        (Some(root), false) => {
            // A fresh start must not collide with (or overwrite) checkpoints already committed.
            if let Some((manifest, committed)) = commit::read_latest(root).await? {
                return Err(Error::Checkpoint(format!(
                    "{} already holds committed checkpoints (latest: step {} at {}); set [checkpoint] resume = true \
                     to continue from it, or choose another [checkpoint] url",
                    root.url(),
                    manifest.step,
                    committed.manifest_url
                )));
            }
            None
        }
        _ => None,
    };
    let nonce = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let job = config.job.name.clone();
    let mut state = Coordinator::new(config, Instant::now(), nonce).with_dataset(Arc::new(dataset));
    if let Some((manifest, checkpoint)) = resume {
        if manifest.job != job {
            tracing::warn!(
                "resuming job {job:?} from a checkpoint of job {:?} ({})",
                manifest.job,
                checkpoint.manifest_url
            );
        }
        state = state.with_resume(checkpoint);
    }
    Ok(CoordinatorService::new(state, root))
}

/// A running coordinator: its address, its progress and a way to stop it.
#[derive(Debug)]
pub struct CoordinatorHandle {
    service: CoordinatorService,
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    server: JoinHandle<Result<()>>,
}

impl CoordinatorHandle {
    /// The address the gRPC server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A snapshot of the job.
    pub fn progress(&self) -> Progress {
        self.service.progress()
    }

    /// The service (for status pages and tests).
    pub fn service(&self) -> &CoordinatorService {
        &self.service
    }

    /// Resolves once the job finished or failed (see [`Progress::failure`]).
    pub async fn ended(&self) {
        self.service.ended().cancelled().await
    }

    /// Resolves once every worker has left or been declared dead, or after `timeout`.
    /// Returns true when no worker is left.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.progress().members.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(TICK_INTERVAL).await;
        }
    }

    /// Asks the server to stop.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for the server to stop (after [`CoordinatorHandle::shutdown`] or the token passed
    /// to [`start`] is cancelled).
    pub async fn join(self) -> Result<()> {
        self.server.await.map_err(|e| Error::Serve(format!("server task: {e}")))?
    }
}

/// Starts a coordinator for `config` on `listener`; it runs until `shutdown` is cancelled.
pub async fn start(config: JobConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<CoordinatorHandle> {
    let service = prepare(config).await?;
    start_service(service, listener, shutdown)
}

/// Starts an already prepared service on `listener`; it runs until `shutdown` is cancelled.
pub fn start_service(
    service: CoordinatorService,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<CoordinatorHandle> {
    let local_addr = listener.local_addr().map_err(|e| Error::Serve(format!("listener has no address: {e}")))?;
    let ticker = service.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = interval.tick() => ticker.tick(Instant::now()),
            }
        }
    });
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let grpc = CoordinatorServer::new(service.clone());
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(grpc)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
            .map_err(|e| Error::Serve(format!("{local_addr}: {e}")))
    });
    tracing::info!("coordinator listening on {local_addr}");
    Ok(CoordinatorHandle { service, local_addr, shutdown, server })
}

/// Runs a coordinator for `config` on `listener` until `shutdown` is cancelled.
pub async fn serve(config: JobConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    start(config, listener, shutdown).await?.join().await
}
