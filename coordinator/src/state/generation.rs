//! Rendezvous and generations: who waits, when a generation forms, where its training state
//! comes from (a member's memory or a checkpoint), and how it ends.
//!
//! **Start step.** Let `best` be the newest step any member's in-memory state holds (its
//! `held_step` at rendezvous) and `cursor` the step after the newest committed checkpoint.
//! When `best + 1 >= cursor`, the generation starts at `best + 1` and the lowest rank holding
//! `best` broadcasts its state; otherwise it restores the newest checkpoint and starts at
//! `cursor` (step 0, fresh, without one). A state holding the *last* step is not a start: with
//! a `checkpoint.url`, the final checkpoint needs a generation that trains the last step, so such
//! holds are set aside (the next newest hold or the checkpoint wins; the job never waits on a
//! generation with nothing to train); without a `checkpoint.url`, training is complete and the
//! job finishes instead of forming the generation.
//!
//! **Ending.** A death or a leave ends the live generation at once; survivors learn it from
//! failed collectives or `rendezvous_required` and come back holding their last step. A
//! scale-up (workers waiting) ends it at a step boundary: the boundary is fixed like a
//! requested checkpoint ([`common_step`](super::common_step)), sent to every rank as
//! `StepReply.rendezvous_after_step`, and the generation ends when the first member rendezvous
//! again. A generation that has not reported a step yet ends at once.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use braid_proto::{
    PublishBootstrapReply, PublishBootstrapRequest, RendezvousReply, RendezvousRequest, RendezvousState,
};
use serde::{Deserialize, Serialize};

use super::{
    secs, Coordinator, Generation, GenerationRecord, LogLevel, PendingBoundary, RoundState, Status, Worker,
    GENERATION_HISTORY,
};
use crate::error::{Error, Result};

/// Where a generation's training state comes from, fixed when it forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum StateSource {
    /// Rank `rank` holds the update of `step` in memory and broadcasts it; the generation
    /// starts at `step + 1`. `holders` members held that step.
    Memory {
        /// The broadcasting rank (the lowest rank holding `step`).
        rank: u32,
        /// The step its state holds.
        step: u64,
        /// Members holding `step`.
        holders: u32,
    },
    /// Every rank restores the committed checkpoint of `step`; the generation starts at `step + 1`.
    Checkpoint {
        /// The checkpoint's step.
        step: u64,
        /// Its manifest.
        manifest_url: String,
    },
    /// No state anywhere: a fresh start at step 0.
    Fresh,
}

impl StateSource {
    /// The first global step the generation trains.
    pub fn start_step(&self) -> u64 {
        match self {
            Self::Memory { step, .. } | Self::Checkpoint { step, .. } => step + 1,
            Self::Fresh => 0,
        }
    }

    /// The rank that broadcasts its state, for [`StateSource::Memory`].
    pub fn rank(&self) -> Option<u32> {
        match self {
            Self::Memory { rank, .. } => Some(*rank),
            _ => None,
        }
    }

    /// The checkpoint every rank restores, for [`StateSource::Checkpoint`].
    pub fn manifest_url(&self) -> Option<&str> {
        match self {
            Self::Checkpoint { manifest_url, .. } => Some(manifest_url),
            _ => None,
        }
    }

    /// Short form for histories: `memory:rank0`, `checkpoint:step 39` or `fresh`.
    pub fn describe(&self) -> String {
        match self {
            Self::Memory { rank, .. } => format!("memory:rank{rank}"),
            Self::Checkpoint { step, .. } => format!("checkpoint:step {step}"),
            Self::Fresh => "fresh".to_string(),
        }
    }
}

/// What a generation of given members would do: train from a source, or nothing (the job is done).
enum Start {
    Train {
        source: StateSource,
        /// Why held states were not used, when some were set aside.
        note: String,
    },
    Finished(String),
}

impl Coordinator {
    /// `Rendezvous`: polled until the worker is a rank of a formed generation.
    ///
    /// A member that has not started its generation yet (not fetched its data plan) gets its
    /// assignment again, with the bootstrap once rank 0 published it. A member that has started
    /// asks for a new generation: its generation ends and it waits for the next one.
    ///
    /// `held_step` is recorded on every call (the latest value wins; absent clears it) and
    /// decides where the next generation starts (see the module documentation).
    pub fn rendezvous(&mut self, now: Instant, req: &RendezvousRequest) -> Result<RendezvousReply> {
        let id = self.touch(now, req.header.as_ref())?;
        let total = self.config.train.steps;
        if let Some(held) = req.held_step.filter(|h| *h >= total) {
            return Err(Error::InvalidRequest(format!(
                "worker {id} says it holds step {held}, past the job's last step {} (train.steps = {total})",
                total - 1
            )));
        }
        self.workers.get_mut(&id).expect("touched worker exists").held_step = req.held_step;
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
                    let reason = match self.boundary.as_ref().filter(|b| b.step.is_some() && b.step == req.held_step) {
                        Some(b) => format!(
                            "{who} reached the membership boundary after step {} ({})",
                            b.step.unwrap_or_default(),
                            b.reason
                        ),
                        None => format!("{who} asked for a new rendezvous"),
                    };
                    self.end_generation(now, reason);
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
        if self.is_over() {
            let reason = self.failure.clone().unwrap_or_else(|| "the job finished".into());
            return Ok(RendezvousReply { state: RendezvousState::JobFinished as i32, reason, ..Default::default() });
        }
        if matches!(self.workers[&id].status, Status::Member { .. }) {
            return Ok(self.ready_reply(&id));
        }
        let reason = match &self.generation {
            Some(g) => format!(
                "generation {} is running with {} of max_workers = {} ranks; waiting for it to end{}",
                g.number,
                g.members.len(),
                self.config.cluster.max_workers,
                match self.boundary_step() {
                    Some(step) => format!(" after step {step}"),
                    None => String::new(),
                }
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

    /// Forms a generation when the quorum allows; with a live generation, decides whether
    /// waiting workers make it end (at once, or at a step boundary).
    pub(super) fn maybe_form(&mut self, now: Instant) {
        if self.is_over() {
            return;
        }
        if let Some(g) = &self.generation {
            let number = g.number;
            let max = self.config.cluster.max_workers;
            let world = g.members.len();
            let reported = g.members.iter().any(|id| self.workers.get(id).is_some_and(|w| w.last_step.is_some()));
            let waiting = self.waiting().len();
            let waited = self.waiting_since().map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
            let due = world < max
                && waiting > 0
                && (world + waiting >= max || waited >= secs(self.config.cluster.rendezvous_grace_s));
            if !due {
                if waiting == 0 && self.boundary.as_ref().is_some_and(|b| b.step.is_none()) {
                    self.boundary = None;
                    self.log(
                        LogLevel::Info,
                        format!("generation {number} keeps its members: nobody waits to join any more"),
                    );
                }
                return;
            }
            let reason =
                format!("scale-up: {waiting} more worker(s) waiting, world_size {world} < max_workers = {max}");
            if reported {
                if self.boundary.is_none() {
                    self.log(
                        LogLevel::Info,
                        format!("{reason}: generation {number} ends at the next common step boundary"),
                    );
                    self.boundary = Some(PendingBoundary { generation: number, reason, step: None });
                }
                return;
            }
            self.end_generation(now, reason);
        }
        if let (Some(members), reason) = self.quorum(now) {
            self.form_generation(now, members, reason);
        }
        self.refresh_waiting_reason(now);
    }

    /// The membership boundary sent to the live generation's ranks, once fixed.
    pub(super) fn boundary_step(&self) -> Option<u64> {
        self.boundary.as_ref().filter(|b| Some(b.generation) == self.live_number()).and_then(|b| b.step)
    }

    /// Records why no generation is live, for [`Progress::waiting_reason`](super::Progress::waiting_reason).
    pub(super) fn refresh_waiting_reason(&mut self, now: Instant) {
        self.waiting_reason = (self.generation.is_none() && !self.is_over()).then(|| self.quorum(now).1);
    }

    /// Where a generation of `members` (in rank order) starts; see the module documentation.
    fn start_of(&self, members: &[String]) -> Start {
        let total = self.config.train.steps;
        let cursor = self.cursor();
        let checkpointed = self.config.checkpoint.url.is_some();
        let held: Vec<Option<u64>> = members.iter().map(|id| self.workers.get(id).and_then(|w| w.held_step)).collect();
        let mut note = String::new();
        if checkpointed && held.iter().any(|h| h.is_some_and(|h| h + 1 >= total)) {
            note = format!(
                "; in-memory states of the last step {} are set aside: the final checkpoint needs a generation that trains it",
                total - 1
            );
        }
        let usable = |h: &Option<u64>| h.filter(|h| !(checkpointed && h + 1 >= total));
        if let Some(best) = held.iter().filter_map(usable).max().filter(|best| best + 1 >= cursor) {
            if best + 1 >= total {
                return Start::Finished(format!(
                    "a member's in-memory state holds the last step {best} and the job has no checkpoint.url: training is complete"
                ));
            }
            let rank = held.iter().position(|h| *h == Some(best)).expect("best is held by a member") as u32;
            let holders = held.iter().filter(|h| **h == Some(best)).count() as u32;
            return Start::Train { source: StateSource::Memory { rank, step: best, holders }, note };
        }
        if let Some(best) = held.iter().filter_map(usable).max() {
            note = format!("{note}; the newest in-memory state (step {best}) is older than the checkpoint");
        }
        let source = match self.latest_checkpoint() {
            Some(c) if c.step + 1 >= total => {
                return Start::Finished(format!("the final checkpoint (step {}) is committed", c.step));
            }
            Some(c) => StateSource::Checkpoint { step: c.step, manifest_url: c.manifest_url.clone() },
            None => StateSource::Fresh,
        };
        Start::Train { source, note }
    }

    fn form_generation(&mut self, now: Instant, members: Vec<String>, reason: String) {
        let (source, note) = match self.start_of(&members) {
            Start::Train { source, note } => (source, note),
            Start::Finished(why) => {
                self.finished = true;
                self.log(LogLevel::Info, format!("job finished: {why}"));
                self.refresh_waiting_reason(now);
                return;
            }
        };
        self.last_generation += 1;
        let number = self.last_generation;
        let start_step = source.start_step();
        let mut endpoints = Vec::with_capacity(members.len());
        for (rank, id) in members.iter().enumerate() {
            let w = self.workers.get_mut(id).expect("members are known workers");
            w.status = Status::Member { generation: number, rank: rank as u32 };
            w.last_step = None;
            w.stats = None;
            w.timings.clear();
            w.straggler = false;
            endpoints.push(w.endpoint.clone());
        }
        let roster: Vec<String> =
            members.iter().enumerate().map(|(rank, id)| format!("{rank}={id}@{}", self.workers[id].endpoint)).collect();
        self.log(
            LogLevel::Info,
            format!("generation {number} formed with {} ranks ({reason}): {}", members.len(), roster.join(", ")),
        );
        let from = match &source {
            StateSource::Memory { rank, holders, .. } => {
                format!("from rank {rank}'s in-memory state (held by {holders} of {} members)", members.len())
            }
            StateSource::Checkpoint { step, manifest_url } => format!("from checkpoint step {step} ({manifest_url})"),
            StateSource::Fresh => "fresh".to_string(),
        };
        self.log(LogLevel::Info, format!("generation {number} starts at step {start_step} {from}{note}"));
        // A requested checkpoint fixed at a step this generation never trains is fixed anew.
        if let Some(r) = self.requested.as_mut().filter(|r| r.step.is_some_and(|s| s < start_step)) {
            r.step = None;
        }
        self.history.push(GenerationRecord {
            number,
            world_size: members.len() as u32,
            start_step,
            source: source.describe(),
            formed: reason,
            ended: None,
        });
        if self.history.len() > GENERATION_HISTORY {
            let excess = self.history.len() - GENERATION_HISTORY;
            self.history.drain(..excess);
        }
        self.generation =
            Some(Generation { number, members, endpoints, bootstrap: None, started: BTreeSet::new(), source });
        self.waiting_reason = None;
    }

    /// While no rank of the live generation has started, a checkpoint committed after it formed
    /// that is newer than its start becomes its source.
    pub(super) fn catch_up_before_start(&mut self) {
        let cursor = self.cursor();
        let Some(c) = self.latest_checkpoint().cloned() else { return };
        let Some(g) = self.generation.as_mut().filter(|g| g.started.is_empty() && g.source.start_step() < cursor)
        else {
            return;
        };
        let before = g.source.describe();
        g.source = StateSource::Checkpoint { step: c.step, manifest_url: c.manifest_url.clone() };
        let number = g.number;
        if let Some(record) = self.history.iter_mut().rev().find(|r| r.number == number) {
            record.start_step = cursor;
            record.source = format!("checkpoint:step {}", c.step);
        }
        self.log(
            LogLevel::Info,
            format!(
                "generation {number} starts at step {cursor} from checkpoint step {} ({}) instead of {before}: \
                 it committed before any rank started",
                c.step, c.manifest_url
            ),
        );
    }

    pub(super) fn end_generation(&mut self, now: Instant, reason: String) {
        let Some(g) = self.generation.take() else { return };
        for id in &g.members {
            if let Some(w) = self.workers.get_mut(id) {
                if matches!(w.status, Status::Member { .. }) {
                    w.status = Status::Stale { generation: g.number };
                }
                w.straggler = false;
            }
        }
        self.grace_floor = now;
        self.boundary = None;
        self.rounds.retain(|_, r| r.generation != g.number || r.state != RoundState::Collecting);
        if let Some(record) = self.history.iter_mut().rev().find(|r| r.number == g.number) {
            record.ended = Some(reason.clone());
        }
        self.log(
            LogLevel::Warn,
            format!("generation {} ended: {reason}; survivors rendezvous again with the state they hold", g.number),
        );
        self.refresh_waiting_reason(now);
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
}
