//! Image-text contrastive loss with momentum distillation and queue negatives (ALBEF, BLIP).
//!
//! For a global batch of `N` pairs with online features `I, T` (L2-normalised, with grad),
//! momentum features `I_m, T_m` (gathered from every rank, no grad) and queues `Q_I, Q_T`
//! (`[K, D]`, see [`super::queue`]), with temperature `tau`:
//!
//! ```text
//! sim_i2t   = I   [T_m ; Q_T]^T / tau        sim_t2i   = T   [I_m ; Q_I]^T / tau
//! sim_i2t_m = I_m [T_m ; Q_T]^T / tau        sim_t2i_m = T_m [I_m ; Q_I]^T / tau
//! targets   = alpha * softmax(sim_m) + (1 - alpha) * onehot(i)   (row i's positive is column i)
//! L         = (1/2N) sum_i [ -sum_j log_softmax(sim_i2t)_ij y_i2t_ij - sum_j log_softmax(sim_t2i)_ij y_t2i_ij ]
//! ```
//!
//! as in ALBEF's and BLIP's `forward` (`loss_ita`), with `alpha = 0` giving plain InfoNCE with
//! queue negatives. The targets are computed without autograd (and with `tau` detached); `tau` gets
//! its gradient through `sim`. The caller clamps a learnable `tau` to [0.001, 0.5] as ALBEF does.
//!
//! Data parallelism: ALBEF and BLIP put only the local batch's momentum features in the columns
//! (the queue gets the gathered ones), so their loss depends on the per-GPU batch. braid gathers
//! the momentum features of every rank instead, so `W` workers with batch `B` compute exactly the
//! loss of one worker with batch `W * B` (DESIGN.md). Rank `r` computes the terms of its own rows,
//! `L_r` ([`local_loss`]), and `L = sum_r L_r`. The columns hold only momentum features and queue
//! entries, which carry no gradient, so `L_r` depends on the online features of rank `r`'s rows
//! alone: the gradient of `L_r` with respect to the gathered online features is zero outside
//! those rows, and the 3-stage gradient of braid's ITC reduces to an ordinary backward of `L_r`
//! through this rank's towers (the all-reduce of feature gradients may be kept; it adds zeros).
//! Summing parameter gradients over ranks then gives the full-batch gradient of `L`.

use std::ops::Range;

use tch::{Kind, Tensor};

use super::queue::FeatureQueue;

/// The distillation weight at `step` (0-based): `alpha * min(1, step / ramp_steps)`, `alpha` when
/// `ramp_steps` is 0. ALBEF ramps over the first epoch (`ramp_steps` = steps per epoch; in its
/// code `alpha * min(1, i / len(data_loader))` in epoch 0), BLIP's pretraining over the first two
/// (`ramp_steps` = 2 * steps per epoch); both use `alpha = 0.4`.
pub fn alpha_at(step: u64, ramp_steps: u64, alpha: f64) -> f64 {
    if ramp_steps == 0 {
        alpha
    } else {
        alpha * (step as f64 / ramp_steps as f64).min(1.0)
    }
}

/// What every rank shares in one step: the gathered momentum features of the global batch and
/// the queues, before this step's enqueue.
#[derive(Debug, Clone, Copy)]
pub struct MomentumKeys<'a> {
    /// `[N, D]` L2-normalised momentum image features of every rank, in rank order.
    pub image_all: &'a Tensor,
    /// `[N, D]` L2-normalised momentum text features of every rank, in rank order.
    pub text_all: &'a Tensor,
    /// `[N]` bool, false for samples that failed to load or pad a rank's slot (left out of rows
    /// and columns).
    pub valid_all: &'a Tensor,
    /// Momentum image features of earlier steps (negatives for text queries).
    pub image_queue: &'a FeatureQueue,
    /// Momentum text features of earlier steps (negatives for image queries).
    pub text_queue: &'a FeatureQueue,
}

/// This rank's share `L_r` of the distilled contrastive loss.
///
/// `image`, `text`: this rank's online L2-normalised features `[len(rows), D]` (with grad), rows
/// `rows` of the gathered order (a slice of a gathered leaf works too). `keys`: the momentum
/// features and queues. `temp`: the temperature `tau` (a scalar tensor, possibly learnable).
/// `alpha`: the distillation weight, e.g. [`alpha_at`]. Divided by `2 * N_valid`, so the shares of
/// all ranks sum to the full-batch loss.
pub fn local_loss(image: &Tensor, text: &Tensor, rows: Range<i64>, keys: &MomentumKeys, temp: &Tensor, alpha: f64) -> Tensor {
    let len = rows.end - rows.start;
    assert_eq!(image.size()[0], len, "image features do not match rows {rows:?}");
    assert_eq!(text.size()[0], len, "text features do not match rows {rows:?}");
    let kind = image.kind();
    let device = image.device();
    let n_valid = keys.valid_all.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]).max(1);
    let positives = Tensor::arange_start(rows.start, rows.end, (Kind::Int64, device)).unsqueeze(1);
    let row_invalid = keys.valid_all.narrow(0, rows.start, len).logical_not().unsqueeze(1);
    let temp_m = temp.detach();

    let direction = |queries: &Tensor, queries_m: &Tensor, keys_m: &Tensor, queue: &FeatureQueue| {
        let columns = Tensor::cat(&[keys_m.detach().to_kind(kind), queue.features.detach().to_kind(kind)], 0);
        let invalid = Tensor::cat(&[keys.valid_all.shallow_clone(), queue.valid.shallow_clone()], 0).logical_not().unsqueeze(0);
        let targets = tch::no_grad(|| {
            let onehot = Tensor::zeros([len, columns.size()[0]], (kind, device)).scatter_value(1, &positives, 1.0);
            if alpha == 0.0 {
                onehot
            } else {
                let sim_m = (queries_m.to_kind(kind).matmul(&columns.transpose(0, 1)) / &temp_m).masked_fill(&invalid, f64::NEG_INFINITY);
                sim_m.softmax(1, kind) * alpha + onehot * (1.0 - alpha)
            }
        });
        let sim = (queries.matmul(&columns.transpose(0, 1)) / temp).masked_fill(&invalid, f64::NEG_INFINITY);
        let log_p = sim.log_softmax(1, kind).masked_fill(&invalid, 0.0);
        let nll = -(log_p * targets).sum_dim_intlist([1i64].as_slice(), true, kind);
        nll.masked_fill(&row_invalid, 0.0).sum(kind)
    };
    let image_m = keys.image_all.narrow(0, rows.start, len);
    let text_m = keys.text_all.narrow(0, rows.start, len);
    let i2t = direction(image, &image_m, keys.text_all, keys.text_queue);
    let t2i = direction(text, &text_m, keys.image_all, keys.image_queue);
    (i2t + t2i) / (2 * n_valid) as f64
}
