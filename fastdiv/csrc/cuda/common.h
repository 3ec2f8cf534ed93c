// Types shared by the CUDA launchers (fastdiv/csrc/cuda/*.cu: pure CUDA, compiled alone by nvcc or, emulated, by
// a host compiler) and their torch glue (fastdiv/csrc/cuda/*_ops.cpp, CUDA builds only). Nothing here needs
// torch, so the .cu files never include a torch header (docs/design.md §5).
#pragma once

#include <driver_types.h>  // cudaStream_t, cudaError_t

#include <cstdint>

namespace fastdiv::cuda {

// Storage dtype of a tensor. Kernels accumulate in fp64 for kFloat64 and in fp32 otherwise; every
// "acc" buffer of a launcher has that accumulation type.
enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// A batch of n gradient rows as [B, n, D] on the device: unit stride on D, any non-negative strides
// (in elements) on B and n.
struct RowsView {
  const void* data;
  DType dtype;
  int64_t batch, n, d, stride_b, stride_n;
};

}  // namespace fastdiv::cuda
