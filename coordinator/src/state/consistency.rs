//! Replica consistency (DESIGN.md, "EMA / momentum state"): every rank applies the same update
//! to the same weights, momentum encoders and feature queues, so replicas stay equal without
//! traffic, until silent corruption or nondeterminism makes one drift.
//!
//! At state check steps ([`is_state_check_step`]) every rank sends a digest of its replicated
//! state with its step report. Once every rank of the generation has reported the step, the
//! digests are compared: equal digests pass; otherwise the reference is the digest most ranks
//! hold (ties go to rank 0's), the ranks holding another digest are named as drifted, and every
//! rank is told to take the lowest reference rank's state by broadcast before its next step
//! ([`StateCheck::Resync`]). The async shell holds a digest-carrying report's reply until
//! [`Coordinator::state_check`] gives a verdict; the wait is bounded by
//! [`Coordinator::state_check_wait`] and by the generation's end.
//!
//! Only the newest check is kept: no rank reaches the next check step before every rank has had
//! the reply to the previous one (each step's collectives need every rank, and a rank starts a
//! step only after that reply).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use braid_proto::StepReply;

use super::{secs, Coordinator, LogLevel};
use crate::config::TrainSection;
use crate::error::{Error, Result};

/// Upper bound of the wait for the other ranks' digests, below the workers' RPC timeout
/// ([`DEFAULT_RPC_TIMEOUT`](crate::client::DEFAULT_RPC_TIMEOUT)) so the reply always arrives.
pub const STATE_CHECK_MAX_WAIT: Duration = Duration::from_secs(20);

const _: () = assert!(STATE_CHECK_MAX_WAIT.as_secs() < crate::client::DEFAULT_RPC_TIMEOUT.as_secs());

/// Whether the ranks report a digest of their replicated state after `step`: every
/// `train.ema_check_every` steps (`(step + 1) % ema_check_every == 0`) and after the last step;
/// never with `ema_check_every = 0`.
pub fn is_state_check_step(train: &TrainSection, step: u64) -> bool {
    let every = train.ema_check_every;
    every > 0 && ((step + 1).is_multiple_of(every) || step + 1 == train.steps)
}

/// The outcome of the state check of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateCheck {
    /// Not every rank has reported the step yet.
    Pending,
    /// Every rank sent the same digest.
    Agreed,
    /// The digests differ: every rank takes rank `source`'s state by broadcast before its next
    /// step.
    Resync {
        /// The rank whose state every rank takes (it holds the reference digest).
        source: u32,
        /// The ranks whose digest differs from the reference, ascending.
        drifted: Vec<u32>,
    },
    /// No verdict, and why: a rank sent no digest, a rank did not report within the wait, or
    /// the generation ended first. Training goes on; the next check looks again.
    NoVerdict(String),
}

impl StateCheck {
    /// Writes the verdict into the reply of a digest-carrying step report.
    pub fn fill(&self, reply: &mut StepReply) {
        if let StateCheck::Resync { source, drifted } = self {
            reply.resync_from_rank = Some(*source);
            reply.drifted_ranks = drifted.clone();
        }
    }
}

/// The state check of one step of one generation, while it collects digests and after.
#[derive(Debug, Clone)]
pub(super) struct CheckRound {
    generation: u64,
    step: u64,
    /// When the first rank reported the step.
    opened: Instant,
    /// Each reporting rank's digest; empty when it reported the step without one.
    digests: BTreeMap<u32, String>,
    verdict: Option<StateCheck>,
}

/// The reference digest's holders and the other ranks, given every rank's digest: the digest
/// most ranks hold, ties going to the one held by the lowest rank.
fn reference(digests: &BTreeMap<u32, String>) -> (Vec<u32>, Vec<u32>) {
    let mut groups: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (rank, digest) in digests {
        groups.entry(digest.as_str()).or_default().push(*rank);
    }
    let best =
        groups.values().max_by(|a, b| a.len().cmp(&b.len()).then_with(|| b[0].cmp(&a[0]))).cloned().unwrap_or_default();
    let others = digests.keys().copied().filter(|r| !best.contains(r)).collect();
    (best, others)
}

/// The first 12 hex digits of a digest, for log lines.
fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

impl Coordinator {
    /// How long a digest-carrying report waits for the other ranks' digests: the smaller of
    /// `cluster.collective_timeout_s` and [`STATE_CHECK_MAX_WAIT`].
    pub fn state_check_wait(&self) -> Duration {
        secs(self.config.cluster.collective_timeout_s).min(STATE_CHECK_MAX_WAIT)
    }

    /// Records rank `rank`'s digest (empty: none) for `step` of the live generation `generation`
    /// of `world` ranks; decides the check once every rank has reported. A digest at a step that
    /// is not a state check step is refused.
    pub(super) fn record_digest(
        &mut self,
        now: Instant,
        generation: u64,
        world: usize,
        rank: u32,
        step: u64,
        digest: &str,
    ) -> Result<()> {
        if !is_state_check_step(&self.config.train, step) {
            if digest.is_empty() {
                return Ok(());
            }
            return Err(Error::InvalidRequest(format!(
                "rank {rank} sent a state digest with step {step}, which is not a state check step \
                 (train.ema_check_every = {}, train.steps = {})",
                self.config.train.ema_check_every, self.config.train.steps
            )));
        }
        let current = self.check.as_ref().is_some_and(|c| c.generation == generation && c.step == step);
        if !current {
            self.check = Some(CheckRound { generation, step, opened: now, digests: BTreeMap::new(), verdict: None });
        }
        let round = self.check.as_mut().expect("set above");
        round.digests.insert(rank, digest.to_string());
        if round.verdict.is_some() || round.digests.len() < world {
            return Ok(());
        }
        let digests = round.digests.clone();
        let verdict = self.decide(generation, step, &digests);
        self.check.as_mut().expect("set above").verdict = Some(verdict);
        Ok(())
    }

    /// The verdict once every rank's digest for `step` is in; logs and counts it.
    fn decide(&mut self, generation: u64, step: u64, digests: &BTreeMap<u32, String>) -> StateCheck {
        let missing: Vec<u32> = digests.iter().filter(|(_, d)| d.is_empty()).map(|(r, _)| *r).collect();
        if missing.len() == digests.len() {
            // Nobody checked (a single rank skips the digest): nothing to say.
            return StateCheck::NoVerdict("no rank sent a digest".into());
        }
        if !missing.is_empty() {
            let why = format!("ranks {missing:?} sent no digest");
            self.log(
                LogLevel::Warn,
                format!("state check of step {step} (generation {generation}) has no verdict: {why}"),
            );
            return StateCheck::NoVerdict(why);
        }
        self.replica_checks += 1;
        let (holders, drifted) = reference(digests);
        let source = holders[0];
        let reference = digests[&source].clone();
        if drifted.is_empty() {
            self.log(
                LogLevel::Info,
                format!(
                    "state check of step {step} (generation {generation}): all {} ranks hold digest {}",
                    digests.len(),
                    short(&reference)
                ),
            );
            return StateCheck::Agreed;
        }
        self.replica_drifts += 1;
        let who = |ranks: &[u32]| {
            ranks
                .iter()
                .map(|r| {
                    let worker = self.rank_worker(generation, *r).unwrap_or("?");
                    format!("rank {r} (worker {worker}, digest {})", short(&digests[r]))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let message = format!(
            "state check of step {step} (generation {generation}): replicas disagree; drifted: {}; reference: {}; \
             every rank takes rank {source}'s state by broadcast before step {} ({} drifts in {} checks)",
            who(&drifted),
            who(&holders),
            step + 1,
            self.replica_drifts,
            self.replica_checks
        );
        self.log(LogLevel::Warn, message);
        StateCheck::Resync { source, drifted }
    }

    /// The worker id of rank `rank` of the live generation numbered `generation`.
    fn rank_worker(&self, generation: u64, rank: u32) -> Option<&str> {
        let g = self.generation.as_ref().filter(|g| g.number == generation)?;
        g.members.get(rank as usize).map(String::as_str)
    }

    /// The state check of `step` in `generation` at `now`: [`StateCheck::Pending`] while ranks
    /// have yet to report it; [`StateCheck::NoVerdict`] once the generation or the job ended or
    /// [`Coordinator::state_check_wait`] passed since the first rank reported it (logged once).
    pub fn state_check(&mut self, now: Instant, generation: u64, step: u64) -> StateCheck {
        let wait = self.state_check_wait();
        let live = self.live_number() == Some(generation);
        let over = self.is_over();
        let world = self.generation.as_ref().map_or(0, |g| g.members.len() as u32);
        let Some(round) = self.check.as_ref().filter(|c| c.generation == generation && c.step == step) else {
            return StateCheck::NoVerdict(format!("no state check of step {step} in generation {generation} is open"));
        };
        if let Some(verdict) = &round.verdict {
            return verdict.clone();
        }
        let why = if !live {
            format!("generation {generation} ended before every rank reported step {step}")
        } else if over {
            format!("the job ended before every rank reported step {step}")
        } else if now.saturating_duration_since(round.opened) >= wait {
            let absent: Vec<u32> = (0..world).filter(|r| !round.digests.contains_key(r)).collect();
            format!("ranks {absent:?} did not report step {step} within {:.1} s", wait.as_secs_f64())
        } else {
            return StateCheck::Pending;
        };
        let round = self.check.as_mut().expect("found above");
        round.verdict = Some(StateCheck::NoVerdict(why.clone()));
        self.log(LogLevel::Warn, format!("state check of step {step} (generation {generation}) has no verdict: {why}"));
        StateCheck::NoVerdict(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(d: &[&str]) -> BTreeMap<u32, String> {
        d.iter().enumerate().map(|(r, d)| (r as u32, d.to_string())).collect()
    }

    #[test]
    fn the_reference_is_the_majority_digest_and_ties_go_to_rank_0() {
        assert_eq!(reference(&digests(&["a", "b"])), (vec![0], vec![1]));
        assert_eq!(reference(&digests(&["a", "b", "b"])), (vec![1, 2], vec![0]));
        assert_eq!(reference(&digests(&["a", "b", "a", "b"])), (vec![0, 2], vec![1, 3]));
        assert_eq!(reference(&digests(&["a", "b", "c"])), (vec![0], vec![1, 2]));
        assert_eq!(reference(&digests(&["a", "a"])), (vec![0, 1], vec![]));
    }

    #[test]
    fn check_steps_are_every_n_and_the_last() {
        let train = TrainSection { steps: 12, ema_check_every: 5, ..Default::default() };
        let steps: Vec<u64> = (0..12).filter(|s| is_state_check_step(&train, *s)).collect();
        assert_eq!(steps, [4, 9, 11]);
        let off = TrainSection { ema_check_every: 0, ..train };
        assert!((0..12).all(|s| !is_state_check_step(&off, s)));
    }
}
