// What the emulated CUDA kernel tests (tests/native/test_cuda_*.cpp) share: host tensors as the raw
// views the launchers of fastdiv/csrc/cuda/ take. Include after the .cu file under test.
#pragma once

#include <ATen/ATen.h>

#include "cuda/common.h"

namespace native_test {

inline fastdiv::cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return fastdiv::cuda::DType::kFloat32;
    case at::kDouble: return fastdiv::cuda::DType::kFloat64;
    case at::kHalf: return fastdiv::cuda::DType::kFloat16;
    case at::kBFloat16: return fastdiv::cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "no CUDA kernel dtype for ", t);
  }
}

// x [B, n, D] (unit stride on D) as a RowsView; "device" pointers are host pointers under emulation.
inline fastdiv::cuda::RowsView rows_view_of(const at::Tensor& x) {
  return fastdiv::cuda::RowsView{x.data_ptr(), cuda_dtype(x.scalar_type()), x.size(0), x.size(1), x.size(2),
                                 x.stride(0), x.stride(1)};
}

}  // namespace native_test
