//! A generation's starting state, as the coordinator decided it (`DataPlanReply`): the newest
//! in-memory state a member holds, broadcast from that rank to all others (survivors keep
//! training without reading a checkpoint, newcomers receive the state); else a committed
//! checkpoint; else a fresh initialisation (with `[model] init_from` applied).

use braid_coordinator::config::JobConfig;
use braid_proto::DataPlanReply;
use tch::{Kind, Tensor};

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
        crate::export::init_from_open_clip(trainer, init)?;
        tracing::info!("initialised from {init}");
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
