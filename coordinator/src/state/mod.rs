//! The coordinator's state machine: membership, generations, the data plan's start step,
//! checkpoint votes and the job's outcome.
//!
//! A plain synchronous struct. Time (`now`) and randomness (the attempt `nonce`) are arguments,
//! so tests drive it with a hand-moved clock. Each RPC has one method taking the request and
//! returning the reply; side effects the async shell must perform (log lines, checkpoint
//! commits) accumulate as [`Action`]s and are drained with [`Coordinator::take_actions`].
//!
//! Lifecycle of a worker: `Join` (gets a worker id) -> `Rendezvous`, polled until a generation
//! that includes it forms -> `DataPlan` (the worker has started training in that generation) ->
//! `ReportStep`/`Heartbeat`/`CommitCheckpoint` -> `Leave`.
//!
//! A generation ends at once when a member dies (silent past `heartbeat_timeout_s`), leaves, or
//! asks for a new rendezvous after starting. A scale-up (workers waiting to join) ends it at a
//! step boundary instead: every rank is told `rendezvous_after_step`, completes that step and
//! rendezvous again holding it. Survivors rendezvous with the step their in-memory state holds
//! (`held_step`), and the next generation starts after the newest state any member holds,
//! broadcast from that member, unless a committed checkpoint is newer. The `generation` module
//! documents both rules.
//!
//! Submodules: `generation` (rendezvous, forming and ending generations, the start step),
//! `checkpoint` (requests, votes, commits), `consistency` (replica digests and resync orders),
//! `stragglers` (slow ranks), `progress` (the read-only view) and `snapshot` (the state a
//! restarted coordinator resumes from).

mod checkpoint;
mod consistency;
mod generation;
mod progress;
mod series;
mod snapshot;
mod stragglers;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_proto::{
    CorruptReply, CorruptReport, DataPlanReply, DataPlanRequest, Header, HeartbeatReply, HeartbeatRequest, JoinReply,
    JoinRequest, LeaveReply, LeaveRequest, StepReply, StepReport, PROTOCOL_VERSION,
};
use serde::{Deserialize, Serialize};

use crate::config::JobConfig;
use crate::error::{Error, Result};
use crate::manifest::DatasetManifest;
use crate::plan::SamplePlan;

pub use consistency::{is_state_check_step, StateCheck, STATE_CHECK_MAX_WAIT};
pub use generation::StateSource;
pub use progress::{GenerationRecord, MemberProgress, MemberState, Progress, GENERATION_HISTORY};
pub use series::{CheckpointCost, StepPoint, STEP_HISTORY};
pub use snapshot::{
    CoordinatorSnapshot, GenerationMember, GenerationSnapshot, RankVote, RoundSnapshot, RoundStatus, WorkerSnapshot,
    WorkerStatus, SNAPSHOT_VERSION,
};
pub use stragglers::{
    STRAGGLER_MIN_EXCESS_S, STRAGGLER_MIN_STEPS, STRAGGLER_RATIO, STRAGGLER_RECOVER_RATIO, STRAGGLER_WINDOW,
};

/// Global steps ahead (from the start step) whose shards a data plan lists for prefetching.
pub const PREFETCH_STEPS: u64 = 4;

/// Severity of a [`Action::Log`] line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Normal progress: joins, generations, commits.
    Info,
    /// Something went wrong and the job copes: a dead worker, an aborted checkpoint.
    Warn,
    /// The job cannot go on as configured.
    Error,
}

/// Work the async shell performs on the state machine's behalf.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Emit a log line.
    Log {
        /// Severity.
        level: LogLevel,
        /// The line.
        message: String,
    },
    /// Every rank voted yes for one checkpoint attempt: verify its parts, write the manifest
    /// create-only and move `latest`, then report back with [`Coordinator::commit_succeeded`] or
    /// [`Coordinator::commit_failed`].
    Commit(CommitPlan),
}

/// A checkpoint attempt every rank voted for, ready to be committed.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitPlan {
    /// Job id.
    pub job: String,
    /// Hash of the job config ([`JobConfig::hash`]).
    pub config_hash: String,
    /// The global step the checkpoint holds (the state after that step).
    pub step: u64,
    /// The attempt id the ranks wrote under.
    pub attempt: String,
    /// Generation whose ranks wrote the parts.
    pub generation: u64,
    /// Ranks in that generation.
    pub world_size: u32,
    /// Every rank's parts, in rank order.
    pub parts: Vec<PlannedPart>,
}

/// One file of a checkpoint, as a rank reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPart {
    /// Path relative to the checkpoint root, under `step-<step:06>/`.
    pub path: String,
    /// Hex sha256 of the file.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// The rank that wrote it.
    pub rank: u32,
}

/// A checkpoint whose manifest was committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedCheckpoint {
    /// The global step it holds.
    pub step: u64,
    /// The attempt that was committed.
    pub attempt: String,
    /// Generation that wrote it.
    pub generation: u64,
    /// URL of its `manifest.json`.
    pub manifest_url: String,
}

/// A checkpoint the coordinator will have every rank take at a common step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestedCheckpoint {
    /// Who asked and why (timer, operator, preemption).
    pub reason: String,
    /// Stop the job once it is committed (preemption).
    pub stop_after: bool,
    /// The step it is taken after, once fixed (see [`common_step`]).
    pub step: Option<u64>,
}

/// A membership change (scale-up) the live generation makes at a step boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingBoundary {
    /// The generation that ends at the boundary.
    pub generation: u64,
    /// Why membership changes.
    pub reason: String,
    /// The step every rank completes before it rendezvous again, once fixed (see [`common_step`]).
    pub step: Option<u64>,
}

/// The common future step for something every rank of the live generation must do after the
/// same step (a requested checkpoint, a membership boundary), fixed at the first step report
/// after it was asked for: `reported + 1`, when that is below `limit`.
///
/// No rank can finish step `reported + 1` before every rank reported `reported` (the step's
/// collectives need every rank, and a rank reports a step before it starts the next), so every
/// rank learns it at the latest from the reply to its own report of that step.
pub fn common_step(reported: u64, limit: u64) -> Option<u64> {
    (reported + 1 < limit).then_some(reported + 1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Joined,
    Waiting { since: Instant },
    Member { generation: u64, rank: u32 },
    Stale { generation: u64 },
}

#[derive(Debug, Clone, Copy)]
struct StepStats {
    loss: f64,
    learning_rate: f64,
    grad_norm: f64,
    samples_per_second: Option<f64>,
    data_wait_seconds: f64,
    device_memory_bytes: Option<u64>,
    device_memory_peak_bytes: Option<u64>,
}

#[derive(Debug, Clone)]
struct Worker {
    seq: u64,
    hostname: String,
    device: String,
    last_seen: Instant,
    endpoint: String,
    status: Status,
    last_step: Option<u64>,
    /// The last step whose update its in-memory state holds, as its latest rendezvous said.
    held_step: Option<u64>,
    stats: Option<StepStats>,
    /// Step timings in its live generation, for straggler detection.
    timings: stragglers::StepTimings,
    /// Flagged as a straggler in its live generation.
    straggler: bool,
}

impl Worker {
    fn new(seq: u64, hostname: String, device: String, now: Instant) -> Self {
        Self {
            seq,
            hostname,
            device,
            last_seen: now,
            endpoint: String::new(),
            status: Status::Joined,
            last_step: None,
            held_step: None,
            stats: None,
            timings: stragglers::StepTimings::default(),
            straggler: false,
        }
    }
}

#[derive(Debug, Clone)]
struct Generation {
    number: u64,
    members: Vec<String>,
    endpoints: Vec<String>,
    bootstrap: Option<Vec<u8>>,
    /// Ranks that fetched the data plan: they have started training in this generation.
    started: BTreeSet<u32>,
    /// The first global step it trains and where the state before that step comes from.
    source: StateSource,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum RoundState {
    Collecting,
    Committing,
    Committed(String),
    Aborted(String),
}

#[derive(Debug, Clone)]
struct Round {
    generation: u64,
    votes: BTreeMap<u32, Vec<PlannedPart>>,
    state: RoundState,
    /// The slowest voter's time writing its parts.
    write_seconds: f64,
    /// When the last vote arrived.
    last_vote: Option<Instant>,
}

/// The coordinator's whole state. See the module documentation for the lifecycle.
#[derive(Debug)]
pub struct Coordinator {
    config: JobConfig,
    job_toml: String,
    config_hash: String,
    nonce: String,
    workers: BTreeMap<String, Worker>,
    next_seq: u64,
    last_generation: u64,
    generation: Option<Generation>,
    /// Grace for forming a generation counts from the later of the first waiting worker's
    /// arrival and this instant (the end of the previous generation), so survivors of a
    /// generation have the full grace to come back.
    grace_floor: Instant,
    dataset: Option<SamplePlan>,
    checkpoints: Vec<CommittedCheckpoint>,
    rounds: BTreeMap<(u64, String), Round>,
    quarantined: BTreeSet<String>,
    finished: bool,
    failure: Option<String>,
    actions: Vec<Action>,
    /// The latest step report of the lowest rank that reported, kept after its generation ends
    /// so the final summary still has the last loss and throughput.
    last_report: Option<(u32, StepStats)>,
    /// A checkpoint asked for by the timer, an operator or a preemption, until it commits.
    requested: Option<RequestedCheckpoint>,
    /// A scale-up the live generation makes at a step boundary.
    boundary: Option<PendingBoundary>,
    /// When the last checkpoint committed (or the job started), for `every_minutes`.
    last_commit_at: Instant,
    /// The step after which the job stopped for a preemption, once that checkpoint committed.
    preempted_after: Option<u64>,
    /// Workers that joined after the first generation formed.
    rejoins: u64,
    /// The last [`GENERATION_HISTORY`] generations, oldest first.
    history: Vec<GenerationRecord>,
    /// Why no generation is live (the quorum's reason), as of the last change.
    waiting_reason: Option<String>,
    /// The newest replica state check (see the `consistency` module).
    check: Option<consistency::CheckRound>,
    /// State checks that compared every rank's digest.
    replica_checks: u64,
    /// State checks whose digests differed (each ordered a resync).
    replica_drifts: u64,
    /// When this coordinator started.
    started_at: Instant,
    /// The recent steps as the lowest rank reported them.
    series: series::StepSeries,
    /// Checkpoints this coordinator committed.
    commits: u64,
    /// What the last of them cost.
    last_checkpoint_cost: Option<CheckpointCost>,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn path_safe(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && s != "." && s != ".."
}

impl Coordinator {
    /// A coordinator for `config` (already validated), started at `now`. `nonce` makes this
    /// coordinator's checkpoint attempt prefixes unique (`g<generation>-<nonce>`).
    pub fn new(config: JobConfig, now: Instant, nonce: impl Into<String>) -> Self {
        let job_toml = config.to_toml();
        let config_hash = config.hash();
        let mut c = Self {
            config,
            job_toml,
            config_hash,
            nonce: nonce.into(),
            workers: BTreeMap::new(),
            next_seq: 1,
            last_generation: 0,
            generation: None,
            grace_floor: now,
            dataset: None,
            checkpoints: Vec::new(),
            rounds: BTreeMap::new(),
            quarantined: BTreeSet::new(),
            finished: false,
            failure: None,
            actions: Vec::new(),
            last_report: None,
            requested: None,
            boundary: None,
            last_commit_at: now,
            preempted_after: None,
            rejoins: 0,
            history: Vec::new(),
            waiting_reason: None,
            check: None,
            replica_checks: 0,
            replica_drifts: 0,
            started_at: now,
            series: series::StepSeries::default(),
            commits: 0,
            last_checkpoint_cost: None,
        };
        c.refresh_waiting_reason(now);
        c
    }

    /// Attaches the training dataset's manifest, so data plans list the shards to prefetch.
    pub fn with_dataset(mut self, manifest: Arc<DatasetManifest>) -> Self {
        self.dataset = Some(SamplePlan::new(manifest, self.config.job.seed, self.config.data.shuffle_window_shards));
        self
    }

    /// Resumes from a committed checkpoint: the cursor moves to the step after it and data
    /// plans name its manifest. A checkpoint of the last step finishes the job at once.
    pub fn with_resume(mut self, checkpoint: CommittedCheckpoint) -> Self {
        let total = self.config.train.steps;
        self.log(
            LogLevel::Info,
            format!(
                "resuming from checkpoint step {} ({}); training continues at step {}",
                checkpoint.step,
                checkpoint.manifest_url,
                checkpoint.step + 1
            ),
        );
        if checkpoint.step + 1 >= total {
            self.finished = true;
            self.log(
                LogLevel::Info,
                format!(
                    "checkpoint step {} is the last step of train.steps = {total}: the job is already complete",
                    checkpoint.step
                ),
            );
        }
        self.checkpoints.push(checkpoint);
        self
    }

    /// The job's configuration.
    pub fn config(&self) -> &JobConfig {
        &self.config
    }

    /// Drains the actions produced since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// True when the job finished or failed.
    pub fn is_over(&self) -> bool {
        self.finished || self.failure.is_some() || self.preempted_after.is_some()
    }

    /// The newest committed checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Option<&CommittedCheckpoint> {
        self.checkpoints.last()
    }

    /// The committed cursor: the step after the newest committed checkpoint (0 without one).
    /// A new generation starts here unless a member's in-memory state is at least as new
    /// (the rule is in the `generation` module's documentation).
    pub fn cursor(&self) -> u64 {
        self.latest_checkpoint().map_or(0, |c| c.step + 1)
    }

    fn log(&mut self, level: LogLevel, message: String) {
        self.actions.push(Action::Log { level, message });
    }

    fn fail(&mut self, message: String) {
        if self.failure.is_none() {
            self.log(LogLevel::Error, format!("job failed: {message}"));
            self.failure = Some(message);
        }
    }

    /// Checks a request's header: protocol version first, then the job id.
    pub fn check_header(&self, header: Option<&Header>) -> Result<Header> {
        self.check_header_of(header, false)
    }

    /// [`Coordinator::check_header`]; with `any_job`, an empty job id is accepted (a `Join`
    /// from a worker that learns its job from the reply).
    fn check_header_of(&self, header: Option<&Header>, any_job: bool) -> Result<Header> {
        let header = header.ok_or_else(|| Error::InvalidRequest("the request has no header".into()))?;
        if header.protocol_version != PROTOCOL_VERSION {
            return Err(Error::ProtocolMismatch { expected: PROTOCOL_VERSION, got: header.protocol_version });
        }
        if header.job_id != self.config.job.name && !(any_job && header.job_id.is_empty()) {
            return Err(Error::JobMismatch { expected: self.config.job.name.clone(), got: header.job_id.clone() });
        }
        Ok(header.clone())
    }

    /// Checks the header, finds the worker it names and records that it is alive.
    fn touch(&mut self, now: Instant, header: Option<&Header>) -> Result<String> {
        let header = self.check_header(header)?;
        let worker =
            self.workers.get_mut(&header.worker_id).ok_or_else(|| Error::UnknownWorker(header.worker_id.clone()))?;
        worker.last_seen = now;
        Ok(header.worker_id)
    }

    /// The worker's rank when it is a member of the live generation numbered `generation`.
    fn live_rank(&self, id: &str, generation: u64) -> Result<u32> {
        let current = match self.workers[id].status {
            Status::Member { generation: g, rank } if self.live_number() == Some(g) => {
                if g == generation {
                    return Ok(rank);
                }
                Some(g)
            }
            _ => None,
        };
        Err(Error::StaleGeneration { worker: id.to_string(), got: generation, current })
    }

    fn live_number(&self) -> Option<u64> {
        self.generation.as_ref().map(|g| g.number)
    }

    /// The live generation's number and world size, if one is live.
    pub fn live_generation(&self) -> Option<(u64, usize)> {
        self.generation.as_ref().map(|g| (g.number, g.members.len()))
    }

    fn describe(&self, id: &str) -> String {
        match self.workers.get(id) {
            Some(w) => match w.status {
                Status::Member { rank, .. } => format!("{id} ({}, rank {rank})", w.hostname),
                _ => format!("{id} ({})", w.hostname),
            },
            None => id.to_string(),
        }
    }

    /// `Join`: registers a worker and hands it the job file. An empty job id in the header is
    /// accepted here (the worker learns the job from the reply); every other RPC must name it.
    pub fn join(&mut self, now: Instant, req: &JoinRequest) -> Result<JoinReply> {
        self.check_header_of(req.header.as_ref(), true)?;
        let id = format!("w-{}", self.next_seq);
        // A worker without a device override trains on the job's `cluster.device`.
        let device = if req.device.is_empty() { self.config.cluster.device.clone() } else { req.device.clone() };
        self.workers.insert(id.clone(), Worker::new(self.next_seq, req.hostname.clone(), device.clone(), now));
        self.next_seq += 1;
        let rejoin = if self.last_generation > 0 {
            self.rejoins += 1;
            format!("; joins after generation 1 formed: {}", self.rejoins)
        } else {
            String::new()
        };
        self.log(
            LogLevel::Info,
            format!("worker {id} joined from {} (device {device:?}, pid {}){rejoin}", req.hostname, req.pid),
        );
        let interval = secs(self.config.cluster.heartbeat_timeout_s / 5.0)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        Ok(JoinReply {
            worker_id: id,
            job_toml: self.job_toml.clone(),
            heartbeat_interval_ms: interval.as_millis() as u64,
        })
    }

    /// `Heartbeat`: liveness. Says whether the worker's generation ended and whether the job is over.
    pub fn heartbeat(&mut self, now: Instant, req: &HeartbeatRequest) -> Result<HeartbeatReply> {
        let id = self.touch(now, req.header.as_ref())?;
        let (generation, rendezvous_required) = match self.workers[&id].status {
            Status::Member { generation, .. } => (generation, false),
            Status::Stale { generation } => (generation, !self.is_over()),
            Status::Joined | Status::Waiting { .. } => (0, false),
        };
        Ok(HeartbeatReply { generation, rendezvous_required, job_finished: self.is_over() })
    }

    /// `DataPlan`: what the worker's rank trains in its generation. Marks the rank as started.
    ///
    /// The start step and the state source were fixed when the generation formed: either
    /// `state_source_rank` (that rank broadcasts its in-memory state, `resume_manifest_url` is
    /// empty) or `resume_manifest_url` (every rank restores it; empty for a fresh start). A
    /// checkpoint newer than that start which commits before any rank fetched its plan (a
    /// commit still in flight from the previous generation) moves the start to it.
    pub fn data_plan(&mut self, now: Instant, req: &DataPlanRequest) -> Result<DataPlanReply> {
        let id = self.touch(now, req.header.as_ref())?;
        let rank = self.live_rank(&id, req.generation)?;
        self.catch_up_before_start();
        let g = self.generation.as_mut().expect("live_rank checked the generation");
        g.started.insert(rank);
        let world = g.members.len();
        let source = g.source.clone();
        let start_step = source.start_step();
        let total = self.config.train.steps;
        let global_batch = self.config.train.global_batch;
        let (epoch, prefetch_shards) = match self.dataset.as_mut() {
            Some(plan) => {
                let epoch = start_step * global_batch as u64 / plan.epoch_len();
                let mut shards = Vec::new();
                for step in start_step..(start_step + PREFETCH_STEPS).min(total) {
                    for s in plan.rank_batch(step, global_batch, rank as usize, world) {
                        if !shards.contains(&s.sample.shard) {
                            shards.push(s.sample.shard);
                        }
                    }
                }
                (epoch, shards)
            }
            None => (0, Vec::new()),
        };
        Ok(DataPlanReply {
            manifest_url: self.config.data.train.clone(),
            seed: self.config.job.seed,
            global_batch: global_batch as u64,
            start_step,
            total_steps: total,
            resume_manifest_url: source.manifest_url().unwrap_or_default().to_string(),
            prefetch_shards,
            quarantined: self.quarantined.iter().cloned().collect(),
            epoch,
            attempt_prefix: format!("g{}-{}", req.generation, self.nonce),
            state_source_rank: source.rank(),
        })
    }

    /// `ReportStep`: records a rank's progress; the reply says whether to stop or re-rendezvous.
    ///
    /// At a state check step the report's `state_digest` is recorded (a digest at another step
    /// is refused); the verdict is not part of this reply: ask [`Coordinator::state_check`]
    /// until it is no longer pending and [`StateCheck::fill`] the reply with it.
    pub fn report_step(&mut self, now: Instant, req: &StepReport) -> Result<StepReply> {
        let id = self.touch(now, req.header.as_ref())?;
        if self.is_over() {
            return Ok(StepReply { stop: true, ..Default::default() });
        }
        if self.live_rank(&id, req.generation).is_err() {
            return Ok(StepReply { rendezvous_required: true, ..Default::default() });
        }
        let total = self.config.train.steps;
        if req.step >= total {
            return Err(Error::InvalidRequest(format!(
                "step {} is past the job's last step {} (train.steps = {total})",
                req.step,
                total - 1
            )));
        }
        // `samples` counts the whole global batch, so this is already the job's throughput.
        let samples_per_second = (req.step_seconds > 0.0).then(|| req.samples as f64 / req.step_seconds);
        let rank = self.live_rank(&id, req.generation)?;
        let world = self.generation.as_ref().map_or(0, |g| g.members.len());
        self.record_digest(now, req.generation, world, rank, req.step, &req.state_digest)?;
        let stats = StepStats {
            loss: req.loss,
            learning_rate: req.learning_rate,
            grad_norm: req.grad_norm,
            samples_per_second,
            data_wait_seconds: req.data_wait_seconds,
            device_memory_bytes: req.device_memory_bytes,
            device_memory_peak_bytes: req.device_memory_peak_bytes,
        };
        if self.last_report.is_none_or(|(r, _)| rank <= r) {
            self.last_report = Some((rank, stats));
        }
        if rank == 0 {
            self.series.push(StepPoint {
                step: req.step,
                generation: req.generation,
                elapsed_seconds: now.saturating_duration_since(self.started_at).as_secs_f64(),
                loss: req.loss,
                loss_terms: req.loss_terms.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                learning_rate: req.learning_rate,
                grad_norm: req.grad_norm,
                samples_per_second,
                data_wait_seconds: req.data_wait_seconds,
            });
        }
        let w = self.workers.get_mut(&id).expect("touched worker exists");
        w.last_step = Some(req.step);
        w.stats = Some(stats);
        w.timings.push(req.step_seconds, req.collective_wait_seconds);
        self.update_stragglers();
        if let Some(r) = self.requested.as_mut() {
            if r.step.is_none() {
                r.step = common_step(req.step, total);
            }
        }
        // A boundary never falls on the last step: the job ends there anyway.
        if let Some(b) = self.boundary.as_mut().filter(|b| b.step.is_none() && b.generation == req.generation) {
            b.step = common_step(req.step, total - 1);
            if let Some(step) = b.step {
                let msg = format!(
                    "generation {} changes membership after step {step} ({}): every rank completes it and rendezvous again",
                    b.generation, b.reason
                );
                self.log(LogLevel::Info, msg);
            }
        }
        self.check_finished();
        let scheduled = self.requested.as_ref().and_then(|r| r.step.map(|s| (s, r.stop_after)));
        Ok(StepReply {
            stop: self.is_over(),
            rendezvous_required: false,
            checkpoint_step: scheduled.map(|(s, _)| s),
            stop_after_checkpoint: scheduled.is_some_and(|(_, stop)| stop),
            rendezvous_after_step: self.boundary_step(),
            ..Default::default()
        })
    }

    /// `ReportCorrupt`: quarantines a sample (or a whole shard when no key is given).
    pub fn report_corrupt(&mut self, now: Instant, req: &CorruptReport) -> Result<CorruptReply> {
        let id = self.touch(now, req.header.as_ref())?;
        let key = if req.sample_key.is_empty() { req.shard.clone() } else { req.sample_key.clone() };
        if key.is_empty() {
            return Err(Error::InvalidRequest("a corrupt report names neither a shard nor a sample".into()));
        }
        let new = self.quarantined.insert(key.clone());
        let count = self.quarantined.len() as u64;
        let limit = self.config.data.max_corrupt_samples;
        if new {
            self.log(
                LogLevel::Warn,
                format!(
                    "worker {id} reports sample {key:?} of shard {} corrupt: {} ({count} of {limit} allowed)",
                    req.shard, req.reason
                ),
            );
        }
        let over_limit = count > limit;
        if over_limit {
            self.fail(format!(
                "{count} corrupt samples exceed data.max_corrupt_samples = {limit}; the last was {key:?} in shard {} ({})",
                req.shard, req.reason
            ));
        }
        Ok(CorruptReply { over_limit })
    }

    /// `Leave`: the worker is gone; if it was a rank of the live generation, that generation ends.
    pub fn leave(&mut self, now: Instant, req: &LeaveRequest) -> Result<LeaveReply> {
        let id = self.touch(now, req.header.as_ref())?;
        let who = self.describe(&id);
        self.remove(
            now,
            &id,
            format!("{who} left ({})", if req.reason.is_empty() { "no reason given" } else { &req.reason }),
        );
        Ok(LeaveReply {})
    }

    fn remove(&mut self, now: Instant, id: &str, reason: String) {
        let Some(w) = self.workers.remove(id) else { return };
        let member_of_live =
            matches!(w.status, Status::Member { generation, .. } if self.live_number() == Some(generation));
        if member_of_live && !self.is_over() {
            self.end_generation(now, reason);
        } else {
            self.log(LogLevel::Info, reason);
            self.refresh_waiting_reason(now);
        }
    }

    /// Periodic work: declares silent workers dead, forms generations whose grace passed and
    /// asks for the `every_minutes` checkpoint.
    pub fn tick(&mut self, now: Instant) {
        let minutes = self.config.checkpoint.every_minutes;
        let due = minutes > 0.0 && now.saturating_duration_since(self.last_commit_at) >= secs(minutes * 60.0);
        if due && self.requested.is_none() && self.generation.is_some() && !self.is_over() {
            self.ask_checkpoint(format!("checkpoint.every_minutes = {minutes}"), false);
        }
        let timeout = secs(self.config.cluster.heartbeat_timeout_s);
        let dead: Vec<(String, Duration)> = self
            .workers
            .iter()
            .map(|(id, w)| (id.clone(), now.saturating_duration_since(w.last_seen)))
            .filter(|(_, silent)| *silent > timeout)
            .collect();
        for (id, silent) in dead {
            let who = self.describe(&id);
            let reason = format!(
                "{who} silent for {:.1} s > heartbeat_timeout_s = {}: declared dead",
                silent.as_secs_f64(),
                self.config.cluster.heartbeat_timeout_s
            );
            self.remove(now, &id, reason);
        }
        self.maybe_form(now);
    }
}
