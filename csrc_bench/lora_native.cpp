// Native unfused LoRA linear: the strongest baseline without fusion. Every GEMM is one cuBLAS call through ATen,
// accumulating into its output with beta = 1 where the math adds, so there is no separate scale or add kernel and
// no Python between the calls (one C++ call for the forward, one for the backward).
//
// Notation as docs/DESIGN.md section 1: x (M, K), W (N, K), A (r, K), B (N, r), s the scale, p the dropout, m the mask.
//
//   forward   y  = bias + x @ W.T                 addmm (or mm without bias)
//             S  = (x * m) @ A.T * 1/(1-p)        one mul kernel for x * m; 1/(1-p) is the GEMM's alpha
//             y += s * S @ B.T                    addmm_, beta = 1, alpha = s
//   backward  dS = s * dy @ B                     addmm_out, beta = 0, alpha = s
//             dB = s * dy.T @ S                   addmm_out, beta = 0, alpha = s
//             dA = dS.T @ (x * m) * 1/(1-p)       addmm_out, beta = 0, alpha = 1/(1-p)
//             dx = dy @ W                         mm_out
//             dx += dS @ A                        p = 0: addmm_, beta = 1
//             dx += (dS @ A) * m * 1/(1-p)        p > 0: mm, then one addcmul_ kernel
//             dbias = dy.sum(0)                   only when asked
//   floor     y = bias + x @ W.T;  dx = dy @ W    the frozen GEMMs alone
//
// Dropout: the mask m is an input (0/1 values in x's dtype), drawn once by the caller outside any timed region, so
// random-number generation is not part of the native timings; the forward returns x * m, which the backward reads
// (as PEFT keeps the dropped input for dA). Without dropout pass mask = None and p = 0.
//
// Only ATen operators are called, so this file needs a C++ compiler but not nvcc, and runs on any device ATen
// supports (the benchmarks use it on CUDA; the CPU test checks its math).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

void check_mask(const at::Tensor& x, const std::optional<at::Tensor>& mask, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(mask.has_value() == (dropout_p > 0.0), "pass a mask exactly when dropout_p > 0 (dropout_p = ",
              dropout_p, ", mask ", mask.has_value() ? "given" : "missing", ")");
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == x.sizes() && mask->scalar_type() == x.scalar_type(),
                "mask must match x in shape and dtype: x ", x.sizes(), " ", x.scalar_type(), ", mask ",
                mask->sizes(), " ", mask->scalar_type());
  }
}

// Returns (y, S, x * m); the last is an empty tensor when p = 0 (the backward then reads x itself).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                            double scale, const std::optional<at::Tensor>& mask,
                                                            double dropout_p) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (M, K), got ", x.sizes());
  check_mask(x, mask, dropout_p);
  // y = bias + x @ W.T
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  // S = x~ @ A.T, x~ = x * m / (1-p)
  at::Tensor x_dropped = mask.has_value() ? at::mul(x, *mask) : at::empty({0}, x.options());
  const at::Tensor& x_tilde = mask.has_value() ? x_dropped : x;
  at::Tensor shrunk = at::empty({x.size(0), lora_a.size(0)}, x.options());
  at::addmm_out(shrunk, shrunk, x_tilde, lora_a.t(), /*beta=*/0, /*alpha=*/1.0 / (1.0 - dropout_p));
  // y += s * S @ B.T
  y.addmm_(shrunk, lora_b.t(), /*beta=*/1, /*alpha=*/scale);
  return {y, shrunk, x_dropped};
}

// Returns (dx, dA, dB, dbias); dbias is an empty tensor unless need_bias_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& x_dropped, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& shrunk, double scale,
    const std::optional<at::Tensor>& mask, double dropout_p, bool need_bias_grad) {
  check_mask(x, mask, dropout_p);
  const double inv_keep = 1.0 / (1.0 - dropout_p);
  const at::Tensor& x_tilde = mask.has_value() ? x_dropped : x;
  const auto options = grad_y.options();
  // dS = s * dy @ B
  at::Tensor grad_shrunk = at::empty({grad_y.size(0), lora_b.size(1)}, options);
  at::addmm_out(grad_shrunk, grad_shrunk, grad_y, lora_b, /*beta=*/0, /*alpha=*/scale);
  // dB = s * dy.T @ S
  at::Tensor grad_b = at::empty_like(lora_b);
  at::addmm_out(grad_b, grad_b, grad_y.t(), shrunk, /*beta=*/0, /*alpha=*/scale);
  // dA = dS.T @ x~
  at::Tensor grad_a = at::empty_like(lora_a);
  at::addmm_out(grad_a, grad_a, grad_shrunk.t(), x_tilde, /*beta=*/0, /*alpha=*/inv_keep);
  // dx = dy @ W + (dS @ A) * m / (1-p)
  at::Tensor grad_x = at::empty({grad_y.size(0), weight.size(1)}, options);
  at::mm_out(grad_x, grad_y, weight);
  if (mask.has_value()) {
    grad_x.addcmul_(at::mm(grad_shrunk, lora_a), *mask, /*value=*/inv_keep);
  } else {
    grad_x.addmm_(grad_shrunk, lora_a, /*beta=*/1, /*alpha=*/1);
  }
  at::Tensor grad_bias = need_bias_grad ? grad_y.sum(0) : at::empty({0}, options);
  return {grad_x, grad_a, grad_b, grad_bias};
}

// y = bias + x @ W.T
at::Tensor floor_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
}

// dx = dy @ W
at::Tensor floor_backward(const at::Tensor& grad_y, const at::Tensor& weight) { return at::mm(grad_y, weight); }

}  // namespace

TORCH_LIBRARY(relora_bench, m) {
  m.def("lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
        "Tensor? mask, float dropout_p) -> (Tensor, Tensor, Tensor)",
        &lora_forward);
  m.def("lora_backward(Tensor grad_y, Tensor x, Tensor x_dropped, Tensor weight, Tensor lora_a, Tensor lora_b, "
        "Tensor shrunk, float scale, Tensor? mask, float dropout_p, bool need_bias_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        &lora_backward);
  m.def("floor_forward(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &floor_forward);
  m.def("floor_backward(Tensor grad_y, Tensor weight) -> Tensor", &floor_backward);
}
