// Multi-tensor optimizer kernels of libtorch that tch does not wrap: fused AdamW, foreach norm
// and scaling for gradient clipping, foreach zeroing, foreach lerp (momentum / EMA updates).
// Each call launches a handful of kernels for all parameters instead of several per parameter.
// Tensors arrive as tch's handles (pointers to torch::Tensor); errors come back as a malloc'd
// message (null on success).

#include <torch/torch.h>
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

char *error_message(const std::exception &e) {
  std::string msg = e.what();
  auto cut = msg.find("\nException raised from");
  if (cut != std::string::npos) msg.resize(cut);
  return strdup(msg.c_str());
}

}  // namespace

extern "C" {

// One AdamW update (torch.optim.AdamW, fused) of n parameters that share a weight decay.
// `step` holds the step number to use (already incremented), a float32 scalar on the params' device.
char *braid_fused_adamw(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                        at::Tensor **exp_avg_sqs, at::Tensor *step, int64_t n, double lr,
                        double beta1, double beta2, double weight_decay, double eps) {
  try {
    if (n == 0) return nullptr;
    auto p = list(params, n), g = list(grads, n), m = list(exp_avgs, n), v = list(exp_avg_sqs, n);
    std::vector<at::Tensor> steps(n, *step);
    std::vector<at::Tensor> max_exp_avg_sqs;
    at::_fused_adamw_(p, g, m, v, max_exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/std::nullopt,
                      /*found_inf=*/std::nullopt);
    return nullptr;
  } catch (const std::exception &e) {
    return error_message(e);
  }
}

// Global L2 norm of n gradients (accumulated in float64), written to *norm; when max_norm > 0
// and the norm exceeds it, every gradient is scaled by max_norm / (norm + 1e-6).
char *braid_clip_grad_norm(at::Tensor **grads, int64_t n, double max_norm, double *norm) {
  try {
    *norm = 0.0;
    if (n == 0) return nullptr;
    auto g = list(grads, n);
    auto norms = at::_foreach_norm(g, 2);
    auto total = at::linalg_vector_norm(at::stack(norms).to(at::kDouble), 2).item<double>();
    *norm = total;
    if (max_norm > 0.0 && total > max_norm) {
      at::_foreach_mul_(g, max_norm / (total + 1e-6));
    }
    return nullptr;
  } catch (const std::exception &e) {
    return error_message(e);
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
    return error_message(e);
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
    return error_message(e);
  }
}

void braid_free_error(char *message) { free(message); }

}  // extern "C"
