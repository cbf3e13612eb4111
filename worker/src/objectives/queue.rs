//! Feature queues of momentum features (ALBEF, BLIP): extra negatives for the contrastive loss.
//!
//! Layout: `features` is `[K, D]`, one L2-normalised feature per row, the same layout as a batch
//! of features (LAVIS keeps the transpose, `image_queue: [embed_dim, queue_size]`, normalised
//! along dim 0; the math is the same). Like LAVIS/ALBEF the queue starts as random normal
//! features normalised to unit length; the draw is a pure function of the seed (made in fp64 on
//! the CPU, then cast and moved), so every rank and every device starts identical.
//!
//! Each step enqueues the all-gathered momentum features of the whole global batch at
//! `pointer` and advances it modulo `K` (ALBEF's `_dequeue_and_enqueue` with
//! `concat_all_gather`), so the queue holds the newest `K` momentum features and stays equal on
//! every rank. As in the papers, `K` must be a multiple of the global batch
//! ([`check_queue_size`]) so a batch never wraps. A `valid` flag per slot keeps samples that failed
//! to load (and padding) out of the negatives, as braid's plain ITC does.

use tch::{Device, Kind, Tensor};

use super::momentum::{state_digest, MomentumError};

/// Refuses a queue size that is not a positive multiple of the global batch.
pub fn check_queue_size(queue: usize, global_batch: usize) -> Result<(), String> {
    if global_batch == 0 {
        return Err(format!("queue size {queue} needs a global batch of at least 1, got global batch {global_batch}"));
    }
    if queue == 0 || !queue.is_multiple_of(global_batch) {
        let below = queue / global_batch * global_batch;
        let above = below + global_batch;
        let nearest = if below == 0 { format!("{above}") } else { format!("{below} or {above}") };
        return Err(format!(
            "queue size {queue} is not a positive multiple of the global batch {global_batch}: every step \
             enqueues the whole global batch, so the queue must hold a whole number of batches (e.g. {nearest})"
        ));
    }
    Ok(())
}

/// The rows of a gathered, per-rank padded tensor that hold the global batch, in global order:
/// rank `r` holds `rank_slice(global_batch, r, world_size)` at the start of its slot of
/// `ceil(global_batch / world_size)` rows. Index the gathered momentum features with these
/// before [`FeatureQueue::enqueue`].
pub fn global_batch_rows(global_batch: usize, world_size: usize) -> Vec<i64> {
    let slot = global_batch.div_ceil(world_size.max(1));
    (0..world_size)
        .flat_map(|r| {
            let slice = braid_coordinator::plan::rank_slice(global_batch, r, world_size);
            let start = (r * slot) as i64;
            (0..slice.len() as i64).map(move |i| start + i)
        })
        .collect()
}

/// A queue of `K` momentum features of dimension `D`.
#[derive(Debug)]
pub struct FeatureQueue {
    /// `[K, D]`, one L2-normalised feature per row.
    pub features: Tensor,
    /// `[K]` bool: false for slots filled by samples that failed to load.
    pub valid: Tensor,
    /// The next slot to write, in `0..K`.
    pub pointer: i64,
}

impl FeatureQueue {
    /// A queue of `size` random unit features of dimension `dim`, drawn from `seed` (fp64 on the
    /// CPU, the same on every rank and device), in `kind` on `device`. Draws under
    /// [`crate::trainer::seeded`], so it must not be called inside a `seeded` closure.
    pub fn new(size: i64, dim: i64, seed: u64, kind: Kind, device: Device) -> Self {
        let features = crate::trainer::seeded(seed, || Tensor::randn([size, dim], (Kind::Double, Device::Cpu)));
        let norm = features.norm_scalaropt_dim(2, [1i64], true).clamp_min(1e-12);
        let features = (features / norm).to_kind(kind).to_device(device);
        let valid = Tensor::ones([size], (Kind::Bool, device));
        Self { features, valid, pointer: 0 }
    }

    /// `K`, the number of slots.
    pub fn size(&self) -> i64 {
        self.features.size()[0]
    }

    /// Writes the gathered momentum features of the global batch `[G, D]` (all valid) at the
    /// pointer and advances it by `G` modulo `K`.
    pub fn enqueue(&mut self, gathered: &Tensor) -> Result<(), MomentumError> {
        let valid = Tensor::ones([gathered.size()[0]], (Kind::Bool, self.valid.device()));
        self.enqueue_valid(gathered, &valid)
    }

    /// [`FeatureQueue::enqueue`] with a `[G]` bool flag per sample; slots of invalid samples are
    /// left out of the negatives until overwritten.
    pub fn enqueue_valid(&mut self, gathered: &Tensor, valid: &Tensor) -> Result<(), MomentumError> {
        let err = |reason: String| MomentumError::State { origin: "enqueue".into(), reason };
        let (k, d) = (self.size(), self.features.size()[1]);
        let size = gathered.size();
        if size.len() != 2 || size[1] != d {
            return Err(err(format!("gathered features have shape {size:?}, the queue holds [{k}, {d}]")));
        }
        let g = size[0];
        if valid.size() != [g] {
            return Err(err(format!("valid flags have shape {:?}, the batch has {g} samples", valid.size())));
        }
        if g == 0 || k % g != 0 || self.pointer % g != 0 {
            return Err(err(check_queue_size(k as usize, g as usize).err().unwrap_or_else(|| {
                format!("pointer {} is not at a batch boundary for a global batch of {g}", self.pointer)
            })));
        }
        tch::no_grad(|| {
            self.features.narrow(0, self.pointer, g).copy_(&gathered.detach());
            self.valid.narrow(0, self.pointer, g).copy_(valid);
        });
        self.pointer = (self.pointer + g) % k;
        Ok(())
    }

    /// The queue as named tensors `<prefix>features`, `<prefix>valid` and `<prefix>pointer` (an
    /// int64 scalar), e.g. with prefix `queue.image.`, for checkpoints and digests.
    pub fn named(&self, prefix: &str) -> Vec<(String, Tensor)> {
        vec![
            (format!("{prefix}features"), self.features.shallow_clone()),
            (format!("{prefix}valid"), self.valid.shallow_clone()),
            (format!("{prefix}pointer"), Tensor::from(self.pointer)),
        ]
    }

    /// Restores a queue written by [`FeatureQueue::named`] with the same prefix, checking shapes
    /// and the pointer's range; `origin` names the source in errors.
    pub fn load<'a>(&mut self, source: impl Fn(&str) -> Option<&'a Tensor>, prefix: &str, origin: &str) -> Result<(), MomentumError> {
        let err = |reason: String| MomentumError::State { origin: origin.to_string(), reason };
        let get = |name: &str| {
            let key = format!("{prefix}{name}");
            source(&key).ok_or_else(|| err(format!("missing tensor {key:?}"))).map(|t| (key, t))
        };
        let (fkey, features) = get("features")?;
        let (vkey, valid) = get("valid")?;
        let (pkey, pointer) = get("pointer")?;
        if features.size() != self.features.size() {
            return Err(err(format!("tensor {fkey:?} has shape {:?}, the queue needs {:?}", features.size(), self.features.size())));
        }
        if valid.size() != self.valid.size() {
            return Err(err(format!("tensor {vkey:?} has shape {:?}, the queue needs {:?}", valid.size(), self.valid.size())));
        }
        if pointer.numel() != 1 {
            return Err(err(format!("tensor {pkey:?} has shape {:?}, a pointer is a scalar", pointer.size())));
        }
        let p = pointer.to_kind(Kind::Int64).reshape([1]).int64_value(&[0]);
        if !(0..self.size()).contains(&p) {
            return Err(err(format!("tensor {pkey:?} is {p}, outside the queue's 0..{}", self.size())));
        }
        tch::no_grad(|| {
            self.features.copy_(features);
            self.valid.copy_(&valid.to_kind(Kind::Bool));
        });
        self.pointer = p;
        Ok(())
    }

    /// [`state_digest`] of [`FeatureQueue::named`] with no prefix.
    pub fn digest(&self) -> String {
        state_digest(&self.named(""))
    }
}
