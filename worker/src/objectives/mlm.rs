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

use tch::Tensor;

use crate::data::mlm::IGNORE_INDEX;

/// Sum over predicted tokens of the distilled MLM loss. `logits`: `[B, L, V]`; `labels`:
/// `[B, L]` int64 ([`IGNORE_INDEX`] where nothing is predicted); `logits_m`: the momentum
/// model's logits (needed when `alpha > 0`), treated as constants.
///
/// The vocabulary-wide work (softmaxes, the soft cross-entropy and their gradients) runs on the
/// predicted rows alone, about 15% of the tokens; the other rows get a zero gradient.
pub fn distilled_mlm_sum(logits: &Tensor, labels: &Tensor, logits_m: Option<&Tensor>, alpha: f64) -> Tensor {
    let kind = logits.kind();
    let vocab = *logits.size().last().expect("logits are [B, L, V]");
    let labels = labels.reshape([-1]);
    let rows = labels.ne(IGNORE_INDEX).nonzero().squeeze_dim(1);
    let log_p = logits.reshape([-1, vocab]).index_select(0, &rows).log_softmax(-1, kind);
    let ce = -log_p.gather(1, &labels.index_select(0, &rows).unsqueeze(1), false).squeeze_dim(1);
    let mut per_token = ce * (1.0 - alpha);
    if alpha > 0.0 {
        let logits_m = logits_m.expect("momentum logits are needed when alpha > 0");
        let soft = logits_m.detach().reshape([-1, vocab]).index_select(0, &rows).to_kind(kind).softmax(-1, kind);
        let distill = -(soft * &log_p).sum_dim_intlist([-1i64].as_slice(), false, kind);
        per_token += distill * alpha;
    }
    per_token.sum(kind)
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
        let got = distilled_mlm_sum(&logits, &labels, Some(&logits_m), alpha).double_value(&[]);
        let z = [0.5f64, 0.5, 2.0];
        let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        let zm = [3.0f64, 0.0, 0.0];
        let sm: f64 = zm.iter().map(|v| v.exp()).sum();
        let soft: Vec<f64> = zm.iter().map(|v| v.exp() / sm).collect();
        let ce = lse - z[2];
        let distill: f64 = soft.iter().zip(z).map(|(q, v)| -q * (v - lse)).sum();
        let expected = (1.0 - alpha) * ce + alpha * distill;
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        let plain = distilled_mlm_sum(&logits, &labels, None, 0.0).double_value(&[]);
        assert!((plain - ce).abs() < 1e-12);
    }
}
