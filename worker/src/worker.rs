//! A worker process: join the coordinator, rendezvous into a generation, connect the
//! collective, follow the data plan, train, report every step and take part in checkpoints.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_coordinator::client::CoordinatorClient;
use braid_coordinator::config::JobConfig;
use braid_proto::{RendezvousState, StepReport};
use tch::Device;

use crate::checkpoint::participant::{Checkpointer, Taken};
use crate::checkpoint::CheckpointStore;
use crate::collective::{connect_collective, Engine, NcclUniqueId, Rendezvous, RingListener};
use crate::data::loader::{CorruptSample, Loader, LoaderOptions};
use crate::data::{store, tokenizer};
use crate::trainer::{clip_config, ClipTrainer, DeviceBatch};
use braid_coordinator::plan::SamplePlan;

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
    Init(#[from] crate::export::ExportError),
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
        s.connect(coordinator)?;
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
    let mut client = runtime.block_on(CoordinatorClient::connect(&options.coordinator, "", options.connect_timeout))?;
    let hostname = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    let device_name = options.device.clone().unwrap_or_default();
    let joined = runtime.block_on(client.join(&hostname, &device_name, std::process::id()))?;
    let config = JobConfig::parse(&joined.job_toml, "the coordinator's job config").map_err(WorkerError::Config)?;
    config.validate("the coordinator's job config").map_err(WorkerError::Config)?;
    let device_spec = options.device.clone().unwrap_or_else(|| config.cluster.device.clone());
    let device = parse_device(&device_spec).ok_or_else(|| WorkerError::Protocol(format!("bad device {device_spec:?}")))?;
    if config.train.threads > 0 {
        tch::set_num_threads(config.train.threads as i32);
    }

    let step_now = Arc::new(AtomicU64::new(0));
    let heartbeat = spawn_heartbeat(&runtime, client.clone(), step_now.clone(), Duration::from_millis(joined.heartbeat_interval_ms.max(100)));
    let grace = Duration::from_secs_f64(config.checkpoint.grace_period_s);
    let signals = runtime.spawn(stop_on_signal(client.clone(), grace));
    let result = train(&runtime, &mut client, &config, device, &options, &step_now);
    heartbeat.abort();
    signals.abort();
    let reason = match &result {
        Ok(()) => "finished".to_string(),
        Err(e) => format!("error: {e}"),
    };
    let _ = runtime.block_on(client.leave(&reason));
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
    config: &JobConfig,
    device: Device,
    options: &WorkerOptions,
    step_now: &Arc<AtomicU64>,
) -> Result<(), WorkerError> {
    let tokenizer = tokenizer::load_tokenizer(&config.data.tokenizer)?;
    let host = options.advertise_host.clone().unwrap_or_else(|| local_host_towards(&options.coordinator));
    let (listener, bound) = RingListener::bind("0.0.0.0:0")?;
    let endpoint = format!("{host}:{}", port_of(&bound));

    // Rendezvous: poll until a generation that includes this worker is formed.
    let rendezvous = loop {
        let reply = runtime.block_on(client.rendezvous(&endpoint))?;
        match RendezvousState::try_from(reply.state) {
            Ok(RendezvousState::Ready) => break reply,
            Ok(RendezvousState::JobFinished) => return Ok(()),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let (generation, rank, world_size) = (rendezvous.generation, rendezvous.rank as usize, rendezvous.world_size as usize);
    let timeout = Duration::from_secs_f64(config.cluster.collective_timeout_s);
    let material = match Engine::for_device(device) {
        Engine::Ring => Rendezvous::Ring { listener, endpoints: rendezvous.endpoints.clone(), session: generation },
        Engine::Nccl => Rendezvous::Nccl { id: nccl_bootstrap(runtime, client, &endpoint, generation, rank, rendezvous.bootstrap)? },
    };
    let mut coll = connect_collective(device, rank, world_size, material, timeout)?;
    tracing::info!(rank, world_size, generation, engine = coll.engine(), "collective connected");
    let plan_reply = runtime.block_on(client.data_plan(generation))?;
    tracing::info!(rank, world_size, generation, start_step = plan_reply.start_step, "rendezvous complete");

    let clip = clip_config(config, tokenizer.vocab_size() as i64).map_err(crate::trainer::TrainError::from)?;
    let mut trainer = ClipTrainer::new(config, clip, device)?;
    let checkpoints = config.checkpoint.url.as_deref().map(CheckpointStore::open).transpose()?;
    let checkpointer = checkpoints
        .clone()
        .map(|store| Checkpointer::new(store, client.clone(), runtime.handle().clone(), generation, rank));
    if plan_reply.resume_manifest_url.is_empty() {
        if let Some(init) = &config.model.init_from {
            crate::export::init_from_open_clip(&mut trainer, init)?;
            tracing::info!("initialised from {init}");
        }
    } else {
        let store = checkpoints.as_ref().ok_or_else(|| WorkerError::Protocol("resume without a checkpoint url".into()))?;
        let (manifest, tensors) = store.read_checkpoint(&plan_reply.resume_manifest_url)?;
        trainer.load_state(tensors, &plan_reply.resume_manifest_url)?;
        tracing::info!(step = manifest.step, "resumed from {}", plan_reply.resume_manifest_url);
    }

    let manifest = Arc::new(store::load_manifest(&plan_reply.manifest_url)?);
    let plan = SamplePlan::new(manifest, plan_reply.seed, config.data.shuffle_window_shards);
    let corrupt_client = client.clone();
    let handle = runtime.handle().clone();
    let on_corrupt = Arc::new(move |c: CorruptSample| {
        tracing::warn!(shard = %c.shard, key = %c.key, "corrupt sample skipped: {}", c.reason);
        let client = corrupt_client.clone();
        let _ = handle.block_on(client.report_corrupt(&c.shard, &c.key, &c.reason));
    });
    let global_batch = config.train.global_batch;
    let mut loader = Loader::new(LoaderOptions {
        plan,
        manifest_url: plan_reply.manifest_url.clone(),
        rank,
        world_size,
        global_batch,
        start_step: plan_reply.start_step,
        end_step: plan_reply.total_steps,
        image_size: clip.vision.image_size as usize,
        context_length: clip.text.context_length as usize,
        tokenizer: tokenizer.clone(),
        decode_threads: config.data.decode_threads,
        prefetch_batches: config.data.prefetch_batches,
        train: true,
        min_crop_scale: config.data.min_crop_scale,
        seed: config.job.seed,
        max_corrupt_samples: config.data.max_corrupt_samples,
        on_corrupt,
        runtime: None,
    })?;

    let slot = global_batch.div_ceil(world_size);
    for step in plan_reply.start_step..plan_reply.total_steps {
        let started = Instant::now();
        let batch = loader.next_batch()?;
        let device_batch = DeviceBatch::from_batch(&batch, slot, clip.vision.image_size, device, trainer.compute_kind());
        let stats = trainer.train_step_with(step, &device_batch, coll.as_mut(), || {
            if let Some(checkpointer) = &checkpointer {
                checkpointer.before_update();
            }
        })?;
        coll.check()?;
        step_now.store(step, Ordering::Relaxed);
        if rank == 0 && (step % config.telemetry.log_every_steps.max(1) == 0 || step + 1 == plan_reply.total_steps) {
            tracing::info!(step, loss = stats.loss, lr = stats.lr, grad_norm = stats.grad_norm, logit_scale = stats.logit_scale, "step");
        }
        let reply = runtime.block_on(client.report_step(StepReport {
            header: None,
            generation,
            step,
            loss: stats.loss,
            learning_rate: stats.lr,
            grad_norm: stats.grad_norm,
            logit_scale: stats.logit_scale,
            samples: stats.samples,
            step_seconds: started.elapsed().as_secs_f64(),
            data_wait_seconds: batch.data_wait.as_secs_f64(),
            skipped_samples: loader.corrupt_samples(),
            collective_wait_seconds: 0.0,
        }))?;
        let last = step + 1 == plan_reply.total_steps;
        let every = config.checkpoint.every_steps;
        let requested = reply.checkpoint_step == Some(step);
        let stop_here = requested && reply.stop_after_checkpoint;
        if let Some(checkpointer) = &checkpointer {
            if last || requested || (every > 0 && (step + 1) % every == 0) {
                let attempt = format!("{}-s{step}", plan_reply.attempt_prefix);
                let state = || {
                    let mut state = trainer.state();
                    state.push(("train.step".into(), tch::Tensor::from(step as i64)));
                    state
                };
                match checkpointer.take(step, &attempt, state, last || stop_here) {
                    Taken::Started { blocked } => {
                        tracing::info!(step, blocked_seconds = blocked.as_secs_f64(), "checkpoint started")
                    }
                    Taken::Deferred => tracing::warn!(step, "checkpoint deferred: the previous upload is still in flight"),
                }
            }
        }
        if stop_here {
            tracing::warn!(step, "stopping after this checkpoint, as the coordinator asked");
            break;
        }
        if reply.stop {
            tracing::info!(step, "the coordinator asked to stop");
            break;
        }
        if reply.rendezvous_required {
            return Err(WorkerError::Protocol(format!(
                "generation {generation} ended at step {step} (a member left); this worker stops"
            )));
        }
    }
    if let Some(checkpointer) = &checkpointer {
        checkpointer.finish();
    }
    wait_for_job_end(runtime, client, config)
}

/// Stays a member until the coordinator reports the job finished (the final checkpoint needs
/// every rank of the generation), so an early exit cannot end the generation under the others.
fn wait_for_job_end(runtime: &tokio::runtime::Runtime, client: &CoordinatorClient, config: &JobConfig) -> Result<(), WorkerError> {
    let deadline = Instant::now() + Duration::from_secs_f64(config.cluster.heartbeat_timeout_s.max(1.0) * 4.0 + 60.0);
    while Instant::now() < deadline {
        let reply = runtime.block_on(client.heartbeat(config.train.steps.saturating_sub(1)))?;
        if reply.job_finished {
            return Ok(());
        }
        if reply.rendezvous_required {
            return Err(WorkerError::Protocol("the generation ended before the job was marked finished".into()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(WorkerError::Protocol("the coordinator did not mark the job finished after the last step".into()))
}

/// Rank 0 creates this generation's NCCL id and publishes it; the others poll the rendezvous
/// until it is there.
fn nccl_bootstrap(
    runtime: &tokio::runtime::Runtime,
    client: &CoordinatorClient,
    endpoint: &str,
    generation: u64,
    rank: usize,
    mut bootstrap: Vec<u8>,
) -> Result<NcclUniqueId, WorkerError> {
    if rank == 0 {
        let id = NcclUniqueId::new()?;
        runtime.block_on(client.publish_bootstrap(generation, id.as_bytes().to_vec()))?;
        return Ok(id);
    }
    while bootstrap.is_empty() {
        std::thread::sleep(Duration::from_millis(50));
        let reply = runtime.block_on(client.rendezvous(endpoint))?;
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
