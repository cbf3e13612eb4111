//! Image-text contrastive loss (symmetric InfoNCE) over every worker's pairs.
//!
//! With `N` valid pairs across all ranks, the loss is
//! `L = (1 / 2N) * sum_i [CE(s * I_i . T^T, i) + CE(s * T_i . I^T, i)]`.
//! Rank `r` computes the terms of its own rows, `L_r`, on the gathered features, so
//! `L = sum_r L_r`. The exact gradient follows in two stages: backward of `L_r` to the gathered
//! features (and the logit scale), a sum of those feature gradients over ranks, then backward
//! of each rank's own slice through its towers. Summing parameter gradients over ranks then
//! gives exactly the single-process gradient of `L` for the full global batch.

use tch::{Kind, Tensor};

/// This rank's share `L_r` of the contrastive loss.
///
/// `image_all`, `text_all`: gathered L2-normalised features [N, D] of every rank, in rank order.
/// `valid_all`: [N] bool, false for samples that failed to load (left out of rows and columns).
/// `rows`: the range of this rank's samples in the gathered order.
/// `logit_scale`: `s`, the log of the scale (the loss uses `exp(s)`).
pub fn local_loss(
    image_all: &Tensor,
    text_all: &Tensor,
    valid_all: &Tensor,
    rows: std::ops::Range<i64>,
    logit_scale: &Tensor,
) -> Tensor {
    // Counted on the device: nothing in the step waits for it (a captured step cannot).
    let n_valid = valid_all.sum(image_all.kind()).clamp_min(1.0);
    let scale = logit_scale.exp();
    let len = rows.end - rows.start;
    let image_rows = image_all.narrow(0, rows.start, len);
    let text_rows = text_all.narrow(0, rows.start, len);
    let invalid_columns = valid_all.logical_not().unsqueeze(0);
    let targets = Tensor::arange_start(rows.start, rows.end, (Kind::Int64, image_all.device())).unsqueeze(1);
    let row_mask = valid_all.narrow(0, rows.start, len).to_kind(image_all.kind());
    let direction = |queries: &Tensor, keys: &Tensor| {
        let logits = (queries.matmul(&keys.transpose(0, 1)) * &scale).masked_fill(&invalid_columns, f64::NEG_INFINITY);
        let nll = -logits.log_softmax(1, logits.kind()).gather(1, &targets, false).squeeze_dim(1);
        (nll.nan_to_num(0.0, None, None) * &row_mask).sum(image_all.kind())
    };
    (direction(&image_rows, text_all) + direction(&text_rows, image_all)) / (n_valid * 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook full-batch loss: mean CE over rows and over columns.
    fn full_batch_loss(image: &Tensor, text: &Tensor, s: &Tensor) -> Tensor {
        let logits = image.matmul(&text.transpose(0, 1)) * s.exp();
        let n = image.size()[0];
        let labels = Tensor::arange(n, (Kind::Int64, image.device()));
        let ce = |l: &Tensor| l.log_softmax(1, Kind::Double).nll_loss(&labels);
        (ce(&logits) + ce(&logits.transpose(0, 1))) / 2.0
    }

    #[test]
    fn sum_of_rank_shares_equals_full_batch_loss() {
        tch::manual_seed(1);
        let opts = (Kind::Double, tch::Device::Cpu);
        let image = crate::models::clip::normalize(&Tensor::randn([12, 8], opts));
        let text = crate::models::clip::normalize(&Tensor::randn([12, 8], opts));
        let s = Tensor::from(2.3f64);
        let valid = Tensor::ones([12], (Kind::Bool, tch::Device::Cpu));
        let shares: f64 = [0..5, 5..9, 9..12].into_iter().map(|r| local_loss(&image, &text, &valid, r, &s).double_value(&[])).sum();
        let full = full_batch_loss(&image, &text, &s).double_value(&[]);
        assert!((shares - full).abs() < 1e-12, "{shares} vs {full}");
    }

    #[test]
    fn invalid_samples_are_left_out() {
        tch::manual_seed(2);
        let opts = (Kind::Double, tch::Device::Cpu);
        let image = crate::models::clip::normalize(&Tensor::randn([6, 4], opts));
        let text = crate::models::clip::normalize(&Tensor::randn([6, 4], opts));
        let s = Tensor::from(1.0f64);
        let valid = Tensor::from_slice(&[true, true, false, true, true, true]);
        let masked = local_loss(&image, &text, &valid, 0..6, &s).double_value(&[]);
        let keep = Tensor::from_slice(&[0i64, 1, 3, 4, 5]);
        let reference = full_batch_loss(&image.index_select(0, &keep), &text.index_select(0, &keep), &s).double_value(&[]);
        assert!((masked - reference).abs() < 1e-12, "{masked} vs {reference}");
    }
}
