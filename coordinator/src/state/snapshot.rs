//! The state a restarted coordinator resumes a job from, without restarting its workers.
//!
//! [`Coordinator::snapshot`] captures everything that decides the job's future replies:
//! membership (worker ids, ranks, endpoints), the live generation and where it started,
//! checkpoints and votes in flight, quarantined samples, pending requests and boundaries, and
//! the outcome. It holds no clock readings: [`Coordinator::restore`] treats every worker as
//! seen at the restore instant, so a worker that died with the old coordinator is declared dead
//! one `heartbeat_timeout_s` later, and the survivors keep their ids and ranks.
//!
//! Not kept: the latest loss and throughput (the next step report brings them), step timings for
//! straggler detection (they refill within [`STRAGGLER_WINDOW`](super::STRAGGLER_WINDOW) steps),
//! a replica state check still collecting digests (its waiting reports fail with the old
//! coordinator and the next check looks again) and the dataset manifest (attach it again with
//! [`Coordinator::with_dataset`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{
    Action, CommitPlan, CommittedCheckpoint, Coordinator, Generation, GenerationRecord, LogLevel, PendingBoundary,
    PlannedPart, RequestedCheckpoint, Round, RoundState, StateSource, Status, Worker,
};
use crate::config::JobConfig;
use crate::error::{Error, Result};

/// Version of the [`CoordinatorSnapshot`] layout; [`Coordinator::restore`] refuses others.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Everything a restarted coordinator needs to continue a job. Serialisable (JSON in the
/// journal); see the module documentation for what it leaves out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CoordinatorSnapshot {
    /// [`SNAPSHOT_VERSION`] of the coordinator that took it.
    pub version: u32,
    /// Hash of the job config ([`JobConfig::hash`]); a restore with another config is refused.
    pub config_hash: String,
    /// The attempt nonce of the coordinator that started the job (attempt prefixes stay stable).
    pub nonce: String,
    /// The sequence number the next worker to join gets (`w-<next_seq>`).
    pub next_seq: u64,
    /// The number of the newest generation formed.
    pub last_generation: u64,
    /// The live generation, if one is.
    pub generation: Option<GenerationSnapshot>,
    /// Every known worker, in join order.
    pub workers: Vec<WorkerSnapshot>,
    /// Committed checkpoints, oldest first.
    pub checkpoints: Vec<CommittedCheckpoint>,
    /// Checkpoint attempts with votes (collecting, committing, committed or aborted).
    pub rounds: Vec<RoundSnapshot>,
    /// Sample keys (or shards) quarantined as corrupt.
    pub quarantined: Vec<String>,
    /// A checkpoint asked for and not committed yet.
    pub requested: Option<RequestedCheckpoint>,
    /// A scale-up the live generation makes at a step boundary.
    pub boundary: Option<PendingBoundary>,
    /// Every rank trained the last step and the final checkpoint is committed.
    pub finished: bool,
    /// Why the job failed, if it did.
    pub failure: Option<String>,
    /// The step after which the job stopped for a preemption.
    pub preempted_after: Option<u64>,
    /// Workers that joined after the first generation formed.
    pub rejoins: u64,
    /// The last generations, oldest first.
    pub generation_history: Vec<GenerationRecord>,
    /// Replica state checks that compared every rank's digest (absent in older journals: 0).
    #[serde(default)]
    pub replica_checks: u64,
    /// Of those, the checks that found a drifted rank (absent in older journals: 0).
    #[serde(default)]
    pub replica_drifts: u64,
}

/// The live generation in a [`CoordinatorSnapshot`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GenerationSnapshot {
    /// Its number.
    pub number: u64,
    /// Its ranks, in rank order.
    pub members: Vec<GenerationMember>,
    /// The bootstrap bytes rank 0 published, if it did.
    pub bootstrap: Option<Vec<u8>>,
    /// Ranks that fetched their data plan (started training).
    pub started: Vec<u32>,
    /// The first global step it trains.
    pub start_step: u64,
    /// The rank that broadcasts its in-memory state, when the state comes from memory.
    pub state_source_rank: Option<u32>,
    /// Where its state comes from (agrees with `start_step` and `state_source_rank`).
    pub source: StateSource,
}

/// One rank of a [`GenerationSnapshot`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GenerationMember {
    /// Worker id.
    pub worker_id: String,
    /// Its rank.
    pub rank: u32,
    /// Its collective endpoint.
    pub endpoint: String,
}

/// What a worker is doing, in a [`WorkerSnapshot`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum WorkerStatus {
    /// Joined, no rendezvous yet.
    Joined,
    /// Waiting in rendezvous.
    Waiting,
    /// Rank `rank` of generation `generation`.
    Member {
        /// The generation.
        generation: u64,
        /// Its rank.
        rank: u32,
    },
    /// Its generation ended; it must rendezvous again.
    Stale {
        /// The generation that ended.
        generation: u64,
    },
}

/// One worker in a [`CoordinatorSnapshot`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WorkerSnapshot {
    /// Worker id (`w-<seq>`).
    pub worker_id: String,
    /// Join order.
    pub seq: u64,
    /// Host it runs on.
    pub hostname: String,
    /// Its device.
    pub device: String,
    /// Its collective endpoint (as of its latest rendezvous).
    pub endpoint: String,
    /// What it is doing.
    pub status: WorkerStatus,
    /// Last step it reported in its generation.
    pub last_step: Option<u64>,
    /// Last step its in-memory state holds, as its latest rendezvous said.
    pub held_step: Option<u64>,
}

/// The state of a checkpoint attempt in a [`RoundSnapshot`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RoundStatus {
    /// Votes are coming in.
    Collecting,
    /// Every rank voted yes; the commit was handed to the shell.
    Committing,
    /// Committed, with its manifest.
    Committed {
        /// The manifest's URL.
        manifest_url: String,
    },
    /// Aborted.
    Aborted {
        /// Why.
        reason: String,
    },
}

/// One rank's yes vote in a [`RoundSnapshot`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RankVote {
    /// The voting rank.
    pub rank: u32,
    /// The parts it wrote.
    pub parts: Vec<PlannedPart>,
}

/// A checkpoint attempt in a [`CoordinatorSnapshot`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RoundSnapshot {
    /// The step it holds.
    pub step: u64,
    /// The attempt id.
    pub attempt: String,
    /// The generation whose ranks vote.
    pub generation: u64,
    /// Yes votes so far, in rank order.
    pub votes: Vec<RankVote>,
    /// Its state.
    pub status: RoundStatus,
}

impl Coordinator {
    /// Everything needed to continue the job in a restarted coordinator (see
    /// [`Coordinator::restore`]).
    pub fn snapshot(&self) -> CoordinatorSnapshot {
        let mut workers: Vec<(&String, &Worker)> = self.workers.iter().collect();
        workers.sort_by_key(|(_, w)| w.seq);
        CoordinatorSnapshot {
            version: SNAPSHOT_VERSION,
            config_hash: self.config_hash.clone(),
            nonce: self.nonce.clone(),
            next_seq: self.next_seq,
            last_generation: self.last_generation,
            generation: self.generation.as_ref().map(|g| GenerationSnapshot {
                number: g.number,
                members: g
                    .members
                    .iter()
                    .zip(&g.endpoints)
                    .enumerate()
                    .map(|(rank, (id, endpoint))| GenerationMember {
                        worker_id: id.clone(),
                        rank: rank as u32,
                        endpoint: endpoint.clone(),
                    })
                    .collect(),
                bootstrap: g.bootstrap.clone(),
                started: g.started.iter().copied().collect(),
                start_step: g.source.start_step(),
                state_source_rank: g.source.rank(),
                source: g.source.clone(),
            }),
            workers: workers
                .into_iter()
                .map(|(id, w)| WorkerSnapshot {
                    worker_id: id.clone(),
                    seq: w.seq,
                    hostname: w.hostname.clone(),
                    device: w.device.clone(),
                    endpoint: w.endpoint.clone(),
                    status: match w.status {
                        Status::Joined => WorkerStatus::Joined,
                        Status::Waiting { .. } => WorkerStatus::Waiting,
                        Status::Member { generation, rank } => WorkerStatus::Member { generation, rank },
                        Status::Stale { generation } => WorkerStatus::Stale { generation },
                    },
                    last_step: w.last_step,
                    held_step: w.held_step,
                })
                .collect(),
            checkpoints: self.checkpoints.clone(),
            rounds: self
                .rounds
                .iter()
                .map(|((step, attempt), r)| RoundSnapshot {
                    step: *step,
                    attempt: attempt.clone(),
                    generation: r.generation,
                    votes: r.votes.iter().map(|(rank, parts)| RankVote { rank: *rank, parts: parts.clone() }).collect(),
                    status: match &r.state {
                        RoundState::Collecting => RoundStatus::Collecting,
                        RoundState::Committing => RoundStatus::Committing,
                        RoundState::Committed(url) => RoundStatus::Committed { manifest_url: url.clone() },
                        RoundState::Aborted(reason) => RoundStatus::Aborted { reason: reason.clone() },
                    },
                })
                .collect(),
            quarantined: self.quarantined.iter().cloned().collect(),
            requested: self.requested.clone(),
            boundary: self.boundary.clone(),
            finished: self.finished,
            failure: self.failure.clone(),
            preempted_after: self.preempted_after,
            rejoins: self.rejoins,
            generation_history: self.history.clone(),
            replica_checks: self.replica_checks,
            replica_drifts: self.replica_drifts,
        }
    }

    /// A coordinator that continues the job of `snapshot` under `config`, at `now`: every
    /// worker counts as seen at `now`, waiting workers as waiting since `now`, and the
    /// `every_minutes` timer restarts at `now`.
    ///
    /// A checkpoint attempt that was being committed when the snapshot was taken is queued
    /// again as an [`Action::Commit`]: drain the actions after the restore and perform it (the
    /// shell should treat a manifest that already exists for that attempt as committed).
    ///
    /// Fails when `config` hashes differently from the snapshot's job, when the snapshot has
    /// another layout version, or when it contradicts itself (all problems listed).
    pub fn restore(config: JobConfig, snapshot: CoordinatorSnapshot, now: Instant) -> Result<Coordinator> {
        let origin = "coordinator snapshot".to_string();
        let hash = config.hash();
        if snapshot.config_hash != hash {
            return Err(Error::Config {
                origin,
                problems: vec![format!(
                    "the snapshot belongs to a job whose config hash is {}, this config's hash is {hash}; \
                     restore with the job file the job was started with",
                    snapshot.config_hash
                )],
            });
        }
        let problems = check(&snapshot);
        if !problems.is_empty() {
            return Err(Error::Config { origin, problems });
        }
        let mut c = Coordinator::new(config, now, snapshot.nonce);
        c.actions.clear();
        c.next_seq = snapshot.next_seq;
        c.last_generation = snapshot.last_generation;
        for w in snapshot.workers {
            let mut worker = Worker::new(w.seq, w.hostname, w.device, now);
            worker.endpoint = w.endpoint;
            worker.status = match w.status {
                WorkerStatus::Joined => Status::Joined,
                WorkerStatus::Waiting => Status::Waiting { since: now },
                WorkerStatus::Member { generation, rank } => Status::Member { generation, rank },
                WorkerStatus::Stale { generation } => Status::Stale { generation },
            };
            worker.last_step = w.last_step;
            worker.held_step = w.held_step;
            c.workers.insert(w.worker_id, worker);
        }
        c.generation = snapshot.generation.map(|g| Generation {
            number: g.number,
            members: g.members.iter().map(|m| m.worker_id.clone()).collect(),
            endpoints: g.members.into_iter().map(|m| m.endpoint).collect(),
            bootstrap: g.bootstrap,
            started: g.started.into_iter().collect::<BTreeSet<u32>>(),
            source: g.source,
        });
        c.checkpoints = snapshot.checkpoints;
        for r in snapshot.rounds {
            let votes: BTreeMap<u32, Vec<PlannedPart>> = r.votes.into_iter().map(|v| (v.rank, v.parts)).collect();
            let state = match r.status {
                RoundStatus::Collecting => RoundState::Collecting,
                RoundStatus::Committing => {
                    c.actions.push(Action::Commit(CommitPlan {
                        job: c.config.job.name.clone(),
                        config_hash: c.config_hash.clone(),
                        step: r.step,
                        attempt: r.attempt.clone(),
                        generation: r.generation,
                        world_size: votes.len() as u32,
                        parts: votes.values().flatten().cloned().collect(),
                    }));
                    RoundState::Committing
                }
                RoundStatus::Committed { manifest_url } => RoundState::Committed(manifest_url),
                RoundStatus::Aborted { reason } => RoundState::Aborted(reason),
            };
            c.rounds.insert((r.step, r.attempt), Round { generation: r.generation, votes, state, write_seconds: 0.0, last_vote: None });
        }
        c.quarantined = snapshot.quarantined.into_iter().collect();
        c.requested = snapshot.requested;
        c.boundary = snapshot.boundary;
        c.finished = snapshot.finished;
        c.failure = snapshot.failure;
        c.preempted_after = snapshot.preempted_after;
        c.rejoins = snapshot.rejoins;
        c.history = snapshot.generation_history;
        c.replica_checks = snapshot.replica_checks;
        c.replica_drifts = snapshot.replica_drifts;
        c.refresh_waiting_reason(now);
        let live = match &c.generation {
            Some(g) => format!(
                "generation {} live with {} ranks from step {}",
                g.number,
                g.members.len(),
                g.source.start_step()
            ),
            None => "no generation live".to_string(),
        };
        let msg = format!(
            "coordinator restored from a snapshot: {live}, {} workers, {} committed checkpoints",
            c.workers.len(),
            c.checkpoints.len()
        );
        let commits = std::mem::take(&mut c.actions);
        c.log(LogLevel::Info, msg);
        c.actions.extend(commits);
        Ok(c)
    }
}

/// Everything in `s` that contradicts itself.
fn check(s: &CoordinatorSnapshot) -> Vec<String> {
    let mut problems = Vec::new();
    if s.version != SNAPSHOT_VERSION {
        problems.push(format!("snapshot layout version {} (this coordinator reads {SNAPSHOT_VERSION})", s.version));
    }
    let mut ids = BTreeSet::new();
    for w in &s.workers {
        if !ids.insert(w.worker_id.as_str()) {
            problems.push(format!("worker {} is listed twice", w.worker_id));
        }
        if w.seq >= s.next_seq {
            problems.push(format!("worker {} has seq {} but next_seq is {}", w.worker_id, w.seq, s.next_seq));
        }
        if let WorkerStatus::Member { generation, rank } = w.status {
            let live = s.generation.as_ref().filter(|g| g.number == generation);
            if live.is_none_or(|g| !g.members.iter().any(|m| m.worker_id == w.worker_id && m.rank == rank)) {
                problems.push(format!(
                    "worker {} is rank {rank} of generation {generation}, which does not list it",
                    w.worker_id
                ));
            }
        }
    }
    if let Some(g) = &s.generation {
        if g.number > s.last_generation {
            problems.push(format!("live generation {} is newer than last_generation {}", g.number, s.last_generation));
        }
        for (i, m) in g.members.iter().enumerate() {
            if m.rank as usize != i {
                problems
                    .push(format!("generation {} lists {} as rank {} at position {i}", g.number, m.worker_id, m.rank));
            }
            let member = s.workers.iter().find(|w| w.worker_id == m.worker_id);
            if member.is_none_or(|w| w.status != (WorkerStatus::Member { generation: g.number, rank: m.rank })) {
                problems.push(format!(
                    "generation {} lists {} as rank {}, but that worker is not recorded as its member",
                    g.number, m.worker_id, m.rank
                ));
            }
        }
        if g.start_step != g.source.start_step() || g.state_source_rank != g.source.rank() {
            problems.push(format!(
                "generation {} starts at step {} from rank {:?}, but its source says step {} from rank {:?}",
                g.number,
                g.start_step,
                g.state_source_rank,
                g.source.start_step(),
                g.source.rank()
            ));
        }
    }
    if let Some(b) = &s.boundary {
        if s.generation.as_ref().is_none_or(|g| g.number != b.generation) {
            problems
                .push(format!("a membership boundary is pending for generation {}, which is not live", b.generation));
        }
    }
    problems
}
