// What every CUDA kernel file of fastdiv includes: the CUDA headers (or, with FASTDIV_CUDA_EMULATE,
// the host emulation of emulate.h), launch macros that mean the same in both, and the device helpers
// shared by the kernels: storage <-> accumulation conversions and deterministic reductions.
//
// Kernels launch through FASTDIV_LAUNCH and declare dynamic shared memory with FASTDIV_DYNAMIC_SMEM so
// the same source runs on a GPU and, for the tests of tests/native/, on the host.
#pragma once

#if defined(FASTDIV_CUDA_EMULATE)
#include "cuda/emulate.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define FASTDIV_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define FASTDIV_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define FASTDIV_LAST_ERROR() cudaGetLastError()
#define FASTDIV_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  cudaFuncSetAttribute((kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes))
#endif

#include <cstdint>
#include <type_traits>

#include "cuda/common.h"

namespace fastdiv::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// fp32 accumulation for fp32/fp16/bf16 storage, fp64 for fp64.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

template <typename A, typename T>
__host__ __device__ __forceinline__ A load_as(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return static_cast<A>(__half2float(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return static_cast<A>(__bfloat162float(v));
  } else {
    return static_cast<A>(v);
  }
}

// Round to nearest even, NaN stays NaN (as the CPU kernels' store_as).
template <typename T, typename A>
__host__ __device__ __forceinline__ T store_as(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

// sign(NaN) = 0, as (v > 0) - (v < 0) in the CPU kernels.
template <typename A>
__host__ __device__ __forceinline__ A sign_of(A v) {
  return static_cast<A>((v > A(0)) - (v < A(0)));
}

// Sum over the 32 lanes of a warp, the same value in every lane; the butterfly order is fixed, so the
// result is the same bits on every run.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Reduction of v over the block (blockDim.x a multiple of 32) with an associative op, returned to every
// thread: warp butterflies, then the warp results combined in warp order by one thread, so the order
// never depends on scheduling. scratch: blockDim.x / 32 + 1 values of shared memory; every thread of
// the block must call it.
template <typename A, typename Op>
__device__ __forceinline__ A block_reduce(A v, A* scratch, Op op) {
  const unsigned warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    A total = scratch[0];
    for (unsigned w = 1; w < warps; ++w) total = op(total, scratch[w]);
    scratch[warps] = total;
  }
  __syncthreads();
  const A total = scratch[warps];
  __syncthreads();  // scratch may be reused right after
  return total;
}

struct Plus {
  template <typename A>
  __host__ __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};

template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  return block_reduce(v, scratch, Plus{});
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fastdiv::cuda

// Runs the statement with scalar_t bound to the storage type of a DType.
#define FASTDIV_CUDA_DISPATCH(dtype, ...)                                          \
  [&] {                                                                            \
    switch (dtype) {                                                               \
      case ::fastdiv::cuda::DType::kFloat32: { using scalar_t = float; return __VA_ARGS__(); }          \
      case ::fastdiv::cuda::DType::kFloat64: { using scalar_t = double; return __VA_ARGS__(); }         \
      case ::fastdiv::cuda::DType::kFloat16: { using scalar_t = __half; return __VA_ARGS__(); }         \
      case ::fastdiv::cuda::DType::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
    }                                                                              \
    return cudaErrorInvalidValue;                                                  \
  }()
