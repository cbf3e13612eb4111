// Multi-tensor optimizer kernels of libtorch that tch does not wrap: fused AdamW, foreach norm
// and scaling for gradient clipping, foreach zeroing, foreach lerp (momentum / EMA updates).
// Each call launches a handful of kernels for all parameters instead of several per parameter.
// Tensors arrive as tch's handles (pointers to torch::Tensor); errors come back as a malloc'd
// message (null on success).

#include <torch/torch.h>

#include "error_message.h"
#include <cstring>
#include <string>
#include <vector>

namespace {

std::vector<at::Tensor> list(at::Tensor **ts, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

}  // namespace

extern "C" {

// One AdamW update (torch.optim.AdamW, fused) of n parameters that share a weight decay.
// `step` holds the step number to use (already incremented), a float32 scalar on the params' device.
// The learning rate is `*lr_tensor` when given (a float32 scalar on the params' device, read by the
// kernel, so a captured CUDA graph takes each step's rate), else `lr`.
char *braid_fused_adamw(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                        at::Tensor **exp_avg_sqs, at::Tensor *step, int64_t n, double lr,
                        at::Tensor *lr_tensor, double beta1, double beta2, double weight_decay,
                        double eps) {
  try {
    if (n == 0) return nullptr;
    auto p = list(params, n), g = list(grads, n), m = list(exp_avgs, n), v = list(exp_avg_sqs, n);
    std::vector<at::Tensor> steps(n, *step);
    std::vector<at::Tensor> max_exp_avg_sqs;
    if (lr_tensor != nullptr) {
      at::_fused_adamw_(p, g, m, v, max_exp_avg_sqs, steps, *lr_tensor, beta1, beta2, weight_decay,
                        eps, /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/std::nullopt,
                        /*found_inf=*/std::nullopt);
    } else {
      at::_fused_adamw_(p, g, m, v, max_exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps,
                        /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/std::nullopt,
                        /*found_inf=*/std::nullopt);
    }
    return nullptr;
  } catch (const std::exception &e) {
    return braid::error_message(e);
  }
}

// Global L2 norm of n gradients (accumulated in float64), returned in *norm as a new float64
// scalar on the gradients' device; when max_norm > 0 every gradient is scaled by
// min(1, max_norm / (norm + 1e-6)) (torch.nn.utils.clip_grad_norm_). Nothing waits for the
// device, so the call can be captured in a CUDA graph.
char *braid_clip_grad_norm(at::Tensor **grads, int64_t n, double max_norm, at::Tensor **norm) {
  try {
    *norm = nullptr;
    if (n == 0) {
      *norm = new at::Tensor(at::zeros({}, at::TensorOptions().dtype(at::kDouble)));
      return nullptr;
    }
    auto g = list(grads, n);
    auto norms = at::_foreach_norm(g, 2);
    auto total = at::linalg_vector_norm(at::stack(norms).to(at::kDouble), 2);
    if (max_norm > 0.0) {
      auto coef = at::clamp_max(at::reciprocal(total + 1e-6) * max_norm, 1.0);
      at::_foreach_mul_(g, coef.to(g[0].scalar_type()));
    }
    *norm = new at::Tensor(total);
    return nullptr;
  } catch (const std::exception &e) {
    return braid::error_message(e);
  }
}

// Zeroes n tensors in place.
char *braid_foreach_zero(at::Tensor **ts, int64_t n) {
  try {
    if (n == 0) return nullptr;
    auto t = list(ts, n);
    at::_foreach_zero_(t);
    return nullptr;
  } catch (const std::exception &e) {
    return braid::error_message(e);
  }
}

// In place, for each i: self[i] += weight * (end[i] - self[i]) (torch._foreach_lerp_), e.g. the
// momentum update theta_m <- m theta_m + (1 - m) theta with weight 1 - m. Pairs must agree in
// dtype, device and shape.
char *braid_foreach_lerp(at::Tensor **self, at::Tensor **end, int64_t n, double weight) {
  try {
    if (n == 0) return nullptr;
    auto s = list(self, n), e = list(end, n);
    at::NoGradGuard no_grad;
    at::_foreach_lerp_(s, e, weight);
    return nullptr;
  } catch (const std::exception &e) {
    return braid::error_message(e);
  }
}

void braid_free_error(char *message) { free(message); }

}  // extern "C"
