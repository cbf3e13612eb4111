//! Masked language modelling with momentum distillation (ALBEF).
//!
//! Over the predicted tokens `P` (label not [`IGNORE_INDEX`]) of the global batch, with logits
//! `z` of the fused model and `z_m` of its momentum copy on the same masked input:
//!
//! ```text
//! L = (1/|P|) sum_{t in P} [ (1 - alpha) CE(z_t, y_t) + alpha * (-sum_v softmax(z_m,t)_v log_softmax(z_t)_v) ]
//! ```
//!
//! as ALBEF's `BertForMaskedLM` with `soft_labels` (`loss_distill[labels != -100].mean()`).
//! Each rank returns the sum over its own tokens; dividing by the global `|P|` makes the ranks'
//! shares add up to `L`.

use tch::{Kind, Tensor};

use crate::data::mlm::IGNORE_INDEX;

/// The positions a language-modelling loss predicts: where `labels` `[B, L]` is not
/// [`IGNORE_INDEX`], in row-major order. The vocabulary-sized head then runs on those positions'
/// states alone (about 15% of the tokens for MLM); the others would get a zero gradient anyway.
#[derive(Debug)]
pub struct Predicted {
    /// Flat indices into `B * L` of the predicted positions `[R]`.
    index: Tensor,
    /// Their labels `[R]`.
    pub targets: Tensor,
}

impl Predicted {
    /// The predicted positions of `labels` `[B, L]`.
    pub fn new(labels: &Tensor) -> Self {
        let flat = labels.reshape([-1]);
        let index = flat.ne(IGNORE_INDEX).nonzero().squeeze_dim(1);
        let targets = flat.index_select(0, &index);
        Self { index, targets }
    }

    /// The states `[B, L, W]` of the predicted positions, `[R, W]`.
    pub fn rows(&self, states: &Tensor) -> Tensor {
        let width = *states.size().last().expect("states are [B, L, W]");
        states.reshape([-1, width]).index_select(0, &self.index)
    }

    /// Number of predicted positions.
    pub fn len(&self) -> i64 {
        self.index.size()[0]
    }

    /// True when nothing is predicted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sum over predicted tokens of the distilled MLM loss. `logits`: `[R, V]` at the predicted
/// positions ([`Predicted::rows`] of the head's input, through the head); `targets`: `[R]`
/// ([`Predicted::targets`]); `logits_m`: the momentum model's logits at the same positions
/// (needed when `alpha > 0`), treated as constants.
pub fn distilled_mlm_sum(logits: &Tensor, targets: &Tensor, logits_m: Option<&Tensor>, alpha: f64) -> Tensor {
    let kind = logits.kind();
    let log_p = logits.log_softmax(-1, kind);
    let ce = -log_p.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1);
    let mut per_token = ce * (1.0 - alpha);
    if alpha > 0.0 {
        let logits_m = logits_m.expect("momentum logits are needed when alpha > 0");
        let soft = logits_m.detach().to_kind(kind).softmax(-1, kind);
        let distill = -(soft * &log_p).sum_dim_intlist([-1i64].as_slice(), false, kind);
        per_token += distill * alpha;
    }
    per_token.sum(kind)
}

/// The cross-entropy with label smoothing `label_smoothing` of `logits` `[R, V]` against
/// `targets` `[R]`, summed, in `kind`: `sum_t [(1 - eps) (-log p_t(y_t)) + eps / V * sum_v
/// (-log p_t(v))]`, torch's `cross_entropy(..., label_smoothing=eps, reduction="sum")`.
pub fn smoothed_ce_sum(logits: &Tensor, targets: &Tensor, label_smoothing: f64, kind: Kind) -> Tensor {
    logits.to_kind(kind).cross_entropy_loss::<Tensor>(targets, None, tch::Reduction::Sum, IGNORE_INDEX, label_smoothing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_formula_on_a_tiny_case() {
        let logits = Tensor::from_slice(&[1.0f64, 0.0, -1.0, 0.5, 0.5, 2.0]).view([1, 2, 3]);
        let logits_m = Tensor::from_slice(&[0.0f64, 1.0, 0.0, 3.0, 0.0, 0.0]).view([1, 2, 3]);
        let labels = Tensor::from_slice(&[IGNORE_INDEX, 2]).view([1, 2]);
        let alpha = 0.4;
        let predicted = Predicted::new(&labels);
        assert_eq!(predicted.len(), 1);
        let (rows, rows_m) = (predicted.rows(&logits), predicted.rows(&logits_m));
        let got = distilled_mlm_sum(&rows, &predicted.targets, Some(&rows_m), alpha).double_value(&[]);
        let z = [0.5f64, 0.5, 2.0];
        let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        let zm = [3.0f64, 0.0, 0.0];
        let sm: f64 = zm.iter().map(|v| v.exp()).sum();
        let soft: Vec<f64> = zm.iter().map(|v| v.exp() / sm).collect();
        let ce = lse - z[2];
        let distill: f64 = soft.iter().zip(z).map(|(q, v)| -q * (v - lse)).sum();
        let expected = (1.0 - alpha) * ce + alpha * distill;
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        let plain = distilled_mlm_sum(&rows, &predicted.targets, None, 0.0).double_value(&[]);
        assert!((plain - ce).abs() < 1e-12);
    }
}
