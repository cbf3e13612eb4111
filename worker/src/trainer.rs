//! The data-parallel training step: forward, the cross-worker contrastive loss with its exact
//! gradient, gradient all-reduce in buckets, clipping, AdamW and the schedule.
//!
//! Every rank holds the same parameters and optimizer state; the loss terms are scaled so that
//! summing gradients over ranks gives the gradient of the global-batch loss, so W workers with
//! B samples each take the same step as one worker with W*B samples.

use std::ops::Range;

use braid_coordinator::config::JobConfig;
use tch::{nn, Device, Kind, Tensor};

use crate::collective::{all_reduce_buckets, Collective, CollectiveError, ReducePrecision};
use crate::data::loader::Batch;
use crate::models::clip::{Clip, ClipConfig};
use crate::models::layers::Activation;
use crate::models::ModelError;
use crate::objectives::itc;
use crate::optim::{clip_grad_norm, cosine_lr, AdamW, AdamWConfig};

/// Numeric precision of parameters and math.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit floats.
    Fp32,
    /// 64-bit floats (exactness tests).
    Fp64,
    /// bf16 compute with fp32 master weights.
    Bf16,
}

impl Precision {
    /// Parses `fp32`, `fp64` or `bf16`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fp32" => Some(Self::Fp32),
            "fp64" => Some(Self::Fp64),
            "bf16" => Some(Self::Bf16),
            _ => None,
        }
    }

    /// Kind of the master parameters.
    pub fn param_kind(self) -> Kind {
        match self {
            Self::Fp64 => Kind::Double,
            Self::Fp32 | Self::Bf16 => Kind::Float,
        }
    }
}

/// Errors of a training step.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A collective failed or timed out.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// The model could not be built.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A multi-tensor optimizer kernel failed.
    #[error(transparent)]
    Kernel(#[from] crate::multi_tensor::KernelError),
    /// A state that does not fit the model.
    #[error("state {origin}: {reason}")]
    State {
        /// Where the state came from.
        origin: String,
        /// What did not fit.
        reason: String,
    },
}

/// What one optimizer step did, identical on every rank.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    /// Global-batch loss.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Logit scale `exp(s)` after the step.
    pub logit_scale: f64,
    /// Valid samples in the global batch.
    pub samples: u64,
}

/// A CLIP model with its optimizer, trained data-parallel.
pub struct ClipTrainer {
    vs: nn::VarStore,
    model: Clip,
    optimizer: AdamW,
    precision: Precision,
    device: Device,
    total_steps: u64,
    warmup_steps: u64,
    lr: f64,
    min_lr: f64,
    grad_clip: f64,
    max_micro_batch: usize,
    activation_checkpointing: bool,
    bucket_bytes: usize,
    /// Dtype of the gradients on the wire (`cluster.reduce_precision`).
    reduce_precision: ReducePrecision,
}

/// Runs `f` with libtorch's global generator seeded with `seed`, holding a lock so that
/// concurrent callers (ranks as threads in tests, the evaluator) cannot interleave draws.
pub fn seeded<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    f()
}

/// Builds the CLIP shape a job asks for.
pub fn clip_config(config: &JobConfig, vocab_size: i64) -> Result<ClipConfig, ModelError> {
    let activation = if config.model.quick_gelu { Activation::QuickGelu } else { Activation::Gelu };
    ClipConfig::preset(&config.model.preset, vocab_size, config.model.context_length.map(|c| c as i64), activation)
}

impl ClipTrainer {
    /// A freshly initialised model (seeded by the job seed, so every rank starts identical).
    pub fn new(config: &JobConfig, clip: ClipConfig, device: Device) -> Result<Self, TrainError> {
        let precision = Precision::parse(&config.train.precision).expect("validated precision");
        let mut vs = nn::VarStore::new(device);
        let mut model = seeded(config.job.seed, || Clip::new(&vs.root(), clip));
        if precision == Precision::Fp64 {
            vs.double();
        }
        model.set_compute_kind(match precision {
            Precision::Fp64 => Kind::Double,
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        });
        let t = &config.train;
        let named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        let optimizer = AdamW::new(
            named,
            AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay },
        );
        Ok(Self {
            vs,
            model,
            optimizer,
            precision,
            device,
            total_steps: t.steps,
            warmup_steps: t.warmup_steps,
            lr: t.lr,
            min_lr: t.min_lr,
            grad_clip: t.grad_clip,
            max_micro_batch: t.max_micro_batch,
            activation_checkpointing: t.activation_checkpointing,
            bucket_bytes: config.cluster.bucket_bytes(),
            reduce_precision: ReducePrecision::parse(&config.cluster.reduce_precision).expect("validated reduce_precision"),
        })
    }

    /// The model.
    pub fn model(&self) -> &Clip {
        &self.model
    }

    /// The variable store holding the parameters.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Device of the parameters.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Kind of the model's inputs and outputs (its parameters' kind; bf16 runs inside).
    pub fn compute_kind(&self) -> Kind {
        self.precision.param_kind()
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.optimizer.step_count()
    }

    /// One optimizer step on this rank's share of global batch `step`.
    ///
    /// `rank_batch` is padded by the caller to `slot` samples (every rank gathers the same
    /// shape); padding rows are marked invalid.
    pub fn train_step(&mut self, step: u64, batch: &DeviceBatch, coll: &mut dyn Collective) -> Result<StepStats, TrainError> {
        self.train_step_with(step, batch, coll, || ())
    }

    /// [`ClipTrainer::train_step`], calling `before_update` between the backward pass and the
    /// optimizer update (where a checkpoint's host copy of the parameters must be complete).
    pub fn train_step_with(
        &mut self,
        step: u64,
        batch: &DeviceBatch,
        coll: &mut dyn Collective,
        before_update: impl FnOnce(),
    ) -> Result<StepStats, TrainError> {
        let (loss, samples) = self.compute_gradients(batch, coll)?;
        // A collective that failed after its call returned (NCCL's watchdog) must stop the step
        // before the update: the parameters then still hold the previous step.
        coll.check()?;
        before_update();
        let (grad_norm, lr) = self.apply_update(step)?;
        Ok(StepStats { loss, grad_norm, lr, logit_scale: self.model.logit_scale.exp().double_value(&[]), samples })
    }

    /// Clips the reduced gradients, takes the AdamW step at step `step`'s learning rate and
    /// clamps the logit scale. Returns the gradient norm before clipping and the learning rate.
    pub fn apply_update(&mut self, step: u64) -> Result<(f64, f64), TrainError> {
        let grad_norm = clip_grad_norm(&self.optimizer.grads(), self.grad_clip)?;
        let lr = cosine_lr(step, self.total_steps, self.warmup_steps, self.lr, self.min_lr);
        self.optimizer.step(lr)?;
        self.model.clamp_logit_scale();
        Ok((grad_norm, lr))
    }

    /// Forward and backward of this rank's batch with the gradients summed over ranks: after
    /// it every rank holds the gradient of the global-batch loss. Returns that loss and the
    /// number of valid samples in the global batch.
    pub fn compute_gradients(&mut self, batch: &DeviceBatch, coll: &mut dyn Collective) -> Result<(f64, u64), TrainError> {
        self.optimizer.zero_grad()?;
        let rank = coll.rank() as i64;
        let slot = batch.len() as i64;
        let rows: Range<i64> = rank * slot..(rank + 1) * slot;

        let micro = if self.max_micro_batch == 0 { batch.len() } else { self.max_micro_batch.min(batch.len()) };
        let single_pass = micro >= batch.len();
        // Stage 1: this rank's features (kept in the graph when there is one micro-batch; with
        // activation checkpointing, the graph of each tower's stem and head and its block inputs).
        let mut tapes = None;
        let (image, text) = if !single_pass {
            tch::no_grad(|| self.encode_in_chunks(batch, micro))
        } else if self.activation_checkpointing {
            let image = self.model.encode_image_checkpointed(&batch.images);
            let text = self.model.encode_text_checkpointed(&batch.tokens, &batch.eot_index);
            let features = (image.output().detach(), text.output().detach());
            tapes = Some((image, text));
            features
        } else {
            (self.model.encode_image(&batch.images), self.model.encode_text(&batch.tokens, &batch.eot_index))
        };
        let image_all = coll.all_gather(&image.detach())?;
        let text_all = coll.all_gather(&text.detach())?;
        let valid_all = coll.all_gather(&batch.valid.to_kind(image.kind()))?.gt(0.5);
        let image_leaf = image_all.detach().set_requires_grad(true);
        let text_leaf = text_all.detach().set_requires_grad(true);

        // Stage 2: this rank's loss share; gradients to the gathered features and logit scale.
        let loss = itc::local_loss(&image_leaf, &text_leaf, &valid_all, rows.clone(), &self.model.logit_scale);
        loss.backward();
        let mut feature_grads = Tensor::cat(&[image_leaf.grad(), text_leaf.grad()], 1);
        coll.all_reduce_sum(&mut feature_grads)?;
        let dim = image.size()[1];
        let local_grads = feature_grads.narrow(0, rows.start, slot);
        let (image_grad, text_grad) = (local_grads.narrow(1, 0, dim), local_grads.narrow(1, dim, dim));

        // Stage 3: backward of this rank's slice through the towers.
        if let Some((image_tape, text_tape)) = tapes {
            image_tape.backward(&image_grad);
            text_tape.backward(&text_grad);
        } else if single_pass {
            surrogate(&image, &image_grad, &text, &text_grad).backward();
        } else {
            for start in (0..batch.len()).step_by(micro) {
                let len = micro.min(batch.len() - start) as i64;
                let part = batch.narrow(start as i64, len);
                let s = start as i64;
                let (image_grad, text_grad) = (image_grad.narrow(0, s, len), text_grad.narrow(0, s, len));
                if self.activation_checkpointing {
                    self.model.encode_image_checkpointed(&part.images).backward(&image_grad);
                    self.model.encode_text_checkpointed(&part.tokens, &part.eot_index).backward(&text_grad);
                } else {
                    let image = self.model.encode_image(&part.images);
                    let text = self.model.encode_text(&part.tokens, &part.eot_index);
                    surrogate(&image, &image_grad, &text, &text_grad).backward();
                }
            }
        }

        // Sum gradients over ranks, the loss share riding along unless the wire is bf16 (the
        // reported loss keeps full precision then, at the cost of one more small collective).
        let mut grads = self.optimizer.grads();
        let mut loss_share = loss.detach().to_kind(grads[0].kind()).reshape([1]);
        let global_loss = if self.reduce_precision == ReducePrecision::Fp32 {
            grads.push(loss_share);
            all_reduce_buckets(coll, &mut grads, self.bucket_bytes, self.reduce_precision)?;
            grads.pop().expect("loss share")
        } else {
            all_reduce_buckets(coll, &mut grads, self.bucket_bytes, self.reduce_precision)?;
            coll.all_reduce_sum(&mut loss_share)?;
            loss_share
        };
        let global_loss = global_loss.double_value(&[0]);
        let samples = valid_all.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]) as u64;
        Ok((global_loss, samples))
    }

    /// The parameters' current gradients by name.
    pub fn named_grads(&self) -> Vec<(String, Tensor)> {
        self.optimizer.params().map(|(n, p)| (n.to_string(), p.grad())).collect()
    }

    fn encode_in_chunks(&self, batch: &DeviceBatch, micro: usize) -> (Tensor, Tensor) {
        let mut images = Vec::new();
        let mut texts = Vec::new();
        for start in (0..batch.len()).step_by(micro) {
            let part = batch.narrow(start as i64, micro.min(batch.len() - start) as i64);
            images.push(self.model.encode_image(&part.images));
            texts.push(self.model.encode_text(&part.tokens, &part.eot_index));
        }
        (Tensor::cat(&images, 0), Tensor::cat(&texts, 0))
    }

    /// Model parameters (`model.<name>`), optimizer state (`optim.<name>`) as named tensors.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> =
            self.optimizer.params().map(|(n, t)| (format!("model.{n}"), t.detach())).collect();
        out.extend(self.optimizer.state().into_iter().map(|(n, t)| (format!("optim.{n}"), t)));
        out
    }

    /// Restores a state written by [`ClipTrainer::state`]; `origin` names it in errors.
    pub fn load_state(&mut self, tensors: Vec<(String, Tensor)>, origin: &str) -> Result<(), TrainError> {
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        self.copy_params(|name| map.get(&format!("model.{name}")), "model.", origin)?;
        let lookup = |k: &str| map.get(&format!("optim.{k}")).map(|t| t.shallow_clone());
        self.optimizer
            .load_state(&lookup)
            .map_err(|reason| TrainError::State { origin: origin.to_string(), reason })
    }

    /// Loads bare model weights (`<name>` keys as open_clip names them), e.g. from an export.
    pub fn load_weights(&mut self, tensors: &[(String, Tensor)], origin: &str) -> Result<(), TrainError> {
        let map: std::collections::HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        self.copy_params(|name| map.get(name).copied(), "", origin)
    }

    /// Copies every parameter from `source` (by parameter name), checking presence and shape;
    /// `prefix` is how the source names keys in errors.
    fn copy_params<'a>(&self, source: impl Fn(&str) -> Option<&'a Tensor>, prefix: &str, origin: &str) -> Result<(), TrainError> {
        let err = |reason: String| TrainError::State { origin: origin.to_string(), reason };
        for (name, param) in self.optimizer.params() {
            let key = format!("{prefix}{name}");
            let src = source(name).ok_or_else(|| err(format!("missing tensor {key:?}")))?;
            if src.size() != param.size() {
                return Err(err(format!("tensor {key:?} has shape {:?}, the model needs {:?}", src.size(), param.size())));
            }
            tch::no_grad(|| param.shallow_clone().copy_(src));
        }
        Ok(())
    }
}

/// `sum(image * dL/dimage) + sum(text * dL/dtext)`: its backward sends the given feature
/// gradients through the towers.
fn surrogate(image: &Tensor, image_grad: &Tensor, text: &Tensor, text_grad: &Tensor) -> Tensor {
    (image * image_grad.detach()).sum(image.kind()) + (text * text_grad.detach()).sum(text.kind())
}

/// A rank's batch as tensors on the training device, padded to the per-rank slot size.
#[derive(Debug)]
pub struct DeviceBatch {
    /// [B, 3, H, W]
    pub images: Tensor,
    /// [B, context]
    pub tokens: Tensor,
    /// [B]
    pub eot_index: Tensor,
    /// [B] bool
    pub valid: Tensor,
}

impl DeviceBatch {
    /// Moves a loader batch to `device` in `kind`, padding with invalid samples up to `slot`.
    pub fn from_batch(batch: &Batch, slot: usize, image_size: i64, device: Device, kind: Kind) -> Self {
        let b = batch.valid.len();
        assert!(b <= slot, "a rank batch of {b} does not fit slot {slot}");
        let context = batch.tokens.len().checked_div(b).unwrap_or(1) as i64;
        let pad = (slot - b) as i64;
        let images = Tensor::from_slice(&batch.images).view([b as i64, 3, image_size, image_size]);
        let tokens = Tensor::from_slice(&batch.tokens).view([b as i64, context]);
        let eot = Tensor::from_slice(&batch.eot_index);
        let valid = Tensor::from_slice(&batch.valid);
        let (images, tokens, eot, valid) = if pad > 0 {
            (
                Tensor::cat(&[images, Tensor::zeros([pad, 3, image_size, image_size], (Kind::Float, Device::Cpu))], 0),
                Tensor::cat(&[tokens, Tensor::zeros([pad, context], (Kind::Int64, Device::Cpu))], 0),
                Tensor::cat(&[eot, Tensor::zeros([pad], (Kind::Int64, Device::Cpu))], 0),
                Tensor::cat(&[valid, Tensor::zeros([pad], (Kind::Bool, Device::Cpu))], 0),
            )
        } else {
            (images, tokens, eot, valid)
        };
        Self {
            images: images.to_kind(kind).to_device(device),
            tokens: tokens.to_device(device),
            eot_index: eot.to_device(device),
            valid: valid.to_device(device),
        }
    }

    /// Samples in the batch (padding included).
    pub fn len(&self) -> usize {
        self.valid.size()[0] as usize
    }

    /// True when the batch holds no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `[start, start + len)`.
    pub fn narrow(&self, start: i64, len: i64) -> DeviceBatch {
        DeviceBatch {
            images: self.images.narrow(0, start, len),
            tokens: self.tokens.narrow(0, start, len),
            eot_index: self.eot_index.narrow(0, start, len),
            valid: self.valid.narrow(0, start, len),
        }
    }
}
