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
use super::momentum::{build_with_momentum, HardNegativeSampler, Leaves, Momentum, MomentumSettings};
use super::{compute_kind, DeviceBatch, Family, LossShare, Precision, TrainError};
use crate::collective::Collective;
use crate::data::mlm::{Masker, MaskingConfig, MaskingInputs, MaskingVocab, IGNORE_INDEX};
use crate::models::albef::{Albef, AlbefConfig};
use crate::objectives::distill;
use crate::objectives::mlm::{distilled_mlm_sum, Predicted};
use crate::objectives::queue::FeatureQueue;

pub use super::momentum::{DrawnNegatives, HardNegatives};

/// ALBEF, its momentum encoders and queues, and its objectives' settings.
pub struct AlbefFamily {
    /// The model (its parameters live in the trainer's variable store).
    pub model: Albef,
    /// The momentum model: the same modules over the momentum copy's storage.
    pub momentum_model: Albef,
    /// The momentum copy, the queues and the distillation weight's ramp.
    momentum: Momentum,
    masker: Masker,
    hard_negatives: HardNegatives,
    sampler: HardNegativeSampler,
    /// Kind of parameters and losses.
    kind: Kind,
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
        let (mut model, mut momentum_model, momentum_store) = build_with_momentum(vs, seed, precision, |root| Albef::new(root, albef));
        model.set_compute_kind(compute_kind(precision));
        momentum_model.set_compute_kind(compute_kind(precision));
        let kind = precision.param_kind();
        let settings = MomentumSettings {
            queue_size: albef.queue_size,
            embed_dim: albef.embed_dim,
            momentum: albef.momentum,
            alpha: albef.alpha,
            alpha_ramp_steps: config.model.alpha_ramp_steps,
            ramp_epochs: 1,
            seed,
            global_batch: config.train.global_batch,
            kind,
        };
        let momentum = Momentum::new(vs, momentum_store, Albef::has_momentum, settings)?;
        let masking = MaskingConfig {
            probability: albef.mlm_probability,
            whole_word: config.model.whole_word_masking,
            ..MaskingConfig::default()
        };
        let masker = Masker::new(masking, vocab, seed).map_err(|e| TrainError::Tokenizer(e.to_string()))?;
        Ok(Self {
            model,
            momentum_model,
            momentum,
            masker,
            hard_negatives: HardNegatives::parse(&config.model.hard_negatives).expect("validated hard_negatives"),
            sampler: HardNegativeSampler::new(seed, 0.0),
            kind,
        })
    }

    /// The distillation weight at `step`: `alpha` ramped over `alpha_ramp_steps`, else over one
    /// epoch (ALBEF's schedule).
    pub fn alpha_at(&self, step: u64) -> f64 {
        self.momentum.alpha_at(step)
    }

    /// The hard negatives drawn in the last step for this rank's valid samples.
    pub fn last_negatives(&self) -> &[DrawnNegatives] {
        self.sampler.last()
    }

    /// Momentum image features of earlier steps.
    pub fn image_queue(&self) -> &FeatureQueue {
        &self.momentum.image_queue
    }

    /// Momentum text features of earlier steps.
    pub fn text_queue(&self) -> &FeatureQueue {
        &self.momentum.text_queue
    }

    /// MLM inputs of a batch: masked ids and labels `[B, L]` on the batch's device (padding
    /// rows predict nothing).
    /// The MLM labels of `batch` (the original id where a token is predicted, -100 elsewhere),
    /// as a step masks it.
    pub fn mlm_labels(&self, batch: &DeviceBatch) -> Result<Tensor, TrainError> {
        Ok(self.mask(batch, &batch.attention_mask())?.1)
    }

    fn mask(&self, batch: &DeviceBatch, attention_mask: &Tensor) -> Result<(Tensor, Tensor), TrainError> {
        let (b, l) = batch.tokens.size2()?;
        let cpu = |t: &Tensor| Vec::<i64>::try_from(t.to_device(Device::Cpu).flatten(0, -1));
        let token_ids = cpu(&batch.tokens)?;
        let mask = cpu(attention_mask)?;
        let positions = Vec::<i64>::try_from(&batch.positions)?;
        let positions: Vec<u64> = positions.iter().map(|&p| p.max(0) as u64).collect();
        let word_ids = match (&batch.word_ids, self.masker.config().whole_word) {
            (Some(words), true) => Some(cpu(words)?),
            (None, true) => {
                return Err(TrainError::Tokenizer(
                    "model.whole_word_masking needs each token's word; this batch has no word boundaries".into(),
                ))
            }
            (_, false) => None,
        };
        let inputs = MaskingInputs { token_ids: &token_ids, attention_mask: &mask, word_ids: word_ids.as_deref(), positions: &positions };
        let masked = self.masker.mask_batch(inputs).map_err(|e| TrainError::Tokenizer(e.to_string()))?;
        let device = batch.tokens.device();
        let ids = Tensor::from_slice(&masked.input_ids).view([b, l]).to_device(device);
        let labels = Tensor::from_slice(&masked.labels).view([b, l]).to_device(device);
        let labels = labels.masked_fill(&batch.valid.logical_not().unsqueeze(1), IGNORE_INDEX);
        Ok((ids, labels))
    }
}

impl Family for AlbefFamily {
    fn forward_backward(&mut self, step: u64, batch: &DeviceBatch, coll: &mut dyn Collective) -> Result<LossShare, TrainError> {
        let (rank, world) = (coll.rank(), coll.world_size());
        let slot = batch.len() as i64;
        let kind = self.kind;
        let alpha = self.alpha_at(step);
        let attention_mask = batch.attention_mask();
        let (masked_ids, labels) = self.mask(batch, &attention_mask)?;
        let predicted = Predicted::new(&labels);

        let forward = tracing::info_span!("forward").entered();
        // 1. The momentum model's features and MLM logits; gathered features, flags and counts.
        let mm = &self.momentum_model;
        let (image_m, text_m, mlm_logits_m) = tch::no_grad(|| {
            let image_states = mm.encode_image(&batch.images);
            let text_states = mm.encode_text(&batch.tokens, &attention_mask);
            let logits = (alpha > 0.0).then(|| {
                let masked = mm.encode_text(&masked_ids, &attention_mask);
                mm.mlm_logits(&predicted.rows(&mm.fuse(&masked, &attention_mask, &image_states)))
            });
            (mm.image_feature(&image_states).to_kind(kind), mm.text_feature(&text_states).to_kind(kind), logits)
        });
        let masked_per_row = labels.ne(IGNORE_INDEX).sum_dim_intlist([1i64].as_slice(), false, kind);
        let gathered = self.momentum.gather(coll, &image_m, &text_m, &batch.valid, &masked_per_row)?;

        // 2. Unimodal states with autograd, detached into leaves (gathered for global negatives).
        let image_states = self.model.encode_image(&batch.images);
        let text_states = self.model.encode_text(&batch.tokens, &attention_mask);
        let leaves = Leaves::new(self.hard_negatives, rank, world, slot, kind);
        let image_leaf = leaves.leaf(coll, &image_states)?;
        let text_leaf = leaves.leaf(coll, &text_states)?;
        let mask_c = leaves.candidates(coll, &attention_mask)?;
        let image_own = leaves.own(&image_leaf);
        let text_own = leaves.own(&text_leaf);

        // 3a. ITC with momentum distillation against every rank's momentum features and the queues.
        let image_feat = self.model.image_feature(&image_own).to_kind(kind);
        let text_feat = self.model.text_feature(&text_own).to_kind(kind);
        let rows = rank as i64 * slot..(rank as i64 + 1) * slot;
        let itc = distill::local_loss(&image_feat, &text_feat, rows, &self.momentum.keys(&gathered), &self.model.heads.temp, alpha);

        // 3b. ITM: one hard negative per direction, drawn over the candidates' momentum features.
        let draw = self.sampler.draw(step, batch, (&image_feat, &text_feat), &gathered, &leaves, &self.model.heads.temp)?;
        let text_in = draw.pair_texts(&text_own, &text_leaf);
        let mask_in = draw.pair_texts(&attention_mask, &mask_c);
        let image_in = draw.pair_images(&image_own, &image_leaf);
        let itm_logits = self.model.itm_logits(&self.model.fuse(&text_in, &mask_in, &image_in)).to_kind(kind);
        let itm = draw.itm_loss(&itm_logits, &batch.valid, gathered.n_valid);

        // 3c. MLM of the masked captions fused with this rank's images, distilled.
        let masked_states = self.model.encode_text(&masked_ids, &attention_mask);
        let fused = self.model.fuse(&masked_states, &attention_mask, &image_own);
        let mlm_logits = self.model.mlm_logits(&predicted.rows(&fused)).to_kind(kind);
        let mlm = distilled_mlm_sum(&mlm_logits, &predicted.targets, mlm_logits_m.as_ref(), alpha) / gathered.count.max(1) as f64;

        drop(forward);
        let _backward = tracing::info_span!("backward").entered();
        // 4. Backward to the heads, fusion layers and leaves, then through the encoders.
        let total = &itc + &itm + &mlm;
        total.backward();
        let grads = leaves.own_grads(coll, &[(&image_leaf, &image_states), (&text_leaf, &text_states)])?;
        surrogate(&image_states, &grads[0], &text_states, &grads[1]).backward();

        self.momentum.enqueue_after_update(&gathered, world);
        let parts = vec![("itc", itc.detach()), ("itm", itm.detach()), ("mlm", mlm.detach())];
        Ok(LossShare { total: total.detach(), parts })
    }

    fn after_update(&mut self) -> Result<(), TrainError> {
        self.model.clamp_temp();
        self.momentum.after_update()
    }

    fn logit_scale(&self) -> Tensor {
        self.model.heads.temp.detach().reciprocal()
    }

    fn extra_state(&self) -> Vec<(String, Tensor)> {
        self.momentum.extra_state()
    }

    fn load_extra_state(&mut self, source: &HashMap<String, Tensor>, origin: &str) -> Result<(), TrainError> {
        self.momentum.load_extra_state(source, origin)
    }

    fn set_epoch_steps(&mut self, steps: u64) {
        self.momentum.set_epoch_steps(steps);
    }

    fn reset_momentum(&mut self) -> Result<(), TrainError> {
        self.momentum.reset_to_live()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
