// CUDA registrations of the Gram-family ops (schemas in fastdiv/csrc/ops.cpp): the argument checks and head-name
// parsing of the CPU wrappers (fastdiv/csrc/checks.h), output allocation, and the launchers of
// fastdiv/csrc/cuda/gram.cu on the current stream of x's device. Compiled only in CUDA builds.
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "cuda/glue.h"
#include "cuda/gram.h"

namespace fastdiv::cuda {
namespace {

// Scratch of the two-launch path (n > kMaxFusedSamples), from the caching allocator; empty otherwise.
at::Tensor workspace_for(const at::Tensor& x) {
  return at::empty({static_cast<int64_t>(gram_workspace_bytes(x.size(0), x.size(1)))},
                   x.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> gram_op(const at::Tensor& x, bool with_l1) {
  auto [s, l1] = prepare_gram(x, with_l1, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(cuda::gram(rows_view(x), s.data_ptr(), with_l1 ? data_or_null(l1) : nullptr, current_stream()),
               "gram");
  return {s, l1};
}

at::Tensor gram_pullback_op(const at::Tensor& x, const at::Tensor& a, const std::optional<at::Tensor>& beta,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& row_scale) {
  const GramPullbackArgs args = prepare_gram_pullback(x, a, beta, scale, row_scale, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor* s = args.scale;
  check_launch(cuda::gram_pullback(rows_view(x), args.a.data_ptr(), data_or_null(args.beta),
                                   s ? s->data_ptr() : nullptr, s ? s->stride(0) : 0, data_or_null(args.row_scale),
                                   args.dx.data_ptr(), current_stream()),
               "gram_pullback");
  return args.dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_loss_op(const at::Tensor& x, const std::string& head,
                                                                     double eps, double jitter, double p,
                                                                     double rho_max) {
  const heads::Head h = parse_head(head);
  auto [loss, a, beta, row_scale] = prepare_gram_loss(x, h == heads::Head::kSparsity, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor ws = workspace_for(x);
  check_launch(cuda::gram_loss(rows_view(x), h, heads::Params{eps, jitter, p, rho_max}, loss.data_ptr(),
                               a.data_ptr(), data_or_null(beta), data_or_null(row_scale), data_or_null(ws),
                               current_stream()),
               "gram_loss");
  return {loss, a, beta, row_scale};
}

at::Tensor concentration_stats_op(const at::Tensor& x, double q, double eps, double jitter, double rho_max) {
  at::Tensor out = prepare_concentration_stats(x, q, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor ws = workspace_for(x);
  check_launch(cuda::concentration_stats(rows_view(x), q, heads::Params{eps, jitter, 0.0, rho_max}, out.data_ptr(),
                                         data_or_null(ws), current_stream()),
               "concentration_stats");
  return out;
}

}  // namespace
}  // namespace fastdiv::cuda

TORCH_LIBRARY_IMPL(fastdiv, CUDA, m) {
  m.impl("gram", &fastdiv::cuda::gram_op);
  m.impl("gram_pullback", &fastdiv::cuda::gram_pullback_op);
  m.impl("gram_loss", &fastdiv::cuda::gram_loss_op);
  m.impl("concentration_stats", &fastdiv::cuda::concentration_stats_op);
}
