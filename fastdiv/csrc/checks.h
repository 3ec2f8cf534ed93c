// Argument checks of the fastdiv ops, shared by the CPU registrations (fastdiv/csrc/cpu/) and the CUDA ones
// (fastdiv/csrc/cuda/*_ops.cpp), so both reject the same bad input with the same message; for the ops with many
// arguments also the preparation of the inputs and the allocation of the outputs (prepare_*), and the parsing of
// gram_loss's head name (parse_head). Every tensor argument must be on the device of the op's main input;
// coefficient and statistic tensors have the accumulation dtype (fp64 for fp64 inputs, fp32 otherwise).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "head_math.h"

namespace fastdiv {

// Half-precision inputs accumulate in fp32; fp64 inputs accumulate in fp64.
inline at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Options of x's accumulation-dtype outputs (losses, coefficients, statistics): x's device, acc dtype.
inline at::TensorOptions acc_options(const at::Tensor& x) { return x.options().dtype(acc_scalar_type(x.scalar_type())); }

// x is [B, n, D], float32/float64/float16/bfloat16, on a `device` tensor, unit stride on D.
inline void check_rows(const at::Tensor& x, const char* op, c10::DeviceType device) {
  TORCH_CHECK_VALUE(x.dim() == 3, "fastdiv::", op, ": x must be [B, n, D], got ", x.dim(), " dims");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                       x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   "fastdiv::", op, ": x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().type() == device, "fastdiv::", op, ": expected a ", c10::DeviceTypeName(device),
                    " tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.size(2) <= 1 || x.stride(2) == 1, "fastdiv::", op,
                    ": x needs unit stride on the feature dim, got stride ", x.stride(2));
}

// t has the given shape, the accumulation dtype of x and x's device.
inline void check_acc(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& x, const char* op,
                      const char* name) {
  const auto acc = acc_scalar_type(x.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape && t.scalar_type() == acc, "fastdiv::", op, ": ", name, " must be ",
                    shape, " of ", acc, ", got ", t.sizes(), " of ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "fastdiv::", op, ": ", name, " must be on ", x.device(),
                    " like x, got ", t.device());
}

// A present, non-empty optional tensor checked as check_acc; nullptr when absent, undefined or empty
// (absent gradients and coefficients count as zero). keep holds the contiguous copy.
inline const at::Tensor* optional_acc(const std::optional<at::Tensor>& t, at::IntArrayRef shape, const at::Tensor& x,
                                      const char* op, const char* name, at::Tensor& keep) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) return nullptr;
  check_acc(*t, shape, x, op, name);
  keep = t->contiguous();
  return &keep;
}


// gram_pullback's optional per-input scale [B] (acc, x's device), the upstream gradient of a per-input
// loss. Any stride is accepted and no copy is made: autograd often hands an expanded (stride 0) gradient,
// so the kernels read scale[b * stride(0)]. nullptr when absent or undefined (no scaling). Unlike beta,
// an empty scale is not "absent": it must still be [B] (so [0] only for B = 0).
inline const at::Tensor* check_pullback_scale(const std::optional<at::Tensor>& scale, const at::Tensor& x,
                                              const char* op) {
  if (!scale.has_value() || !scale->defined()) return nullptr;
  check_acc(*scale, {x.size(0)}, x, op, "scale");
  return &*scale;
}

inline void check_samples(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.size(1) >= 2, "fastdiv::", op, ": needs n >= 2 samples, got n = ", x.size(1));
}

// gram_loss's head name, as the op schema spells it, to the head of head_math.h.
inline heads::Head parse_head(const std::string& name) {
  using heads::Head;
  if (name == "dpp") return Head::kDpp;
  if (name == "mean") return Head::kMeanCos;
  if (name == "kappa") return Head::kKappa;
  if (name == "max") return Head::kMaxCos;
  if (name == "smoothmax") return Head::kSmoothmax;
  if (name == "gal") return Head::kGal;
  if (name == "mean_penalty") return Head::kMeanPenalty;
  if (name == "sparsity") return Head::kSparsity;
  TORCH_CHECK_VALUE(false, "fastdiv: head must be one of dpp, mean, kappa, max, smoothmax, gal, ",
                    "mean_penalty, sparsity; got '", name, "'");
}

inline void check_q(double q, const char* op) {
  TORCH_CHECK_VALUE(q >= 1, "fastdiv::", op, ": q must be >= 1, got ", q);
}

// normalize_pullback: grad matches x in shape and dtype (and device).
inline void check_same_as_x(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), "fastdiv::", op, ": ", name,
                    " must match x (", x.sizes(), " of ", x.scalar_type(), "), got ", t.sizes(), " of ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "fastdiv::", op, ": ", name, " must be on ", x.device(),
                    " like x, got ", t.device());
}

// ---- eot_step: grads [B, n, D] (checked by check_rows), x and x0 [B, D] ----

inline void check_eot_features(const at::Tensor& t, const at::Tensor& grads, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == grads.size(0) && t.size(1) == grads.size(2), "fastdiv::eot_step: ",
                    name, " must be [B, D] = [", grads.size(0), ", ", grads.size(2), "], got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == grads.scalar_type(), "fastdiv::eot_step: ", name,
                   " must have grads' dtype ", grads.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == grads.device(), "fastdiv::eot_step: ", name, " must be on ", grads.device(),
                    " like grads, got ", t.device());
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, "fastdiv::eot_step: ", name,
                    " needs unit stride on the feature dim, got stride ", t.stride(1));
}

// alpha / eps: [B] of the accumulation dtype on grads' device; returned contiguous.
inline at::Tensor eot_per_example(const at::Tensor& t, const at::Tensor& grads, const char* name) {
  const int64_t B = grads.size(0);
  const auto acc = acc_scalar_type(grads.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B && t.scalar_type() == acc && t.device() == grads.device(),
                    "fastdiv::eot_step: ", name, " must be a [", B, "] tensor of ", acc, " on ", grads.device(),
                    ", got ", t.sizes(), " of ", t.scalar_type(), " on ", t.device());
  return t.contiguous();
}

inline void check_eot_norm(const std::string& norm) {
  TORCH_CHECK_VALUE(norm == "linf" || norm == "l2", "fastdiv::eot_step: norm must be 'linf' or 'l2', got '", norm,
                    "'");
}

// momentum [B, D] of the accumulation dtype on grads' device; returned with unit stride on D.
inline at::Tensor eot_momentum(const at::Tensor& m, const at::Tensor& grads) {
  const int64_t B = grads.size(0), d = grads.size(2);
  const auto acc = acc_scalar_type(grads.scalar_type());
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == d && m.scalar_type() == acc &&
                        m.device() == grads.device(),
                    "fastdiv::eot_step: momentum must be a [", B, ", ", d, "] tensor of ", acc, " on ",
                    grads.device(), ", got ", m.sizes(), " of ", m.scalar_type(), " on ", m.device());
  return (d > 1 && m.stride(1) != 1) ? m.contiguous() : m;
}

// ---- prepared arguments and allocated outputs of the ops with many arguments ----

inline at::Tensor contiguous_like(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

// eot_step: alpha, eps contiguous [B]; momentum (undefined when absent) with unit stride on D; out [B, D]
// of x's dtype and the new momentum [B, D] acc ([B, 0] without momentum), both contiguous.
struct EotStepArgs {
  at::Tensor alpha, eps, momentum, out, momentum_out;
  bool l2 = false;
};

inline EotStepArgs prepare_eot_step(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grads,
                                    const at::Tensor& alpha, const at::Tensor& eps, const std::string& norm,
                                    const std::optional<at::Tensor>& momentum, c10::DeviceType device) {
  check_rows(grads, "eot_step", device);
  const int64_t B = grads.size(0), d = grads.size(2);
  TORCH_CHECK_VALUE(grads.size(1) >= 1, "fastdiv::eot_step: grads needs at least one sample, got [B, n, D] = ",
                    grads.sizes());
  check_eot_norm(norm);
  check_eot_features(x, grads, "x");
  check_eot_features(x0, grads, "x0");
  EotStepArgs args;
  args.l2 = norm == "l2";
  args.alpha = eot_per_example(alpha, grads, "alpha");
  args.eps = eot_per_example(eps, grads, "eps");
  const bool has_m = momentum.has_value() && momentum->defined();
  if (has_m) args.momentum = eot_momentum(*momentum, grads);
  const auto acc = acc_scalar_type(grads.scalar_type());
  args.out = at::empty({B, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  args.momentum_out = at::empty({B, has_m ? d : 0}, x.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous));
  return args;
}

// normalize_pullback: the upstream gradient (x's shape, dtype and device) as a contiguous copy, and dx
// contiguous like x.
inline std::tuple<at::Tensor, at::Tensor> prepare_normalize_pullback(const at::Tensor& x, const at::Tensor& grad,
                                                                     c10::DeviceType device) {
  check_rows(x, "normalize_pullback", device);
  check_same_as_x(grad, x, "normalize_pullback", "grad");
  return {grad.contiguous(), contiguous_like(x)};
}

// column_stats: r [B, n], mean and var [B, D], all acc.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_column_stats(const at::Tensor& x,
                                                                           c10::DeviceType device) {
  check_rows(x, "column_stats", device);
  const auto opts = acc_options(x);
  return {at::empty({x.size(0), x.size(1)}, opts), at::empty({x.size(0), x.size(2)}, opts),
          at::empty({x.size(0), x.size(2)}, opts)};
}

// gram: S [B, n, n] and the row l1 norms [B, n] ([B, 0] without them), acc.
inline std::tuple<at::Tensor, at::Tensor> prepare_gram(const at::Tensor& x, bool with_l1, c10::DeviceType device) {
  check_rows(x, "gram", device);
  const int64_t B = x.size(0), n = x.size(1);
  return {at::empty({B, n, n}, acc_options(x)), at::empty({B, with_l1 ? n : 0}, acc_options(x))};
}

// gram_loss: the loss [B], the backward's coefficients A [B, n, n] and beta ([B, n] for heads with an
// l1 term, else [B, 0]) and the row scales [B, n], acc.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepare_gram_loss(const at::Tensor& x,
                                                                                    bool with_beta,
                                                                                    c10::DeviceType device) {
  check_rows(x, "gram_loss", device);
  check_samples(x, "gram_loss");
  const int64_t B = x.size(0), n = x.size(1);
  return {at::empty({B}, acc_options(x)), at::empty({B, n, n}, acc_options(x)),
          at::empty({B, with_beta ? n : 0}, acc_options(x)), at::empty({B, n}, acc_options(x))};
}

// concentration_stats: the six statistics per input [B, 6], acc.
inline at::Tensor prepare_concentration_stats(const at::Tensor& x, double q, c10::DeviceType device) {
  constexpr const char* op = "concentration_stats";
  check_rows(x, op, device);
  check_samples(x, op);
  check_q(q, op);
  return at::empty({x.size(0), 6}, acc_options(x));
}

// column_stats_pullback: r, mean contiguous; the gradients autograd produced as contiguous copies
// (undefined when absent: they count as zero); dx contiguous like x.
struct ColumnStatsPullbackArgs {
  at::Tensor r, mean, grad_r, grad_mean, grad_var, dx;
};

inline ColumnStatsPullbackArgs prepare_column_stats_pullback(const at::Tensor& x, const at::Tensor& r,
                                                             const at::Tensor& mean,
                                                             const std::optional<at::Tensor>& grad_r,
                                                             const std::optional<at::Tensor>& grad_mean,
                                                             const std::optional<at::Tensor>& grad_var,
                                                             c10::DeviceType device) {
  constexpr const char* op = "column_stats_pullback";
  check_rows(x, op, device);
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2);
  check_acc(r, {B, n}, x, op, "r");
  check_acc(mean, {B, d}, x, op, "mean");
  ColumnStatsPullbackArgs args;
  optional_acc(grad_r, {B, n}, x, op, "grad_r", args.grad_r);
  optional_acc(grad_mean, {B, d}, x, op, "grad_mean", args.grad_mean);
  optional_acc(grad_var, {B, d}, x, op, "grad_var", args.grad_var);
  args.r = r.contiguous();
  args.mean = mean.contiguous();
  args.dx = contiguous_like(x);
  return args;
}

// gram_pullback: a [B, n, n] contiguous; beta [B, n] as a contiguous copy (undefined when absent or
// empty: no l1 term); scale [B] read in place at any stride (null when absent); row_scale [B, n] as a
// contiguous copy (undefined when absent or empty: all 1); dx contiguous like x.
struct GramPullbackArgs {
  at::Tensor a, beta, row_scale, dx;
  const at::Tensor* scale = nullptr;  // the caller's tensor
};

inline GramPullbackArgs prepare_gram_pullback(const at::Tensor& x, const at::Tensor& a,
                                              const std::optional<at::Tensor>& beta,
                                              const std::optional<at::Tensor>& scale,
                                              const std::optional<at::Tensor>& row_scale, c10::DeviceType device) {
  constexpr const char* op = "gram_pullback";
  check_rows(x, op, device);
  check_acc(a, {x.size(0), x.size(1), x.size(1)}, x, op, "a");
  GramPullbackArgs args;
  args.scale = check_pullback_scale(scale, x, op);
  args.a = a.contiguous();
  optional_acc(beta, {x.size(0), x.size(1)}, x, op, "beta", args.beta);
  optional_acc(row_scale, {x.size(0), x.size(1)}, x, op, "row_scale", args.row_scale);
  args.dx = contiguous_like(x);
  return args;
}

}  // namespace fastdiv
