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

/// A rank's batch as host tensors, in the kinds the model takes and padded to the slot:
/// everything a [`DeviceBatch`] needs but the copy to the device. Building it is the host's
/// share of the work (conversion, padding), which a thread beside training can do; for a CUDA
/// device its tensors are in pinned memory, so [`HostBatch::to_device`] copies asynchronously.
#[derive(Debug)]
pub struct HostBatch {
    images: Tensor,
    tokens: Tensor,
    eot_index: Tensor,
    valid: Tensor,
    word_ids: Tensor,
    positions: Tensor,
    pinned: bool,
}

impl HostBatch {
    /// Converts a loader batch for `device`: images in `kind`, every tensor padded with invalid
    /// samples up to `slot`, pinned when `device` is CUDA.
    pub fn from_batch(batch: &Batch, slot: usize, image_size: i64, device: Device, kind: Kind) -> Self {
        let b = batch.valid.len();
        assert!(b <= slot, "a rank batch of {b} does not fit slot {slot}");
        assert_eq!(batch.images.len(), b * (3 * image_size * image_size) as usize, "images of {b} samples at {image_size}px");
        let context = batch.tokens.len().checked_div(b).unwrap_or(1) as i64;
        let (slot, b) = (slot as i64, b as i64);
        let pinned = device.is_cuda();
        // Each tensor is allocated at the slot's size (pinned for a CUDA device), the batch's
        // rows are converted into it in one pass and the padding rows are filled.
        let padded = |shape: &[i64], kind: Kind, rows: &Tensor, pad: f64| {
            let mut full_shape = shape.to_vec();
            full_shape[0] = slot;
            let full = Tensor::empty(full_shape.as_slice(), (kind, Device::Cpu));
            let full = if pinned { full.pin_memory(device) } else { full };
            full.narrow(0, 0, b).copy_(rows);
            let _ = full.narrow(0, b, slot - b).fill_(pad);
            full
        };
        // SAFETY: `from_blob` views `batch.images` (alive for this whole function) without a
        // copy; the view is only read, by the conversion into `images`, before returning.
        let pixels = unsafe {
            Tensor::from_blob(batch.images.as_ptr() as *const u8, &[b, 3, image_size, image_size], &[], Kind::Float, Device::Cpu)
        };
        let images = padded(&[b, 3, image_size, image_size], kind, &pixels, 0.0);
        let positions: Vec<i64> = batch.positions.iter().map(|&p| p as i64).collect();
        Self {
            images,
            tokens: padded(&[b, context], Kind::Int64, &Tensor::from_slice(&batch.tokens).view([b, context]), 0.0),
            eot_index: padded(&[b], Kind::Int64, &Tensor::from_slice(&batch.eot_index), 0.0),
            valid: padded(&[b], Kind::Bool, &Tensor::from_slice(&batch.valid), 0.0),
            word_ids: padded(&[b, context], Kind::Int64, &Tensor::from_slice(&batch.word_ids).view([b, context]), -1.0),
            positions: padded(&[b], Kind::Int64, &Tensor::from_slice(&positions), -1.0),
            pinned,
        }
    }

    /// The batch on `device`: copies issued without waiting when the host tensors are pinned
    /// (they run in order before the step's kernels); word ids and positions stay on the host.
    pub fn to_device(&self, device: Device) -> DeviceBatch {
        let move_to = |t: &Tensor| if device == Device::Cpu { t.shallow_clone() } else { t.to_device_(device, t.kind(), self.pinned, false) };
        DeviceBatch {
            images: move_to(&self.images),
            tokens: move_to(&self.tokens),
            eot_index: move_to(&self.eot_index),
            valid: move_to(&self.valid),
            word_ids: Some(self.word_ids.shallow_clone()),
            positions: self.positions.shallow_clone(),
        }
    }
}

impl DeviceBatch {
    /// Moves a loader batch to `device` in `kind`, padding with invalid samples up to `slot`.
    pub fn from_batch(batch: &Batch, slot: usize, image_size: i64, device: Device, kind: Kind) -> Self {
        HostBatch::from_batch(batch, slot, image_size, device, kind).to_device(device)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn loader_batch() -> Batch {
        Batch {
            step: 4,
            positions: vec![17, 3],
            keys: vec!["a".into(), "b".into()],
            images: (0..24).map(|i| i as f32 * 0.37 - 4.0).collect(),
            tokens: vec![5, 6, 7, 8, 9, 10],
            eot_index: vec![2, 1],
            word_ids: vec![0, 1, -1, 0, -1, -1],
            classes: vec![1, -1],
            captions: vec!["x".into(), "y".into()],
            valid: vec![true, false],
            data_wait: std::time::Duration::ZERO,
        }
    }

    /// Two samples padded to a slot of three: the rows converted to the model's kinds, the
    /// padding rows invalid with zero images and tokens and -1 positions and words.
    #[test]
    fn a_loader_batch_is_converted_and_padded() {
        let batch = loader_batch();
        let moved = DeviceBatch::from_batch(&batch, 3, 2, Device::Cpu, Kind::BFloat16);
        assert_eq!(moved.images.size(), [3, 3, 2, 2]);
        assert_eq!(moved.images.kind(), Kind::BFloat16);
        let expected = Tensor::from_slice(&batch.images).view([2, 3, 2, 2]).to_kind(Kind::BFloat16);
        assert!(moved.images.narrow(0, 0, 2).equal(&expected));
        assert_eq!(f64::try_from(moved.images.narrow(0, 2, 1).abs().sum(Kind::Float)).unwrap(), 0.0);
        assert_eq!(Vec::<i64>::try_from(moved.tokens.flatten(0, -1)).unwrap(), [5, 6, 7, 8, 9, 10, 0, 0, 0]);
        assert_eq!(Vec::<i64>::try_from(&moved.eot_index).unwrap(), [2, 1, 0]);
        assert_eq!(Vec::<bool>::try_from(&moved.valid).unwrap(), [true, false, false]);
        assert_eq!(Vec::<i64>::try_from(&moved.positions).unwrap(), [17, 3, -1]);
        let words = moved.word_ids.expect("word ids");
        assert_eq!(Vec::<i64>::try_from(words.flatten(0, -1)).unwrap(), [0, 1, -1, 0, -1, -1, -1, -1, -1]);
        let full = DeviceBatch::from_batch(&batch, 2, 2, Device::Cpu, Kind::Float);
        assert!(full.images.equal(&Tensor::from_slice(&batch.images).view([2, 3, 2, 2])));
    }
}
