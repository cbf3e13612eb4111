//! The data-parallel training step: each family's forward and backward pass with its
//! objectives' cross-worker communication, gradient all-reduce in buckets, clipping, AdamW and
//! the schedule.
//!
//! Every rank holds the same parameters, optimizer state and (ALBEF, BLIP) momentum encoders and
//! queues; the loss terms are scaled so that summing gradients over ranks gives the gradient of
//! the global-batch loss, so W workers with B samples each take the same step as one worker with
//! W*B samples.

pub mod albef;
mod batch;
pub mod blip;
mod capture;
mod clip;
mod momentum;

use std::collections::HashMap;

use braid_coordinator::config::JobConfig;
use tch::{nn, Device, Kind, Tensor};

pub use batch::{attention_mask, DeviceBatch, HostBatch};
pub use capture::{StepCapture, CAPTURE_AFTER_STEPS};
use capture::CaptureState;

use crate::collective::{all_reduce_buckets, Collective, CollectiveError, ReducePrecision};
use crate::data::mlm::MaskingVocab;
use crate::data::tokenizer::TextTokenizer;
use crate::models::albef::AlbefConfig;
use crate::models::blip::{BlipConfig, BlipTokens};
use crate::models::clip::{Clip, ClipConfig};
use crate::models::layers::Activation;
use crate::models::ModelError;
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
    /// The tokenizer cannot serve the model family.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Momentum encoders or feature queues that do not fit.
    #[error(transparent)]
    Momentum(#[from] crate::objectives::momentum::MomentumError),
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
#[derive(Debug, Clone, Default, PartialEq)]
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
    /// Global-batch values of the loss's terms (`itc`, `itm`, then `mlm` for ALBEF or `lm` for BLIP; empty for CLIP).
    pub parts: Vec<(&'static str, f64)>,
}

/// The shape of the model a job trains, with what its objectives need from the tokenizer.
#[derive(Debug, Clone)]
pub enum ModelSpec {
    /// CLIP.
    Clip(ClipConfig),
    /// ALBEF.
    Albef {
        /// The model's shape.
        config: AlbefConfig,
        /// The vocabulary its MLM masking draws from.
        vocab: MaskingVocab,
        /// Caption length in tokens (`model.context_length`; default 30 as in the paper, 32 for
        /// `tiny`), at most the position table's size.
        context_length: i64,
    },
    /// BLIP.
    Blip {
        /// The model's shape, with its special tokens and the job's queue size, momentum and
        /// distillation weight.
        config: BlipConfig,
        /// Caption length in tokens (`model.context_length`; default 30 as in the paper's
        /// pretraining, 32 for `tiny`), at most the position table's size.
        context_length: i64,
    },
}

impl ModelSpec {
    /// The family's name as job files write it.
    pub fn family(&self) -> &'static str {
        match self {
            Self::Clip(_) => "clip",
            Self::Albef { .. } => "albef",
            Self::Blip { .. } => "blip",
        }
    }

    /// Input resolution (square).
    pub fn image_size(&self) -> i64 {
        match self {
            Self::Clip(c) => c.vision.image_size,
            Self::Albef { config, .. } => config.vision.image_size,
            Self::Blip { config, .. } => config.vision.image_size,
        }
    }

    /// Caption length in tokens.
    pub fn context_length(&self) -> i64 {
        match self {
            Self::Clip(c) => c.text.context_length,
            Self::Albef { context_length, .. } | Self::Blip { context_length, .. } => *context_length,
        }
    }

    /// Forward FLOPs of one training sample, for throughput and MFU.
    pub fn forward_flops_per_sample(&self) -> f64 {
        match self {
            Self::Clip(c) => c.forward_flops_per_sample(),
            Self::Albef { config, context_length, .. } => {
                // The preset's count is for captions as long as the position table; a job's
                // captions are `context_length` tokens.
                let mut counted = *config;
                counted.text.max_position_embeddings = *context_length;
                counted.forward_flops_per_sample()
            }
            Self::Blip { config, .. } => config.forward_flops_per_sample(),
        }
    }
}

/// Builds the model shape a job asks for, with the tokenizer's vocabulary and special tokens.
pub fn model_spec(config: &JobConfig, tokenizer: &dyn TextTokenizer) -> Result<ModelSpec, TrainError> {
    let vocab_size = tokenizer.vocab_size() as i64;
    let bert_tokens = || {
        tokenizer.as_hf().ok_or_else(|| TrainError::Tokenizer(format!(
            "model.family = {:?} needs a BERT-style tokenizer.json with [CLS], [SEP], [PAD], [MASK] and [UNK]; data.tokenizer is {}",
            config.model.family,
            tokenizer.name()
        )))
    };
    match config.model.family.as_str() {
        "albef" => {
            let hf = bert_tokens()?;
            let special = hf.bert_special_tokens().map_err(|e| TrainError::Tokenizer(e.to_string()))?;
            let vocab = MaskingVocab::from_tokenizer(hf).map_err(|e| TrainError::Tokenizer(e.to_string()))?;
            let default_context = if config.model.preset == "tiny" { 32 } else { 30 };
            let context_length = config.model.context_length.map_or(default_context, |c| c as i64);
            let mut albef = AlbefConfig::preset(&config.model.preset, vocab_size, i64::from(special.pad), None)?;
            let m = &config.model;
            albef.queue_size = m.queue_size() as i64;
            albef.momentum = m.momentum;
            albef.alpha = m.alpha;
            albef.mlm_probability = m.mlm_probability;
            let positions = albef.text.max_position_embeddings;
            if context_length > positions {
                return Err(TrainError::Model(ModelError::Weights {
                    origin: "model.context_length".into(),
                    reason: format!("{context_length} tokens exceed the {positions} position embeddings of albef {}", config.model.preset),
                }));
            }
            Ok(ModelSpec::Albef { config: albef, vocab, context_length })
        }
        "blip" => {
            let hf = tokenizer.as_hf().ok_or_else(|| TrainError::Tokenizer(format!(
                "model.family = \"blip\" needs a BERT-style tokenizer.json with [DEC], [ENC], [SEP] and [PAD]; data.tokenizer is {}",
                tokenizer.name()
            )))?;
            let names = ["[DEC]", "[ENC]", "[SEP]", "[PAD]"];
            let ids: Vec<Option<u32>> = names.iter().map(|t| hf.token_to_id(t)).collect();
            let missing: Vec<&str> = names.iter().zip(&ids).filter(|(_, id)| id.is_none()).map(|(t, _)| *t).collect();
            let [Some(dec), Some(enc), Some(sep), Some(pad)] = ids[..] else {
                return Err(TrainError::Tokenizer(format!(
                    "model.family = \"blip\": tokenizer {} lacks {}; BLIP needs [DEC] (the decoder's first token), [ENC] (the \
                     image-grounded encoder's first token), [SEP] and [PAD] (`braid data synth` writes a tokenizer-bert.json with \
                     all four; for bert-base-uncased add [DEC] and [ENC] as BLIP does)",
                    tokenizer.name(),
                    missing.join(", ")
                )));
            };
            let special = BlipTokens {
                bos_token_id: i64::from(dec),
                enc_token_id: i64::from(enc),
                sep_token_id: i64::from(sep),
                pad_token_id: i64::from(pad),
            };
            let default_context = if config.model.preset == "tiny" { 32 } else { 30 };
            let context_length = config.model.context_length.map_or(default_context, |c| c as i64);
            let mut blip = BlipConfig::preset(&config.model.preset, vocab_size, special, Some(context_length))?;
            let m = &config.model;
            blip.queue_size = m.queue_size() as i64;
            blip.momentum = m.momentum;
            blip.alpha = m.alpha;
            let positions = blip.text.max_position_embeddings;
            if !(2..=positions).contains(&context_length) {
                return Err(TrainError::Model(ModelError::Weights {
                    origin: "model.context_length".into(),
                    reason: format!(
                        "{context_length} tokens do not fit blip {}: a caption needs at least 2 tokens and at most the {positions} position embeddings",
                        config.model.preset
                    ),
                }));
            }
            blip.validate().map_err(|problems| TrainError::Model(ModelError::Weights {
                origin: format!("blip {} with tokenizer {}", config.model.preset, tokenizer.name()),
                reason: problems,
            }))?;
            Ok(ModelSpec::Blip { config: blip, context_length })
        }
        _ => Ok(ModelSpec::Clip(clip_config(config, vocab_size)?)),
    }
}

/// What a model family adds to the generic data-parallel step: its forward and backward pass
/// with the objectives' cross-rank communication, what follows the optimizer update (clamps,
/// momentum encoders, queues), and the state it keeps besides parameters and optimizer moments.
pub(crate) trait Family: Send {
    /// Forward and backward of this rank's slot of global batch `step`: afterwards every
    /// parameter's gradient holds this rank's share (summing over ranks gives the gradient of
    /// the global-batch loss). Returns this rank's loss share (scalar) and the named parts.
    fn forward_backward(&mut self, step: u64, batch: &DeviceBatch, coll: &mut dyn Collective) -> Result<LossShare, TrainError>;

    /// Runs after the optimizer update of every step.
    fn after_update(&mut self) -> Result<(), TrainError>;

    /// The contrastive logit scale now, a scalar on the model's device: `exp(s)` (CLIP) or
    /// `1 / temperature` (ALBEF, BLIP).
    fn logit_scale(&self) -> Tensor;

    /// State besides parameters and optimizer moments (momentum encoders, queues), named
    /// `momentum.*` / `queue.*`; shallow tensors.
    fn extra_state(&self) -> Vec<(String, Tensor)>;

    /// Restores [`Family::extra_state`] from `source`; `origin` names it in errors.
    fn load_extra_state(&mut self, source: &HashMap<String, Tensor>, origin: &str) -> Result<(), TrainError>;

    /// Sets the momentum encoders to the live weights, after weights were loaded into them
    /// (ALBEF, BLIP); nothing for families without momentum encoders.
    fn reset_momentum(&mut self) -> Result<(), TrainError> {
        Ok(())
    }

    /// Tells the family how many steps one epoch of the training set takes (ALBEF and BLIP
    /// ramp their distillation weight over the first epochs).
    fn set_epoch_steps(&mut self, _steps: u64) {}

    /// The family as `Any`, for callers that need the concrete model (evaluation, export).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// This rank's share of a step's loss.
pub(crate) struct LossShare {
    /// The share of the total loss (a scalar tensor, detached).
    pub total: Tensor,
    /// The shares of the loss's terms (`itc`, `itm`, `mlm`, ...), same kind.
    pub parts: Vec<(&'static str, Tensor)>,
}

/// A step's loss shares summed over ranks, still on the device: `[total, terms..., samples]`
/// in the gradients' kind.
struct ReducedShares {
    values: Tensor,
    terms: Vec<&'static str>,
}

/// A model with its optimizer, trained data-parallel.
pub struct Trainer {
    vs: nn::VarStore,
    family: Box<dyn Family>,
    spec: ModelSpec,
    optimizer: AdamW,
    precision: Precision,
    device: Device,
    total_steps: u64,
    warmup_steps: u64,
    lr: f64,
    min_lr: f64,
    grad_clip: f64,
    bucket_bytes: usize,
    /// Dtype of the gradients on the wire (`cluster.reduce_precision`).
    reduce_precision: ReducePrecision,
    /// How steps are issued (`train.cuda_graph`).
    capture: StepCapture,
    capture_state: CaptureState,
    /// Why the last step ran eagerly although a capture mode is set (logged when it changes).
    capture_declined: Option<String>,
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

/// The kind a model computes in at `precision`.
fn compute_kind(precision: Precision) -> Kind {
    match precision {
        Precision::Fp64 => Kind::Double,
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
    }
}

impl Trainer {
    /// A freshly initialised model (seeded by the job seed, so every rank starts identical).
    pub fn new(config: &JobConfig, spec: impl Into<ModelSpec>, device: Device) -> Result<Self, TrainError> {
        let spec = spec.into();
        let precision = Precision::parse(&config.train.precision).expect("validated precision");
        let mut vs = nn::VarStore::new(device);
        let family: Box<dyn Family> = match &spec {
            ModelSpec::Clip(clip) => Box::new(clip::ClipFamily::new(&mut vs, config, *clip, precision)),
            ModelSpec::Albef { config: albef, vocab, .. } => {
                Box::new(albef::AlbefFamily::new(&mut vs, config, *albef, vocab.clone(), precision)?)
            }
            ModelSpec::Blip { config: blip, .. } => Box::new(blip::BlipFamily::new(&mut vs, config, *blip, precision)?),
        };
        let t = &config.train;
        let named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        let optimizer = AdamW::new(
            named,
            AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay },
        );
        Ok(Self {
            vs,
            family,
            spec,
            optimizer,
            precision,
            device,
            total_steps: t.steps,
            warmup_steps: t.warmup_steps,
            lr: t.lr,
            min_lr: t.min_lr,
            grad_clip: t.grad_clip,
            bucket_bytes: config.cluster.bucket_bytes(),
            reduce_precision: ReducePrecision::parse(&config.cluster.reduce_precision).expect("validated reduce_precision"),
            capture: if t.cuda_graph { StepCapture::CudaGraph } else { StepCapture::Eager },
            capture_state: if t.cuda_graph { CaptureState::WarmingUp(0) } else { CaptureState::Off },
            capture_declined: None,
        })
    }

    /// The model's shape.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The CLIP model, when the job trains CLIP.
    pub fn clip(&self) -> Option<&Clip> {
        self.family.as_any().downcast_ref::<clip::ClipFamily>().map(|f| &f.model)
    }

    /// The ALBEF model and its momentum encoders, when the job trains ALBEF.
    pub fn albef(&self) -> Option<&albef::AlbefFamily> {
        self.family.as_any().downcast_ref::<albef::AlbefFamily>()
    }

    /// The BLIP model and its momentum encoders, when the job trains BLIP.
    pub fn blip(&self) -> Option<&blip::BlipFamily> {
        self.family.as_any().downcast_ref::<blip::BlipFamily>()
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

    /// Tells the objectives how many steps one epoch takes (ALBEF/BLIP's distillation ramp).
    pub fn set_epoch_steps(&mut self, steps: u64) {
        self.family.set_epoch_steps(steps);
    }

    /// One optimizer step on this rank's share of global batch `step`.
    ///
    /// `rank_batch` is padded by the caller to `slot` samples (every rank gathers the same
    /// shape); padding rows are marked invalid.
    pub fn train_step(&mut self, step: u64, batch: &DeviceBatch, coll: &mut dyn Collective) -> Result<StepStats, TrainError> {
        self.train_step_with(step, batch, coll, || ())
    }

    /// [`Trainer::train_step`], calling `before_update` before anything modifies the
    /// parameters (where a checkpoint's host copy of the state must be complete): between the
    /// backward pass and the optimizer update, or before a captured step's replay.
    ///
    /// The step's kernels are issued without waiting for the device; its results are read in
    /// one copy at the end.
    pub fn train_step_with(
        &mut self,
        step: u64,
        batch: &DeviceBatch,
        coll: &mut dyn Collective,
        before_update: impl FnOnce(),
    ) -> Result<StepStats, TrainError> {
        if self.capture != StepCapture::Eager {
            match self.capture_declined_for(batch, coll.world_size()) {
                None => return self.captured_step(step, batch, coll, before_update),
                Some(reason) => self.decline_capture(reason),
            }
        }
        let lr = self.lr_at(step);
        let shares = self.reduce_gradients(step, batch, coll)?;
        // A collective that failed after its call returned (NCCL's watchdog) must stop the step
        // before the update: the parameters then still hold the previous step.
        coll.check()?;
        before_update();
        let values = tracing::info_span!("optimizer").in_scope(|| -> Result<Tensor, TrainError> {
            self.optimizer.begin_step(lr);
            let grad_norm = self.update()?;
            Ok(self.step_values(&shares, &grad_norm))
        })?;
        read_stats(&values, &shares.terms, lr)
    }

    /// Learning rate of step `step` (0-based) on the job's schedule.
    fn lr_at(&self, step: u64) -> f64 {
        cosine_lr(step, self.total_steps, self.warmup_steps, self.lr, self.min_lr)
    }

    /// Clips the reduced gradients, applies the AdamW update [`AdamW::begin_step`] began, then
    /// the family's after-update work (clamps, momentum encoders, queues). Returns the gradient
    /// norm before clipping, on the device.
    fn update(&mut self) -> Result<Tensor, TrainError> {
        let grad_norm = clip_grad_norm(&self.optimizer.grads(), self.grad_clip)?;
        self.optimizer.apply()?;
        self.family.after_update()?;
        Ok(grad_norm)
    }

    /// A step's results on the device, to read in one copy: `[total loss, terms..., samples,
    /// grad norm, logit scale]` as float64.
    fn step_values(&self, shares: &ReducedShares, grad_norm: &Tensor) -> Tensor {
        let scalar = |t: &Tensor| t.detach().to_kind(Kind::Double).reshape([1]);
        Tensor::cat(&[shares.values.to_kind(Kind::Double), scalar(grad_norm), scalar(&self.family.logit_scale())], 0)
    }

    /// Forward, backward, gradient all-reduce and update of one step, issued without waiting
    /// for the device: what a captured step holds. Returns [`Trainer::step_values`].
    fn step_work(&mut self, step: u64, batch: &DeviceBatch, coll: &mut dyn Collective) -> Result<(Tensor, Vec<&'static str>), TrainError> {
        let shares = self.reduce_gradients(step, batch, coll)?;
        let grad_norm = self.update()?;
        Ok((self.step_values(&shares, &grad_norm), shares.terms))
    }

    /// Forward and backward of this rank's batch with the gradients summed over ranks: after
    /// it every rank holds the gradient of the global-batch loss. Returns that loss and the
    /// number of valid samples in the global batch.
    pub fn compute_gradients(&mut self, step: u64, batch: &DeviceBatch, coll: &mut dyn Collective) -> Result<(f64, u64), TrainError> {
        let shares = self.reduce_gradients(step, batch, coll)?;
        let values = Vec::<f64>::try_from(shares.values.to_kind(Kind::Double).to_device(Device::Cpu))?;
        Ok((values[0], values[values.len() - 1] as u64))
    }

    /// Zeroes the gradients, runs the family's forward and backward pass and sums gradients
    /// and loss shares over ranks, without waiting for the device.
    fn reduce_gradients(&mut self, step: u64, batch: &DeviceBatch, coll: &mut dyn Collective) -> Result<ReducedShares, TrainError> {
        self.optimizer.zero_grad()?;
        let share = self.family.forward_backward(step, batch, coll)?;
        // Sum gradients over ranks, the loss shares and valid-sample counts riding along unless
        // the wire is bf16 (the reported losses keep full precision then, at the cost of one
        // more small collective).
        let mut grads = self.optimizer.grads();
        let kind = grads[0].kind();
        let valid = batch.valid.sum(kind).reshape([1]);
        let shares: Vec<Tensor> = std::iter::once(&share.total)
            .chain(share.parts.iter().map(|(_, t)| t))
            .map(|t| t.detach().to_kind(kind).reshape([1]))
            .chain(std::iter::once(valid))
            .collect();
        let mut shares = Tensor::cat(&shares, 0);
        let _all_reduce = tracing::info_span!("all_reduce", buckets_bytes = self.bucket_bytes).entered();
        let values = if self.reduce_precision == ReducePrecision::Fp32 {
            grads.push(shares);
            all_reduce_buckets(coll, &mut grads, self.bucket_bytes, self.reduce_precision)?;
            grads.pop().expect("loss shares")
        } else {
            all_reduce_buckets(coll, &mut grads, self.bucket_bytes, self.reduce_precision)?;
            coll.all_reduce_sum(&mut shares)?;
            shares
        };
        Ok(ReducedShares { values, terms: share.parts.iter().map(|(name, _)| *name).collect() })
    }

    /// The parameters' current gradients by name.
    pub fn named_grads(&self) -> Vec<(String, Tensor)> {
        self.optimizer.params().map(|(n, p)| (n.to_string(), p.grad())).collect()
    }

    /// Model parameters (`model.<name>`), optimizer state (`optim.<name>`) and the family's
    /// state (`momentum.<name>`, `queue.*`) as named tensors.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> =
            self.optimizer.params().map(|(n, t)| (format!("model.{n}"), t.detach())).collect();
        out.extend(self.optimizer.state().into_iter().map(|(n, t)| (format!("optim.{n}"), t)));
        out.extend(self.family.extra_state());
        out
    }

    /// Hex sha256 of the replicated state (parameters, momentum encoders, queues; not the
    /// optimizer moments), equal on every rank while replicas agree.
    pub fn replica_digest(&self) -> String {
        let mut named: Vec<(String, Tensor)> = self.optimizer.params().map(|(n, t)| (format!("model.{n}"), t.detach())).collect();
        named.extend(self.family.extra_state());
        crate::objectives::momentum::state_digest(&named)
    }

    /// Restores a state written by [`Trainer::state`]; `origin` names it in errors.
    pub fn load_state(&mut self, tensors: Vec<(String, Tensor)>, origin: &str) -> Result<(), TrainError> {
        let map: HashMap<String, Tensor> = tensors.into_iter().collect();
        self.copy_params(|name| map.get(&format!("model.{name}")), "model.", origin)?;
        let lookup = |k: &str| map.get(&format!("optim.{k}")).map(|t| t.shallow_clone());
        self.optimizer
            .load_state(&lookup)
            .map_err(|reason| TrainError::State { origin: origin.to_string(), reason })?;
        self.family.load_extra_state(&map, origin)
    }

    /// Loads bare model weights (`<name>` keys as braid names them), e.g. from an export.
    pub fn load_weights(&mut self, tensors: &[(String, Tensor)], origin: &str) -> Result<(), TrainError> {
        let map: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        self.copy_params(|name| map.get(name).copied(), "", origin)?;
        self.family.reset_momentum()
    }

    /// Loads the weights a reference layout has (braid names), keeping the initialisation of
    /// the parameters `may_lack` allows it to lack (heads the reference does not have); the
    /// momentum encoders then start as copies of the result. Returns the parameters left at
    /// their initialisation.
    pub fn load_partial_weights(&mut self, tensors: &[(String, Tensor)], may_lack: impl Fn(&str) -> bool, origin: &str) -> Result<Vec<String>, TrainError> {
        let map: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut kept = Vec::new();
        let err = |reason: String| TrainError::State { origin: origin.to_string(), reason };
        for (name, param) in self.optimizer.params() {
            match map.get(name) {
                Some(src) if src.size() == param.size() => tch::no_grad(|| param.shallow_clone().copy_(src)),
                Some(src) => return Err(err(format!("tensor {name:?} has shape {:?}, the model needs {:?}", src.size(), param.size()))),
                None if may_lack(name) => kept.push(name.to_string()),
                None => return Err(err(format!("missing tensor {name:?}"))),
            };
        }
        self.family.reset_momentum()?;
        Ok(kept)
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

/// Reads a step's results (laid out by [`Trainer::step_values`]) from the device in one copy.
fn read_stats(values: &Tensor, terms: &[&'static str], lr: f64) -> Result<StepStats, TrainError> {
    let v = Vec::<f64>::try_from(values.to_device(Device::Cpu))?;
    let n = terms.len();
    assert_eq!(v.len(), n + 4, "step values are [total, {n} terms, samples, grad norm, logit scale]");
    Ok(StepStats {
        loss: v[0],
        parts: terms.iter().zip(&v[1..=n]).map(|(name, value)| (*name, *value)).collect(),
        samples: v[n + 1] as u64,
        grad_norm: v[n + 2],
        logit_scale: v[n + 3],
        lr,
    })
}

impl From<ClipConfig> for ModelSpec {
    fn from(config: ClipConfig) -> Self {
        ModelSpec::Clip(config)
    }
}
