//! Momentum encoders (ALBEF, BLIP): an exponential moving average of a named parameter list.
//!
//! `theta_m <- m * theta_m + (1 - m) * theta` after every optimizer step (m = 0.995 in both
//! papers), one fused `torch._foreach_lerp_` over all tensors: `theta_m.lerp_(theta, 1 - m)`.
//! The copy is model-agnostic: it holds tensors named as the model names its parameters
//! (`visual.…`, `text.…`), and a model family runs its momentum towers on those tensors, either
//! by building them over the copy's storage ([`MomentumCopy::over`]) or by reading
//! [`MomentumCopy::tensors`].
//!
//! Every rank applies the same update to the same weights, so replicas stay equal without
//! traffic; [`state_digest`] hashes weights, momentum copies and queues for the coordinator's
//! consistency checks (DESIGN.md, "EMA / momentum state").
//!
//! Order within one ALBEF/BLIP step, as in the reference code: update the momentum copy
//! (ALBEF calls `_momentum_update()` at the start of each forward, i.e. after the previous
//! step's optimizer update; on the first step it is a no-op since `theta_m == theta`), compute
//! the momentum features of the batch without autograd and all-gather them, compute the loss
//! against the queues as they were before this step, then enqueue the gathered momentum
//! features.

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::multi_tensor::{self, KernelError};

/// Errors of momentum copies and feature queues.
#[derive(Debug, thiserror::Error)]
pub enum MomentumError {
    /// The live parameters or a loaded state do not match this copy or queue.
    #[error("momentum state from {origin}: {reason}")]
    State {
        /// Where the tensors came from (a checkpoint path, "live parameters").
        origin: String,
        /// What did not match.
        reason: String,
    },
    /// The fused update failed inside libtorch.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// The kind momentum weights are kept in: fp64 for fp64 runs (exact tests), fp32 master
/// precision otherwise (bf16 and fp16 live weights are averaged in fp32).
pub fn momentum_kind(live: Kind) -> Kind {
    if live == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Detached copies of a named parameter list, updated as an exponential moving average.
#[derive(Debug)]
pub struct MomentumCopy {
    names: Vec<String>,
    tensors: Vec<Tensor>,
}

impl MomentumCopy {
    /// Fresh copies of `live` (names as the model's), without autograd, in
    /// [`momentum_kind`] on the live tensors' devices.
    pub fn new(live: &[(String, Tensor)]) -> Self {
        let tensors = tch::no_grad(|| {
            live.iter()
                .map(|(_, t)| t.detach().to_kind(momentum_kind(t.kind())).copy())
                .collect()
        });
        Self { names: live.iter().map(|(n, _)| n.clone()).collect(), tensors }
    }

    /// A copy kept in existing storage, e.g. the variables of a momentum tower built as a second
    /// module: `targets` are overwritten with `live` (same names, in the same order, same shapes)
    /// and later updates write into them, so the tower always runs on the momentum weights.
    pub fn over(targets: Vec<(String, Tensor)>, live: &[(String, Tensor)]) -> Result<Self, MomentumError> {
        let copy = Self {
            names: targets.iter().map(|(n, _)| n.clone()).collect(),
            tensors: targets.into_iter().map(|(_, t)| t.detach()).collect(),
        };
        copy.check_live(live)?;
        for (dst, (_, src)) in copy.tensors.iter().zip(live) {
            tch::no_grad(|| dst.shallow_clone().copy_(src));
        }
        Ok(copy)
    }

    /// `theta_m <- m * theta_m + (1 - m) * theta` for every tensor, without autograd, in one fused
    /// multi-tensor kernel. `live` must list the same names in the same order as at creation.
    pub fn update(&mut self, live: &[(String, Tensor)], m: f64) -> Result<(), MomentumError> {
        self.check_live(live)?;
        let ends: Vec<Tensor> = live
            .iter()
            .zip(&self.tensors)
            .map(|((_, t), mine)| {
                let t = t.detach();
                if t.kind() == mine.kind() {
                    t
                } else {
                    t.to_kind(mine.kind())
                }
            })
            .collect();
        multi_tensor::lerp_(&self.tensors, &ends, 1.0 - m)?;
        Ok(())
    }

    /// The momentum tensors in creation order (shallow: they share storage with the copy).
    pub fn tensors(&self) -> Vec<Tensor> {
        self.tensors.iter().map(Tensor::shallow_clone).collect()
    }

    /// The momentum tensors named `<prefix><name>` (e.g. `momentum.visual.conv1.weight`), for
    /// checkpoints and digests; shallow, so they always show the current values.
    pub fn named(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.names.iter().zip(&self.tensors).map(|(n, t)| (format!("{prefix}{n}"), t.shallow_clone())).collect()
    }

    /// Restores every tensor from `source`, looked up as `<prefix><name>` (as written by
    /// [`MomentumCopy::named`]), checking presence and shape; `origin` names the source in errors.
    pub fn load<'a>(&mut self, source: impl Fn(&str) -> Option<&'a Tensor>, prefix: &str, origin: &str) -> Result<(), MomentumError> {
        let err = |reason: String| MomentumError::State { origin: origin.to_string(), reason };
        for (name, dst) in self.names.iter().zip(&self.tensors) {
            let key = format!("{prefix}{name}");
            let src = source(&key).ok_or_else(|| err(format!("missing tensor {key:?}")))?;
            if src.size() != dst.size() {
                return Err(err(format!("tensor {key:?} has shape {:?}, the momentum copy needs {:?}", src.size(), dst.size())));
            }
            tch::no_grad(|| dst.shallow_clone().copy_(src));
        }
        Ok(())
    }

    /// [`state_digest`] of [`MomentumCopy::named`] with no prefix.
    pub fn digest(&self) -> String {
        state_digest(&self.named(""))
    }

    /// Checks that `live` lists this copy's names, in order, with its shapes.
    fn check_live(&self, live: &[(String, Tensor)]) -> Result<(), MomentumError> {
        let err = |reason: String| MomentumError::State { origin: "live parameters".into(), reason };
        if live.len() != self.names.len() {
            return Err(err(format!("{} tensors, the momentum copy has {}", live.len(), self.names.len())));
        }
        for (i, ((name, t), (mine, m))) in live.iter().zip(self.names.iter().zip(&self.tensors)).enumerate() {
            if name != mine {
                return Err(err(format!("tensor {i} is {name:?}, the momentum copy has {mine:?} there")));
            }
            if t.size() != m.size() {
                return Err(err(format!("tensor {name:?} has shape {:?}, the momentum copy has {:?}", t.size(), m.size())));
            }
        }
        Ok(())
    }
}

/// Hex sha256 of a named tensor list, for replica consistency checks of weights, momentum copies
/// and queues: tensors in name order, each contributing its name, kind, shape and the bytes of its
/// values (contiguous, copied to the CPU). Equal tensors give equal digests on any device;
/// changing one element, a shape or a name changes it.
pub fn state_digest(named: &[(String, Tensor)]) -> String {
    let mut sorted: Vec<&(String, Tensor)> = named.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = Sha256::new();
    for (name, tensor) in sorted {
        let t = tch::no_grad(|| tensor.detach().to_device(Device::Cpu).contiguous());
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(format!("{:?}", t.kind()).as_bytes());
        hasher.update((t.dim() as u64).to_le_bytes());
        for d in t.size() {
            hasher.update(d.to_le_bytes());
        }
        let len = t.numel() * t.kind().elt_size_in_bytes();
        if len > 0 {
            // SAFETY: `t` is a contiguous CPU tensor alive for this borrow; its storage holds
            // `len` bytes from `data_ptr`.
            let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) };
            hasher.update(bytes);
        }
    }
    hex::encode(hasher.finalize())
}
