//! Safe wrappers over libtorch's multi-tensor kernels (`csrc/multi_tensor.cpp`): fused AdamW,
//! gradient-norm clipping, zeroing and lerp (momentum updates) over whole parameter lists, a few
//! kernel launches per call instead of several per parameter.

use std::ffi::{c_char, c_void, CStr};

use tch::Tensor;

/// tch's tensor handle: a pointer to a `torch::Tensor`.
type Handle = *mut c_void;

mod ffi {
    use super::*;

    extern "C" {
        pub fn braid_fused_adamw(
            params: *const Handle,
            grads: *const Handle,
            exp_avgs: *const Handle,
            exp_avg_sqs: *const Handle,
            step: Handle,
            n: i64,
            lr: f64,
            lr_tensor: Handle,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
        ) -> *mut c_char;
        pub fn braid_clip_grad_norm(grads: *const Handle, n: i64, max_norm: f64, norm: *mut Handle) -> *mut c_char;
        pub fn braid_foreach_zero(tensors: *const Handle, n: i64) -> *mut c_char;
        pub fn braid_foreach_lerp(tensors: *const Handle, ends: *const Handle, n: i64, weight: f64) -> *mut c_char;
        pub fn braid_free_error(message: *mut c_char);
    }
}

/// An error reported by libtorch inside a multi-tensor kernel.
#[derive(Debug, thiserror::Error)]
#[error("libtorch {op}: {message}")]
pub struct KernelError {
    /// The operation.
    pub op: &'static str,
    /// libtorch's message.
    pub message: String,
}

/// `Ok` for a null message from the shim; otherwise the message as an error of `op` (freed here).
pub(crate) fn check(op: &'static str, message: *mut c_char) -> Result<(), KernelError> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string allocated by the shim with strdup.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    unsafe { ffi::braid_free_error(message) };
    Err(KernelError { op, message: text })
}

fn handles(tensors: &[Tensor]) -> Vec<Handle> {
    tensors.iter().map(|t| t.as_ptr() as Handle).collect()
}

/// Where a fused AdamW update reads its learning rate.
#[derive(Debug, Clone, Copy)]
pub enum LearningRate<'a> {
    /// A value fixed at the call.
    Value(f64),
    /// A float32 scalar on the parameters' device, read by the kernel when it runs (so a
    /// captured CUDA graph takes each step's rate).
    OnDevice(&'a Tensor),
}

/// Hyperparameters of one fused AdamW update.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep<'a> {
    /// Learning rate.
    pub lr: LearningRate<'a>,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Decoupled weight decay of this group.
    pub weight_decay: f64,
    /// Denominator epsilon.
    pub eps: f64,
}

/// One AdamW update of a parameter group in place (`torch._fused_adamw_`). All lists have the
/// same length; `step` is a float32 scalar on the parameters' device holding the step number.
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    step: &Tensor,
    h: AdamWStep<'_>,
) -> Result<(), KernelError> {
    let n = params.len();
    assert!(grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n, "fused AdamW lists differ in length");
    let (p, g, m, v) = (handles(params), handles(grads), handles(exp_avgs), handles(exp_avg_sqs));
    let (lr, lr_tensor) = match h.lr {
        LearningRate::Value(lr) => (lr, std::ptr::null_mut()),
        LearningRate::OnDevice(t) => (f64::NAN, t.as_ptr() as Handle),
    };
    // SAFETY: every handle points at a live tensor owned by the slices above (or by `h`) for the
    // whole call; a null `lr_tensor` means "use `lr`".
    let message = unsafe {
        ffi::braid_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            step.as_ptr() as Handle,
            n as i64,
            lr,
            lr_tensor,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
        )
    };
    check("fused AdamW", message)
}

/// The global L2 norm of `grads` (accumulated in float64) as a scalar on their device; when
/// `max_norm > 0`, scales every gradient in place by `min(1, max_norm / (norm + 1e-6))` as
/// `torch.nn.utils.clip_grad_norm_` does. Nothing waits for the device: read the norm when the
/// step is done.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<Tensor, KernelError> {
    let g = handles(grads);
    let mut norm: Handle = std::ptr::null_mut();
    // SAFETY: handles point at live tensors; `norm` receives a tensor the shim allocated with
    // `new`, which the returned `Tensor` owns and frees.
    let message = unsafe { ffi::braid_clip_grad_norm(g.as_ptr(), g.len() as i64, max_norm, &mut norm) };
    check("clip grad norm", message)?;
    assert!(!norm.is_null(), "the clip shim returned no norm");
    // SAFETY: a non-null pointer to a heap `torch::Tensor`, as tch's own handles are.
    Ok(unsafe { Tensor::from_ptr(norm as *mut _) })
}

/// Zeroes every tensor in place.
pub fn zero(tensors: &[Tensor]) -> Result<(), KernelError> {
    let t = handles(tensors);
    // SAFETY: handles point at live tensors for the whole call.
    let message = unsafe { ffi::braid_foreach_zero(t.as_ptr(), t.len() as i64) };
    check("zero", message)
}

/// In place and without autograd, `tensors[i] += weight * (ends[i] - tensors[i])` for every `i`
/// (`torch._foreach_lerp_`): with `weight = 1 - m`, the momentum / EMA update
/// `theta_m <- m * theta_m + (1 - m) * theta`. Each pair agrees in kind, device and shape.
pub fn lerp_(tensors: &[Tensor], ends: &[Tensor], weight: f64) -> Result<(), KernelError> {
    assert_eq!(tensors.len(), ends.len(), "foreach lerp lists differ in length");
    let (t, e) = (handles(tensors), handles(ends));
    // SAFETY: handles point at live tensors owned by the slices above for the whole call.
    let message = unsafe { ffi::braid_foreach_lerp(t.as_ptr(), e.as_ptr(), t.len() as i64, weight) };
    check("foreach lerp", message)
}
