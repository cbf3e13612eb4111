//! A training step captured once and replayed (`train.cuda_graph`): when a step can be
//! captured, the warm-up, the capture as a CUDA graph (or [`StepCapture::Rerun`]'s stand-in),
//! the replays with each step's batch copied into the captured inputs, and the fall back to
//! eager steps when it cannot.

use tch::{Device, Kind, Tensor};

use super::{read_stats, DeviceBatch, ModelSpec, StepStats, TrainError, Trainer};
use crate::collective::{Collective, SingleRank};
use crate::cuda_graph::{CaptureError, CudaGraph};

/// How the trainer issues a step's work on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepCapture {
    /// Every step's kernels are issued as the step runs.
    Eager,
    /// After [`CAPTURE_AFTER_STEPS`] eager steps the step is captured as a CUDA graph and
    /// replayed (`train.cuda_graph`): every step copies its batch into the captured inputs.
    CudaGraph,
    /// The captured step's data flow without a graph: every step copies its batch into fixed
    /// inputs and runs the step's work again on them. What `CudaGraph` does, runnable on the
    /// CPU (tests) and on a GPU to tell a capture problem from a data-flow one.
    Rerun,
}

/// Eager steps a trainer takes before capturing its step: the libraries set up their
/// workspaces, plans and autotuned kernels in them, outside the capture.
pub const CAPTURE_AFTER_STEPS: u64 = 2;

/// A captured step: the graph, the fixed inputs it reads and the values it writes.
pub(super) struct CapturedStep {
    /// None for [`StepCapture::Rerun`].
    graph: Option<CudaGraph>,
    inputs: DeviceBatch,
    /// The step's results as [`Trainer::step_values`] lays them out (written by each replay).
    values: Tensor,
    /// The names of the loss's terms.
    terms: Vec<&'static str>,
}

/// Where a trainer with a capture mode stands.
pub(super) enum CaptureState {
    /// Eager steps taken since the trainer could capture (or since the last capture was dropped).
    WarmingUp(u64),
    /// The captured step.
    Captured(CapturedStep),
    /// This trainer's steps run eagerly (capture off, not applicable, or failed).
    Off,
}

impl Trainer {
    /// Sets how steps are issued from the next step on (a captured step is dropped).
    pub fn set_step_capture(&mut self, capture: StepCapture) {
        self.capture = capture;
        self.capture_state = if capture == StepCapture::Eager { CaptureState::Off } else { CaptureState::WarmingUp(0) };
        self.capture_declined = None;
    }

    /// Whether the last step ran from a captured step (a CUDA graph, or its rerun stand-in).
    pub fn step_is_captured(&self) -> bool {
        matches!(self.capture_state, CaptureState::Captured(_))
    }

    /// Why this step cannot run from a captured step, if it cannot.
    pub(super) fn capture_declined_for(&self, batch: &DeviceBatch, world_size: usize) -> Option<String> {
        if !matches!(self.spec, ModelSpec::Clip(_)) {
            return Some(format!("train.cuda_graph captures CLIP steps; {} steps run eagerly", self.spec.family()));
        }
        if world_size != 1 {
            return Some(format!(
                "train.cuda_graph captures one-worker steps (collectives between workers are not captured); with {world_size} workers steps run eagerly"
            ));
        }
        if self.capture == StepCapture::CudaGraph {
            if !self.device.is_cuda() {
                return Some(format!("train.cuda_graph needs a CUDA device; on {:?} steps run eagerly", self.device));
            }
            if !CudaGraph::built() {
                return Some("train.cuda_graph: this build of braid has no CUDA graphs (libtorch without CUDA); steps run eagerly".into());
            }
        }
        if let CaptureState::Captured(captured) = &self.capture_state {
            if !captured.inputs.same_layout(batch) {
                return Some("the batch's shape changed; the captured step is dropped and captured again".into());
            }
        }
        None
    }

    /// Runs this step eagerly for `reason`, logging it when it is new, and counts eager steps
    /// again from this one, so that a step that can be captured later is.
    pub(super) fn decline_capture(&mut self, reason: String) {
        if self.capture_declined.as_ref() != Some(&reason) {
            tracing::warn!("{reason}");
            self.capture_declined = Some(reason);
        }
        if !matches!(self.capture_state, CaptureState::Off) {
            self.capture_state = CaptureState::WarmingUp(1);
        }
    }

    /// A step through the captured step: warming up, capturing, then replaying.
    pub(super) fn captured_step(&mut self, step: u64, batch: &DeviceBatch, coll: &mut dyn Collective, before_update: impl FnOnce()) -> Result<StepStats, TrainError> {
        self.capture_declined = None;
        if let CaptureState::WarmingUp(done) = self.capture_state {
            if done < CAPTURE_AFTER_STEPS {
                self.capture_state = CaptureState::WarmingUp(done + 1);
                return self.eager_step(step, batch, coll, before_update);
            }
            match self.capture_step(step, batch) {
                Ok(captured) => self.capture_state = CaptureState::Captured(captured),
                Err(e) => {
                    tracing::warn!(step, "capturing the step as a CUDA graph failed; steps run eagerly: {e}");
                    self.capture_state = CaptureState::Off;
                    return self.eager_step(step, batch, coll, before_update);
                }
            }
        }
        let CaptureState::Captured(mut captured) = std::mem::replace(&mut self.capture_state, CaptureState::Off) else {
            return self.eager_step(step, batch, coll, before_update);
        };
        let lr = self.lr_at(step);
        let outcome = (|| {
            captured.inputs.copy_from(batch);
            before_update();
            self.optimizer.begin_step(lr);
            match &captured.graph {
                Some(graph) => {
                    let _replay = tracing::info_span!("replay").entered();
                    graph.replay()?;
                    read_stats(&captured.values, &captured.terms, lr)
                }
                None => {
                    let (values, terms) = self.step_work(step, &captured.inputs, &mut SingleRank)?;
                    read_stats(&values, &terms, lr)
                }
            }
        })();
        self.capture_state = CaptureState::Captured(captured);
        outcome
    }

    /// An eager step while a capture mode is set (the same step as with capture off).
    pub(super) fn eager_step(&mut self, step: u64, batch: &DeviceBatch, coll: &mut dyn Collective, before_update: impl FnOnce()) -> Result<StepStats, TrainError> {
        let capture = std::mem::replace(&mut self.capture, StepCapture::Eager);
        let result = self.train_step_with(step, batch, coll, before_update);
        self.capture = capture;
        result
    }

    /// Captures step `step`'s work on fixed copies of `batch` (for [`StepCapture::Rerun`],
    /// only makes the copies). Nothing runs: the caller replays. A captured step has one rank
    /// and communicates through [`SingleRank`] (the job's engine, NCCL included, is not called).
    pub(super) fn capture_step(&mut self, step: u64, batch: &DeviceBatch) -> Result<CapturedStep, TrainError> {
        let inputs = batch.to_owned_copy();
        let index = match (self.capture, self.device) {
            (StepCapture::CudaGraph, Device::Cuda(index)) => index,
            _ => return Ok(CapturedStep { graph: None, inputs, values: Tensor::zeros([0], (Kind::Double, Device::Cpu)), terms: Vec::new() }),
        };
        let _capture = tracing::info_span!("capture", step).entered();
        let started = std::time::Instant::now();
        let (graph, (values, terms)) = CudaGraph::capture(index, || self.step_work(step, &inputs, &mut SingleRank)).map_err(|e| match e {
            CaptureError::Body(inner) => inner,
            other => TrainError::State { origin: "CUDA graph capture".into(), reason: other.to_string() },
        })?;
        tracing::info!(step, seconds = started.elapsed().as_secs_f64(), "step captured as a CUDA graph; later steps replay it");
        Ok(CapturedStep { graph: Some(graph), inputs, values, terms })
    }
}
