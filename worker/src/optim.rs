//! AdamW over moment tensors the trainer owns (so they can be checkpointed and broadcast),
//! the cosine learning-rate schedule with linear warmup, and global-norm gradient clipping.

use tch::{Kind, Tensor};

use crate::multi_tensor::{self, AdamWStep, KernelError, LearningRate};

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// One optimised parameter and its moments.
#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW with decoupled weight decay (Loshchilov & Hutter): `torch.optim.AdamW`'s update,
/// run by libtorch's fused multi-tensor kernel over the decayed and the undecayed group.
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    config: AdamWConfig,
    step: u64,
    /// The step number as a float32 scalar on the parameters' device (the fused kernel reads it).
    step_tensor: Tensor,
    /// The learning rate of the step being taken.
    lr: f64,
    /// On CUDA, the learning rate as a float32 scalar on the device, which the fused kernel
    /// reads when it runs (a captured step then takes each step's rate); on the CPU the kernel
    /// takes `lr` as a value.
    lr_tensor: Option<Tensor>,
}

/// Whether a parameter gets weight decay: not norms, biases, embeddings or the logit scale.
pub fn takes_weight_decay(name: &str, param: &Tensor) -> bool {
    param.dim() >= 2 && !name.contains("embedding") && !name.contains("logit_scale")
}

impl AdamW {
    /// An optimizer over named parameters (sorted by name for a stable order on every rank).
    pub fn new(mut params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let device = params.first().map(|(_, p)| p.device()).unwrap_or(tch::Device::Cpu);
        let slots = params
            .into_iter()
            .map(|(name, param)| Slot {
                decay: takes_weight_decay(&name, &param),
                exp_avg: param.zeros_like().detach(),
                exp_avg_sq: param.zeros_like().detach(),
                name,
                param,
            })
            .collect::<Vec<Slot>>();
        materialize_grads(slots.iter().map(|s| &s.param));
        let lr_tensor = device.is_cuda().then(|| Tensor::zeros([], (Kind::Float, device)));
        Self { slots, config, step: 0, step_tensor: Tensor::zeros([], (Kind::Float, device)), lr: 0.0, lr_tensor }
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The optimised parameters, in the optimizer's order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.param))
    }

    /// Gradients of all parameters, in the optimizer's order.
    pub fn grads(&self) -> Vec<Tensor> {
        self.slots.iter().map(|s| s.param.grad()).collect()
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) -> Result<(), KernelError> {
        multi_tensor::zero(&self.grads())
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) -> Result<(), KernelError> {
        self.begin_step(lr);
        self.apply()
    }

    /// Counts a step at learning rate `lr` and sets the step number and rate the update kernels
    /// read; [`AdamW::apply`] then updates the parameters (the two are apart so that a captured
    /// step can hold the update while the host sets each step's values).
    pub fn begin_step(&mut self, lr: f64) {
        self.step += 1;
        self.lr = lr;
        let _ = self.step_tensor.fill_(self.step as f64);
        if let Some(t) = &mut self.lr_tensor {
            let _ = t.fill_(lr);
        }
    }

    /// The AdamW update of the step [`AdamW::begin_step`] began, with each parameter's gradient.
    pub fn apply(&self) -> Result<(), KernelError> {
        let c = self.config;
        let lr = match &self.lr_tensor {
            Some(t) => LearningRate::OnDevice(t),
            None => LearningRate::Value(self.lr),
        };
        for decay in [true, false] {
            let group: Vec<&Slot> = self.slots.iter().filter(|s| s.decay == decay).collect();
            let pick = |f: fn(&Slot) -> Tensor| group.iter().map(|s| f(s)).collect::<Vec<Tensor>>();
            let hyper = AdamWStep {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                weight_decay: if decay { c.weight_decay } else { 0.0 },
                eps: c.eps,
            };
            tch::no_grad(|| {
                multi_tensor::fused_adamw(
                    &pick(|s| s.param.shallow_clone()),
                    &pick(|s| s.param.grad()),
                    &pick(|s| s.exp_avg.shallow_clone()),
                    &pick(|s| s.exp_avg_sq.shallow_clone()),
                    &self.step_tensor,
                    hyper,
                )
            })?;
        }
        Ok(())
    }

    /// The optimizer state as named tensors: `exp_avg.<param>`, `exp_avg_sq.<param>`, `step`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.slots.len() + 1);
        for s in &self.slots {
            out.push((format!("exp_avg.{}", s.name), s.exp_avg.shallow_clone()));
            out.push((format!("exp_avg_sq.{}", s.name), s.exp_avg_sq.shallow_clone()));
        }
        out.push(("step".into(), Tensor::from(self.step as i64)));
        out
    }

    /// Restores state written by [`AdamW::state`]; every moment must be present with its shape.
    pub fn load_state(&mut self, lookup: &dyn Fn(&str) -> Option<Tensor>) -> Result<(), String> {
        let step = lookup("step").ok_or("missing optimizer tensor \"step\"")?;
        for s in &mut self.slots {
            for (prefix, dst) in [("exp_avg", &mut s.exp_avg), ("exp_avg_sq", &mut s.exp_avg_sq)] {
                let key = format!("{prefix}.{}", s.name);
                let src = lookup(&key).ok_or_else(|| format!("missing optimizer tensor {key:?}"))?;
                if src.size() != dst.size() {
                    return Err(format!("optimizer tensor {key:?} has shape {:?}, expected {:?}", src.size(), dst.size()));
                }
                tch::no_grad(|| dst.copy_(&src));
            }
        }
        self.step = step.int64_value(&[]) as u64;
        Ok(())
    }
}

/// Gives every parameter a (zero) gradient tensor, so gradients can be bucketed and reduced
/// even before the first backward pass reaches them.
fn materialize_grads<'a>(params: impl Iterator<Item = &'a Tensor>) {
    let terms: Vec<Tensor> = params.filter(|p| p.requires_grad()).map(|p| p.sum(p.kind()) * 0.0).collect();
    if !terms.is_empty() {
        Tensor::stack(&terms, 0).sum(Kind::Double).backward();
    }
}

/// Learning rate at `step` (0-based): linear warmup to `peak` over `warmup` steps, then cosine
/// decay to `min_lr` at `total` steps.
pub fn cosine_lr(step: u64, total: u64, warmup: u64, peak: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    min_lr + 0.5 * (peak - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping as a float64 scalar on the gradients' device (read it once the step is done).
/// `max_norm <= 0` only measures.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<Tensor, KernelError> {
    tch::no_grad(|| multi_tensor::clip_grad_norm(grads, max_norm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((cosine_lr(0, 100, 10, 1.0, 0.0) - 0.1).abs() < 1e-12);
        assert!((cosine_lr(9, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(10, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(55, 100, 10, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert!(cosine_lr(100, 100, 10, 1.0, 0.1) - 0.1 < 1e-12);
    }

    #[test]
    fn decay_skips_norms_biases_embeddings_and_scale() {
        let m = Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu));
        let v = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
        assert!(takes_weight_decay("visual.proj", &m));
        assert!(!takes_weight_decay("ln_final.weight", &v));
        assert!(!takes_weight_decay("token_embedding.weight", &m));
        assert!(!takes_weight_decay("positional_embedding", &m));
        assert!(!takes_weight_decay("logit_scale", &Tensor::from(1.0f32)));
    }

    /// The global norm over every gradient, and the scale `min(1, max_norm / (norm + 1e-6))` of
    /// `torch.nn.utils.clip_grad_norm_`, applied on the device; below the bound the gradients are
    /// left exactly as they were.
    #[test]
    fn clipping_matches_the_formula() {
        let grads = || [Tensor::from_slice(&[3.0f64, 4.0]), Tensor::from_slice(&[12.0f64])];
        let clipped = grads();
        let norm = f64::try_from(clip_grad_norm(&clipped, 6.5).unwrap()).unwrap();
        assert_eq!(norm, 13.0);
        let coef = 6.5 / (13.0 + 1e-6);
        let got: Vec<f64> = Vec::try_from(Tensor::cat(&clipped, 0)).unwrap();
        for (g, want) in got.iter().zip([3.0 * coef, 4.0 * coef, 12.0 * coef]) {
            assert!((g - want).abs() < 1e-15, "{got:?}");
        }
        let kept = grads();
        let norm = f64::try_from(clip_grad_norm(&kept, 100.0).unwrap()).unwrap();
        assert_eq!(norm, 13.0);
        assert_eq!(Vec::<f64>::try_from(Tensor::cat(&kept, 0)).unwrap(), [3.0, 4.0, 12.0]);
        let measured = grads();
        assert_eq!(f64::try_from(clip_grad_norm(&measured, 0.0).unwrap()).unwrap(), 13.0);
        assert_eq!(Vec::<f64>::try_from(Tensor::cat(&measured, 0)).unwrap(), [3.0, 4.0, 12.0]);
    }

    /// Two steps against the AdamW formula written out by hand.
    #[test]
    fn update_matches_the_formula() {
        let opts = (Kind::Double, tch::Device::Cpu);
        let p = Tensor::from_slice(&[1.0f64, -2.0, 0.5, 3.0]).view([2, 2]).set_requires_grad(true);
        let c = AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], c);
        let grads = [[0.1f64, -0.2, 0.3, 0.4], [-0.5, 0.6, 0.05, -0.1]];
        let (mut x, mut m, mut v) = ([1.0f64, -2.0, 0.5, 3.0], [0.0f64; 4], [0.0f64; 4]);
        for (t, g) in grads.iter().enumerate() {
            let lr = 0.01;
            opt.zero_grad().unwrap();
            (&p * Tensor::from_slice(g).view([2, 2]).to_kind(opts.0)).sum(Kind::Double).backward();
            opt.step(lr).unwrap();
            let t = (t + 1) as i32;
            for i in 0..4 {
                x[i] *= 1.0 - lr * c.weight_decay;
                m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
                v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
                let mhat = m[i] / (1.0 - c.beta1.powi(t));
                let vhat = v[i] / (1.0 - c.beta2.powi(t));
                x[i] -= lr * mhat / (vhat.sqrt() + c.eps);
            }
        }
        let got: Vec<f64> = Vec::try_from(p.flatten(0, -1)).unwrap();
        for i in 0..4 {
            assert!((got[i] - x[i]).abs() < 1e-12, "{got:?} vs {x:?}");
        }
    }
}
