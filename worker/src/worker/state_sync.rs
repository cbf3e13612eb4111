//! A generation's starting state, as the coordinator decided it (`DataPlanReply`): the newest
//! in-memory state a member holds, broadcast from that rank to all others (survivors keep
//! training without reading a checkpoint, newcomers receive the state); else a committed
//! checkpoint; else a fresh initialisation (with `[model] init_from` applied).
//!
//! Also the worker's side of the replica consistency check (DESIGN.md, "EMA / momentum
//! state"): the digest a rank reports at state check steps, the resync the coordinator orders
//! when digests differ, and the `corrupt-momentum` failpoint that makes a replica drift.

use braid_coordinator::config::JobConfig;
use braid_proto::{DataPlanReply, StepReply};
use tch::{Kind, Tensor};

use super::generation::Held;
use super::WorkerError;
use crate::checkpoint::CheckpointStore;
use crate::collective::{broadcast_buckets, Collective};
use crate::trainer::{Trainer, TrainError};

/// Where this generation's state came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// Broadcast from the rank that held the newest state.
    Memory {
        /// The broadcasting rank.
        rank: usize,
    },
    /// Read from a committed checkpoint.
    Checkpoint {
        /// Its manifest.
        url: String,
    },
    /// A fresh initialisation.
    Fresh,
}

/// Brings `trainer` to the generation's starting state. `pristine` says whether it still holds
/// its seeded initial values (a fresh start then needs no re-initialisation).
pub fn restore(
    plan: &DataPlanReply,
    trainer: &mut Trainer,
    pristine: bool,
    coll: &mut dyn Collective,
    config: &JobConfig,
    checkpoints: Option<&CheckpointStore>,
    rebuild: impl FnOnce() -> Result<Trainer, TrainError>,
) -> Result<Origin, WorkerError> {
    if let Some(root) = plan.state_source_rank {
        let root = root as usize;
        broadcast_state(trainer, coll, root, config.cluster.bucket_bytes())?;
        return Ok(Origin::Memory { rank: root });
    }
    if !plan.resume_manifest_url.is_empty() {
        let store = checkpoints.ok_or_else(|| WorkerError::Protocol("resume without a checkpoint url".into()))?;
        let (manifest, tensors) = store.read_checkpoint(&plan.resume_manifest_url)?;
        trainer.load_state(tensors, &plan.resume_manifest_url)?;
        tracing::info!(step = manifest.step, "resumed from {}", plan.resume_manifest_url);
        return Ok(Origin::Checkpoint { url: plan.resume_manifest_url.clone() });
    }
    if !pristine {
        *trainer = rebuild()?;
    }
    if let Some(init) = &config.model.init_from {
        let kept = crate::init_from::init_from(trainer, init)?;
        if kept.is_empty() {
            tracing::info!("initialised from {init}");
        } else {
            tracing::info!(kept_initialisation = kept.len(), "initialised from {init}; the layout lacks {}", kept.join(", "));
        }
    }
    Ok(Origin::Fresh)
}

/// Every rank takes rank `root`'s model, optimizer and family state (momentum encoders,
/// queues). Integer and boolean tensors (the optimizer's step count, queue pointers and valid
/// flags) travel as float64 on the device: exact below 2^53.
pub fn broadcast_state(trainer: &mut Trainer, coll: &mut dyn Collective, root: usize, bucket_bytes: usize) -> Result<(), WorkerError> {
    let device = trainer.device();
    let mut names = Vec::new();
    let mut wire = Vec::new();
    for (name, t) in trainer.state() {
        let kind = t.kind();
        let float = matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16);
        wire.push(if float { t.to_device(device).copy() } else { t.to_kind(Kind::Double).to_device(device) });
        names.push((name, kind, t.device(), float));
    }
    broadcast_buckets(coll, &mut wire, bucket_bytes, root)?;
    let received: Vec<(String, Tensor)> = names
        .into_iter()
        .zip(wire)
        .map(|((name, kind, home, float), t)| {
            let t = if float { t } else { t.to_kind(kind).to_device(home) };
            (name, t)
        })
        .collect();
    trainer.load_state(received, &format!("rank {root}'s state"))?;
    Ok(())
}

/// The digest of this rank's replicated state to report after `step`: at state check steps
/// ([`is_state_check_step`](braid_coordinator::state::is_state_check_step)) of a generation
/// of more than one rank; empty otherwise (a single replica has nothing to agree with).
pub fn check_digest(trainer: &Trainer, config: &JobConfig, step: u64, world_size: usize) -> String {
    if world_size > 1 && braid_coordinator::state::is_state_check_step(&config.train, step) {
        trainer.replica_digest()
    } else {
        String::new()
    }
}

/// Carries out the coordinator's resync order in the reply to the report of `step`, if it
/// holds one: every rank takes rank `resync_from_rank`'s state by broadcast before the next
/// step. A drifted rank whose resync fails forgets which step it holds, so its state never
/// seeds a later generation.
pub fn resync(held: &mut Held, coll: &mut dyn Collective, reply: &StepReply, step: u64, bucket_bytes: usize) -> Result<(), WorkerError> {
    let Some(source) = reply.resync_from_rank else { return Ok(()) };
    let rank = coll.rank();
    let drifted = reply.drifted_ranks.contains(&(rank as u32));
    if drifted {
        tracing::warn!(rank, step, "this rank's state digest differed from rank {source}'s: its replica drifted");
    }
    if let Err(e) = broadcast_state(&mut held.trainer, coll, source as usize, bucket_bytes) {
        if drifted {
            held.step = None;
        }
        return Err(e);
    }
    tracing::warn!(rank, step, drifted_ranks = ?reply.drifted_ranks, "resynchronised from rank {source} before step {}", step + 1);
    Ok(())
}

/// The `corrupt-momentum` failpoint: adds a deterministic perturbation (a sine pattern whose
/// phase depends on the rank, 5% of each tensor's mean magnitude; the random generators are
/// left alone, so the run stays reproducible) to every momentum encoder tensor of this rank, or
/// to every parameter when the family keeps no momentum encoder (CLIP).
pub fn corrupt_momentum(trainer: &Trainer, rank: usize, step: u64) {
    let state = trainer.state();
    let momentum = state.iter().any(|(name, _)| name.starts_with("momentum."));
    let prefix = if momentum { "momentum." } else { "model." };
    let mut perturbed = 0;
    tch::no_grad(|| {
        for (_, t) in state.iter().filter(|(name, _)| name.starts_with(prefix)) {
            if !t.is_floating_point() || t.numel() == 0 {
                continue;
            }
            let scale = t.to_kind(Kind::Double).abs().mean(Kind::Double).double_value(&[]) * 0.05 + 1e-4;
            let n = t.numel() as i64;
            let pattern = (Tensor::arange(n, (Kind::Double, t.device())) * 0.7 + (0.3 + rank as f64)).sin() * scale;
            let mut target = t.shallow_clone();
            target += pattern.reshape(t.size()).to_kind(t.kind());
            perturbed += 1;
        }
    });
    tracing::error!(
        rank,
        step,
        tensors = perturbed,
        "FAILPOINT corrupt-momentum: perturbed this rank's {} tensors on purpose after the update of step {step}",
        if momentum { "momentum encoder" } else { "parameter (the family keeps no momentum encoder)" }
    );
}
