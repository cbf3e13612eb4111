//! What the job looks like from outside: [`Progress`] for progress bars, `/status` and the
//! final summary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{CheckpointCost, CommittedCheckpoint, Coordinator, Status, StepPoint, Worker};

/// Generations kept in [`Progress::generation_history`] (the newest).
pub const GENERATION_HISTORY: usize = 100;

/// One generation of the job, as [`Progress::generation_history`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationRecord {
    /// Its number.
    pub number: u64,
    /// Its ranks.
    pub world_size: u32,
    /// The first global step it trained.
    pub start_step: u64,
    /// Where its state came from: `memory:rank<r>`, `checkpoint:step <n>` or `fresh`.
    pub source: String,
    /// Why it formed (the quorum's reason).
    pub formed: String,
    /// Why it ended; `None` while it is live (or when the job ended with it).
    pub ended: Option<String>,
}

/// What a member of the job is doing, as shown in [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Joined, has not asked for a rendezvous yet.
    Joined,
    /// In rendezvous, waiting for a generation to form.
    Waiting,
    /// A rank of the live generation.
    Training,
    /// Its generation ended; it must rendezvous again.
    RendezvousRequired,
}

/// One worker in a [`Progress`] snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberProgress {
    /// Worker id (`w-<n>`).
    pub worker_id: String,
    /// Host it runs on.
    pub hostname: String,
    /// Its device (`cpu`, `cuda:0`, ...).
    pub device: String,
    /// Rank in the live generation, if it is a member.
    pub rank: Option<u32>,
    /// Last global step it reported in the live generation.
    pub last_step: Option<u64>,
    /// What it is doing.
    pub state: MemberState,
    /// The last step its in-memory state holds, as its latest rendezvous said.
    pub held_step: Option<u64>,
    /// Flagged as a straggler in the live generation (see [`STRAGGLER_RATIO`](super::STRAGGLER_RATIO)).
    pub straggler: bool,
    /// Median step time over its recent steps in the live generation.
    pub step_seconds: Option<f64>,
    /// Median time per step spent waiting in collectives, over the same steps.
    pub collective_wait_seconds: Option<f64>,
    /// Seconds its latest step waited for data.
    pub data_wait_seconds: Option<f64>,
    /// Bytes its CUDA caching allocator had reserved from the device after its latest step;
    /// `None` on a CPU device.
    pub device_memory_bytes: Option<u64>,
    /// The most its allocator has reserved since the worker process started.
    pub device_memory_peak_bytes: Option<u64>,
}

/// A read-only snapshot of the job for progress bars, `/status` and the final summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    /// Job id.
    pub job: String,
    /// The live generation; 0 while none is formed.
    pub generation: u64,
    /// Ranks in the live generation; 0 while none is formed.
    pub world_size: u32,
    /// Optimizer steps the job trains (`train.steps`).
    pub total_steps: u64,
    /// Steps completed by every rank of the live generation (counted from its start step);
    /// while none is live, the step the next generation would start at.
    pub steps_done: u64,
    /// Every worker the coordinator knows, in join order.
    pub members: Vec<MemberProgress>,
    /// Latest loss reported (rank 0's when it has reported).
    pub loss: Option<f64>,
    /// The latest loss's terms by objective (rank 0's latest report).
    pub loss_terms: BTreeMap<String, f64>,
    /// Latest learning rate reported.
    pub learning_rate: Option<f64>,
    /// Latest gradient norm (before clipping) reported.
    pub grad_norm: Option<f64>,
    /// Seconds the latest reported step waited for data.
    pub data_wait_seconds: Option<f64>,
    /// Throughput: global-batch samples per second of the latest step report.
    pub samples_per_second: Option<f64>,
    /// Committed checkpoints, oldest first (including the one the job resumed from).
    pub checkpoints: Vec<CommittedCheckpoint>,
    /// Checkpoints this coordinator committed.
    pub checkpoints_committed: u64,
    /// What the last checkpoint this coordinator committed cost.
    pub last_checkpoint: Option<CheckpointCost>,
    /// Distinct samples reported corrupt and quarantined.
    pub corrupt_samples: u64,
    /// True once every rank trained the last step and the final checkpoint is committed.
    pub finished: bool,
    /// Why the job failed, if it did.
    pub failure: Option<String>,
    /// The step after which the job stopped for a preemption (its checkpoint is committed).
    pub preempted_after: Option<u64>,
    /// Why no generation is live (e.g. fewer than `min_workers` waiting); `None` while one is
    /// live or the job is over.
    pub waiting_reason: Option<String>,
    /// Workers that joined after the first generation formed (restarted or added workers).
    pub rejoins: u64,
    /// Generations formed since the job started.
    pub generations: u64,
    /// The last [`GENERATION_HISTORY`] generations, oldest first.
    pub generation_history: Vec<GenerationRecord>,
    /// Replica state checks that compared every rank's digest (`train.ema_check_every`).
    pub replica_checks: u64,
    /// Of those, the checks whose digests differed: a rank had drifted and every rank took
    /// the reference rank's state by broadcast.
    pub replica_drifts: u64,
    /// The last [`STEP_HISTORY`](super::STEP_HISTORY) steps as rank 0 reported them, oldest
    /// first (for charts).
    pub recent_steps: Vec<StepPoint>,
}

impl Progress {
    /// True when the job finished, failed, or stopped after a preemption checkpoint.
    pub fn is_over(&self) -> bool {
        self.finished || self.failure.is_some() || self.preempted_after.is_some()
    }
}

impl Coordinator {
    /// A snapshot of the job for progress displays.
    pub fn progress(&self) -> Progress {
        let mut workers: Vec<(&String, &Worker)> = self.workers.iter().collect();
        workers.sort_by_key(|(_, w)| w.seq);
        let live = self.live_number();
        let members: Vec<MemberProgress> = workers
            .iter()
            .map(|(id, w)| {
                let (rank, state) = match w.status {
                    Status::Joined => (None, MemberState::Joined),
                    Status::Waiting { .. } => (None, MemberState::Waiting),
                    Status::Member { generation, rank } if live == Some(generation) => {
                        (Some(rank), MemberState::Training)
                    }
                    Status::Member { .. } | Status::Stale { .. } => (None, MemberState::RendezvousRequired),
                };
                let live = rank.is_some();
                MemberProgress {
                    worker_id: (*id).clone(),
                    hostname: w.hostname.clone(),
                    device: w.device.clone(),
                    rank,
                    last_step: if live { w.last_step } else { None },
                    state,
                    held_step: w.held_step,
                    straggler: live && w.straggler,
                    step_seconds: if live { w.timings.step_seconds() } else { None },
                    collective_wait_seconds: if live { w.timings.collective_wait_seconds() } else { None },
                    data_wait_seconds: if live { w.stats.map(|s| s.data_wait_seconds) } else { None },
                    device_memory_bytes: if live { w.stats.and_then(|s| s.device_memory_bytes) } else { None },
                    device_memory_peak_bytes: if live { w.stats.and_then(|s| s.device_memory_peak_bytes) } else { None },
                }
            })
            .collect();
        let ranks: Vec<&Worker> = match &self.generation {
            Some(g) => g.members.iter().filter_map(|id| self.workers.get(id)).collect(),
            None => Vec::new(),
        };
        let total = self.config.train.steps;
        let steps_done = match &self.generation {
            _ if self.finished => total,
            Some(g) => {
                let start = g.source.start_step();
                ranks.iter().map(|w| w.last_step.map_or(start, |s| s + 1)).min().unwrap_or(start)
            }
            None => {
                let held = self.workers.values().filter_map(|w| w.held_step).map(|h| h + 1).max();
                held.unwrap_or(0).max(self.cursor()).min(total)
            }
        };
        let latest = ranks
            .first()
            .and_then(|w| w.stats)
            .or_else(|| ranks.iter().find_map(|w| w.stats))
            .or(self.last_report.map(|(_, s)| s));
        Progress {
            job: self.config.job.name.clone(),
            generation: live.unwrap_or(0),
            world_size: self.generation.as_ref().map_or(0, |g| g.members.len() as u32),
            total_steps: self.config.train.steps,
            steps_done,
            members,
            loss: latest.map(|s| s.loss),
            loss_terms: self.series.latest().map(|p| p.loss_terms.clone()).unwrap_or_default(),
            learning_rate: latest.map(|s| s.learning_rate),
            grad_norm: latest.map(|s| s.grad_norm),
            data_wait_seconds: latest.map(|s| s.data_wait_seconds),
            samples_per_second: latest.and_then(|s| s.samples_per_second),
            checkpoints: self.checkpoints.clone(),
            checkpoints_committed: self.commits,
            last_checkpoint: self.last_checkpoint_cost,
            corrupt_samples: self.quarantined.len() as u64,
            finished: self.finished,
            failure: self.failure.clone(),
            preempted_after: self.preempted_after,
            waiting_reason: if self.generation.is_none() && !self.is_over() {
                self.waiting_reason.clone()
            } else {
                None
            },
            rejoins: self.rejoins,
            generations: self.last_generation,
            generation_history: self.history.clone(),
            replica_checks: self.replica_checks,
            replica_drifts: self.replica_drifts,
            recent_steps: self.series.points(),
        }
    }
}
