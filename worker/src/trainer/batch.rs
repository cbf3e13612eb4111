//! A rank's share of a global batch as tensors on the training device.

use tch::{Device, Kind, Tensor};

use crate::data::loader::Batch;

/// A rank's batch as tensors on the training device, padded to the per-rank slot size.
#[derive(Debug)]
pub struct DeviceBatch {
    /// [B, 3, H, W]
    pub images: Tensor,
    /// [B, context]
    pub tokens: Tensor,
    /// [B]
    pub eot_index: Tensor,
    /// [B] bool
    pub valid: Tensor,
    /// [B, context] int64, CPU: the word of each token (-1 for special tokens and padding), for
    /// whole-word masking; `None` when the batch has no word boundaries.
    pub word_ids: Option<Tensor>,
    /// [B] int64, CPU: each sample's global position in the sample order (-1 for padding).
    /// Per-sample randomness (MLM masking, hard-negative draws) hashes it, so a sample gets the
    /// same draws whichever rank holds it.
    pub positions: Tensor,
}

impl DeviceBatch {
    /// Moves a loader batch to `device` in `kind`, padding with invalid samples up to `slot`.
    pub fn from_batch(batch: &Batch, slot: usize, image_size: i64, device: Device, kind: Kind) -> Self {
        let b = batch.valid.len();
        assert!(b <= slot, "a rank batch of {b} does not fit slot {slot}");
        let context = batch.tokens.len().checked_div(b).unwrap_or(1) as i64;
        let pad = (slot - b) as i64;
        let images = Tensor::from_slice(&batch.images).view([b as i64, 3, image_size, image_size]);
        let tokens = Tensor::from_slice(&batch.tokens).view([b as i64, context]);
        let eot = Tensor::from_slice(&batch.eot_index);
        let valid = Tensor::from_slice(&batch.valid);
        let positions: Vec<i64> = batch.positions.iter().map(|&p| p as i64).collect();
        let positions = Tensor::from_slice(&positions);
        let word_ids = Tensor::from_slice(&batch.word_ids).view([b as i64, context]);
        let (images, tokens, eot, valid, positions, word_ids) = if pad > 0 {
            (
                Tensor::cat(&[images, Tensor::zeros([pad, 3, image_size, image_size], (Kind::Float, Device::Cpu))], 0),
                Tensor::cat(&[tokens, Tensor::zeros([pad, context], (Kind::Int64, Device::Cpu))], 0),
                Tensor::cat(&[eot, Tensor::zeros([pad], (Kind::Int64, Device::Cpu))], 0),
                Tensor::cat(&[valid, Tensor::zeros([pad], (Kind::Bool, Device::Cpu))], 0),
                Tensor::cat(&[positions, Tensor::full([pad], -1, (Kind::Int64, Device::Cpu))], 0),
                Tensor::cat(&[word_ids, Tensor::full([pad, context], -1, (Kind::Int64, Device::Cpu))], 0),
            )
        } else {
            (images, tokens, eot, valid, positions, word_ids)
        };
        Self {
            images: images.to_kind(kind).to_device(device),
            tokens: tokens.to_device(device),
            eot_index: eot.to_device(device),
            valid: valid.to_device(device),
            word_ids: Some(word_ids),
            positions,
        }
    }

    /// Samples in the batch (padding included).
    pub fn len(&self) -> usize {
        self.valid.size()[0] as usize
    }

    /// True when the batch holds no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `[start, start + len)`.
    pub fn narrow(&self, start: i64, len: i64) -> DeviceBatch {
        DeviceBatch {
            images: self.images.narrow(0, start, len),
            tokens: self.tokens.narrow(0, start, len),
            eot_index: self.eot_index.narrow(0, start, len),
            valid: self.valid.narrow(0, start, len),
            word_ids: self.word_ids.as_ref().map(|w| w.narrow(0, start, len)),
            positions: self.positions.narrow(0, start, len),
        }
    }

    /// A copy whose device tensors are new storage (the fixed inputs of a captured step); the
    /// host tensors are shared.
    pub fn to_owned_copy(&self) -> DeviceBatch {
        DeviceBatch {
            images: self.images.copy(),
            tokens: self.tokens.copy(),
            eot_index: self.eot_index.copy(),
            valid: self.valid.copy(),
            word_ids: self.word_ids.as_ref().map(|w| w.shallow_clone()),
            positions: self.positions.shallow_clone(),
        }
    }

    /// Whether `other` has this batch's device, kinds and shapes (so it can be copied in).
    pub fn same_layout(&self, other: &DeviceBatch) -> bool {
        let layout = |t: &Tensor| (t.size(), t.kind(), t.device());
        [(&self.images, &other.images), (&self.tokens, &other.tokens), (&self.eot_index, &other.eot_index), (&self.valid, &other.valid)]
            .iter()
            .all(|(a, b)| layout(a) == layout(b))
    }

    /// Copies `other`'s device tensors into this batch's storage (same layout) and takes its
    /// host tensors.
    pub fn copy_from(&mut self, other: &DeviceBatch) {
        for (dst, src) in [(&mut self.images, &other.images), (&mut self.tokens, &other.tokens), (&mut self.eot_index, &other.eot_index), (&mut self.valid, &other.valid)] {
            dst.copy_(src);
        }
        self.word_ids = other.word_ids.as_ref().map(|w| w.shallow_clone());
        self.positions = other.positions.shallow_clone();
    }

    /// `[B, context]` int64 on the batch's device: 1 up to and including each caption's last
    /// token (`eot_index`), 0 for the padding after it (a BERT-style encoder's attention mask).
    pub fn attention_mask(&self) -> Tensor {
        attention_mask(&self.tokens, &self.eot_index)
    }
}

/// The attention mask `[B, L]` of captions `tokens` `[B, L]` whose last token is at
/// `eot_index` `[B]`: 1 up to and including it, 0 for the padding after it.
pub fn attention_mask(tokens: &Tensor, eot_index: &Tensor) -> Tensor {
    let context = tokens.size()[1];
    let index = Tensor::arange(context, (Kind::Int64, tokens.device())).unsqueeze(0);
    index.le_tensor(&eot_index.unsqueeze(1)).to_kind(Kind::Int64)
}
