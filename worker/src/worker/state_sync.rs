//! A generation's starting state, as the coordinator decided it (`DataPlanReply`): the newest
//! in-memory state a member holds, broadcast from that rank to all others (survivors keep
//! training without reading a checkpoint, newcomers receive the state); else a committed
//! checkpoint; else a fresh initialisation (with `[model] init_from` applied).

use braid_coordinator::config::JobConfig;
use braid_proto::DataPlanReply;
use tch::{Device, Kind, Tensor};

use super::WorkerError;
use crate::checkpoint::CheckpointStore;
use crate::collective::{broadcast_buckets, Collective};
use crate::trainer::{ClipTrainer, TrainError};

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
    trainer: &mut ClipTrainer,
    pristine: bool,
    coll: &mut dyn Collective,
    config: &JobConfig,
    checkpoints: Option<&CheckpointStore>,
    rebuild: impl FnOnce() -> Result<ClipTrainer, TrainError>,
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
        crate::export::init_from_open_clip(trainer, init)?;
        tracing::info!("initialised from {init}");
    }
    Ok(Origin::Fresh)
}

/// Every rank takes rank `root`'s model and optimizer state (the optimizer's step count
/// travels as a float64 on the device: exact below 2^53).
pub fn broadcast_state(trainer: &mut ClipTrainer, coll: &mut dyn Collective, root: usize, bucket_bytes: usize) -> Result<(), WorkerError> {
    let device = trainer.device();
    let (names, mut tensors): (Vec<String>, Vec<Tensor>) = trainer
        .state()
        .into_iter()
        .map(|(name, t)| {
            let wire = if t.kind() == Kind::Int64 { t.to_kind(Kind::Double).to_device(device) } else { t.to_device(device).copy() };
            (name, wire)
        })
        .unzip();
    broadcast_buckets(coll, &mut tensors, bucket_bytes, root)?;
    let received: Vec<(String, Tensor)> = names
        .into_iter()
        .zip(tensors)
        .map(|(name, t)| {
            let t = if name == "optim.step" { t.to_kind(Kind::Int64).to_device(Device::Cpu) } else { t };
            (name, t)
        })
        .collect();
    trainer.load_state(received, &format!("rank {root}'s state"))?;
    Ok(())
}
