// Torch glue of the CUDA "rows" kernels (fastdiv/csrc/cuda/rows.cu): the same checks, output allocation and
// gradient handling as the CPU wrappers in fastdiv/csrc/cpu/kernels/rows.cpp, then one launcher call on the current
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
  at::Tensor u = contiguous_like(x);
  check_launch(normalize(rows_view(x), eps, u.data_ptr(), current_stream()), "normalize");
  return u;
}

at::Tensor normalize_pullback_cuda(const at::Tensor& x, const at::Tensor& grad, double eps) {
  auto [g, dx] = prepare_normalize_pullback(x, grad, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(normalize_pullback(rows_view(x), g.data_ptr(), eps, dx.data_ptr(), current_stream()),
               "normalize_pullback");
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> column_stats_cuda(const at::Tensor& x, double eps) {
  auto [r, mean, var] = prepare_column_stats(x, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(column_stats(rows_view(x), eps, r.data_ptr(), mean.data_ptr(), var.data_ptr(), current_stream()),
               "column_stats");
  return {r, mean, var};
}

at::Tensor column_stats_pullback_cuda(const at::Tensor& x, const at::Tensor& r, const at::Tensor& mean,
                                      const std::optional<at::Tensor>& grad_r,
                                      const std::optional<at::Tensor>& grad_mean,
                                      const std::optional<at::Tensor>& grad_var, double eps) {
  ColumnStatsPullbackArgs args = prepare_column_stats_pullback(x, r, mean, grad_r, grad_mean, grad_var, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(column_stats_pullback(rows_view(x), args.r.data_ptr(), args.mean.data_ptr(), data_or_null(args.grad_r),
                                     data_or_null(args.grad_mean), data_or_null(args.grad_var), eps, args.dx.data_ptr(),
                                     current_stream()),
               "column_stats_pullback");
  return args.dx;
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
