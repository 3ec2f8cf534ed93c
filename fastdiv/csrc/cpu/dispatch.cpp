// Run-time choice among the instruction-set variants of the CPU kernels (cpu/isa_*.cpp), as ATen does for
// its own CPU kernels: the best variant this CPU supports, unless FASTDIV_CPU_CAPABILITY names another
// (like ATEN_CPU_CAPABILITY). The entry points of cpu/kernels.h forward to the active variant. This file is
// compiled for the build's default target, so it runs on any CPU.
#include <c10/util/Exception.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace fastdiv::cpu {
namespace {

struct Variant {
  const KernelTable& (*table)();
  bool (*supported)();
};

// FASTDIV_NO_AVX_VARIANTS: a build of the default variant alone (CMake's FASTDIV_AVX_VARIANTS=OFF).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(FASTDIV_NO_AVX_VARIANTS)
#define FASTDIV_HAS_AVX_VARIANTS 1
#endif

#if FASTDIV_HAS_AVX_VARIANTS
// The CPUID bits and, through libgcc, the OS's XSAVE support of the ymm / zmm state.
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512cd");
}
#endif
bool always() { return true; }

// Lowest first.
const std::vector<Variant>& variants() {
  static const std::vector<Variant> all = {
      {&isa_default::kernel_table, &always},
#if FASTDIV_HAS_AVX_VARIANTS
      {&isa_avx2::kernel_table, &has_avx2},
      {&isa_avx512::kernel_table, &has_avx512},
#endif
  };
  return all;
}

std::string known_names() {
  std::string names;
  for (const Variant& v : variants()) names += (names.empty() ? "" : ", ") + std::string(v.table().name);
  return names;
}

const KernelTable* find_supported(const std::string& name, const char* origin) {
  for (const Variant& v : variants()) {
    if (name != v.table().name) continue;
    std::string supported;
    for (const std::string& s : supported_capabilities()) supported += (supported.empty() ? "" : ", ") + s;
    TORCH_CHECK(v.supported(), origin, "'", name, "': this CPU cannot run the ", name,
                " kernels (it supports: ", supported, ")");
    return &v.table();
  }
  TORCH_CHECK(false, origin, "'", name, "' names no CPU capability of fastdiv's kernels (", known_names(), ")");
}

const KernelTable* from_environment() {
  const char* env = std::getenv("FASTDIV_CPU_CAPABILITY");
  std::string name = env ? env : "";
  while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
  while (!name.empty() && std::isspace(static_cast<unsigned char>(name.front()))) name.erase(0, 1);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (!name.empty()) return find_supported(name, "FASTDIV_CPU_CAPABILITY=");
  const KernelTable* best = nullptr;
  for (const Variant& v : variants())
    if (v.supported()) best = &v.table();
  return best;
}

std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

std::vector<std::string> supported_capabilities() {
  std::vector<std::string> names;
  for (const Variant& v : variants())
    if (v.supported()) names.emplace_back(v.table().name);
  return names;
}

const KernelTable& active_kernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (t == nullptr) {
    // A bad FASTDIV_CPU_CAPABILITY throws here, on every call, until it is fixed or set_capability is called.
    const KernelTable* chosen = from_environment();
    g_active.compare_exchange_strong(t, chosen, std::memory_order_acq_rel);
    t = g_active.load(std::memory_order_acquire);
  }
  return *t;
}

void set_capability(const std::string& name) {
  g_active.store(find_supported(name, "set_cpu_capability: "), std::memory_order_release);
}

// ---- the entry points: the active variant's kernels

std::tuple<at::Tensor, at::Tensor> gram(const at::Tensor& x, bool with_l1) { return active_kernels().gram(x, with_l1); }

at::Tensor gram_pullback(const at::Tensor& x, const at::Tensor& a, const std::optional<at::Tensor>& beta,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& row_scale) {
  return active_kernels().gram_pullback(x, a, beta, scale, row_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_loss(const at::Tensor& x, const std::string& head,
                                                                     double eps, double jitter, double p,
                                                                     double rho_max) {
  return active_kernels().gram_loss(x, head, eps, jitter, p, rho_max);
}

at::Tensor concentration_stats(const at::Tensor& x, double q, double eps, double jitter, double rho_max) {
  return active_kernels().concentration_stats(x, q, eps, jitter, rho_max);
}

at::Tensor normalize(const at::Tensor& x, double eps) { return active_kernels().normalize(x, eps); }

at::Tensor normalize_pullback(const at::Tensor& x, const at::Tensor& grad, double eps) {
  return active_kernels().normalize_pullback(x, grad, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> column_stats(const at::Tensor& x, double eps) {
  return active_kernels().column_stats(x, eps);
}

at::Tensor column_stats_pullback(const at::Tensor& x, const at::Tensor& r, const at::Tensor& mean,
                                 const std::optional<at::Tensor>& grad_r,
                                 const std::optional<at::Tensor>& grad_mean,
                                 const std::optional<at::Tensor>& grad_var, double eps) {
  return active_kernels().column_stats_pullback(x, r, mean, grad_r, grad_mean, grad_var, eps);
}

std::tuple<at::Tensor, at::Tensor> eot_step(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grads,
                                            const at::Tensor& alpha, const at::Tensor& eps, const std::string& norm,
                                            double lo, double hi, bool clip,
                                            const std::optional<at::Tensor>& momentum, double decay) {
  return active_kernels().eot_step(x, x0, grads, alpha, eps, norm, lo, hi, clip, momentum, decay);
}

}  // namespace fastdiv::cpu
