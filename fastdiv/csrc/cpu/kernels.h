// CPU implementations of the fastdiv ops (schemas in fastdiv/csrc/ops.cpp). x is [B, n, D] with unit stride
// on D and any strides on B and n; outputs are contiguous. "acc" is fp32 for fp32/bf16/fp16 inputs
// and fp64 for fp64 inputs.
//
// The kernels (cpu/kernels/) are compiled once per instruction set (cpu/isa_*.cpp: default x86-64 or the
// compiler's target, AVX2 + FMA, AVX-512); the functions declared here run the variant chosen at run time
// (cpu/dispatch.cpp: the best this CPU supports, or FASTDIV_CPU_CAPABILITY).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastdiv::cpu {

// Columns per tile: every kernel streams X in column tiles of this many values (cpu/kernels/tile.h).
constexpr int64_t kTile = 2048;

// Raw Gram S = X X^T [B, n, n] (acc) and, when with_l1, row l1 norms [B, n] (acc; else [B, 0]).
std::tuple<at::Tensor, at::Tensor> gram(const at::Tensor& x, bool with_l1);

// dX_bi = scale_b row_scale_bi (A_b X_b + beta_b ⊙ sign(X_b))_i for A [B, n, n], beta [B, n], scale [B]
// and row_scale [B, n] (acc; scale may have any stride, e.g. 0 for an expanded gradient; absent scales
// mean 1); dX has x's dtype. The scale lets a loss's backward pass its upstream gradient straight in
// instead of launching a * g, beta * g first; row_scale is gram_loss's fourth output.
at::Tensor gram_pullback(const at::Tensor& x, const at::Tensor& a, const std::optional<at::Tensor>& beta,
                         const std::optional<at::Tensor>& scale = std::nullopt,
                         const std::optional<at::Tensor>& row_scale = std::nullopt);

// Per-input loss [B] of a Gram head plus its pullback coefficients A [B, n, n], beta [B, n] (beta is
// [B, 0] for heads without an l1 term) and the row scales [B, n] the pullback multiplies its rows by:
// 1 except for rows whose squares leave the accumulation dtype's range (head_math.h, "Row scaling").
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_loss(const at::Tensor& x, const std::string& head,
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

// Fused EOT step on x, x0 [B, D] and grads [B, n, D]: mean gradient, sign (norm "linf") or l2 direction,
// optional MI-FGSM momentum m <- decay m + g / ||g||_1 (momentum [B, D] acc), step by alpha, projection onto
// the eps-ball around x0 and, when clip, clamp to [lo, hi]. alpha, eps are [B] acc. Returns x_new [B, D]
// (x's dtype) and the new momentum [B, D] acc ([B, 0] without momentum).
std::tuple<at::Tensor, at::Tensor> eot_step(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grads,
                                            const at::Tensor& alpha, const at::Tensor& eps, const std::string& norm,
                                            double lo, double hi, bool clip,
                                            const std::optional<at::Tensor>& momentum, double decay);

// ---- run-time dispatch (cpu/dispatch.cpp)

// One instruction-set variant of the kernels: its name ("default", "avx2", "avx512") and entry points.
struct KernelTable {
  const char* name;
  std::tuple<at::Tensor, at::Tensor> (*gram)(const at::Tensor&, bool);
  at::Tensor (*gram_pullback)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*gram_loss)(const at::Tensor&, const std::string&,
                                                                          double, double, double, double);
  at::Tensor (*concentration_stats)(const at::Tensor&, double, double, double, double);
  at::Tensor (*normalize)(const at::Tensor&, double);
  at::Tensor (*normalize_pullback)(const at::Tensor&, const at::Tensor&, double);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*column_stats)(const at::Tensor&, double);
  at::Tensor (*column_stats_pullback)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                      const std::optional<at::Tensor>&, double);
  std::tuple<at::Tensor, at::Tensor> (*eot_step)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, const std::string&, double,
                                                 double, bool, const std::optional<at::Tensor>&, double);
};

// Each variant's table (cpu/isa_*.cpp); the AVX2 and AVX-512 ones exist on x86-64 only.
namespace isa_default { const KernelTable& kernel_table(); }
#if defined(__x86_64__)
namespace isa_avx2 { const KernelTable& kernel_table(); }
namespace isa_avx512 { const KernelTable& kernel_table(); }
#endif

// Names of the variants this build holds and this CPU can run, lowest first ("default" always).
std::vector<std::string> supported_capabilities();
// The variant the functions above run: chosen on first use, from FASTDIV_CPU_CAPABILITY when it is set
// (an error if it names no variant or one this CPU cannot run), else the best supported.
const KernelTable& active_kernels();
// Makes `name` the active variant (an error if it is not in supported_capabilities()).
void set_capability(const std::string& name);

}  // namespace fastdiv::cpu
