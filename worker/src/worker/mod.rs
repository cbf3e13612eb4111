//! A worker process: join the coordinator, rendezvous into a generation, connect the
//! collective, follow the data plan, train, report every step and take part in checkpoints.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_coordinator::client::CoordinatorClient;
use braid_coordinator::security::ClientSecurity;
use braid_coordinator::telemetry::{Origin, Telemetry};
use braid_coordinator::config::JobConfig;
use braid_proto::{RendezvousReply, RendezvousState};
use tch::Device;

use crate::checkpoint::participant::Checkpointer;
use crate::checkpoint::CheckpointStore;
use crate::collective::{NcclUniqueId, RingListener};
use crate::data::tokenizer;
use crate::trainer::{model_spec, Trainer};

mod generation;
mod ledger;
mod metrics;
mod staging;
mod state_sync;

use generation::{run_generation, GenerationEnd, Held, WorkerContext};
use ledger::Ledger;

/// Errors that end a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The coordinator refused or could not be reached.
    #[error(transparent)]
    Coordinator(#[from] braid_coordinator::Error),
    /// The coordinator's reply was unexpected.
    #[error("coordinator: {0}")]
    Protocol(String),
    /// The job config sent by the coordinator is invalid.
    #[error(transparent)]
    Config(braid_coordinator::Error),
    /// Data could not be read.
    #[error(transparent)]
    Data(#[from] crate::data::Error),
    /// The tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    /// Training failed.
    #[error(transparent)]
    Train(#[from] crate::trainer::TrainError),
    /// A collective failed.
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// `[model] init_from` could not be loaded.
    #[error(transparent)]
    Init(#[from] crate::init_from::InitError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime")]
    Runtime(#[from] std::io::Error),
}

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Coordinator address (`host:port`).
    pub coordinator: String,
    /// Device override (`cpu`, `cuda`, `cuda:N`); default from the job's `[cluster] device`.
    pub device: Option<String>,
    /// How long to keep trying to reach the coordinator.
    pub connect_timeout: Duration,
    /// Host other ranks use to reach this worker's ring endpoint; default: the address this
    /// machine uses to reach the coordinator.
    pub advertise_host: Option<String>,
    /// The token and TLS settings the coordinator asks for.
    pub security: ClientSecurity,
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Option<Device> {
    match s {
        "cpu" => Some(Device::Cpu),
        "cuda" => Some(Device::Cuda(0)),
        other => other.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Device::Cuda),
    }
}

/// The local address used to reach `coordinator` (no packet is sent).
fn local_host_towards(coordinator: &str) -> String {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
        s.connect(coordinator.rsplit("://").next().unwrap_or(coordinator))?;
        s.local_addr()
    });
    match probe {
        Ok(addr) if !addr.ip().is_unspecified() => addr.ip().to_string(),
        _ => "127.0.0.1".to_string(),
    }
}

/// Runs a worker until the job finishes.
pub fn run(options: WorkerOptions) -> Result<(), WorkerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut client =
        runtime.block_on(CoordinatorClient::connect_secured(&options.coordinator, "", options.connect_timeout, &options.security))?;
    let identity = Identity {
        hostname: std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
        device: options.device.clone().unwrap_or_default(),
    };
    let joined = runtime.block_on(client.join(&identity.hostname, &identity.device, std::process::id()))?;
    let config = JobConfig::parse(&joined.job_toml, "the coordinator's job config").map_err(WorkerError::Config)?;
    config.validate("the coordinator's job config").map_err(WorkerError::Config)?;
    let device_spec = options.device.clone().unwrap_or_else(|| config.cluster.device.clone());
    let device = parse_device(&device_spec).ok_or_else(|| WorkerError::Protocol(format!("bad device {device_spec:?}")))?;
    if config.train.threads > 0 {
        tch::set_num_threads(config.train.threads as i32);
    }
    // Every log line and span of this worker names its job and id.
    let worker_id = client.worker_id().unwrap_or_default();
    let telemetry = Telemetry::installed().unwrap_or_else(|| Telemetry::init(false, "info"));
    {
        let _runtime = runtime.enter();
        let origin = Origin { service: "braid-worker", job: config.job.name.clone(), worker_id: Some(worker_id.clone()) };
        if let Err(e) = telemetry.export(&config.telemetry, &origin) {
            tracing::warn!("no OTLP export: {e}");
        }
    }
    let worker_span = tracing::info_span!("worker", job = %config.job.name, worker_id = %worker_id).entered();

    let step_now = Arc::new(AtomicU64::new(0));
    let heartbeat = spawn_heartbeat(&runtime, client.clone(), step_now.clone(), Duration::from_millis(joined.heartbeat_interval_ms.max(100)));
    let grace = Duration::from_secs_f64(config.checkpoint.grace_period_s);
    let signals = runtime.spawn(stop_on_signal(client.clone(), grace));
    let result = train(&runtime, &mut client, &identity, &config, device, &options, &step_now);
    heartbeat.abort();
    signals.abort();
    let reason = match &result {
        Ok(()) => "finished".to_string(),
        Err(e) => format!("error: {e}"),
    };
    let _ = runtime.block_on(client.leave(&reason));
    // The last spans and metrics go out before the process exits.
    drop(worker_span);
    telemetry.shutdown();
    result
}

/// On SIGTERM or SIGINT (preemption, Ctrl-C): asks the coordinator for a checkpoint and a
/// stop, and keeps training until then. A second signal, or the end of the grace period,
/// exits at once with status 1.
async fn stop_on_signal(client: CoordinatorClient, grace: Duration) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::warn!("cannot listen for SIGTERM/SIGINT; they will end this worker at once");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    let who = client.worker_id().unwrap_or_default();
    tracing::warn!("{name}: asking for a checkpoint, then stopping (grace period {:.0} s)", grace.as_secs_f64());
    if let Err(e) = client.request_checkpoint(&format!("{name} on worker {who}"), true).await {
        tracing::error!("{name}: no checkpoint can be taken ({e}); stopping now");
        let _ = client.leave(name).await;
        std::process::exit(1);
    }
    tokio::select! {
        _ = tokio::time::sleep(grace) => tracing::error!("grace period of {:.0} s is over; stopping without a checkpoint", grace.as_secs_f64()),
        _ = term.recv() => tracing::error!("second SIGTERM; stopping now"),
        _ = int.recv() => tracing::error!("second SIGINT; stopping now"),
    }
    std::process::exit(1);
}

fn spawn_heartbeat(
    runtime: &tokio::runtime::Runtime,
    client: CoordinatorClient,
    step: Arc<AtomicU64>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = client.heartbeat(step.load(Ordering::Relaxed)).await {
                tracing::warn!("heartbeat failed: {e}");
            }
        }
    })
}

fn train(
    runtime: &tokio::runtime::Runtime,
    client: &mut CoordinatorClient,
    identity: &Identity,
    config: &JobConfig,
    device: Device,
    options: &WorkerOptions,
    step_now: &Arc<AtomicU64>,
) -> Result<(), WorkerError> {
    let tokenizer = tokenizer::load_tokenizer(&config.data.tokenizer)?;
    let host = options.advertise_host.clone().unwrap_or_else(|| local_host_towards(&options.coordinator));
    let spec = model_spec(config, tokenizer.as_ref())?;
    let mut held = Held { trainer: Trainer::new(config, spec.clone(), device)?, step: None, pristine: true };
    let checkpoints = config.checkpoint.url.as_deref().map(CheckpointStore::open).transpose()?;
    let checkpointer = checkpoints.clone().map(|store| Checkpointer::new(store, client.clone(), runtime.handle().clone()));
    let ledger = match &config.telemetry.sample_ledger {
        Some(folder) => {
            let id = client.worker_id().unwrap_or_default();
            let ledger = Ledger::open(std::path::Path::new(folder), &config.job.name, &id)
                .map_err(|e| WorkerError::Protocol(format!("sample ledger in {folder}: {e}")))?;
            Some(std::sync::Mutex::new(ledger))
        }
        None => None,
    };
    loop {
        // A fresh ring endpoint per generation: the previous one's connections may linger.
        let (listener, bound) = RingListener::bind("0.0.0.0:0")?;
        let endpoint = format!("{host}:{}", port_of(&bound));
        let Some(rendezvous) = rendezvous(runtime, client, identity, &endpoint, held.step)? else {
            break;
        };
        let ctx = WorkerContext {
            runtime,
            client,
            config,
            device,
            tokenizer: &tokenizer,
            spec: spec.clone(),
            endpoint: &endpoint,
            checkpoints: checkpoints.as_ref(),
            checkpointer: checkpointer.as_ref(),
            ledger: ledger.as_ref(),
            step_now,
        };
        let generation = rendezvous.generation;
        match run_generation(&ctx, &mut held, rendezvous, listener) {
            Ok(GenerationEnd::JobOver) => {
                if let Some(checkpointer) = &checkpointer {
                    checkpointer.finish();
                }
                match wait_for_job_end(runtime, client, config)? {
                    JobEnd::Finished => break,
                    JobEnd::GenerationEnded => tracing::warn!(generation, "the generation ended before the job was marked finished; rendezvous again"),
                }
            }
            Ok(GenerationEnd::Rendezvous(reason)) => tracing::info!(generation, held_step = ?held.step, "{reason}; rendezvous again"),
            Err(e) if e.is_recoverable() => {
                tracing::warn!(generation, held_step = ?held.step, "generation {generation} failed: {e}; rendezvous again")
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(checkpointer) = &checkpointer {
        checkpointer.finish();
    }
    Ok(())
}

/// Polls the rendezvous until a generation that includes this worker is formed (`None` when
/// the job finished instead). `held_step` tells the coordinator what state this worker holds.
fn rendezvous(
    runtime: &tokio::runtime::Runtime,
    client: &CoordinatorClient,
    identity: &Identity,
    endpoint: &str,
    held_step: Option<u64>,
) -> Result<Option<RendezvousReply>, WorkerError> {
    let mut outage_since: Option<Instant> = None;
    loop {
        match runtime.block_on(client.rendezvous_holding(endpoint, held_step)) {
            Ok(reply) => match RendezvousState::try_from(reply.state) {
                Ok(RendezvousState::Ready) => return Ok(Some(reply)),
                Ok(RendezvousState::JobFinished) => return Ok(None),
                _ => {}
            },
            Err(e) if e.is_outage() => {
                let since = *outage_since.get_or_insert_with(Instant::now);
                if since.elapsed() > COORDINATOR_OUTAGE_LIMIT {
                    return Err(e.into());
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) if e.is_unknown_worker() => {
                // Declared dead while cut off: join again under a new id; the state is kept.
                let old = client.worker_id().unwrap_or_default();
                let joined = runtime.block_on(client.join(&identity.hostname, &identity.device, std::process::id()))?;
                tracing::warn!(held_step = ?held_step, "the coordinator no longer knows worker {old} ({e}); joined again as {}", joined.worker_id);
            }
            Err(e) => return Err(e.into()),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How this worker introduces itself when it joins.
struct Identity {
    hostname: String,
    device: String,
}

/// How long a worker between generations waits for an unreachable coordinator.
const COORDINATOR_OUTAGE_LIMIT: Duration = Duration::from_secs(600);

/// How waiting for the end of the job ended.
enum JobEnd {
    Finished,
    GenerationEnded,
}

/// Stays a member until the coordinator reports the job finished (the final checkpoint needs
/// every rank of the generation), so an early exit cannot end the generation under the others.
fn wait_for_job_end(runtime: &tokio::runtime::Runtime, client: &CoordinatorClient, config: &JobConfig) -> Result<JobEnd, WorkerError> {
    let deadline = Instant::now() + Duration::from_secs_f64(config.cluster.heartbeat_timeout_s.max(1.0) * 4.0 + 60.0);
    while Instant::now() < deadline {
        match runtime.block_on(client.heartbeat(config.train.steps.saturating_sub(1))) {
            Ok(reply) if reply.job_finished => return Ok(JobEnd::Finished),
            Ok(reply) if reply.rendezvous_required => return Ok(JobEnd::GenerationEnded),
            Ok(_) => {}
            Err(e) if e.is_outage() => {}
            Err(e) => return Err(e.into()),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(WorkerError::Protocol("the coordinator did not mark the job finished after the last step".into()))
}

/// Rank 0 creates this generation's NCCL id and publishes it; the others poll the rendezvous
/// until it is there.
pub(crate) fn nccl_bootstrap(
    runtime: &tokio::runtime::Runtime,
    client: &CoordinatorClient,
    endpoint: &str,
    generation: u64,
    rank: usize,
    mut bootstrap: Vec<u8>,
    held_step: Option<u64>,
) -> Result<NcclUniqueId, WorkerError> {
    if rank == 0 {
        let id = NcclUniqueId::new()?;
        runtime.block_on(client.publish_bootstrap(generation, id.as_bytes().to_vec()))?;
        return Ok(id);
    }
    while bootstrap.is_empty() {
        std::thread::sleep(Duration::from_millis(50));
        let reply = runtime.block_on(client.rendezvous_holding(endpoint, held_step))?;
        if reply.generation != generation {
            return Err(WorkerError::Protocol(format!("generation {generation} ended before rank 0 published its NCCL id")));
        }
        bootstrap = reply.bootstrap;
    }
    Ok(NcclUniqueId::from_bytes(&bootstrap)?)
}

fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap_or(addr)
}

impl WorkerError {
    /// True for failures that end a generation but not the worker: a collective that failed
    /// or timed out (a peer died or was cut off). The worker rendezvous again with its state.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, WorkerError::Collective(_) | WorkerError::Train(crate::trainer::TrainError::Collective(_)))
    }
}
