//! CLIP's step: the cross-worker contrastive loss with its exact gradient in three stages.
//!
//! 1. Each rank encodes its slot (in micro-batches without a graph when they do not fit, or
//!    with activation checkpointing) and all-gathers the features.
//! 2. Each rank computes the loss terms of its own rows against every rank's columns, and the
//!    feature gradients of all rows are summed over ranks.
//! 3. Each rank sends its rows' feature gradients back through its towers.

use std::collections::HashMap;
use std::ops::Range;

use braid_coordinator::config::JobConfig;
use tch::{nn, Tensor};

use super::{compute_kind, seeded, DeviceBatch, Family, LossShare, Precision, TrainError};
use crate::collective::Collective;
use crate::models::clip::{Clip, ClipConfig};
use crate::objectives::itc;

/// CLIP and how its step is split into micro-batches.
pub(crate) struct ClipFamily {
    /// The model (its parameters live in the trainer's variable store).
    pub model: Clip,
    max_micro_batch: usize,
    activation_checkpointing: bool,
}

impl ClipFamily {
    /// A freshly initialised CLIP under `vs`'s root, seeded by the job seed.
    pub fn new(vs: &mut nn::VarStore, config: &JobConfig, clip: ClipConfig, precision: Precision) -> Self {
        let mut model = seeded(config.job.seed, || Clip::new(&vs.root(), clip));
        if precision == Precision::Fp64 {
            vs.double();
        }
        model.set_compute_kind(compute_kind(precision));
        Self { model, max_micro_batch: config.train.max_micro_batch, activation_checkpointing: config.train.activation_checkpointing }
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
}

impl Family for ClipFamily {
    fn forward_backward(&mut self, _step: u64, batch: &DeviceBatch, coll: &mut dyn Collective) -> Result<LossShare, TrainError> {
        let rank = coll.rank() as i64;
        let slot = batch.len() as i64;
        let rows: Range<i64> = rank * slot..(rank + 1) * slot;

        let micro = if self.max_micro_batch == 0 { batch.len() } else { self.max_micro_batch.min(batch.len()) };
        let single_pass = micro >= batch.len();
        let forward = tracing::info_span!("forward").entered();
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

        drop(forward);
        let _backward = tracing::info_span!("backward").entered();
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
        // CLIP's loss is its one objective, reported under its name like the other families' terms.
        let total = loss.detach();
        Ok(LossShare { parts: vec![("itc", total.shallow_clone())], total })
    }

    fn after_update(&mut self) -> Result<(), TrainError> {
        self.model.clamp_logit_scale();
        Ok(())
    }

    fn logit_scale(&self) -> Tensor {
        self.model.logit_scale.detach().exp()
    }

    fn extra_state(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    fn load_extra_state(&mut self, _source: &HashMap<String, Tensor>, _origin: &str) -> Result<(), TrainError> {
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// `sum(image * dL/dimage) + sum(text * dL/dtext)`: its backward sends the given feature
/// gradients through the towers.
pub(crate) fn surrogate(image: &Tensor, image_grad: &Tensor, text: &Tensor, text_grad: &Tensor) -> Tensor {
    (image * image_grad.detach()).sum(image.kind()) + (text * text_grad.detach()).sum(text.kind())
}
