//! The coordinator's state machine: membership, generations, the data plan's cursor,
//! checkpoint votes and the job's outcome.
//!
//! A plain synchronous struct. Time (`now`) and randomness (the attempt `nonce`) are arguments,
//! so tests drive it with a hand-moved clock. Each RPC has one method taking the request and
//! returning the reply; side effects the async shell must perform (log lines, checkpoint
//! commits) accumulate as [`Action`]s and are drained with [`Coordinator::take_actions`].
//!
//! Lifecycle of a worker: `Join` (gets a worker id) -> `Rendezvous`, polled until a generation
//! that includes it forms -> `DataPlan` (the worker has started training in that generation) ->
//! `ReportStep`/`Heartbeat`/`CommitCheckpoint` -> `Leave`. A generation ends when a member dies
//! (silent past `heartbeat_timeout_s`), leaves, asks for a new rendezvous after starting, or when
//! more workers wait than the generation holds (scale-up); its survivors are told
//! `rendezvous_required` and form the next generation with whoever else waits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_proto::{
    CheckpointRequest, CheckpointRequestReply, CheckpointVote, CheckpointVoteReply, CorruptReply, CorruptReport, DataPlanReply, DataPlanRequest, Header,
    HeartbeatReply, HeartbeatRequest, JoinReply, JoinRequest, LeaveReply, LeaveRequest, PublishBootstrapReply,
    PublishBootstrapRequest, RendezvousReply, RendezvousRequest, RendezvousState, StepReply, StepReport,
    PROTOCOL_VERSION,
};
use serde::Serialize;

use crate::config::JobConfig;
use crate::error::{Error, Result};
use crate::manifest::DatasetManifest;
use crate::plan::SamplePlan;

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    /// Steps completed by every rank of the live generation (or the committed cursor).
    pub steps_done: u64,
    /// Every worker the coordinator knows, in join order.
    pub members: Vec<MemberProgress>,
    /// Latest loss reported (rank 0's when it has reported).
    pub loss: Option<f64>,
    /// Latest learning rate reported.
    pub learning_rate: Option<f64>,
    /// Throughput: global-batch samples per second of the latest step report.
    pub samples_per_second: Option<f64>,
    /// Committed checkpoints, oldest first (including the one the job resumed from).
    pub checkpoints: Vec<CommittedCheckpoint>,
    /// Distinct samples reported corrupt and quarantined.
    pub corrupt_samples: u64,
    /// True once every rank trained the last step and the final checkpoint is committed.
    pub finished: bool,
    /// Why the job failed, if it did.
    pub failure: Option<String>,
    /// The step after which the job stopped for a preemption (its checkpoint is committed).
    pub preempted_after: Option<u64>,
}

impl Progress {
    /// True when the job finished, failed, or stopped after a preemption checkpoint.
    pub fn is_over(&self) -> bool {
        self.finished || self.failure.is_some() || self.preempted_after.is_some()
    }
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
    samples_per_second: Option<f64>,
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
    stats: Option<StepStats>,
}

#[derive(Debug, Clone)]
struct Generation {
    number: u64,
    members: Vec<String>,
    endpoints: Vec<String>,
    bootstrap: Option<Vec<u8>>,
    /// Ranks that fetched the data plan: they have started training in this generation.
    started: BTreeSet<u32>,
}

#[derive(Debug, Clone, PartialEq)]
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
    /// When the last checkpoint committed (or the job started), for `every_minutes`.
    last_commit_at: Instant,
    /// The step after which the job stopped for a preemption, once that checkpoint committed.
    preempted_after: Option<u64>,
}

/// A checkpoint the coordinator will have every rank take at a common step.
#[derive(Debug, Clone, PartialEq)]
struct RequestedCheckpoint {
    reason: String,
    stop_after: bool,
    /// The step it is taken after; fixed at the first step report after the request, as
    /// `reported + 1`: no rank can finish that step before every rank reported the one before,
    /// so every rank learns it in time.
    step: Option<u64>,
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
        Self {
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
            last_commit_at: now,
            preempted_after: None,
        }
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

    /// `RequestCheckpoint`: a checkpoint at the next step every rank can still reach; with
    /// `stop_after`, training stops once it is committed (preemption).
    pub fn request_checkpoint(&mut self, now: Instant, req: &CheckpointRequest) -> Result<CheckpointRequestReply> {
        let header = req.header.as_ref().ok_or_else(|| Error::InvalidRequest("request without a header".into()))?;
        self.check_header(Some(header))?;
        if !header.worker_id.is_empty() {
            self.touch(now, Some(header))?;
        }
        let reason = if req.reason.is_empty() { "requested".to_string() } else { req.reason.clone() };
        let step = self.checkpoint_now(reason, req.stop_after)?;
        Ok(CheckpointRequestReply { step })
    }

    /// Asks for a checkpoint at the next common step (then a stop with `stop_after`); returns
    /// the step once it is fixed. For the embedding process (`braid run` on a signal).
    pub fn checkpoint_now(&mut self, reason: String, stop_after: bool) -> Result<Option<u64>> {
        if self.is_over() {
            return Err(Error::InvalidRequest("the job is over; nothing to checkpoint".into()));
        }
        if self.config.checkpoint.url.is_none() {
            return Err(Error::InvalidRequest("this job has no checkpoint.url; nothing can be committed".into()));
        }
        self.ask_checkpoint(reason, stop_after);
        Ok(self.requested.as_ref().and_then(|r| r.step))
    }

    fn ask_checkpoint(&mut self, reason: String, stop_after: bool) {
        match &mut self.requested {
            Some(r) => {
                if stop_after && !r.stop_after {
                    r.stop_after = true;
                    r.reason = format!("{}; {reason}", r.reason);
                }
            }
            None => {
                self.log(LogLevel::Info, format!("checkpoint requested: {reason}{}", if stop_after { " (then stop)" } else { "" }));
                self.requested = Some(RequestedCheckpoint { reason, stop_after, step: None });
            }
        }
    }

    /// The newest committed checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Option<&CommittedCheckpoint> {
        self.checkpoints.last()
    }

    /// The committed cursor: the first global step a new generation trains.
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
        self.workers.insert(
            id.clone(),
            Worker {
                seq: self.next_seq,
                hostname: req.hostname.clone(),
                device: req.device.clone(),
                last_seen: now,
                endpoint: String::new(),
                status: Status::Joined,
                last_step: None,
                stats: None,
            },
        );
        self.next_seq += 1;
        self.log(
            LogLevel::Info,
            format!("worker {id} joined from {} (device {:?}, pid {})", req.hostname, req.device, req.pid),
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

    /// `Rendezvous`: polled until the worker is a rank of a formed generation.
    ///
    /// A member that has not started its generation yet (not fetched its data plan) gets its
    /// assignment again, with the bootstrap once rank 0 published it. A member that has started
    /// asks for a new generation: its generation ends and it waits for the next one.
    pub fn rendezvous(&mut self, now: Instant, req: &RendezvousRequest) -> Result<RendezvousReply> {
        let id = self.touch(now, req.header.as_ref())?;
        if self.is_over() {
            let reason = self.failure.clone().unwrap_or_else(|| "the job finished".into());
            return Ok(RendezvousReply { state: RendezvousState::JobFinished as i32, reason, ..Default::default() });
        }
        if let Status::Member { generation, rank } = self.workers[&id].status {
            let live = self.generation.as_ref().filter(|g| g.number == generation);
            match live {
                Some(g) if !g.started.contains(&rank) => return Ok(self.ready_reply(&id)),
                Some(_) => {
                    let who = self.describe(&id);
                    self.end_generation(now, format!("{who} asked for a new rendezvous"));
                }
                None => {}
            }
        }
        let worker = self.workers.get_mut(&id).expect("touched worker exists");
        worker.endpoint = req.endpoint.clone();
        if !matches!(worker.status, Status::Waiting { .. }) {
            worker.status = Status::Waiting { since: now };
        }
        self.maybe_form(now);
        if matches!(self.workers[&id].status, Status::Member { .. }) {
            return Ok(self.ready_reply(&id));
        }
        let reason = match &self.generation {
            Some(g) => format!(
                "generation {} is running with {} of max_workers = {} ranks; waiting for it to end",
                g.number,
                g.members.len(),
                self.config.cluster.max_workers
            ),
            None => self.quorum(now).1,
        };
        Ok(RendezvousReply { state: RendezvousState::Waiting as i32, reason, ..Default::default() })
    }

    fn ready_reply(&self, id: &str) -> RendezvousReply {
        let Status::Member { generation, rank } = self.workers[id].status else {
            unreachable!("ready_reply is only called for members")
        };
        let g = self.generation.as_ref().expect("a member's generation is live");
        debug_assert_eq!(g.number, generation);
        let reason = if g.bootstrap.is_none() && rank != 0 {
            "waiting for rank 0 to publish the bootstrap".to_string()
        } else {
            String::new()
        };
        RendezvousReply {
            state: RendezvousState::Ready as i32,
            generation,
            rank,
            world_size: g.members.len() as u32,
            endpoints: g.endpoints.clone(),
            bootstrap: g.bootstrap.clone().unwrap_or_default(),
            reason,
        }
    }

    /// Waiting workers in join order.
    fn waiting(&self) -> Vec<(&String, &Worker)> {
        let mut waiting: Vec<_> =
            self.workers.iter().filter(|(_, w)| matches!(w.status, Status::Waiting { .. })).collect();
        waiting.sort_by_key(|(_, w)| w.seq);
        waiting
    }

    fn waiting_since(&self) -> Option<Instant> {
        let first = self
            .workers
            .values()
            .filter_map(|w| match w.status {
                Status::Waiting { since } => Some(since),
                _ => None,
            })
            .min()?;
        Some(first.max(self.grace_floor))
    }

    /// Whether the waiting workers form a generation now: the members (join order) and why,
    /// or `None` and why not.
    fn quorum(&self, now: Instant) -> (Option<Vec<String>>, String) {
        let c = &self.config.cluster;
        let waiting = self.waiting();
        let n = waiting.len();
        if n >= c.max_workers {
            let members = waiting.iter().take(c.max_workers).map(|(id, _)| (*id).clone()).collect();
            return (Some(members), format!("max_workers = {} workers waiting", c.max_workers));
        }
        if n < c.min_workers {
            return (None, format!("{n} of min_workers = {} workers waiting", c.min_workers));
        }
        let grace = secs(c.rendezvous_grace_s);
        let waited = self.waiting_since().map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        if waited >= grace {
            let members = waiting.iter().map(|(id, _)| (*id).clone()).collect();
            return (
                Some(members),
                format!("{n} workers waiting and rendezvous_grace_s = {} passed", c.rendezvous_grace_s),
            );
        }
        (
            None,
            format!(
                "{n} workers waiting (min_workers = {}, max_workers = {}); forming in {:.1} s unless more arrive",
                c.min_workers,
                c.max_workers,
                (grace - waited).as_secs_f64()
            ),
        )
    }

    fn maybe_form(&mut self, now: Instant) {
        if self.is_over() {
            return;
        }
        if let Some(g) = &self.generation {
            let max = self.config.cluster.max_workers;
            let world = g.members.len();
            let waiting = self.waiting().len();
            if world >= max || waiting == 0 {
                return;
            }
            let waited = self.waiting_since().map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
            if world + waiting < max && waited < secs(self.config.cluster.rendezvous_grace_s) {
                return;
            }
            self.end_generation(
                now,
                format!("scale-up: {waiting} more worker(s) waiting, world_size {world} < max_workers = {max}"),
            );
        }
        if let (Some(members), reason) = self.quorum(now) {
            self.form_generation(members, reason);
        }
    }

    fn form_generation(&mut self, members: Vec<String>, reason: String) {
        self.last_generation += 1;
        let number = self.last_generation;
        let mut endpoints = Vec::with_capacity(members.len());
        for (rank, id) in members.iter().enumerate() {
            let w = self.workers.get_mut(id).expect("members are known workers");
            w.status = Status::Member { generation: number, rank: rank as u32 };
            w.last_step = None;
            w.stats = None;
            endpoints.push(w.endpoint.clone());
        }
        let roster: Vec<String> =
            members.iter().enumerate().map(|(rank, id)| format!("{rank}={id}@{}", self.workers[id].endpoint)).collect();
        self.log(
            LogLevel::Info,
            format!("generation {number} formed with {} ranks ({reason}): {}", members.len(), roster.join(", ")),
        );
        self.generation = Some(Generation { number, members, endpoints, bootstrap: None, started: BTreeSet::new() });
    }

    fn end_generation(&mut self, now: Instant, reason: String) {
        let Some(g) = self.generation.take() else { return };
        for id in &g.members {
            if let Some(w) = self.workers.get_mut(id) {
                if matches!(w.status, Status::Member { .. }) {
                    w.status = Status::Stale { generation: g.number };
                }
            }
        }
        self.grace_floor = now;
        self.rounds.retain(|_, r| r.generation != g.number || r.state != RoundState::Collecting);
        self.log(
            LogLevel::Warn,
            format!("generation {} ended: {reason}; survivors rendezvous again from step {}", g.number, self.cursor()),
        );
    }

    /// `PublishBootstrap`: rank 0 hands over its generation's collective bootstrap bytes.
    pub fn publish_bootstrap(&mut self, now: Instant, req: &PublishBootstrapRequest) -> Result<PublishBootstrapReply> {
        let id = self.touch(now, req.header.as_ref())?;
        let rank = self.live_rank(&id, req.generation)?;
        if rank != 0 {
            return Err(Error::InvalidRequest(format!(
                "worker {id} is rank {rank}; only rank 0 publishes the bootstrap"
            )));
        }
        if req.bootstrap.is_empty() {
            return Err(Error::InvalidRequest("the bootstrap is empty".into()));
        }
        let g = self.generation.as_mut().expect("live_rank checked the generation");
        match &g.bootstrap {
            Some(b) if *b != req.bootstrap => {
                return Err(Error::InvalidRequest(format!(
                    "generation {} already has a different bootstrap; rendezvous again for a new one",
                    g.number
                )))
            }
            Some(_) => {}
            None => {
                g.bootstrap = Some(req.bootstrap.clone());
                let msg =
                    format!("generation {} bootstrap published by {id} ({} bytes)", g.number, req.bootstrap.len());
                self.log(LogLevel::Info, msg);
            }
        }
        Ok(PublishBootstrapReply {})
    }

    /// `DataPlan`: what the worker's rank trains in its generation. Marks the rank as started.
    pub fn data_plan(&mut self, now: Instant, req: &DataPlanRequest) -> Result<DataPlanReply> {
        let id = self.touch(now, req.header.as_ref())?;
        let rank = self.live_rank(&id, req.generation)?;
        let g = self.generation.as_mut().expect("live_rank checked the generation");
        g.started.insert(rank);
        let world = g.members.len();
        let start_step = self.cursor();
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
            resume_manifest_url: self.latest_checkpoint().map(|c| c.manifest_url.clone()).unwrap_or_default(),
            prefetch_shards,
            quarantined: self.quarantined.iter().cloned().collect(),
            epoch,
            attempt_prefix: format!("g{}-{}", req.generation, self.nonce),
            state_source_rank: None,
        })
    }

    /// `ReportStep`: records a rank's progress; the reply says whether to stop or re-rendezvous.
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
        let stats = StepStats { loss: req.loss, learning_rate: req.learning_rate, samples_per_second };
        if self.last_report.is_none_or(|(r, _)| rank <= r) {
            self.last_report = Some((rank, stats));
        }
        let w = self.workers.get_mut(&id).expect("touched worker exists");
        w.last_step = Some(req.step);
        w.stats = Some(stats);
        if let Some(r) = self.requested.as_mut() {
            if r.step.is_none() && req.step + 1 < total {
                r.step = Some(req.step + 1);
            }
        }
        self.check_finished();
        let scheduled = self.requested.as_ref().and_then(|r| r.step.map(|s| (s, r.stop_after)));
        Ok(StepReply {
            stop: self.is_over(),
            rendezvous_required: false,
            checkpoint_step: scheduled.map(|(s, _)| s),
            stop_after_checkpoint: scheduled.is_some_and(|(_, stop)| stop),
            rendezvous_after_step: None,
        })
    }

    fn check_finished(&mut self) {
        if self.is_over() {
            return;
        }
        let Some(g) = &self.generation else { return };
        let last = self.config.train.steps - 1;
        let trained = g.members.iter().all(|id| self.workers.get(id).and_then(|w| w.last_step) == Some(last));
        let saved = self.config.checkpoint.url.is_none() || self.latest_checkpoint().is_some_and(|c| c.step >= last);
        if trained && saved {
            self.finished = true;
            let msg = format!("job finished: generation {} trained step {last} on every rank", g.number);
            self.log(LogLevel::Info, msg);
        }
    }

    /// `CommitCheckpoint`: one rank's vote for a checkpoint attempt (phase one).
    ///
    /// A yes vote may carry no parts (a rank whose state is replicated on rank 0); the attempt
    /// needs at least one part over all ranks. Part paths are relative to the checkpoint root
    /// and lie under `step-<step:06>/`.
    ///
    /// When every rank of the generation has voted yes for the same `(step, attempt)`, an
    /// [`Action::Commit`] is queued and the reply still says `committed = false`; the shell
    /// commits and answers the final voter. Any `ok = false` vote aborts the attempt.
    pub fn checkpoint_vote(&mut self, now: Instant, req: &CheckpointVote) -> Result<CheckpointVoteReply> {
        let id = self.touch(now, req.header.as_ref())?;
        let rank = self.live_rank(&id, req.generation)?;
        if self.config.checkpoint.url.is_none() {
            return Err(Error::InvalidRequest("this job has no checkpoint.url; nothing can be committed".into()));
        }
        if req.rank != rank {
            return Err(Error::InvalidRequest(format!(
                "worker {id} is rank {rank} of generation {}, the vote says rank {}",
                req.generation, req.rank
            )));
        }
        let total = self.config.train.steps;
        if req.step >= total {
            return Err(Error::InvalidRequest(format!(
                "checkpoint step {} is past the job's last step {}",
                req.step,
                total - 1
            )));
        }
        if let Some(c) = self.checkpoints.iter().find(|c| c.step == req.step) {
            return Ok(CheckpointVoteReply { committed: true, manifest_url: c.manifest_url.clone() });
        }
        if let Some(latest) = self.latest_checkpoint() {
            if req.step < latest.step {
                return Err(Error::InvalidRequest(format!(
                    "checkpoint step {} is older than the latest committed checkpoint (step {})",
                    req.step, latest.step
                )));
            }
        }
        if !path_safe(&req.attempt) {
            return Err(Error::InvalidRequest(format!(
                "attempt {:?}: use letters, digits, '-', '_' and '.'",
                req.attempt
            )));
        }
        let step_dir = format!("step-{:06}/", req.step);
        if req.ok {
            for p in &req.parts {
                let bad = !p.path.starts_with(&step_dir)
                    || p.path.contains("://")
                    || p.path.split('/').any(|s| s.is_empty() || s == "." || s == "..");
                if bad {
                    return Err(Error::InvalidRequest(format!(
                        "part path {:?} of rank {rank}: must be relative to the checkpoint root and under {step_dir}",
                        p.path
                    )));
                }
            }
        }
        let generation = req.generation;
        let world = self.generation.as_ref().expect("live_rank checked the generation").members.len();
        let round = self.rounds.entry((req.step, req.attempt.clone())).or_insert_with(|| Round {
            generation,
            votes: BTreeMap::new(),
            state: RoundState::Collecting,
        });
        if round.generation != generation {
            return Err(Error::InvalidRequest(format!(
                "attempt {:?} of step {} belongs to generation {}, not {generation}",
                req.attempt, req.step, round.generation
            )));
        }
        match &round.state {
            RoundState::Collecting => {}
            RoundState::Committed(url) => {
                return Ok(CheckpointVoteReply { committed: true, manifest_url: url.clone() })
            }
            RoundState::Committing | RoundState::Aborted(_) => return Ok(CheckpointVoteReply::default()),
        }
        if !req.ok {
            let reason =
                format!("rank {rank} voted no: {}", if req.error.is_empty() { "no reason given" } else { &req.error });
            round.state = RoundState::Aborted(reason.clone());
            self.aborted(req.step, &req.attempt, &reason);
            return Ok(CheckpointVoteReply::default());
        }
        round.votes.insert(
            rank,
            req.parts
                .iter()
                .map(|p| PlannedPart { path: p.path.clone(), sha256: p.sha256.clone(), size: p.size, rank })
                .collect(),
        );
        if round.votes.len() == world {
            let parts: Vec<PlannedPart> = round.votes.values().flatten().cloned().collect();
            if parts.is_empty() {
                let reason = "every rank voted yes but none reported a part".to_string();
                round.state = RoundState::Aborted(reason.clone());
                self.aborted(req.step, &req.attempt, &reason);
                return Ok(CheckpointVoteReply::default());
            }
            round.state = RoundState::Committing;
            let plan = CommitPlan {
                job: self.config.job.name.clone(),
                config_hash: self.config_hash.clone(),
                step: req.step,
                attempt: req.attempt.clone(),
                generation,
                world_size: world as u32,
                parts,
            };
            self.actions.push(Action::Commit(plan));
        }
        Ok(CheckpointVoteReply::default())
    }

    fn aborted(&mut self, step: u64, attempt: &str, reason: &str) {
        self.log(LogLevel::Warn, format!("checkpoint step {step} attempt {attempt} aborted: {reason}"));
        if step + 1 == self.config.train.steps {
            self.fail(format!("the final checkpoint (step {step}, attempt {attempt}) was aborted: {reason}"));
            return;
        }
        let Some(r) = self.requested.as_mut() else { return };
        if r.step == Some(step) {
            if r.stop_after {
                let why = r.reason.clone();
                self.fail(format!("the checkpoint before stopping ({why}) at step {step} was aborted: {reason}"));
            } else {
                // Taken again at a later step (e.g. rank 0's previous upload was still running).
                r.step = None;
            }
        }
    }

    /// Whether a commit of `step` should move `latest` (it is newer than every committed one).
    pub fn should_move_latest(&self, step: u64) -> bool {
        self.latest_checkpoint().is_none_or(|c| step > c.step)
    }

    /// The shell committed `plan`: its manifest is at `manifest_url`.
    pub fn commit_succeeded(&mut self, now: Instant, plan: &CommitPlan, manifest_url: String) {
        self.last_commit_at = now;
        if let Some(r) = self.requested.as_ref() {
            if r.step.is_some_and(|s| plan.step >= s) {
                if r.stop_after {
                    self.preempted_after = Some(plan.step);
                    self.log(LogLevel::Warn, format!("stopping after the checkpoint of step {} ({})", plan.step, r.reason));
                }
                self.requested = None;
            }
        }
        if let Some(round) = self.rounds.get_mut(&(plan.step, plan.attempt.clone())) {
            round.state = RoundState::Committed(manifest_url.clone());
        }
        let checkpoint = CommittedCheckpoint {
            step: plan.step,
            attempt: plan.attempt.clone(),
            generation: plan.generation,
            manifest_url: manifest_url.clone(),
        };
        let at = self.checkpoints.partition_point(|c| c.step < plan.step);
        self.checkpoints.insert(at, checkpoint);
        self.log(
            LogLevel::Info,
            format!(
                "checkpoint step {} committed ({} parts from {} ranks): {manifest_url}",
                plan.step,
                plan.parts.len(),
                plan.world_size
            ),
        );
        self.check_finished();
    }

    /// The shell could not commit `plan`; the attempt is aborted.
    pub fn commit_failed(&mut self, plan: &CommitPlan, reason: &str) {
        if let Some(round) = self.rounds.get_mut(&(plan.step, plan.attempt.clone())) {
            round.state = RoundState::Aborted(reason.to_string());
        }
        self.aborted(plan.step, &plan.attempt, reason);
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
                MemberProgress {
                    worker_id: (*id).clone(),
                    hostname: w.hostname.clone(),
                    device: w.device.clone(),
                    rank,
                    last_step: if rank.is_some() { w.last_step } else { None },
                    state,
                }
            })
            .collect();
        let ranks: Vec<&Worker> = match &self.generation {
            Some(g) => g.members.iter().filter_map(|id| self.workers.get(id)).collect(),
            None => Vec::new(),
        };
        let cursor = self.cursor();
        let steps_done = if self.finished {
            self.config.train.steps
        } else {
            ranks.iter().map(|w| w.last_step.map_or(cursor, |s| s + 1)).min().unwrap_or(cursor)
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
            learning_rate: latest.map(|s| s.learning_rate),
            samples_per_second: latest.and_then(|s| s.samples_per_second),
            checkpoints: self.checkpoints.clone(),
            corrupt_samples: self.quarantined.len() as u64,
            finished: self.finished,
            failure: self.failure.clone(),
            preempted_after: self.preempted_after,
        }
    }
}
