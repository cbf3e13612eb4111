//! Image-text matching with hard negatives (ALBEF, BLIP).
//!
//! For each positive pair `(I_i, T_i)` the fusion encoder also sees one hard negative per
//! direction: a text `T_j` drawn for image `i` with weights `softmax_j(sim_i2t[i, :])`, and an image
//! `I_k` drawn for text `i` with weights `softmax_k(sim_t2i[i, :])`, the positive's own column set
//! to zero (BLIP adds 1e-4 to every weight first, so that no candidate is impossible). The ITM head
//! classifies the `3N` pairs (label 1 for the positives, 0 for the negatives) and the loss is the
//! mean cross-entropy over them.
//!
//! The candidates are the columns of the similarity: this rank's batch (`per_worker`, as both
//! papers pretrain) or the whole global batch (`global`). The draw for a sample is an inverse-CDF
//! lookup with a uniform number hashed from (seed, step, the sample's global position,
//! direction) rather than a draw from a running generator, so a sample picks the same negative
//! whichever rank holds it and at any worker count (with `global` candidates).

use braid_coordinator::plan::{splitmix64_mix, SPLITMIX64_GAMMA};
use tch::{Kind, Tensor};

/// Which way a hard negative is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A negative text for an image.
    TextForImage = 1,
    /// A negative image for a text.
    ImageForText = 2,
}

/// Sampling weights of hard negatives: `softmax(sim)` over the valid columns, plus `smoothing`
/// (0 for ALBEF, 1e-4 for BLIP), zero at each row's own column (`own_columns[i]`, -1 for none)
/// and at invalid columns. `sim` is `[rows, columns]`; `valid_columns` is `[columns]` bool.
/// Computed without autograd, returned in fp64 on the CPU.
pub fn hard_negative_weights(sim: &Tensor, own_columns: &[i64], valid_columns: &Tensor, smoothing: f64) -> Tensor {
    tch::no_grad(|| {
        let sim = sim.detach().to_kind(Kind::Double).to_device(tch::Device::Cpu);
        let valid = valid_columns.to_device(tch::Device::Cpu).unsqueeze(0);
        let weights = sim.masked_fill(&valid.logical_not(), f64::NEG_INFINITY).softmax(1, Kind::Double) + smoothing;
        let weights = weights.masked_fill(&valid.logical_not(), 0.0);
        for (row, &column) in own_columns.iter().enumerate() {
            if column >= 0 {
                let _ = weights.get(row as i64).get(column).fill_(0.0);
            }
        }
        weights
    })
}

/// The column whose cumulative weight first exceeds `u * total` (inverse CDF of the
/// unnormalised `weights`), or `None` when every weight is zero.
pub fn draw(weights: &[f64], u: f64) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 || total.is_nan() {
        return None;
    }
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last_positive = None;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            cumulative += w;
            last_positive = Some(i);
            if cumulative > target {
                return Some(i);
            }
        }
    }
    last_positive
}

/// A uniform number in `[0, 1)` (53 bits) for the hard negative of the sample at global
/// `position` at `step`, in `direction`.
pub fn uniform(seed: u64, step: u64, position: u64, direction: Direction) -> f64 {
    let mix = |h: u64, x: u64| splitmix64_mix(h ^ x.wrapping_add(SPLITMIX64_GAMMA));
    let mut h = mix(seed, 0x4954_4D5F_4E45_4741); // "ITM_NEGA"
    h = mix(h, step.wrapping_mul(0xD1B5_4A32_D192_ED03));
    h = mix(h, position.wrapping_mul(SPLITMIX64_GAMMA));
    h = mix(h, (direction as u64).wrapping_mul(0xF135_7AEA_2E62_A9C5));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Draws one negative per row of `weights` (`[rows, columns]`, fp64 CPU, from
/// [`hard_negative_weights`]) for the samples at `positions` (-1 for padding: no draw).
pub fn draw_negatives(weights: &Tensor, positions: &[i64], seed: u64, step: u64, direction: Direction) -> Vec<Option<usize>> {
    let rows = weights.size()[0];
    (0..rows)
        .map(|row| {
            let position = positions[row as usize];
            if position < 0 {
                return None;
            }
            let w: Vec<f64> = Vec::<f64>::try_from(weights.get(row)).expect("fp64 weights");
            draw(&w, uniform(seed, step, position as u64, direction))
        })
        .collect()
}

/// Sum over pairs of `weight * CE(logits, label)` for ITM logits `[pairs, 2]`, labels `[pairs]`
/// (1 match, 0 not) and per-pair weights `[pairs]` (1 for a pair that counts, 0 for padding or
/// a missing negative). Divide by the number of pairs of the global batch for the mean.
pub fn itm_loss_sum(logits: &Tensor, labels: &Tensor, weights: &Tensor) -> Tensor {
    let kind = logits.kind();
    let log_p = logits.log_softmax(1, kind);
    let nll = -log_p.gather(1, &labels.unsqueeze(1), false).squeeze_dim(1);
    (nll * weights.to_kind(kind)).sum(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draw_inverts_the_cumulative_weights() {
        let w = [0.0, 1.0, 0.0, 3.0];
        assert_eq!(draw(&w, 0.0), Some(1));
        assert_eq!(draw(&w, 0.2499), Some(1));
        assert_eq!(draw(&w, 0.2501), Some(3));
        assert_eq!(draw(&w, 0.999_999), Some(3));
        assert_eq!(draw(&[0.0, 0.0], 0.5), None);
    }

    #[test]
    fn weights_zero_the_positive_and_invalid_columns() {
        let sim = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 0.5, 0.5, 0.5]).view([2, 3]);
        let valid = Tensor::from_slice(&[true, true, false]);
        let w = hard_negative_weights(&sim, &[0, 1], &valid, 0.0);
        let w: Vec<f64> = Vec::<f64>::try_from(w.flatten(0, 1)).unwrap();
        let e = (1.0f64).exp() + (2.0f64).exp();
        assert!((w[1] - (2.0f64).exp() / e).abs() < 1e-15);
        assert_eq!((w[0], w[2], w[4], w[5]), (0.0, 0.0, 0.0, 0.0));
        assert!((w[3] - 0.5).abs() < 1e-15);
        let smoothed = hard_negative_weights(&sim, &[0, 1], &valid, 1e-4);
        assert!((smoothed.double_value(&[0, 1]) - (2.0f64.exp() / e + 1e-4)).abs() < 1e-15);
    }

    #[test]
    fn uniforms_differ_by_step_position_and_direction() {
        let u = uniform(7, 3, 11, Direction::TextForImage);
        assert!((0.0..1.0).contains(&u));
        assert_eq!(u, uniform(7, 3, 11, Direction::TextForImage));
        assert_ne!(u, uniform(7, 4, 11, Direction::TextForImage));
        assert_ne!(u, uniform(7, 3, 12, Direction::TextForImage));
        assert_ne!(u, uniform(7, 3, 11, Direction::ImageForText));
        assert_ne!(u, uniform(8, 3, 11, Direction::TextForImage));
    }

    #[test]
    fn itm_loss_is_the_weighted_cross_entropy() {
        let logits = Tensor::from_slice(&[2.0f64, -1.0, 0.5, 0.25]).view([2, 2]);
        let labels = Tensor::from_slice(&[1i64, 0]);
        let both = itm_loss_sum(&logits, &labels, &Tensor::from_slice(&[1.0f64, 1.0])).double_value(&[]);
        let ce = |l: [f64; 2], y: usize| -(l[y] - (l[0].exp() + l[1].exp()).ln());
        assert!((both - (ce([2.0, -1.0], 1) + ce([0.5, 0.25], 0))).abs() < 1e-12);
        let first = itm_loss_sum(&logits, &labels, &Tensor::from_slice(&[1.0f64, 0.0])).double_value(&[]);
        assert!((first - ce([2.0, -1.0], 1)).abs() < 1e-12);
    }
}
