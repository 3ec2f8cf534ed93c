// CPU implementations of the fastdiv ops (schemas in csrc/ops.cpp). x is [B, n, D] with unit stride
// on D and any strides on B and n; outputs are contiguous. "acc" is fp32 for fp32/bf16/fp16 inputs
// and fp64 for fp64 inputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastdiv::cpu {

// Raw Gram S = X X^T [B, n, n] (acc) and, when with_l1, row l1 norms [B, n] (acc; else [B, 0]).
std::tuple<at::Tensor, at::Tensor> gram(const at::Tensor& x, bool with_l1);

// dX = A X + beta ⊙ sign(X) for A [B, n, n] and beta [B, n] (acc); dX has x's dtype.
at::Tensor gram_pullback(const at::Tensor& x, const at::Tensor& a, const std::optional<at::Tensor>& beta);

// Per-input loss [B] of a Gram head plus its pullback coefficients A [B, n, n] and beta [B, n]
// (beta is [B, 0] for heads without an l1 term).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_loss(const at::Tensor& x, const std::string& head,
                                                         double eps, double jitter, double p,
                                                         double rho_max);

// [B, 6] acc: rho, rho_q, kappa, mean cosine, coherence, dpp.
at::Tensor concentration_stats(const at::Tensor& x, double q, double eps, double jitter, double rho_max);

// u = x / max(||x||, eps) per row; same dtype as x.
at::Tensor normalize(const at::Tensor& x, double eps);
at::Tensor normalize_pullback(const at::Tensor& x, const at::Tensor& grad, double eps);

// Row norms r [B, n], column means and population variances of u over the n rows [B, D] (acc).
std::tuple<at::Tensor, at::Tensor, at::Tensor> column_stats(const at::Tensor& x, double eps);
at::Tensor column_stats_pullback(const at::Tensor& x, const at::Tensor& r, const at::Tensor& mean,
                                 const std::optional<at::Tensor>& grad_r,
                                 const std::optional<at::Tensor>& grad_mean,
                                 const std::optional<at::Tensor>& grad_var, double eps);

// Argument checks shared by every op: 3-D, floating dtype, CPU, unit stride on the last dim.
void check_rows(const at::Tensor& x, const char* op);

}  // namespace fastdiv::cpu
