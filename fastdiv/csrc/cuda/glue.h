// Torch side of the CUDA ops (fastdiv/csrc/cuda/*_ops.cpp, compiled only in CUDA builds): turns tensors into the
// raw views the launchers of fastdiv/csrc/cuda/*.cu take, and launcher errors into c10 errors. Uses only c10/cuda
// headers (ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers the glue never needs).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "checks.h"
#include "cuda/common.h"

namespace fastdiv::cuda {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "fastdiv: no CUDA kernel for dtype ", t.scalar_type());
  }
}

// x is [B, n, D] with unit stride on D (checked by check_rows).
inline RowsView rows_view(const at::Tensor& x) {
  return RowsView{x.data_ptr(), dtype_of(x), x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1)};
}

// The launchers take nullptr for an absent optional input or output: an undefined or empty tensor.
inline void* data_or_null(const at::Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr; }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A launcher's status as a c10 error naming the op.
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastdiv::", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace fastdiv::cuda
