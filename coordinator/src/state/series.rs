//! What the coordinator keeps of the job's recent past for telemetry: the per-step numbers the
//! lowest rank reported (loss and its terms, learning rate, gradient norm, throughput, data wait)
//! and the cost of the last committed checkpoint. They feed `/metrics`, `/status` and the
//! status page's charts; none of it is journaled (the next step report brings it back).

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

/// Step points kept in [`StepSeries`] (the newest).
pub const STEP_HISTORY: usize = 1000;

/// One step as the lowest reporting rank of its generation saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepPoint {
    /// Global step.
    pub step: u64,
    /// Generation that trained it.
    pub generation: u64,
    /// When the report arrived, seconds since this coordinator started.
    pub elapsed_seconds: f64,
    /// The global-batch loss.
    pub loss: f64,
    /// Its terms by objective (`itc`, `itm`, `mlm`, `lm`, ...).
    pub loss_terms: BTreeMap<String, f64>,
    /// Learning rate of the step's update.
    pub learning_rate: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Global-batch samples per second of the step.
    pub samples_per_second: Option<f64>,
    /// Seconds the rank waited for its batch.
    pub data_wait_seconds: f64,
}

/// The newest [`STEP_HISTORY`] step points, in step order, one per step.
#[derive(Debug, Clone, Default)]
pub struct StepSeries {
    points: VecDeque<StepPoint>,
}

impl StepSeries {
    /// Records `point`. A step seen again (a generation that redid it after a failure) replaces
    /// the points from that step on, so the series reads as the job's final history.
    pub fn push(&mut self, point: StepPoint) {
        while self.points.back().is_some_and(|p| p.step >= point.step) {
            self.points.pop_back();
        }
        if self.points.len() == STEP_HISTORY {
            self.points.pop_front();
        }
        self.points.push_back(point);
    }

    /// The newest point.
    pub fn latest(&self) -> Option<&StepPoint> {
        self.points.back()
    }

    /// Every kept point, oldest first.
    pub fn points(&self) -> Vec<StepPoint> {
        self.points.iter().cloned().collect()
    }
}

/// What the last committed checkpoint cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CheckpointCost {
    /// Its step.
    pub step: u64,
    /// Bytes of its parts.
    pub bytes: u64,
    /// The slowest rank's write time plus the commit after the last vote.
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64, loss: f64) -> StepPoint {
        StepPoint {
            step,
            generation: 1,
            elapsed_seconds: 0.0,
            loss,
            loss_terms: BTreeMap::new(),
            learning_rate: 0.0,
            grad_norm: 0.0,
            samples_per_second: None,
            data_wait_seconds: 0.0,
        }
    }

    #[test]
    fn a_redone_step_replaces_the_points_from_it_on() {
        let mut s = StepSeries::default();
        for step in 0..5 {
            s.push(point(step, 1.0));
        }
        s.push(point(3, 2.0));
        let steps: Vec<(u64, f64)> = s.points().iter().map(|p| (p.step, p.loss)).collect();
        assert_eq!(steps, vec![(0, 1.0), (1, 1.0), (2, 1.0), (3, 2.0)]);
    }

    #[test]
    fn keeps_the_newest_points() {
        let mut s = StepSeries::default();
        for step in 0..(STEP_HISTORY as u64 + 10) {
            s.push(point(step, 1.0));
        }
        let points = s.points();
        assert_eq!(points.len(), STEP_HISTORY);
        assert_eq!(points[0].step, 10);
        assert_eq!(s.latest().unwrap().step, STEP_HISTORY as u64 + 9);
    }
}
