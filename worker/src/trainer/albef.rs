//! ALBEF's step: ITC with momentum distillation against the queues, ITM on hard negatives and
//! MLM with the momentum model's soft labels; total loss `ITC + ITM + MLM` (the paper's eq. 6).
//!
//! One step on rank `r` of `W`, slot `B`, global batch `N`:
//! 1. Mask the captions (a hash of each sample's position decides, so masks do not depend on
//!    `W`). Run the momentum model without autograd: its [CLS] features of images and captions
//!    and its MLM logits on the masked captions. All-gather the momentum features (with the valid
//!    flags and the count of masked tokens).
//! 2. Encode the images and captions (unimodal layers) with autograd and detach the states into
//!    leaves; with `global` hard negatives the leaves are the all-gathered states of every rank.
//! 3. On the leaves: the distilled ITC of this rank's rows against every rank's momentum features
//!    and the queues; hard negatives drawn from the similarities and the ITM loss on the `3B` pairs
//!    through the fusion layers; the MLM loss of the masked captions fused with this rank's images.
//!    Each term is divided by its global count, so the ranks' shares add up to the global loss.
//! 4. Backward of the shares to the parameters of the heads and fusion layers and to the leaves;
//!    with `global` negatives the leaves' gradients are summed over ranks (a negative may come from
//!    another rank). Then backward of this rank's rows of those gradients through the encoders.
//! 5. After the optimizer update: clamp the temperature, update the momentum encoders
//!    (`theta_m <- m theta_m + (1 - m) theta`) and enqueue the step's gathered momentum features.

use std::collections::HashMap;

use braid_coordinator::config::JobConfig;
use tch::{nn, Device, Kind, Tensor};

use super::clip::surrogate;
use super::{compute_kind, seeded, DeviceBatch, Family, LossShare, Precision, TrainError};
use crate::collective::Collective;
use crate::data::mlm::{Masker, MaskingConfig, MaskingInputs, MaskingVocab, IGNORE_INDEX};
use crate::models::albef::{Albef, AlbefConfig};
use crate::objectives::distill::{self, MomentumKeys};
use crate::objectives::itm::{self, Direction};
use crate::objectives::mlm::distilled_mlm_sum;
use crate::objectives::momentum::MomentumCopy;
use crate::objectives::queue::{global_batch_rows, FeatureQueue};

/// Where ITM hard negatives are drawn from (`model.hard_negatives`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HardNegatives {
    /// This rank's batch (the papers' pretraining).
    PerWorker,
    /// The whole global batch: the same negatives at any worker count.
    Global,
}

impl HardNegatives {
    /// Parses `per_worker` or `global`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "per_worker" => Some(Self::PerWorker),
            "global" => Some(Self::Global),
            _ => None,
        }
    }
}

/// The hard negatives drawn for one sample in a step, as columns of the candidates: the
/// gathered global batch (`global`) or this rank's batch (`per_worker`), in rank order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrawnNegatives {
    /// The sample's global position.
    pub position: i64,
    /// The negative caption's column, if one could be drawn.
    pub text: Option<usize>,
    /// The negative image's column, if one could be drawn.
    pub image: Option<usize>,
}

/// ALBEF, its momentum encoders and queues, and its objectives' settings.
pub struct AlbefFamily {
    /// The model (its parameters live in the trainer's variable store).
    pub model: Albef,
    /// The momentum model: the same modules over the momentum copy's storage.
    pub momentum_model: Albef,
    /// Keeps the momentum model's storage alive.
    _momentum_store: nn::VarStore,
    momentum: MomentumCopy,
    /// The live parameters that have momentum copies, in the copy's order (shallow).
    momentum_sources: Vec<(String, Tensor)>,
    /// Momentum image features of earlier steps.
    pub image_queue: FeatureQueue,
    /// Momentum text features of earlier steps.
    pub text_queue: FeatureQueue,
    masker: Masker,
    m: f64,
    alpha: f64,
    alpha_ramp_steps: Option<u64>,
    epoch_steps: u64,
    hard_negatives: HardNegatives,
    seed: u64,
    global_batch: usize,
    /// Kind of parameters and losses.
    kind: Kind,
    /// This step's gathered momentum features and valid flags, enqueued after the update (a
    /// step that fails before its update leaves the queues as they were).
    pending: Option<(Tensor, Tensor, Tensor)>,
    /// The hard negatives of the last step's valid samples.
    last_negatives: Vec<DrawnNegatives>,
}

impl AlbefFamily {
    /// A freshly initialised ALBEF under `vs`'s root, seeded by the job seed; momentum encoders
    /// start equal to it and the queues with random unit features (both seeded too). The queue
    /// size, momentum, distillation weight and masking probability are `albef`'s; the job's
    /// `[model]` keys set them in [`super::model_spec`].
    pub fn new(
        vs: &mut nn::VarStore,
        config: &JobConfig,
        albef: AlbefConfig,
        vocab: MaskingVocab,
        precision: Precision,
    ) -> Result<Self, TrainError> {
        let seed = config.job.seed;
        let mut model = seeded(seed, || Albef::new(&vs.root(), albef));
        let mut momentum_store = nn::VarStore::new(vs.device());
        // Its initial values are overwritten by the copy; drawing them under the generator's lock
        // keeps other threads' seeded draws (ranks as threads in tests) undisturbed.
        let mut momentum_model = seeded(seed, || Albef::new(&momentum_store.root(), albef));
        if precision == Precision::Fp64 {
            vs.double();
            momentum_store.double();
        }
        momentum_store.freeze();
        model.set_compute_kind(compute_kind(precision));
        momentum_model.set_compute_kind(compute_kind(precision));
        let momentum_sources = momentum_params(vs);
        let momentum = MomentumCopy::over(momentum_params(&momentum_store), &momentum_sources)?;

        let kind = precision.param_kind();
        let queue_size = albef.queue_size;
        let image_queue = FeatureQueue::new(queue_size, albef.embed_dim, seed ^ 0x1A6E, kind, vs.device());
        let text_queue = FeatureQueue::new(queue_size, albef.embed_dim, seed ^ 0x7E47, kind, vs.device());
        let masking = MaskingConfig {
            probability: albef.mlm_probability,
            whole_word: config.model.whole_word_masking,
            ..MaskingConfig::default()
        };
        if masking.whole_word {
            return Err(TrainError::Tokenizer(
                "model.whole_word_masking needs each token's word, which the data loader does not pass to ALBEF yet; \
                 leave it false (braid's synthetic vocabulary has one token per word, where both agree)"
                    .into(),
            ));
        }
        let masker = Masker::new(masking, vocab, seed).map_err(|e| TrainError::Tokenizer(e.to_string()))?;
        Ok(Self {
            model,
            momentum_model,
            _momentum_store: momentum_store,
            momentum,
            momentum_sources,
            image_queue,
            text_queue,
            masker,
            m: albef.momentum,
            alpha: albef.alpha,
            alpha_ramp_steps: config.model.alpha_ramp_steps,
            epoch_steps: 0,
            hard_negatives: HardNegatives::parse(&config.model.hard_negatives).expect("validated hard_negatives"),
            seed,
            global_batch: config.train.global_batch,
            kind,
            pending: None,
            last_negatives: Vec::new(),
        })
    }

    /// The distillation weight at `step`: `alpha` ramped over `alpha_ramp_steps`, else over one
    /// epoch (ALBEF's schedule).
    pub fn alpha_at(&self, step: u64) -> f64 {
        distill::alpha_at(step, self.alpha_ramp_steps.unwrap_or(self.epoch_steps), self.alpha)
    }

    /// The hard negatives drawn in the last step for this rank's valid samples.
    pub fn last_negatives(&self) -> &[DrawnNegatives] {
        &self.last_negatives
    }

    /// MLM inputs of a batch: masked ids and labels `[B, L]` on the batch's device (padding
    /// rows predict nothing).
    fn mask(&self, batch: &DeviceBatch, attention_mask: &Tensor) -> Result<(Tensor, Tensor), TrainError> {
        let (b, l) = batch.tokens.size2()?;
        let cpu = |t: &Tensor| Vec::<i64>::try_from(t.to_device(Device::Cpu).flatten(0, -1));
        let token_ids = cpu(&batch.tokens)?;
        let mask = cpu(attention_mask)?;
        let positions = Vec::<i64>::try_from(&batch.positions)?;
        let positions: Vec<u64> = positions.iter().map(|&p| p.max(0) as u64).collect();
        let masked = self
            .masker
            .mask_batch(MaskingInputs { token_ids: &token_ids, attention_mask: &mask, word_ids: None, positions: &positions })
            .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
        let device = batch.tokens.device();
        let ids = Tensor::from_slice(&masked.input_ids).view([b, l]).to_device(device);
        let labels = Tensor::from_slice(&masked.labels).view([b, l]).to_device(device);
        let labels = labels.masked_fill(&batch.valid.logical_not().unsqueeze(1), IGNORE_INDEX);
        Ok((ids, labels))
    }
}

/// The parameters of `vs` that ALBEF keeps momentum copies of, sorted by name (shallow).
fn momentum_params(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(n, _)| Albef::has_momentum(n)).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

impl Family for AlbefFamily {
    fn forward_backward(&mut self, step: u64, batch: &DeviceBatch, coll: &mut dyn Collective) -> Result<LossShare, TrainError> {
        let (rank, world) = (coll.rank() as i64, coll.world_size());
        let slot = batch.len() as i64;
        let kind = self.kind;
        let alpha = self.alpha_at(step);
        let attention_mask = batch.attention_mask();
        let (masked_ids, labels) = self.mask(batch, &attention_mask)?;

        // 1. The momentum model's features and MLM logits; gathered features, flags and counts.
        let mm = &self.momentum_model;
        let (image_m, text_m, mlm_logits_m) = tch::no_grad(|| {
            let image_states = mm.encode_image(&batch.images);
            let text_states = mm.encode_text(&batch.tokens, &attention_mask);
            let logits = (alpha > 0.0).then(|| {
                let masked = mm.encode_text(&masked_ids, &attention_mask);
                mm.mlm_logits(&mm.fuse(&masked, &attention_mask, &image_states))
            });
            (mm.image_feature(&image_states).to_kind(kind), mm.text_feature(&text_states).to_kind(kind), logits)
        });
        let dim = image_m.size()[1];
        let masked_per_row = labels.ne(IGNORE_INDEX).sum_dim_intlist([1i64].as_slice(), true, kind);
        let local = Tensor::cat(&[&image_m, &text_m, &batch.valid.to_kind(kind).unsqueeze(1), &masked_per_row], 1);
        let gathered = coll.all_gather(&local)?;
        let image_m_all = gathered.narrow(1, 0, dim);
        let text_m_all = gathered.narrow(1, dim, dim);
        let valid_all = gathered.select(1, 2 * dim).gt(0.5);
        let n_valid = valid_all.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
        let n_masked = gathered.select(1, 2 * dim + 1).sum(Kind::Double).double_value(&[]).round() as i64;

        // 2. Unimodal states with autograd, detached into leaves (gathered for global negatives).
        let image_states = self.model.encode_image(&batch.images);
        let text_states = self.model.encode_text(&batch.tokens, &attention_mask);
        let global = self.hard_negatives == HardNegatives::Global && world > 1;
        let (image_leaf, text_leaf, mask_c, offset) = if global {
            let mut gather = |t: &Tensor| -> Result<Tensor, TrainError> {
                let wire = t.detach().to_kind(kind);
                Ok(coll.all_gather(&wire.flatten(1, -1))?.view(gathered_shape(t, world).as_slice()).to_kind(t.kind()))
            };
            let image_all = gather(&image_states)?;
            let text_all = gather(&text_states)?;
            let mask_all = coll.all_gather(&attention_mask.to_kind(kind))?.to_kind(Kind::Int64);
            (image_all.set_requires_grad(true), text_all.set_requires_grad(true), mask_all, rank * slot)
        } else {
            (image_states.detach().set_requires_grad(true), text_states.detach().set_requires_grad(true), attention_mask.shallow_clone(), 0)
        };
        let image_own = image_leaf.narrow(0, offset, slot);
        let text_own = text_leaf.narrow(0, offset, slot);

        // 3a. ITC with momentum distillation against every rank's momentum features and the queues.
        let image_feat = self.model.image_feature(&image_own).to_kind(kind);
        let text_feat = self.model.text_feature(&text_own).to_kind(kind);
        let rows = rank * slot..(rank + 1) * slot;
        let keys = MomentumKeys {
            image_all: &image_m_all,
            text_all: &text_m_all,
            valid_all: &valid_all,
            image_queue: &self.image_queue,
            text_queue: &self.text_queue,
        };
        let itc = distill::local_loss(&image_feat, &text_feat, rows.clone(), &keys, &self.model.temp, alpha);

        // 3b. ITM: one hard negative per direction, drawn over the candidates' momentum features.
        let columns = if global { 0..world as i64 * slot } else { rows.clone() };
        let candidates = |t: &Tensor| t.narrow(0, columns.start, columns.end - columns.start);
        let valid_columns = candidates(&valid_all);
        let temp = self.model.temp.detach().to_kind(kind);
        let own_columns: Vec<i64> = (0..slot).map(|i| offset + i).collect();
        let positions = Vec::<i64>::try_from(&batch.positions)?;
        let valid_rows = Vec::<bool>::try_from(batch.valid.to_device(Device::Cpu))?;
        let positions: Vec<i64> = positions.iter().zip(&valid_rows).map(|(&p, &v)| if v { p } else { -1 }).collect();
        let sim_i2t = image_feat.detach().matmul(&candidates(&text_m_all).transpose(0, 1)) / &temp;
        let sim_t2i = text_feat.detach().matmul(&candidates(&image_m_all).transpose(0, 1)) / &temp;
        let weights_i2t = itm::hard_negative_weights(&sim_i2t, &own_columns, &valid_columns, 0.0);
        let weights_t2i = itm::hard_negative_weights(&sim_t2i, &own_columns, &valid_columns, 0.0);
        let negative_texts = itm::draw_negatives(&weights_i2t, &positions, self.seed, step, Direction::TextForImage);
        let negative_images = itm::draw_negatives(&weights_t2i, &positions, self.seed, step, Direction::ImageForText);
        self.last_negatives = positions
            .iter()
            .zip(negative_texts.iter().zip(&negative_images))
            .filter(|(&position, _)| position >= 0)
            .map(|(&position, (&text, &image))| DrawnNegatives { position, text, image })
            .collect();
        let index = |drawn: &[Option<usize>]| -> (Tensor, Tensor) {
            let idx: Vec<i64> = drawn.iter().enumerate().map(|(i, d)| d.map_or(offset + i as i64, |j| j as i64)).collect();
            let found: Vec<f64> = drawn.iter().map(|d| if d.is_some() { 1.0 } else { 0.0 }).collect();
            (Tensor::from_slice(&idx).to_device(image_leaf.device()), Tensor::from_slice(&found).to_device(image_leaf.device()))
        };
        let (text_idx, text_found) = index(&negative_texts);
        let (image_idx, image_found) = index(&negative_images);
        let own_mask = attention_mask.shallow_clone();
        let text_in = Tensor::cat(&[&text_own, &text_own, &text_leaf.index_select(0, &text_idx)], 0);
        let mask_in = Tensor::cat(&[&own_mask, &own_mask, &mask_c.index_select(0, &text_idx)], 0);
        let image_in = Tensor::cat(&[&image_own, &image_leaf.index_select(0, &image_idx), &image_own], 0);
        let itm_logits = self.model.itm_logits(&self.model.fuse(&text_in, &mask_in, &image_in)).to_kind(kind);
        let device = image_leaf.device();
        let ones = Tensor::ones([slot], (Kind::Int64, device));
        let itm_labels = Tensor::cat(&[ones.shallow_clone(), ones.zeros_like(), ones.zeros_like()], 0);
        let valid = batch.valid.to_kind(Kind::Double);
        let pair_weights = Tensor::cat(&[&valid, &(&valid * &image_found), &(&valid * &text_found)], 0);
        let itm = itm::itm_loss_sum(&itm_logits, &itm_labels, &pair_weights) / (3 * n_valid.max(1)) as f64;

        // 3c. MLM of the masked captions fused with this rank's images, distilled.
        let masked_states = self.model.encode_text(&masked_ids, &attention_mask);
        let mlm_logits = self.model.mlm_logits(&self.model.fuse(&masked_states, &attention_mask, &image_own)).to_kind(kind);
        let mlm = distilled_mlm_sum(&mlm_logits, &labels, mlm_logits_m.as_ref(), alpha) / n_masked.max(1) as f64;

        // 4. Backward to the heads, fusion layers and leaves, then through the encoders.
        let total = &itc + &itm + &mlm;
        total.backward();
        let (mut image_grad, mut text_grad) = (image_leaf.grad(), text_leaf.grad());
        if global {
            let (image_width, text_width) = (image_grad.numel() as i64 / image_grad.size()[0], text_grad.numel() as i64 / text_grad.size()[0]);
            let mut both = Tensor::cat(&[image_grad.flatten(1, -1), text_grad.flatten(1, -1)], 1).to_kind(kind);
            coll.all_reduce_sum(&mut both)?;
            let own = both.narrow(0, offset, slot);
            image_grad = own.narrow(1, 0, image_width).view_as(&image_states).to_kind(image_states.kind());
            text_grad = own.narrow(1, image_width, text_width).view_as(&text_states).to_kind(text_states.kind());
        }
        surrogate(&image_states, &image_grad, &text_states, &text_grad).backward();

        let rows_kept = Tensor::from_slice(&global_batch_rows(self.global_batch, world)).to_device(device);
        self.pending = Some((
            image_m_all.index_select(0, &rows_kept),
            text_m_all.index_select(0, &rows_kept),
            valid_all.index_select(0, &rows_kept),
        ));
        let parts = vec![("itc", itc.detach()), ("itm", itm.detach()), ("mlm", mlm.detach())];
        Ok(LossShare { total: total.detach(), parts, samples: n_valid as u64 })
    }

    fn after_update(&mut self) -> Result<(), TrainError> {
        self.model.clamp_temp();
        self.momentum.update(&self.momentum_sources, self.m)?;
        if let Some((image, text, valid)) = self.pending.take() {
            self.image_queue.enqueue_valid(&image, &valid)?;
            self.text_queue.enqueue_valid(&text, &valid)?;
        }
        Ok(())
    }

    fn logit_scale(&self) -> f64 {
        1.0 / self.model.temp.double_value(&[])
    }

    fn extra_state(&self) -> Vec<(String, Tensor)> {
        let mut state = self.momentum.named("momentum.");
        state.extend(self.image_queue.named("queue.image."));
        state.extend(self.text_queue.named("queue.text."));
        state
    }

    fn load_extra_state(&mut self, source: &HashMap<String, Tensor>, origin: &str) -> Result<(), TrainError> {
        self.momentum.load(|k| source.get(k), "momentum.", origin)?;
        self.image_queue.load(|k| source.get(k), "queue.image.", origin)?;
        self.text_queue.load(|k| source.get(k), "queue.text.", origin)?;
        self.pending = None;
        Ok(())
    }

    fn set_epoch_steps(&mut self, steps: u64) {
        self.epoch_steps = steps;
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The shape of `t` ([slot, ...]) gathered from `world` ranks: [world * slot, ...].
fn gathered_shape(t: &Tensor, world: usize) -> Vec<i64> {
    let mut shape = t.size();
    shape[0] *= world as i64;
    shape
}
