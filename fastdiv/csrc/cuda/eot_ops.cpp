// CUDA registration of fastdiv::eot_step (CUDA builds only): the CPU wrapper of fastdiv/csrc/cpu/kernels/eot.cpp with the
// same checks and outputs, calling the launcher of fastdiv/csrc/cuda/eot.cu on the current stream.
#include <torch/library.h>

#include "cuda/eot.h"
#include "cuda/glue.h"

namespace fastdiv::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> eot_step_op(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grads,
                                               const at::Tensor& alpha, const at::Tensor& eps, const std::string& norm,
                                               double lo, double hi, bool clip,
                                               const std::optional<at::Tensor>& momentum, double decay) {
  EotStepArgs args = prepare_eot_step(x, x0, grads, alpha, eps, norm, momentum, at::kCUDA);
  const bool has_m = args.momentum.defined();
  if (args.out.numel() == 0) return {args.out, args.momentum_out};
  const c10::cuda::CUDAGuard guard(grads.device());
  const int64_t B = grads.size(0), d = grads.size(2);
  const int64_t ws_bytes = eot_step_workspace_bytes(dtype_of(grads), B, d, args.l2, has_m);
  const at::Tensor ws = ws_bytes > 0 ? at::empty({ws_bytes}, grads.options().dtype(at::kByte)) : at::Tensor();
  check_launch(eot_step(rows_view(grads), x.const_data_ptr(), x.stride(0), x0.const_data_ptr(), x0.stride(0),
                        args.alpha.const_data_ptr(), args.eps.const_data_ptr(), args.l2, lo, hi, clip,
                        data_or_null(args.momentum), has_m ? args.momentum.stride(0) : 0, decay,
                        args.out.data_ptr(), data_or_null(args.momentum_out),
                        data_or_null(ws), current_stream()),
               "eot_step");
  return {args.out, args.momentum_out};
}

}  // namespace
}  // namespace fastdiv::cuda

TORCH_LIBRARY_IMPL(fastdiv, CUDA, m) { m.impl("eot_step", &fastdiv::cuda::eot_step_op); }
