// CUDA registration of fastdiv::eot_step (CUDA builds only): the CPU wrapper of csrc/cpu/eot.cpp with the
// same checks and outputs, calling the launcher of csrc/cuda/eot.cu on the current stream.
#include <torch/library.h>

#include "cuda/eot.h"
#include "cuda/glue.h"

namespace fastdiv::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> eot_step_op(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grads,
                                               const at::Tensor& alpha, const at::Tensor& eps, const std::string& norm,
                                               double lo, double hi, bool clip,
                                               const std::optional<at::Tensor>& momentum, double decay) {
  check_rows(grads, "eot_step", at::kCUDA);
  const int64_t B = grads.size(0), n = grads.size(1), d = grads.size(2);
  TORCH_CHECK_VALUE(n >= 1, "fastdiv::eot_step: grads needs at least one sample, got [B, n, D] = ", grads.sizes());
  check_eot_norm(norm);
  check_eot_features(x, grads, "x");
  check_eot_features(x0, grads, "x0");
  const auto acc = acc_scalar_type(grads.scalar_type());
  const at::Tensor a = eot_per_example(alpha, grads, "alpha");
  const at::Tensor e = eot_per_example(eps, grads, "eps");
  const bool has_m = momentum.has_value() && momentum->defined();
  const at::Tensor m = has_m ? eot_momentum(*momentum, grads) : at::Tensor();
  const c10::cuda::CUDAGuard guard(grads.device());
  at::Tensor out = at::empty({B, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor m_out = at::empty({B, has_m ? d : 0}, x.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || d == 0) return {out, m_out};
  const bool l2 = norm == "l2";
  const int64_t ws_bytes = eot_step_workspace_bytes(dtype_of(grads), B, d, l2, has_m);
  const at::Tensor ws = ws_bytes > 0 ? at::empty({ws_bytes}, grads.options().dtype(at::kByte)) : at::Tensor();
  check_launch(eot_step(rows_view(grads), x.const_data_ptr(), x.stride(0), x0.const_data_ptr(), x0.stride(0),
                        a.const_data_ptr(), e.const_data_ptr(), l2, lo, hi, clip,
                        has_m ? m.const_data_ptr() : nullptr, has_m ? m.stride(0) : 0, decay, out.data_ptr(),
                        has_m ? m_out.data_ptr() : nullptr, ws_bytes > 0 ? ws.data_ptr() : nullptr,
                        current_stream()),
               "eot_step");
  return {out, m_out};
}

}  // namespace
}  // namespace fastdiv::cuda

TORCH_LIBRARY_IMPL(fastdiv, CUDA, m) { m.impl("eot_step", &fastdiv::cuda::eot_step_op); }
