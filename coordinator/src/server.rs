//! Running the coordinator: open the checkpoint root and resume, load the dataset manifest,
//! serve gRPC on a listener and tick the state machine until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use braid_proto::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::commit;
use crate::config::JobConfig;
use crate::error::{Error, Result};
use crate::journal::{unix_ms, Holder, Journal, JournalError};
use crate::metrics;
use crate::telemetry;
use crate::security::{self, AuthToken, ServerSecurity};
use crate::manifest::DatasetManifest;
use crate::service::CoordinatorService;
use crate::state::{Coordinator, CoordinatorSnapshot, Progress};
use crate::store::{self, StoreRoot};

/// The largest RPC message the coordinator reads or writes. Its messages are small (the largest
/// is a checkpoint vote listing parts, or the job file in a join reply); a larger one is refused
/// with OUT_OF_RANGE before it is decoded.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// How often the state machine is ticked (dead workers, rendezvous grace).
pub const TICK_INTERVAL: Duration = Duration::from_millis(200);

/// How a starting coordinator treats the job's journal (under the checkpoint root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// A standalone coordinator: resume the job from the journal when it holds an unfinished
    /// one (its workers may still be training); with `wait_for_lease`, wait for a previous
    /// coordinator's lease to expire instead of refusing to start.
    Resume {
        /// Wait for a live lease to expire.
        wait_for_lease: bool,
    },
    /// `braid run`, whose workers are its own children: none of a previous run's workers can
    /// be alive, so the job starts from its checkpoints as a new launch (the lease is still
    /// taken, so two launches cannot share a checkpoint root).
    Launch,
}

/// The job's journal, as the server keeps it.
type CoordinatorJournal = Journal<CoordinatorSnapshot>;

/// Opens the journal of `config`'s job under `root`, taking its lease; waits for a live lease
/// to expire when asked. Returns the journal and the newest snapshot.
async fn open_journal(
    root: &StoreRoot,
    config: &JobConfig,
    wait_for_lease: bool,
) -> Result<(CoordinatorJournal, Option<CoordinatorSnapshot>)> {
    let ttl = Duration::from_secs_f64(config.cluster.coordinator_lease_s);
    let holder = Holder::this_process();
    loop {
        let now = unix_ms(SystemTime::now());
        match Journal::open_unless_gone(root.clone(), &config.job.name, holder.clone(), ttl, now, Holder::has_exited_locally).await {
            Err(JournalError::LeaseHeld { expires_in_ms, holder: other, .. }) if wait_for_lease => {
                tracing::warn!(
                    "coordinator {other} holds job {:?}'s lease; waiting {:.1} s for it to expire",
                    config.job.name,
                    expires_in_ms as f64 / 1e3
                );
                tokio::time::sleep(Duration::from_millis(expires_in_ms + 100)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// Builds the service for `config`: opens the checkpoint root and the job's journal (taking the
/// lease), resumes the job from the journal or from `latest` as `takeover` and
/// `checkpoint.resume` say, and loads the training dataset's manifest.
pub async fn prepare(config: JobConfig, takeover: Takeover) -> Result<(CoordinatorService, Option<CoordinatorJournal>)> {
    let manifest_bytes = store::read_url(&config.data.train).await.map_err(|e| Error::Manifest {
        origin: config.data.train.clone(),
        reason: match e {
            Error::BadUrl { reason, .. } => reason,
            other => other.to_string(),
        },
    })?;
    let dataset = Arc::new(DatasetManifest::from_json(&manifest_bytes, &config.data.train)?);
    let root = config.checkpoint.url.as_deref().map(store::open).transpose()?;
    let (journal, journaled) = match &root {
        Some(root) => {
            let wait = matches!(takeover, Takeover::Resume { wait_for_lease: true });
            let (journal, snapshot) = open_journal(root, &config, wait).await?;
            (Some(journal), snapshot)
        }
        None => (None, None),
    };
    let unfinished = journaled.filter(|s| !(s.finished || s.failure.is_some() || s.preempted_after.is_some()));
    if let (Some(snapshot), Takeover::Resume { .. }) = (unfinished, takeover) {
        let generation = snapshot.generation.as_ref().map(|g| g.number);
        let state = Coordinator::restore(config, snapshot, Instant::now())?.with_dataset(dataset);
        tracing::warn!(
            "resuming job {:?} from the coordinator journal (live generation {generation:?}); workers that are still \
             running carry on",
            state.config().job.name
        );
        return Ok((CoordinatorService::new(state, root), journal));
    }
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
    let mut state = Coordinator::new(config, Instant::now(), nonce).with_dataset(dataset);
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
    Ok((CoordinatorService::new(state, root), journal))
}

/// How often the journal task looks for a changed state to write.
const JOURNAL_INTERVAL: Duration = Duration::from_secs(1);

/// Writes the state to the journal when it changed (at most every [`JOURNAL_INTERVAL`]) and
/// whenever the lease is due for renewal; releases the lease when `stop` is cancelled. Losing
/// the lease to another coordinator stops this one.
async fn keep_journal(service: CoordinatorService, mut journal: CoordinatorJournal, stop: CancellationToken) -> Result<()> {
    let mut written: Option<Vec<u8>> = None;
    let mut interval = tokio::time::interval(JOURNAL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = interval.tick() => {}
        }
        let snapshot = service.snapshot();
        let bytes = serde_json::to_vec(&snapshot).map_err(|e| Error::Serve(format!("encoding the journal snapshot: {e}")))?;
        let now = unix_ms(SystemTime::now());
        if written.as_ref() == Some(&bytes) && !journal.renew_due(now) {
            continue;
        }
        match journal.append(&snapshot, now).await {
            Ok(()) => written = Some(bytes),
            Err(e @ JournalError::LeaseLost { .. }) => {
                tracing::error!("{e}");
                stop.cancel();
                return Err(e.into());
            }
            Err(e) => tracing::warn!("coordinator journal: {e}; trying again"),
        }
    }
    if let Err(e) = journal.release(&service.snapshot(), unix_ms(SystemTime::now())).await {
        tracing::warn!("releasing the coordinator lease: {e}");
    }
    Ok(())
}

/// A running coordinator: its address, its progress and a way to stop it.
#[derive(Debug)]
pub struct CoordinatorHandle {
    service: CoordinatorService,
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    server: JoinHandle<Result<()>>,
    journal: Option<JoinHandle<Result<()>>>,
    /// The job's OpenTelemetry instruments while it exports over OTLP.
    instruments: Vec<Box<dyn std::any::Any + Send + Sync>>,
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
        let served = self.server.await.map_err(|e| Error::Serve(format!("server task: {e}")))?;
        if let Some(journal) = self.journal {
            journal.await.map_err(|e| Error::Serve(format!("journal task: {e}")))??;
        }
        if !self.instruments.is_empty() {
            // The last export carries the job's final numbers.
            let telemetry = telemetry::Telemetry::installed();
            tokio::task::spawn_blocking(move || telemetry.inspect(|t| t.shutdown())).await.ok();
        }
        served
    }
}

/// Starts a coordinator for `config` on `listener` (resuming from the job's journal when it
/// holds an unfinished job); it runs until `shutdown` is cancelled.
pub async fn start(config: JobConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<CoordinatorHandle> {
    start_with(config, Takeover::Resume { wait_for_lease: false }, listener, shutdown).await
}

/// [`start`] with the journal treated as `takeover` says.
pub async fn start_with(
    config: JobConfig,
    takeover: Takeover,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<CoordinatorHandle> {
    let security = ServerSecurity::load(&config.security)?;
    let (service, journal) = prepare(config, takeover).await?;
    start_service(service, journal, security, listener, shutdown)
}

/// Starts an already prepared service on `listener`, keeping `journal` when there is one and
/// enforcing `security` (token, TLS); it runs until `shutdown` is cancelled.
pub fn start_service(
    service: CoordinatorService,
    journal: Option<CoordinatorJournal>,
    security: ServerSecurity,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<CoordinatorHandle> {
    let local_addr = listener.local_addr().map_err(|e| Error::Serve(format!("listener has no address: {e}")))?;
    let ticker = service.clone();
    let stop = shutdown.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    let first_health = health.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut serving = Some(!ticker.is_over());
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = interval.tick() => ticker.tick(Instant::now()),
            }
            let ready = !ticker.is_over();
            if serving != Some(ready) {
                report_health(&health, ready).await;
                serving = Some(ready);
            }
        }
        report_health(&health, false).await;
    });
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let coordinator = CoordinatorServer::new(service.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let grpc = tonic::service::Routes::new(coordinator).add_service(health_service);
    let routes = http_routes(service.clone(), grpc, security.token.clone());
    let mut builder = tonic::transport::Server::builder().accept_http1(true);
    let scheme = if security.tls.is_some() { "https" } else { "http" };
    if let Some(tls) = security.tls {
        builder = builder.tls_config(tls).map_err(|e| Error::Security(format!("the TLS settings in [security]: {e}")))?;
    }
    let stop = shutdown.clone();
    let ready = !service.is_over();
    let server = tokio::spawn(async move {
        // Health is set before the first connection is served, so no probe finds it missing.
        report_health(&first_health, ready).await;
        builder
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
            .map_err(|e| Error::Serve(format!("{local_addr}: {e}")))
    });
    let token = if security.token.is_some() { ", bearer token required" } else { "" };
    tracing::info!("coordinator listening on {scheme}://{local_addr}{token}");
    let pending = service.clone();
    tokio::spawn(async move { pending.run_pending().await });
    let journal = journal.map(|j| tokio::spawn(keep_journal(service.clone(), j, shutdown.clone())));
    let instruments = export_telemetry(&service)?;
    Ok(CoordinatorHandle { service, local_addr, shutdown, server, journal, instruments })
}

/// Starts the OTLP export of spans and the job's series when `[telemetry] otlp_endpoint` is
/// set; returns the instruments to keep (none when nothing is exported).
fn export_telemetry(service: &CoordinatorService) -> Result<Vec<Box<dyn std::any::Any + Send + Sync>>> {
    let config = service.config();
    if config.telemetry.otlp_endpoint.is_none() {
        return Ok(Vec::new());
    }
    let telemetry = telemetry::Telemetry::installed().unwrap_or_else(|| telemetry::Telemetry::init(false, "info"));
    let origin = telemetry::Origin { service: "braid-coordinator", job: config.job.name.clone(), worker_id: None };
    telemetry.export(&config.telemetry, &origin)?;
    let progress = service.clone();
    Ok(telemetry::observe_job(&opentelemetry::global::meter("braid"), move || progress.progress()))
}

/// gRPC health (`grpc.health.v1`): SERVING for the whole server and for `braid.v1.Coordinator`
/// while the job runs or waits for workers, NOT_SERVING once it finished, failed or stopped.
async fn report_health(health: &tonic_health::server::HealthReporter, ready: bool) {
    let status = if ready { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
    health.set_service_status("", status).await;
    health.set_service_status(COORDINATOR_SERVICE, status).await;
}

/// The coordinator's gRPC service name, as health checks ask for it.
pub const COORDINATOR_SERVICE: &str = "braid.v1.Coordinator";

/// The gRPC services `grpc` (the coordinator's and health checking) and, on the same port over
/// HTTP/1.1 or HTTP/2, `POST /checkpoint` (a checkpoint at the next common step, as
/// `braid checkpoint request` asks over gRPC), `GET /metrics` (Prometheus, see [`metrics`]) and `GET /status`: the job's
/// [`Progress`] as JSON (generation, members with their ranks, steps and straggler flags,
/// rejoins, generation history, checkpoints, why the job waits), and `GET /`: the same as an
/// HTML page with charts of the recent steps (see [`crate::status_page`]).
///
/// With `token`, every gRPC call but health checks and every HTTP call but reads must carry it
/// (see [`security::require_token`]).
fn http_routes(service: CoordinatorService, grpc: tonic::service::Routes, token: Option<AuthToken>) -> tonic::service::Routes {
    let status = service.clone();
    let page = service.clone();
    let requester = service.clone();
    let router = grpc
        .into_axum_router()
        .route("/status", axum::routing::get(move || async move { axum::Json(status.progress()) }))
        .route("/", axum::routing::get(move || async move { ([(axum::http::header::CONTENT_TYPE, crate::status_page::CONTENT_TYPE)], crate::status_page::render(&page.progress())) }))
        .route(
            "/metrics",
            axum::routing::get(move || async move {
                ([(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)], metrics::render(&service.progress()))
            }),
        );
    let router = router.route(
        "/checkpoint",
        axum::routing::post(move || async move {
            use axum::response::IntoResponse;
            match requester.checkpoint_now("an operator over HTTP (POST /checkpoint)", false) {
                Ok(step) => axum::Json(serde_json::json!({ "requested": true, "after_step": step })).into_response(),
                Err(e) => (axum::http::StatusCode::CONFLICT, format!("{e}\n")).into_response(),
            }
        }),
    );
    let router = match token {
        Some(token) => router.layer(axum::middleware::from_fn(move |request, next| security::require_token(token.clone(), request, next))),
        None => router,
    };
    tonic::service::Routes::from(router)
}

/// Runs a coordinator for `config` on `listener` until `shutdown` is cancelled.
pub async fn serve(config: JobConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    start(config, listener, shutdown).await?.join().await
}
