// Torch glue of the CUDA "rows" kernels (csrc/cuda/rows.cu): the same checks, output allocation and
// gradient handling as the CPU wrappers in csrc/cpu/rows.cpp, then one launcher call on the current
// stream of x's device. CUDA builds only.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/glue.h"
#include "cuda/rows.h"

namespace fastdiv::cuda {
namespace {

at::Tensor normalize_cuda(const at::Tensor& x, double eps) {
  check_rows(x, "normalize", at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor u = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(normalize(rows_view(x), eps, u.data_ptr(), current_stream()), "normalize");
  return u;
}

at::Tensor normalize_pullback_cuda(const at::Tensor& x, const at::Tensor& grad, double eps) {
  check_rows(x, "normalize_pullback", at::kCUDA);
  check_same_as_x(grad, x, "normalize_pullback", "grad");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(normalize_pullback(rows_view(x), g.data_ptr(), eps, dx.data_ptr(), current_stream()),
               "normalize_pullback");
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> column_stats_cuda(const at::Tensor& x, double eps) {
  check_rows(x, "column_stats", at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  at::Tensor r = at::empty({x.size(0), x.size(1)}, opts);
  at::Tensor mean = at::empty({x.size(0), x.size(2)}, opts);
  at::Tensor var = at::empty({x.size(0), x.size(2)}, opts);
  check_launch(column_stats(rows_view(x), eps, r.data_ptr(), mean.data_ptr(), var.data_ptr(), current_stream()),
               "column_stats");
  return {r, mean, var};
}

at::Tensor column_stats_pullback_cuda(const at::Tensor& x, const at::Tensor& r, const at::Tensor& mean,
                                      const std::optional<at::Tensor>& grad_r,
                                      const std::optional<at::Tensor>& grad_mean,
                                      const std::optional<at::Tensor>& grad_var, double eps) {
  constexpr const char* op = "column_stats_pullback";
  check_rows(x, op, at::kCUDA);
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2);
  check_acc(r, {B, n}, x, op, "r");
  check_acc(mean, {B, d}, x, op, "mean");
  const c10::cuda::CUDAGuard guard(x.device());
  // Contiguous copies of whichever gradients autograd produced (absent ones count as zero: null).
  at::Tensor gr, gm, gv;
  const at::Tensor* pgr = optional_acc(grad_r, {B, n}, x, op, "grad_r", gr);
  const at::Tensor* pgm = optional_acc(grad_mean, {B, d}, x, op, "grad_mean", gm);
  const at::Tensor* pgv = optional_acc(grad_var, {B, d}, x, op, "grad_var", gv);
  const at::Tensor rc = r.contiguous(), mc = mean.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto ptr = [](const at::Tensor* t) -> const void* { return t ? t->data_ptr() : nullptr; };
  check_launch(column_stats_pullback(rows_view(x), rc.data_ptr(), mc.data_ptr(), ptr(pgr), ptr(pgm), ptr(pgv), eps,
                                     dx.data_ptr(), current_stream()),
               op);
  return dx;
}

}  // namespace
}  // namespace fastdiv::cuda

TORCH_LIBRARY_IMPL(fastdiv, CUDA, m) {
  namespace cuda = fastdiv::cuda;
  m.impl("normalize", &cuda::normalize_cuda);
  m.impl("normalize_pullback", &cuda::normalize_pullback_cuda);
  m.impl("column_stats", &cuda::column_stats_cuda);
  m.impl("column_stats_pullback", &cuda::column_stats_pullback_cuda);
}
