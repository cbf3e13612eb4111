//! Stragglers: ranks whose compute per step is well above the others'.
//!
//! A rank's *compute* time is `step_seconds - collective_wait_seconds`: a slow rank waits little
//! in collectives while every other rank waits for it, so its compute time stands out and the
//! others' does not. Over the last [`STRAGGLER_WINDOW`] steps of the live generation each rank
//! has a median compute time; a rank is compared with the median of the other ranks' medians
//! (with two ranks, with the other rank).

use std::collections::VecDeque;

use super::{Coordinator, LogLevel};

/// Steps of the live generation over which a rank's medians are taken.
pub const STRAGGLER_WINDOW: usize = 20;

/// Steps a rank must have reported in the live generation before it is judged (the first steps
/// of a generation include warm-up and broadcasts).
pub const STRAGGLER_MIN_STEPS: usize = 5;

/// A rank becomes a straggler when its median compute time exceeds this multiple of the other
/// ranks' median...
pub const STRAGGLER_RATIO: f64 = 1.5;

/// ... and exceeds it by at least this many seconds (so tiny steps do not flag on jitter).
pub const STRAGGLER_MIN_EXCESS_S: f64 = 0.05;

/// A straggler recovers once its median compute time is at most this multiple of the others'
/// median, or less than [`STRAGGLER_MIN_EXCESS_S`] above it (hysteresis, so a rank near the
/// threshold does not flap).
pub const STRAGGLER_RECOVER_RATIO: f64 = 1.2;

/// One rank's recent step timings.
#[derive(Debug, Clone, Default)]
pub(super) struct StepTimings {
    /// `(step_seconds, collective_wait_seconds)`, newest last.
    steps: VecDeque<(f64, f64)>,
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 })
}

impl StepTimings {
    /// Records a step; negative or non-finite values count as 0.
    pub(super) fn push(&mut self, step_seconds: f64, collective_wait_seconds: f64) {
        let clean = |v: f64| if v.is_finite() { v.max(0.0) } else { 0.0 };
        if self.steps.len() == STRAGGLER_WINDOW {
            self.steps.pop_front();
        }
        self.steps.push_back((clean(step_seconds), clean(collective_wait_seconds)));
    }

    pub(super) fn clear(&mut self) {
        self.steps.clear();
    }

    /// Median step time over the window.
    pub(super) fn step_seconds(&self) -> Option<f64> {
        median(self.steps.iter().map(|s| s.0).collect())
    }

    /// Median collective wait over the window.
    pub(super) fn collective_wait_seconds(&self) -> Option<f64> {
        median(self.steps.iter().map(|s| s.1).collect())
    }

    /// Median compute time over the window, once [`STRAGGLER_MIN_STEPS`] steps are in.
    pub(super) fn compute_seconds(&self) -> Option<f64> {
        if self.steps.len() < STRAGGLER_MIN_STEPS {
            return None;
        }
        median(self.steps.iter().map(|(step, wait)| (step - wait).max(0.0)).collect())
    }
}

/// Decides, for each rank's median compute time (`None`: not enough steps yet), whether it is
/// a straggler, given whether it was one (`was`). A rank without a median, or without another
/// rank that has one, keeps its flag. Returns the new flags and, per rank, the other ranks'
/// median it was compared with.
pub(super) fn judge(medians: &[Option<f64>], was: &[bool]) -> Vec<(bool, Option<f64>)> {
    medians
        .iter()
        .zip(was)
        .enumerate()
        .map(|(rank, (mine, was))| {
            let others: Vec<f64> =
                medians.iter().enumerate().filter(|(r, _)| *r != rank).filter_map(|(_, m)| *m).collect();
            let (Some(mine), Some(reference)) = (*mine, median(others)) else { return (*was, None) };
            let excess = mine - reference;
            let slow = if *was {
                mine > STRAGGLER_RECOVER_RATIO * reference && excess >= STRAGGLER_MIN_EXCESS_S
            } else {
                mine > STRAGGLER_RATIO * reference && excess >= STRAGGLER_MIN_EXCESS_S
            };
            (slow, Some(reference))
        })
        .collect()
}

impl Coordinator {
    /// Re-judges the live generation's ranks after a step report; logs a rank once when it
    /// becomes a straggler (warn) and once when it recovers (info).
    pub(super) fn update_stragglers(&mut self) {
        let Some(g) = &self.generation else { return };
        if g.members.len() < 2 {
            return;
        }
        let members = g.members.clone();
        let medians: Vec<Option<f64>> =
            members.iter().map(|id| self.workers.get(id).and_then(|w| w.timings.compute_seconds())).collect();
        let was: Vec<bool> = members.iter().map(|id| self.workers.get(id).is_some_and(|w| w.straggler)).collect();
        let verdicts = judge(&medians, &was);
        for (rank, (id, (slow, reference))) in members.iter().zip(verdicts).enumerate() {
            if slow == was[rank] {
                continue;
            }
            let who = self.describe(id);
            if let Some(w) = self.workers.get_mut(id) {
                w.straggler = slow;
            }
            let (mine, reference) = (medians[rank].unwrap_or_default(), reference.unwrap_or_default());
            if slow {
                self.log(
                    LogLevel::Warn,
                    format!(
                        "{who} is a straggler: median compute {mine:.3} s per step over its last {STRAGGLER_WINDOW} \
                         steps, the other ranks' median is {reference:.3} s"
                    ),
                );
            } else {
                self.log(
                    LogLevel::Info,
                    format!("{who} is no longer a straggler: median compute {mine:.3} s per step, the others' {reference:.3} s"),
                );
            }
        }
    }
}
