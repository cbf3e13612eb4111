//! What ALBEF's and BLIP's steps share: the momentum model over a second variable store with its
//! feature queues, the distillation weight's ramp, ITM hard negatives drawn by hash, and the
//! leaves that carry the online unimodal states across the loss.
//!
//! - [`build_with_momentum`] builds a model and its momentum copy, both seeded by the job seed;
//!   [`Momentum`] keeps the copy (the parameters the family's `has_momentum` names), the image and
//!   text queues and this step's gathered momentum features, which [`Momentum::after_update`]
//!   enqueues after the optimizer update together with `theta_m <- m theta_m + (1 - m) theta` (a
//!   step that fails before its update leaves both as they were).
//! - [`Leaves`]: the online states are detached into leaves, so the loss terms can run on them
//!   and their gradients can go back through the encoders in a second backward. With `global`
//!   hard negatives the leaves are the all-gathered states of every rank (a negative may come from
//!   another rank) and their gradients are summed over ranks before each rank sends its own rows
//!   back; with `per_worker` negatives they are this rank's states.
//! - [`HardNegativeSampler`]: one negative per direction and sample, drawn with
//!   `objectives::itm`'s hashed uniforms over the candidates' momentum features, so a sample gets
//!   the same negative whichever rank holds it.

use std::collections::HashMap;
use std::ops::Range;

use tch::{nn, Device, Kind, Tensor};

use super::{seeded, DeviceBatch, Precision, TrainError};
use crate::collective::Collective;
use crate::objectives::distill::{self, MomentumKeys};
use crate::objectives::itm::{self, Direction};
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

/// A model built by `build` under `vs`'s root and a second instance under a new variable store
/// for its momentum copy, both drawn under [`seeded`]`(seed)`; in fp64 both stores are cast,
/// and the momentum store is frozen. Returns the model, the momentum model and its store.
pub(crate) fn build_with_momentum<M>(
    vs: &mut nn::VarStore,
    seed: u64,
    precision: Precision,
    build: impl Fn(&nn::Path) -> M,
) -> (M, M, nn::VarStore) {
    let model = seeded(seed, || build(&vs.root()));
    let mut store = nn::VarStore::new(vs.device());
    // Its initial values are overwritten by the copy; drawing them under the generator's lock
    // keeps other threads' seeded draws (ranks as threads in tests) undisturbed.
    let momentum_model = seeded(seed, || build(&store.root()));
    if precision == Precision::Fp64 {
        vs.double();
        store.double();
    }
    store.freeze();
    (model, momentum_model, store)
}

/// The momentum copy's and queues' settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MomentumSettings {
    /// Entries of each queue (a multiple of the global batch).
    pub queue_size: i64,
    /// Dimension of the contrastive features.
    pub embed_dim: i64,
    /// `m` of the momentum update.
    pub momentum: f64,
    /// The distillation weight after its ramp.
    pub alpha: f64,
    /// Steps of the ramp (`model.alpha_ramp_steps`); `None`: `ramp_epochs` epochs.
    pub alpha_ramp_steps: Option<u64>,
    /// The default ramp in epochs (ALBEF 1, BLIP 2).
    pub ramp_epochs: u64,
    /// The job seed (the queues' initial features).
    pub seed: u64,
    /// Samples per global batch (the rows enqueued each step).
    pub global_batch: usize,
    /// Kind of parameters, features and losses.
    pub kind: Kind,
}

/// The momentum features of a step's global batch, gathered from every rank.
pub(crate) struct Gathered {
    /// `[N, D]` momentum image features, in rank order (each rank's slot padded).
    pub image_all: Tensor,
    /// `[N, D]` momentum text features.
    pub text_all: Tensor,
    /// `[N]` bool, false for padding and samples that failed to load.
    pub valid_all: Tensor,
    /// Valid samples in the global batch.
    pub n_valid: i64,
    /// The sum over ranks of the per-sample counts passed to [`Momentum::gather`].
    pub count: i64,
}

/// The momentum copy of a model, its feature queues and the distillation weight's ramp.
pub(crate) struct Momentum {
    /// Keeps the momentum model's storage alive.
    _store: nn::VarStore,
    copy: MomentumCopy,
    /// The live parameters that have momentum copies, in the copy's order (shallow).
    sources: Vec<(String, Tensor)>,
    /// Momentum image features of earlier steps.
    pub image_queue: FeatureQueue,
    /// Momentum text features of earlier steps.
    pub text_queue: FeatureQueue,
    settings: MomentumSettings,
    epoch_steps: u64,
    /// This step's gathered momentum features and valid flags, enqueued after the update.
    pending: Option<(Tensor, Tensor, Tensor)>,
}

impl Momentum {
    /// The momentum copy of the parameters of `vs` that `has_momentum` names, kept in `store`'s
    /// variables (the momentum model's), which start equal to them; queues of random unit
    /// features drawn from the seed.
    pub fn new(vs: &nn::VarStore, store: nn::VarStore, has_momentum: fn(&str) -> bool, settings: MomentumSettings) -> Result<Self, TrainError> {
        let named = |vs: &nn::VarStore| {
            let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(n, _)| has_momentum(n)).collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            named
        };
        let sources = named(vs);
        let copy = MomentumCopy::over(named(&store), &sources)?;
        let MomentumSettings { queue_size, embed_dim, seed, kind, .. } = settings;
        let image_queue = FeatureQueue::new(queue_size, embed_dim, seed ^ 0x1A6E, kind, vs.device());
        let text_queue = FeatureQueue::new(queue_size, embed_dim, seed ^ 0x7E47, kind, vs.device());
        Ok(Self { _store: store, copy, sources, image_queue, text_queue, settings, epoch_steps: 0, pending: None })
    }

    /// The distillation weight at `step`: `alpha` ramped over `alpha_ramp_steps`, else over
    /// `ramp_epochs` epochs.
    pub fn alpha_at(&self, step: u64) -> f64 {
        let s = &self.settings;
        distill::alpha_at(step, s.alpha_ramp_steps.unwrap_or(s.ramp_epochs * self.epoch_steps), s.alpha)
    }

    /// Sets the steps of one epoch (the default ramp's unit).
    pub fn set_epoch_steps(&mut self, steps: u64) {
        self.epoch_steps = steps;
    }

    /// All-gathers this rank's momentum features `[B, D]`, valid flags `[B]` and a per-sample
    /// count `[B]` (tokens a loss term predicts), in one collective.
    pub fn gather(&self, coll: &mut dyn Collective, image_m: &Tensor, text_m: &Tensor, valid: &Tensor, counts: &Tensor) -> Result<Gathered, TrainError> {
        let kind = self.settings.kind;
        let dim = image_m.size()[1];
        let column = |t: &Tensor| t.to_kind(kind).unsqueeze(1);
        let local = Tensor::cat(&[&image_m.to_kind(kind), &text_m.to_kind(kind), &column(valid), &column(counts)], 1);
        let gathered = coll.all_gather(&local)?;
        let valid_all = gathered.select(1, 2 * dim).gt(0.5);
        let n_valid = valid_all.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
        let count = gathered.select(1, 2 * dim + 1).sum(Kind::Double).double_value(&[]).round() as i64;
        Ok(Gathered { image_all: gathered.narrow(1, 0, dim), text_all: gathered.narrow(1, dim, dim), valid_all, n_valid, count })
    }

    /// The keys of the distilled contrastive loss: the gathered features and the queues as they
    /// were before this step.
    pub fn keys<'a>(&'a self, gathered: &'a Gathered) -> MomentumKeys<'a> {
        MomentumKeys {
            image_all: &gathered.image_all,
            text_all: &gathered.text_all,
            valid_all: &gathered.valid_all,
            image_queue: &self.image_queue,
            text_queue: &self.text_queue,
        }
    }

    /// Keeps the global batch's rows of `gathered` for [`Momentum::after_update`] to enqueue.
    pub fn enqueue_after_update(&mut self, gathered: &Gathered, world: usize) {
        let rows = Tensor::from_slice(&global_batch_rows(self.settings.global_batch, world)).to_device(gathered.image_all.device());
        self.pending = Some((
            gathered.image_all.index_select(0, &rows),
            gathered.text_all.index_select(0, &rows),
            gathered.valid_all.index_select(0, &rows),
        ));
    }

    /// After the optimizer update: `theta_m <- m theta_m + (1 - m) theta`, then the step's
    /// momentum features into the queues.
    pub fn after_update(&mut self) -> Result<(), TrainError> {
        self.copy.update(&self.sources, self.settings.momentum)?;
        if let Some((image, text, valid)) = self.pending.take() {
            self.image_queue.enqueue_valid(&image, &valid)?;
            self.text_queue.enqueue_valid(&text, &valid)?;
        }
        Ok(())
    }

    /// Sets the momentum encoders to the live weights (after weights were loaded into them).
    pub fn reset_to_live(&mut self) -> Result<(), TrainError> {
        self.copy.update(&self.sources, 0.0)?;
        Ok(())
    }

    /// `momentum.*`, `queue.image.*` and `queue.text.*` (shallow).
    pub fn extra_state(&self) -> Vec<(String, Tensor)> {
        let mut state = self.copy.named("momentum.");
        state.extend(self.image_queue.named("queue.image."));
        state.extend(self.text_queue.named("queue.text."));
        state
    }

    /// Restores [`Momentum::extra_state`] from `source`; `origin` names it in errors.
    pub fn load_extra_state(&mut self, source: &HashMap<String, Tensor>, origin: &str) -> Result<(), TrainError> {
        self.copy.load(|k| source.get(k), "momentum.", origin)?;
        self.image_queue.load(|k| source.get(k), "queue.image.", origin)?;
        self.text_queue.load(|k| source.get(k), "queue.text.", origin)?;
        self.pending = None;
        Ok(())
    }
}

/// The layout of a step's leaves: the gathered states of every rank (`global` hard negatives on
/// more than one rank), this rank's rows at `offset`; or this rank's states alone.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Leaves {
    global: bool,
    /// This rank's first row in the leaves.
    pub offset: i64,
    rank: i64,
    slot: i64,
    world: usize,
    kind: Kind,
}

impl Leaves {
    /// The layout for `mode` on rank `rank` of `world` with `slot` samples per rank; `kind` is
    /// what gathered tensors travel in.
    pub fn new(mode: HardNegatives, rank: usize, world: usize, slot: i64, kind: Kind) -> Self {
        let global = mode == HardNegatives::Global && world > 1;
        let rank = rank as i64;
        Self { global, offset: if global { rank * slot } else { 0 }, rank, slot, world, kind }
    }

    /// `states` `[B, ...]` detached into a leaf that requires grad: gathered from every rank
    /// (`[W * B, ...]`) or this rank's.
    pub fn leaf(&self, coll: &mut dyn Collective, states: &Tensor) -> Result<Tensor, TrainError> {
        let states = states.detach();
        let leaf = if self.global { self.gather(coll, &states)? } else { states };
        Ok(leaf.set_requires_grad(true))
    }

    /// Per-sample inputs the hard negatives read (attention masks, token ids), gathered like the
    /// leaves, without grad, in `t`'s kind. Integers travel exactly below 2^24 in fp32.
    pub fn candidates(&self, coll: &mut dyn Collective, t: &Tensor) -> Result<Tensor, TrainError> {
        if self.global {
            self.gather(coll, &t.detach())
        } else {
            Ok(t.shallow_clone())
        }
    }

    fn gather(&self, coll: &mut dyn Collective, t: &Tensor) -> Result<Tensor, TrainError> {
        let mut shape = t.size();
        shape[0] *= self.world as i64;
        let wire = t.to_kind(self.kind).flatten(1, -1);
        Ok(coll.all_gather(&wire)?.view(shape.as_slice()).to_kind(t.kind()))
    }

    /// This rank's rows of a leaf.
    pub fn own(&self, leaf: &Tensor) -> Tensor {
        leaf.narrow(0, self.offset, self.slot)
    }

    /// The rows of the gathered global batch that are hard-negative candidates: all of them
    /// (`global`) or this rank's slot.
    pub fn candidate_rows(&self) -> Range<i64> {
        if self.global {
            0..self.world as i64 * self.slot
        } else {
            self.rank * self.slot..(self.rank + 1) * self.slot
        }
    }

    /// After the backward of the loss to the leaves: each leaf's gradient at this rank's rows,
    /// summed over ranks first when the leaves are gathered (in one collective), shaped and
    /// typed as the `states` the leaf was made from.
    pub fn own_grads(&self, coll: &mut dyn Collective, leaves: &[(&Tensor, &Tensor)]) -> Result<Vec<Tensor>, TrainError> {
        if !self.global {
            return Ok(leaves.iter().map(|(leaf, _)| leaf.grad()).collect());
        }
        let grads: Vec<Tensor> = leaves.iter().map(|(leaf, _)| leaf.grad().flatten(1, -1).to_kind(self.kind)).collect();
        let widths: Vec<i64> = grads.iter().map(|g| g.size()[1]).collect();
        let mut all = Tensor::cat(&grads, 1);
        coll.all_reduce_sum(&mut all)?;
        let own = self.own(&all);
        let mut start = 0;
        Ok(leaves
            .iter()
            .zip(widths)
            .map(|((_, states), width)| {
                let grad = own.narrow(1, start, width).view_as(states).to_kind(states.kind());
                start += width;
                grad
            })
            .collect())
    }
}

/// The hard negatives of one step, as rows of the leaves (a sample without a negative points at
/// itself) with a 0/1 flag per sample (fp64) saying whether one was drawn.
pub(crate) struct NegativeDraw {
    /// `[B]` the negative caption's row for each image.
    pub text_index: Tensor,
    /// `[B]` 1 where a negative caption was drawn.
    pub text_found: Tensor,
    /// `[B]` the negative image's row for each caption.
    pub image_index: Tensor,
    /// `[B]` 1 where a negative image was drawn.
    pub image_found: Tensor,
}

impl NegativeDraw {
    /// The captions of ITM's `3B` pairs: this rank's (with their images, then with the
    /// negative images), then each image's negative caption. `own` holds this rank's rows,
    /// `candidates` the rows the draw indexes (the leaves, or inputs gathered like them).
    pub fn pair_texts(&self, own: &Tensor, candidates: &Tensor) -> Tensor {
        Tensor::cat(&[own, own, &candidates.index_select(0, &self.text_index)], 0)
    }

    /// The images of ITM's `3B` pairs, matching [`NegativeDraw::pair_texts`]: this rank's, each
    /// caption's negative image, this rank's again.
    pub fn pair_images(&self, own: &Tensor, candidates: &Tensor) -> Tensor {
        Tensor::cat(&[own, &candidates.index_select(0, &self.image_index), own], 0)
    }

    /// ITM's loss share: the sum of CE over this rank's valid pairs (labels 1, 0, 0 for the
    /// positives and the two negatives; a missing negative left out) divided by `3 * n_valid`
    /// of the global batch. `logits` are `[3B, 2]` in the order of [`NegativeDraw::pair_texts`].
    pub fn itm_loss(&self, logits: &Tensor, valid: &Tensor, n_valid: i64) -> Tensor {
        let slot = valid.size()[0];
        let ones = Tensor::ones([slot], (Kind::Int64, logits.device()));
        let labels = Tensor::cat(&[ones.shallow_clone(), ones.zeros_like(), ones.zeros_like()], 0);
        let valid = valid.to_kind(Kind::Double);
        let weights = Tensor::cat(&[&valid, &(&valid * &self.image_found), &(&valid * &self.text_found)], 0);
        itm::itm_loss_sum(logits, &labels, &weights) / (3 * n_valid.max(1)) as f64
    }
}

/// Draws ITM hard negatives and remembers the last step's.
pub(crate) struct HardNegativeSampler {
    seed: u64,
    /// Added to every weight before the positive is zeroed (0 for ALBEF, 1e-4 for BLIP).
    smoothing: f64,
    last: Vec<DrawnNegatives>,
}

impl HardNegativeSampler {
    /// A sampler hashing `seed`, with weights `softmax(sim) + smoothing`.
    pub fn new(seed: u64, smoothing: f64) -> Self {
        Self { seed, smoothing, last: Vec::new() }
    }

    /// One negative caption per image and one negative image per caption of this rank's batch at
    /// `step`: weights `softmax(sim) + smoothing` over the candidates' momentum features
    /// (`sim = feature . feature_m / temp`, without grad, from this rank's online `(image, text)`
    /// features), the sample's own column and invalid columns zeroed, drawn with a uniform hashed
    /// from the sample's position.
    pub fn draw(
        &mut self,
        step: u64,
        batch: &DeviceBatch,
        (image_feat, text_feat): (&Tensor, &Tensor),
        gathered: &Gathered,
        leaves: &Leaves,
        temp: &Tensor,
    ) -> Result<NegativeDraw, TrainError> {
        let slot = batch.len() as i64;
        let columns = leaves.candidate_rows();
        let candidates = |t: &Tensor| t.narrow(0, columns.start, columns.end - columns.start);
        let valid_columns = candidates(&gathered.valid_all);
        let temp = temp.detach().to_kind(image_feat.kind());
        let own_columns: Vec<i64> = (0..slot).map(|i| leaves.offset + i).collect();
        let positions = Vec::<i64>::try_from(&batch.positions)?;
        let valid_rows = Vec::<bool>::try_from(batch.valid.to_device(Device::Cpu))?;
        let positions: Vec<i64> = positions.iter().zip(&valid_rows).map(|(&p, &v)| if v { p } else { -1 }).collect();
        let sim_i2t = image_feat.detach().matmul(&candidates(&gathered.text_all).transpose(0, 1)) / &temp;
        let sim_t2i = text_feat.detach().matmul(&candidates(&gathered.image_all).transpose(0, 1)) / &temp;
        let weights_i2t = itm::hard_negative_weights(&sim_i2t, &own_columns, &valid_columns, self.smoothing);
        let weights_t2i = itm::hard_negative_weights(&sim_t2i, &own_columns, &valid_columns, self.smoothing);
        let negative_texts = itm::draw_negatives(&weights_i2t, &positions, self.seed, step, Direction::TextForImage);
        let negative_images = itm::draw_negatives(&weights_t2i, &positions, self.seed, step, Direction::ImageForText);
        self.last = positions
            .iter()
            .zip(negative_texts.iter().zip(&negative_images))
            .filter(|(&position, _)| position >= 0)
            .map(|(&position, (&text, &image))| DrawnNegatives { position, text, image })
            .collect();
        let device = image_feat.device();
        let index = |drawn: &[Option<usize>]| -> (Tensor, Tensor) {
            let idx: Vec<i64> = drawn.iter().enumerate().map(|(i, d)| d.map_or(leaves.offset + i as i64, |j| j as i64)).collect();
            let found: Vec<f64> = drawn.iter().map(|d| if d.is_some() { 1.0 } else { 0.0 }).collect();
            (Tensor::from_slice(&idx).to_device(device), Tensor::from_slice(&found).to_device(device))
        };
        let (text_index, text_found) = index(&negative_texts);
        let (image_index, image_found) = index(&negative_images);
        Ok(NegativeDraw { text_index, text_found, image_index, image_found })
    }

    /// The hard negatives drawn in the last step for this rank's valid samples.
    pub fn last(&self) -> &[DrawnNegatives] {
        &self.last
    }
}
