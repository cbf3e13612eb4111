//! BLIP's pretraining step (`blip_pretrain.py`): ITC with momentum distillation against the
//! queues, ITM on hard negatives through the image-grounded encoder, and LM through the causal
//! decoder; total loss `ITC + ITM + LM`, unweighted.
//!
//! One step on rank `r` of `W`, slot `B`, global batch `N`:
//! 1. The momentum model (image encoder, `vision_proj`, unimodal text encoder, `text_proj`)
//!    without autograd: the features of the images and of the captions (`[CLS]` first). All-gather
//!    them with the valid flags and each sample's count of LM targets.
//! 2. Encode the images with autograd and detach their states into a leaf; with `global` hard
//!    negatives the leaf is the all-gathered states of every rank, and the captions' `[ENC]` ids
//!    and attention masks are gathered too (ids travel as floats, exact below 2^24). Encode the
//!    captions unimodally with autograd (only ITC reads them, on this rank's rows).
//! 3. ITC: the distilled contrastive loss of this rank's rows against every rank's momentum
//!    features and the queues, alpha ramped over the first two epochs (BLIP's
//!    `alpha * min(1, step / (2 * steps_per_epoch))`). ITM: one hard negative per direction with
//!    weights `softmax(sim) + 1e-4`, the positive zeroed, drawn by hash; the `3B` pairs go through
//!    the image-grounded encoder from their token ids with `[ENC]` in place of `[CLS]`, and the
//!    loss is the CE over them. LM: the captions with `[DEC]` in place of `[CLS]` through the
//!    causal decoder attending to this rank's image states, CE with label smoothing 0.1 at every
//!    position after `[DEC]` up to and including `[SEP]` (padding not predicted). BLIP averages
//!    ITM and LM over its per-GPU batch; braid divides each term's local sum by its count over the
//!    global batch (pairs, LM tokens), so the ranks' shares add up to the global-batch loss and W
//!    workers take the step of one worker with the whole batch.
//! 4. Backward of the shares to the text model, the heads, the decoder and the image leaf; with
//!    `global` negatives the leaf's gradient is summed over ranks. Then backward of this rank's
//!    rows of it through the image encoder.
//! 5. After the optimizer update: clamp the temperature to [0.001, 0.5], update the momentum
//!    encoders (`theta_m <- m theta_m + (1 - m) theta`) and enqueue the step's gathered momentum
//!    features.

use std::collections::HashMap;

use braid_coordinator::config::JobConfig;
use tch::{nn, Kind, Tensor};

use super::momentum::{build_with_momentum, HardNegativeSampler, Leaves, Momentum, MomentumSettings};
use super::{compute_kind, DeviceBatch, Family, LossShare, Precision, TrainError};
use crate::collective::Collective;
use crate::models::blip::{Blip, BlipConfig};
use crate::models::ModelError;
use crate::objectives::distill;
use crate::objectives::mlm::{smoothed_ce_sum, Predicted};
use crate::objectives::queue::FeatureQueue;

pub use super::momentum::{DrawnNegatives, HardNegatives};

/// BLIP's weight of every candidate before the positive is zeroed: `softmax(sim) + 1e-4`.
pub const HARD_NEGATIVE_SMOOTHING: f64 = 1e-4;

/// Label of a position the LM does not predict (`torch.nn.CrossEntropyLoss`'s `ignore_index`).
const IGNORE_INDEX: i64 = -100;

/// BLIP, its momentum encoders and queues, and its objectives' settings.
pub struct BlipFamily {
    /// The model (its parameters live in the trainer's variable store).
    pub model: Blip,
    /// The momentum model: the same modules over the momentum copy's storage (only the image
    /// encoder, the unimodal text encoder and the projections are copied and run).
    pub momentum_model: Blip,
    /// The momentum copy, the queues and the distillation weight's ramp.
    momentum: Momentum,
    hard_negatives: HardNegatives,
    sampler: HardNegativeSampler,
    /// Kind of parameters and losses.
    kind: Kind,
}

impl BlipFamily {
    /// A freshly initialised BLIP under `vs`'s root, seeded by the job seed; momentum encoders
    /// start equal to it and the queues with random unit features (both seeded too). The queue
    /// size, momentum and distillation weight are `blip`'s; the job's `[model]` keys set them in
    /// [`super::model_spec`].
    pub fn new(vs: &mut nn::VarStore, config: &JobConfig, blip: BlipConfig, precision: Precision) -> Result<Self, TrainError> {
        blip.validate().map_err(|reason| ModelError::Weights { origin: "blip config".into(), reason })?;
        let kind = precision.param_kind();
        // With `global` negatives the token ids travel in `kind`; fp32 holds integers exactly below 2^24.
        if kind != Kind::Double && blip.text.vocab_size > 1 << 24 {
            return Err(TrainError::Tokenizer(format!(
                "a vocabulary of {} tokens: token ids above 2^24 cannot be gathered exactly in fp32",
                blip.text.vocab_size
            )));
        }
        let seed = config.job.seed;
        let (mut model, mut momentum_model, momentum_store) = build_with_momentum(vs, seed, precision, |root| Blip::new(root, blip));
        model.set_compute_kind(compute_kind(precision));
        momentum_model.set_compute_kind(compute_kind(precision));
        let settings = MomentumSettings {
            queue_size: blip.queue_size,
            embed_dim: blip.embed_dim,
            momentum: blip.momentum,
            alpha: blip.alpha,
            alpha_ramp_steps: config.model.alpha_ramp_steps,
            ramp_epochs: 2,
            seed,
            global_batch: config.train.global_batch,
            kind,
        };
        let momentum = Momentum::new(vs, momentum_store, Blip::has_momentum, settings)?;
        Ok(Self {
            model,
            momentum_model,
            momentum,
            hard_negatives: HardNegatives::parse(&config.model.hard_negatives).expect("validated hard_negatives"),
            sampler: HardNegativeSampler::new(seed, HARD_NEGATIVE_SMOOTHING),
            kind,
        })
    }

    /// The distillation weight at `step`: `alpha` ramped over `alpha_ramp_steps`, else over two
    /// epochs (BLIP's schedule).
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
}

/// `tokens` `[B, L]` with the first token (the tokenizer's `[CLS]`) replaced by `first`, as
/// BLIP's `input_ids[:, 0] = enc_token_id` (ITM) or `bos_token_id` (LM).
pub fn with_first_token(tokens: &Tensor, first: i64) -> Tensor {
    let (b, l) = tokens.size2().expect("tokens are [batch, tokens]");
    let head = Tensor::full([b, 1], first, (tokens.kind(), tokens.device()));
    Tensor::cat(&[head, tokens.narrow(1, 1, l - 1)], 1)
}

/// The positions BLIP's LM predicts, `[B, L - 1]` bool: token `i + 1` of every caption whose
/// attention mask is set there (the tokens after `[DEC]` up to and including `[SEP]`), and none
/// of a padding row (`valid` false).
pub fn lm_targets(attention_mask: &Tensor, valid: &Tensor) -> Tensor {
    let l = attention_mask.size()[1];
    attention_mask.narrow(1, 1, l - 1).ne(0).logical_and(&valid.unsqueeze(1))
}

/// The next-token labels `[B, L - 1]` of decoder inputs `input_ids` `[B, L]`: token `i + 1` at
/// position `i` where `predicted` ([`lm_targets`]) says so, [`IGNORE_INDEX`] elsewhere; with
/// [`Predicted`] they pick the decoder states the LM head runs on.
pub fn lm_labels(input_ids: &Tensor, predicted: &Tensor) -> Tensor {
    let l = input_ids.size()[1];
    input_ids.narrow(1, 1, l - 1).masked_fill(&predicted.logical_not(), IGNORE_INDEX)
}

/// The sum over the `predicted` positions (`[B, L - 1]` bool, [`lm_targets`]) of the
/// cross-entropy with label smoothing `label_smoothing` of full decoder logits `[B, L, V]`
/// ([`Blip::decoder_logits`]) at position `i` against token `i + 1` of `input_ids`, in `kind`
/// ([`smoothed_ce_sum`] on the predicted rows). Divided by the number of predicted tokens it is
/// [`Blip::lm_loss`] (BLIP's LM loss, a mean over tokens). Training runs the LM head on the
/// predicted rows only instead.
pub fn lm_loss_sum(logits: &Tensor, input_ids: &Tensor, predicted: &Tensor, label_smoothing: f64, kind: Kind) -> Tensor {
    let l = logits.size()[1];
    let rows = Predicted::new(&lm_labels(input_ids, predicted));
    smoothed_ce_sum(&rows.rows(&logits.narrow(1, 0, l - 1)), &rows.targets, label_smoothing, kind)
}

impl Family for BlipFamily {
    fn forward_backward(&mut self, step: u64, batch: &DeviceBatch, coll: &mut dyn Collective) -> Result<LossShare, TrainError> {
        let (rank, world) = (coll.rank(), coll.world_size());
        let slot = batch.len() as i64;
        let kind = self.kind;
        let alpha = self.alpha_at(step);
        let config = *self.model.config();
        let attention_mask = batch.attention_mask();
        let predicted = lm_targets(&attention_mask, &batch.valid);

        let forward = tracing::info_span!("forward").entered();
        // 1. The momentum model's features; gathered features, flags and LM target counts.
        let mm = &self.momentum_model;
        let (image_m, text_m) = tch::no_grad(|| {
            let image = mm.image_feature(&mm.encode_image(&batch.images));
            let text = mm.text_feature(&mm.encode_text(&batch.tokens, &attention_mask));
            (image.to_kind(kind), text.to_kind(kind))
        });
        let lm_counts = predicted.sum_dim_intlist([1i64].as_slice(), false, kind);
        let gathered = self.momentum.gather(coll, &image_m, &text_m, &batch.valid, &lm_counts)?;

        // 2. Image states with autograd, detached into a leaf (gathered, with the captions' ids
        //    and masks, for global negatives); the unimodal caption states.
        let image_states = self.model.encode_image(&batch.images);
        let leaves = Leaves::new(self.hard_negatives, rank, world, slot, kind);
        let image_leaf = leaves.leaf(coll, &image_states)?;
        let image_own = leaves.own(&image_leaf);
        let encoder_ids = with_first_token(&batch.tokens, config.enc_token_id);
        let ids_c = leaves.candidates(coll, &encoder_ids)?;
        let mask_c = leaves.candidates(coll, &attention_mask)?;
        let text_states = self.model.encode_text(&batch.tokens, &attention_mask);

        // 3a. ITC with momentum distillation against every rank's momentum features and the queues.
        let image_feat = self.model.image_feature(&image_own).to_kind(kind);
        let text_feat = self.model.text_feature(&text_states).to_kind(kind);
        let rows = rank as i64 * slot..(rank as i64 + 1) * slot;
        let itc = distill::local_loss(&image_feat, &text_feat, rows, &self.momentum.keys(&gathered), &self.model.heads.temp, alpha);

        // 3b. ITM: one hard negative per direction; every pair through the image-grounded encoder.
        let draw = self.sampler.draw(step, batch, (&image_feat, &text_feat), &gathered, &leaves, &self.model.heads.temp)?;
        let ids_in = draw.pair_texts(&encoder_ids, &ids_c);
        let mask_in = draw.pair_texts(&attention_mask, &mask_c);
        let image_in = draw.pair_images(&image_own, &image_leaf);
        let itm_logits = self.model.itm_logits(&self.model.encode_multimodal(&ids_in, &mask_in, &image_in)).to_kind(kind);
        let itm = draw.itm_loss(&itm_logits, &batch.valid, gathered.n_valid);

        // 3c. LM: the captions through the decoder with [DEC] first, over the global batch's tokens.
        let decoder_ids = with_first_token(&batch.tokens, config.bos_token_id);
        // The LM head runs on the positions whose next token is predicted, not on padding.
        let states = self.model.decode(&decoder_ids, &attention_mask, &image_own);
        let rows = Predicted::new(&lm_labels(&decoder_ids, &predicted));
        let lm_logits = self.model.lm_logits(&rows.rows(&states.narrow(1, 0, states.size()[1] - 1)));
        let lm = smoothed_ce_sum(&lm_logits, &rows.targets, config.label_smoothing, kind) / gathered.count.max(1) as f64;

        drop(forward);
        let _backward = tracing::info_span!("backward").entered();
        // 4. Backward to the text model, heads, decoder and image leaf, then through the image encoder.
        let total = &itc + &itm + &lm;
        total.backward();
        let grads = leaves.own_grads(coll, &[(&image_leaf, &image_states)])?;
        (&image_states * grads[0].detach()).sum(image_states.kind()).backward();

        self.momentum.enqueue_after_update(&gathered, world);
        let parts = vec![("itc", itc.detach()), ("itm", itm.detach()), ("lm", lm.detach())];
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
