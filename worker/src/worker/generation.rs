//! One generation of a worker: connect the collective, take the generation's starting state,
//! then train, report and checkpoint step by step until the job ends or membership changes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use braid_coordinator::client::CoordinatorClient;
use braid_coordinator::config::JobConfig;
use braid_coordinator::plan::SamplePlan;
use braid_proto::{RendezvousReply, StepReply, StepReport};
use tch::{Device, Tensor};

use super::ledger::Ledger;
use super::metrics::WorkerMetrics;
use super::state_sync::{self, Origin};
use super::staging::{Staged, Stager, StagingShape};
use super::{nccl_bootstrap, WorkerError};
use crate::checkpoint::participant::{Checkpointer, Membership, Taken};
use crate::checkpoint::CheckpointStore;
use crate::collective::{connect_collective, Collective, CollectiveError, Engine, Rendezvous, RingListener};
use crate::cuda_memory::{memory_stats, MemoryStats};
use crate::data::loader::{CorruptSample, Loader, LoaderOptions};
use crate::data::{store, tokenizer};
use crate::trainer::{ModelSpec, Trainer};

/// How a generation ended for this worker.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEnd {
    /// The job is over for this worker: it trained the last step, or was told to stop.
    JobOver,
    /// Membership changes: rendezvous again, keeping the state (the reason is logged).
    Rendezvous(String),
}

/// What a worker keeps from one generation to the next.
pub struct Held {
    /// The model and optimizer.
    pub trainer: Trainer,
    /// The last step whose update `trainer` holds; `None` before the first step.
    pub step: Option<u64>,
    /// True while `trainer` holds its seeded initial values.
    pub pristine: bool,
}

/// What stays the same across a worker's generations.
pub struct WorkerContext<'a> {
    /// The async runtime for RPCs.
    pub runtime: &'a tokio::runtime::Runtime,
    /// The coordinator.
    pub client: &'a CoordinatorClient,
    /// The job.
    pub config: &'a JobConfig,
    /// The training device.
    pub device: Device,
    /// The tokenizer.
    pub tokenizer: &'a Arc<dyn tokenizer::TextTokenizer>,
    /// The model's shape.
    pub spec: ModelSpec,
    /// This worker's ring endpoint as advertised to peers.
    pub endpoint: &'a str,
    /// The checkpoint root, if the job has one.
    pub checkpoints: Option<&'a CheckpointStore>,
    /// The checkpoint participant, if the job has a root.
    pub checkpointer: Option<&'a Checkpointer>,
    /// The sample ledger, if asked for.
    pub ledger: Option<&'a std::sync::Mutex<Ledger>>,
    /// The step this worker is on, for heartbeats.
    pub step_now: &'a Arc<AtomicU64>,
}

/// Times the calls of a collective: the host-side wait of one step, reported to the
/// coordinator for straggler detection.
struct Timed<'a> {
    inner: &'a mut dyn Collective,
    waited: Duration,
}

impl Timed<'_> {
    fn time<T>(&mut self, call: impl FnOnce(&mut dyn Collective) -> T) -> T {
        let started = Instant::now();
        let out = call(&mut *self.inner);
        self.waited += started.elapsed();
        out
    }
}

impl Collective for Timed<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&mut self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        self.time(|c| c.all_reduce_sum(tensor))
    }
    fn all_reduce_sum_in_dtype(&mut self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        self.time(|c| c.all_reduce_sum_in_dtype(tensor))
    }
    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor, CollectiveError> {
        self.time(|c| c.all_gather(tensor))
    }
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        self.time(|c| c.broadcast(tensor, root))
    }
    fn check(&mut self) -> Result<(), CollectiveError> {
        self.inner.check()
    }
    fn engine(&self) -> &'static str {
        self.inner.engine()
    }
}

/// Runs this worker's part of the generation `rendezvous` formed.
pub fn run_generation(
    ctx: &WorkerContext<'_>,
    held: &mut Held,
    rendezvous: RendezvousReply,
    listener: RingListener,
) -> Result<GenerationEnd, WorkerError> {
    let WorkerContext { runtime, client, config, device, .. } = *ctx;
    let (generation, rank, world_size) = (rendezvous.generation, rendezvous.rank as usize, rendezvous.world_size as usize);
    // Every log line and span of this generation names it and this worker's rank.
    let _generation_span = tracing::info_span!("generation", generation, rank, world_size).entered();
    let timeout = Duration::from_secs_f64(config.cluster.collective_timeout_s);
    let material = match Engine::for_device(device) {
        Engine::Ring => Rendezvous::Ring { listener, endpoints: rendezvous.endpoints.clone(), session: generation },
        Engine::Nccl => Rendezvous::Nccl {
            id: nccl_bootstrap(runtime, client, ctx.endpoint, generation, rank, rendezvous.bootstrap, held.step)?,
        },
    };
    let mut coll = connect_collective(device, rank, world_size, material, timeout)?;
    tracing::info!(rank, world_size, generation, engine = coll.engine(), "collective connected");
    let plan_reply = match runtime.block_on(client.data_plan(generation)) {
        Ok(reply) => reply,
        Err(e) if e.is_stale() => return Ok(GenerationEnd::Rendezvous(format!("generation {generation} ended before it started: {e}"))),
        Err(e) => return Err(e.into()),
    };
    let (start, total) = (plan_reply.start_step, plan_reply.total_steps);

    let spec = &ctx.spec;
    let origin = state_sync::restore(&plan_reply, &mut held.trainer, held.pristine, coll.as_mut(), config, ctx.checkpoints, || {
        Trainer::new(config, spec.clone(), device)
    })?;
    held.step = start.checked_sub(1);
    held.pristine = origin == Origin::Fresh;
    tracing::info!(rank, world_size, generation, start_step = start, ?origin, "rendezvous complete");
    if start >= total {
        return Ok(GenerationEnd::JobOver);
    }

    let manifest = Arc::new(store::load_manifest(&plan_reply.manifest_url)?);
    held.trainer.set_epoch_steps(manifest.num_samples().div_ceil(config.train.global_batch.max(1) as u64));
    let plan = SamplePlan::new(manifest, plan_reply.seed, config.data.shuffle_window_shards);
    let corrupt_client = client.clone();
    let handle = runtime.handle().clone();
    let on_corrupt = Arc::new(move |c: CorruptSample| {
        tracing::warn!(shard = %c.shard, key = %c.key, "corrupt sample skipped: {}", c.reason);
        let client = corrupt_client.clone();
        let _ = handle.block_on(client.report_corrupt(&c.shard, &c.key, &c.reason));
    });
    let global_batch = config.train.global_batch;
    let loader = Loader::new(LoaderOptions {
        plan,
        manifest_url: plan_reply.manifest_url.clone(),
        rank,
        world_size,
        global_batch,
        start_step: start,
        end_step: total,
        image_size: spec.image_size() as usize,
        context_length: spec.context_length() as usize,
        tokenizer: ctx.tokenizer.clone(),
        decode_threads: config.data.decode_threads,
        prefetch_batches: config.data.prefetch_batches,
        train: true,
        min_crop_scale: config.data.min_crop_scale,
        seed: config.job.seed,
        max_corrupt_samples: config.data.max_corrupt_samples,
        on_corrupt,
        runtime: None,
    })?;

    let member = Membership { generation, rank };
    let slot = global_batch.div_ceil(world_size);
    let shape = StagingShape { slot, image_size: spec.image_size(), device, kind: held.trainer.compute_kind() };
    let mut stager = Stager::new(loader, shape)?;
    let mut outage_since: Option<Instant> = None;
    let metrics = WorkerMetrics::new(&config.job.name, &client.worker_id().unwrap_or_default());
    for step in start..total {
        let _step_span = tracing::info_span!("step", step).entered();
        let started = Instant::now();
        braid_coordinator::failpoint::set_context(step, rank);
        let Staged { batch, host } = tracing::info_span!("data_wait").in_scope(|| stager.next_batch())?;
        if let Some(ledger) = ctx.ledger {
            ledger.lock().unwrap_or_else(|e| e.into_inner()).contributed(generation, step, rank, world_size, &batch.keys);
        }
        let device_batch = host.to_device(device);
        let mut timed = Timed { inner: coll.as_mut(), waited: Duration::ZERO };
        let stats = held.trainer.train_step_with(step, &device_batch, &mut timed, || {
            if let Some(checkpointer) = ctx.checkpointer {
                checkpointer.before_update();
            }
        })?;
        let collective_wait = timed.waited;
        held.step = Some(step);
        held.pristine = false;
        if braid_coordinator::failpoint::trigger("corrupt-momentum", step) {
            state_sync::corrupt_momentum(&held.trainer, rank, step);
        }
        if let Some(ledger) = ctx.ledger {
            ledger.lock().unwrap_or_else(|e| e.into_inner()).applied(generation, step, rank, world_size, stats.loss);
        }
        ctx.step_now.store(step, Ordering::Relaxed);
        if rank == 0 && (step % config.telemetry.log_every_steps.max(1) == 0 || step + 1 == total) {
            let terms: Vec<String> = stats.parts.iter().map(|(name, value)| format!("{name}={value:.4}")).collect();
            tracing::info!(step, loss = stats.loss, terms = terms.join(" "), lr = stats.lr, grad_norm = stats.grad_norm, logit_scale = stats.logit_scale, "step");
        }
        let memory = device_memory(device);
        let report = StepReport {
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
            skipped_samples: stager.corrupt_samples(),
            collective_wait_seconds: collective_wait.as_secs_f64(),
            state_digest: state_sync::check_digest(&held.trainer, config, step, world_size),
            loss_terms: stats.parts.iter().map(|(name, value)| (name.to_string(), *value)).collect(),
            device_memory_bytes: memory.map(|m| m.reserved),
            device_memory_peak_bytes: memory.map(|m| m.peak_reserved),
        };
        metrics.record(rank, &report);
        let reply = match tracing::info_span!("report").in_scope(|| runtime.block_on(client.report_step(report))) {
            Ok(reply) => {
                if let Some(since) = outage_since.take() {
                    tracing::info!(step, "coordinator reachable again after {:.1} s", since.elapsed().as_secs_f64());
                }
                reply
            }
            Err(e) if e.is_stale() => return Ok(GenerationEnd::Rendezvous(format!("generation {generation} ended: {e}"))),
            Err(e) if e.is_outage() => {
                if outage_since.is_none() {
                    tracing::warn!(step, "coordinator unreachable ({e}); training on, reporting again at the next step");
                    outage_since = Some(Instant::now());
                }
                StepReply::default()
            }
            Err(e) => return Err(e.into()),
        };
        state_sync::resync(held, coll.as_mut(), &reply, step, config.cluster.bucket_bytes())?;
        let last = step + 1 == total;
        let requested = reply.checkpoint_step == Some(step);
        let stop_here = requested && reply.stop_after_checkpoint;
        let every = config.checkpoint.every_steps;
        if let Some(checkpointer) = ctx.checkpointer {
            if last || requested || (every > 0 && (step + 1) % every == 0) {
                take_checkpoint(checkpointer, &held.trainer, member, step, &plan_reply.attempt_prefix, last || stop_here);
            }
        }
        if stop_here {
            tracing::warn!(step, "stopping after this checkpoint, as the coordinator asked");
            return Ok(GenerationEnd::JobOver);
        }
        if reply.stop {
            tracing::info!(step, "the coordinator asked to stop");
            return Ok(GenerationEnd::JobOver);
        }
        if reply.rendezvous_after_step == Some(step) {
            return Ok(GenerationEnd::Rendezvous(format!("membership changes after step {step}")));
        }
        if reply.rendezvous_required {
            return Ok(GenerationEnd::Rendezvous(format!("generation {generation} ended at step {step}")));
        }
    }
    Ok(GenerationEnd::JobOver)
}

/// What the CUDA caching allocator holds on `device` after a step, for the step report; `None`
/// on a CPU device, or when libtorch cannot say (warned about once per process: it would fail
/// the same way at every step).
fn device_memory(device: Device) -> Option<MemoryStats> {
    static WARNED: Once = Once::new();
    memory_stats(device).unwrap_or_else(|e| {
        WARNED.call_once(|| tracing::warn!("step reports go without GPU memory: {e}"));
        None
    })
}

/// Takes part in the checkpoint of `step`, logging how it went.
fn take_checkpoint(checkpointer: &Checkpointer, trainer: &Trainer, member: Membership, step: u64, prefix: &str, must_complete: bool) {
    let _span = tracing::info_span!("checkpoint", step).entered();
    let attempt = format!("{prefix}-s{step}");
    let state = || {
        let mut state = trainer.state();
        state.push(("train.step".into(), Tensor::from(step as i64)));
        state
    };
    match checkpointer.take(member, step, &attempt, state, must_complete) {
        Taken::Started { blocked } => tracing::info!(step, blocked_seconds = blocked.as_secs_f64(), "checkpoint started"),
        Taken::Deferred => tracing::warn!(step, "checkpoint deferred: the previous upload is still in flight"),
    }
}
