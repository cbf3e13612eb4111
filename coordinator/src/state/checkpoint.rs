//! Checkpoints: requests for a checkpoint at a common step, the ranks' votes (phase one), the
//! shell's commit outcome (phase two) and the job's end once the final checkpoint is committed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use braid_proto::{CheckpointRequest, CheckpointRequestReply, CheckpointVote, CheckpointVoteReply};

use super::{
    path_safe, Action, CheckpointCost, CommitPlan, CommittedCheckpoint, Coordinator, LogLevel, PlannedPart,
    RequestedCheckpoint, Round, RoundState,
};
use crate::error::{Error, Result};

impl Coordinator {
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

    pub(super) fn ask_checkpoint(&mut self, reason: String, stop_after: bool) {
        match &mut self.requested {
            Some(r) => {
                if stop_after && !r.stop_after {
                    r.stop_after = true;
                    r.reason = format!("{}; {reason}", r.reason);
                }
            }
            None => {
                self.log(
                    LogLevel::Info,
                    format!("checkpoint requested: {reason}{}", if stop_after { " (then stop)" } else { "" }),
                );
                self.requested = Some(RequestedCheckpoint { reason, stop_after, step: None });
            }
        }
    }

    /// The job is finished once every rank of the live generation trained the last step and,
    /// with a `checkpoint.url`, its checkpoint is committed. (Should the generation end between
    /// the final commit and the last step reports, the next generation does not form: the job
    /// finishes then, see the generation module's start rule.)
    pub(super) fn check_finished(&mut self) {
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
            write_seconds: 0.0,
            last_vote: None,
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
        round.write_seconds = round.write_seconds.max(req.write_seconds.max(0.0));
        round.last_vote = Some(now);
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
                    self.log(
                        LogLevel::Warn,
                        format!("stopping after the checkpoint of step {} ({})", plan.step, r.reason),
                    );
                }
                self.requested = None;
            }
        }
        if let Some(round) = self.rounds.get_mut(&(plan.step, plan.attempt.clone())) {
            round.state = RoundState::Committed(manifest_url.clone());
            let commit = round.last_vote.map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
            self.last_checkpoint_cost = Some(CheckpointCost {
                step: plan.step,
                bytes: plan.parts.iter().map(|p| p.size).sum(),
                seconds: round.write_seconds + commit.as_secs_f64(),
            });
        }
        self.commits += 1;
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
}
