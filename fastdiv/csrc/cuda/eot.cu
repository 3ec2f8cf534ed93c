// The fused EOT step on the GPU (docs/design.md §2.6), the same math and NaN rules as fastdiv/csrc/cpu/kernels/eot.cpp: mean of
// the n sample gradients, sign (l_inf) or l2 direction, optional MI-FGSM momentum, step by alpha_b,
// projection onto the eps_b-ball around x0, clamp to [lo, hi].
//
// Two kernels, chosen by the mode; every mode reads grads exactly once:
//  - l_inf without momentum (eot_linf_kernel): purely elementwise. One thread per (example, column)
//    sums the column's n gradients in registers and writes x_new: one pass over grads, x and x0.
//  - momentum and/or l2 (eot_example_kernel): these need reductions over all D features of an example
//    (||g||_1 for the momentum, ||v||_2 for the l2 direction, then ||delta||_2 of the stepped offset,
//    which depends on ||v||). One thread block per example loops over D. Its first loop reads grads
//    once and keeps the mean gradient in a D-long acc buffer (momentum_out, which the momentum
//    overwrites anyway, or the workspace); each later loop re-reads that buffer (D values, not n * D)
//    after a block reduction. The loops: grads -> buffer [||g||_1 or ||g||_2]; with momentum, buffer ->
//    m_new [||m_new||_2 for l2] (and x_new for l_inf); for l2, buffer + x + x0 -> ||delta||_2, then
//    buffer + x + x0 -> x_new (delta recomputed rather than stored: the momentum buffer must keep m_new).
//    Every thread re-reads only the buffer entries it wrote itself, so no barrier is needed around the
//    buffer; the reductions are block_sum's fixed-order warp/shared-memory trees: deterministic, no
//    atomics. The one-pass alternative for l2 (docs/design.md §2.6), expanding ||delta + a v/||v|| ||^2
//    into ||delta||^2, delta.v and ||v||^2 in one pass, is not used: it cancels catastrophically when the
//    step lands near x0 and would differ from the CPU kernel, which reduces the stepped offset itself.
// As on the CPU, each thread accumulates its share of a norm in the acc type and the shares are summed
// in double (rows.cpp's rule), and the mean sums the n rows in order (so the sign of a near-zero mean is
// the CPU's).
#include "cuda/device.cuh"
#include "cuda/eot.h"

namespace fastdiv::cuda {
namespace {

// Columns per block of the elementwise kernel, and the largest block of the per-example kernel (many
// threads per example: with one block per example, a batch of ~100 fills a GPU with one block per SM).
constexpr int kColumnThreads = 256;
constexpr int kExampleThreads = 1024;
constexpr int64_t kMaxGrid = 0x7fffffff;  // grid.x limit; kernels loop over the blocks beyond it

template <typename T>
struct EotArgs {
  using A = acc_t<T>;
  const T* g;
  int64_t g_stride_b, g_stride_n;
  int64_t batch, n, d;
  const T* x;
  int64_t x_stride_b;
  const T* x0;
  int64_t x0_stride_b;
  const A* alpha;
  const A* eps;
  const A* m;  // null without momentum
  int64_t m_stride_b;
  A lo, hi, decay;
  bool clip;
  T* out;
  A* buf;  // [B, D] mean gradient, then m_new: momentum_out, or the workspace (l2 without momentum)
};

// sign with sign(NaN) = NaN (device.cuh's sign_of maps NaN to 0, which would hide a NaN gradient).
template <typename A>
__device__ __forceinline__ A sign_nan(A v) {
  return v > A(0) ? A(1) : (v < A(0) ? A(-1) : v * A(0));  // 0 * NaN keeps NaN, 0 stays 0
}

// Clamp that passes NaN through (both comparisons are false for NaN).
template <typename A>
__device__ __forceinline__ A clamp_nan(A v, A lo, A hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// 1 / norm, 0 for a zero norm (no direction), NaN for a NaN norm.
template <typename A>
__device__ __forceinline__ A inv_or_zero(double norm) {
  return norm == 0 ? A(0) : static_cast<A>(1.0 / norm);
}

// Mean of the n gradients of column k of example b, rows added in order as the CPU kernel does.
// Consecutive threads take consecutive k, so each row's loads are coalesced.
template <typename T>
__device__ __forceinline__ acc_t<T> mean_gradient(const EotArgs<T>& p, int64_t b, int64_t k) {
  using A = acc_t<T>;
  const T* g = p.g + b * p.g_stride_b + k;
  A s = load_as<A>(g[0]);
  for (int64_t i = 1; i < p.n; ++i) s += load_as<A>(g[i * p.g_stride_n]);
  return s / static_cast<A>(p.n);
}

// x_new[b, k] of the l_inf step with direction sign(v).
template <typename T>
__device__ __forceinline__ void store_linf(const EotArgs<T>& p, int64_t b, int64_t k, acc_t<T> a, acc_t<T> e,
                                           acc_t<T> v) {
  using A = acc_t<T>;
  const A x0v = load_as<A>(p.x0[b * p.x0_stride_b + k]);
  const A stepped = load_as<A>(p.x[b * p.x_stride_b + k]) + a * sign_nan(v);
  A y = x0v + clamp_nan(stepped - x0v, -e, e);
  if (p.clip) y = clamp_nan(y, p.lo, p.hi);
  p.out[b * p.d + k] = store_as<T>(y);
}

// l_inf without momentum: block blk covers columns [tile * blockDim.x, (tile + 1) * blockDim.x) of
// example blk / tiles. One pass over grads, x, x0.
template <typename T>
__global__ void __launch_bounds__(kColumnThreads) eot_linf_kernel(EotArgs<T> p, int64_t tiles) {
  const int64_t blocks = p.batch * tiles;
  for (int64_t blk = blockIdx.x; blk < blocks; blk += gridDim.x) {
    const int64_t b = blk / tiles;
    const int64_t k = (blk % tiles) * blockDim.x + threadIdx.x;
    if (k < p.d) store_linf(p, b, k, p.alpha[b], p.eps[b], mean_gradient(p, b, k));
  }
}

// Momentum and/or l2: one block per example (blocks loop over examples beyond the grid), columns
// k = threadIdx.x + j * blockDim.x. Every thread runs every loop and reduction of every example, so the
// barriers inside block_sum are reached by the whole block.
template <typename T, bool kL2, bool kMomentum>
__global__ void __launch_bounds__(kExampleThreads) eot_example_kernel(EotArgs<T> p) {
  using A = acc_t<T>;
  __shared__ double scratch[kExampleThreads / kWarp + 1];
  const int64_t d = p.d;
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const A a = p.alpha[b], e = p.eps[b];
    A* v = p.buf + b * d;
    // The only pass over grads: the mean gradient into the buffer, and its l1 (momentum) or squared l2
    // norm (the l2 direction without momentum).
    A part = 0;
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      const A g = mean_gradient(p, b, k);
      v[k] = g;
      if constexpr (kMomentum) {
        part += g < A(0) ? -g : g;
      } else {
        part += g * g;
      }
    }
    if constexpr (kMomentum) {  // MI-FGSM: m <- decay m + g / ||g||_1
      const A inv_l1 = inv_or_zero<A>(block_sum(static_cast<double>(part), scratch));
      const A* mb = p.m + b * p.m_stride_b;
      part = 0;
      for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
        const A mk = p.decay * mb[k] + v[k] * inv_l1;
        v[k] = mk;
        if constexpr (kL2) {
          part += mk * mk;
        } else {
          store_linf(p, b, k, a, e, mk);
        }
      }
    }
    if constexpr (kL2) {
      const A inv = inv_or_zero<A>(sqrt(block_sum(static_cast<double>(part), scratch)));
      const T* xb = p.x + b * p.x_stride_b;
      const T* x0b = p.x0 + b * p.x0_stride_b;
      part = 0;
      for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
        const A delta = (load_as<A>(xb[k]) + a * (v[k] * inv)) - load_as<A>(x0b[k]);
        part += delta * delta;
      }
      const double norm = sqrt(block_sum(static_cast<double>(part), scratch));
      // scale delta by min(1, eps / ||delta||); a zero (or NaN) norm leaves it unchanged
      const A f = norm > static_cast<double>(e) ? static_cast<A>(static_cast<double>(e) / norm) : A(1);
      T* ob = p.out + b * d;
      for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
        const A x0v = load_as<A>(x0b[k]);
        const A delta = (load_as<A>(xb[k]) + a * (v[k] * inv)) - x0v;
        A y = x0v + delta * f;
        if (p.clip) y = clamp_nan(y, p.lo, p.hi);
        ob[k] = store_as<T>(y);
      }
    }
  }
}

// Smallest multiple of a warp covering d columns, at most max_threads.
unsigned block_threads(int64_t d, int max_threads) {
  return static_cast<unsigned>(d >= max_threads ? max_threads : ceil_div(d, kWarp) * kWarp);
}

template <typename T, bool kL2, bool kMomentum>
void launch_example_kernel(const EotArgs<T>& p, cudaStream_t stream) {
  const auto kernel = eot_example_kernel<T, kL2, kMomentum>;  // a template-id's commas would split the macro
  const dim3 grid(static_cast<unsigned>(p.batch < kMaxGrid ? p.batch : kMaxGrid));
  const dim3 block(block_threads(p.d, kExampleThreads));
  FASTDIV_LAUNCH(kernel, grid, block, 0, stream, p);
}

}  // namespace

int64_t eot_step_workspace_bytes(DType dtype, int64_t batch, int64_t d, bool l2, bool momentum) {
  if (!l2 || momentum) return 0;
  const int64_t acc_bytes = dtype == DType::kFloat64 ? 8 : 4;
  return batch * d * acc_bytes;
}

cudaError_t eot_step(const RowsView& grads, const void* x, int64_t x_stride_b, const void* x0, int64_t x0_stride_b,
                     const void* alpha, const void* eps, bool l2, double lo, double hi, bool clip,
                     const void* momentum, int64_t momentum_stride_b, double decay, void* out, void* momentum_out,
                     void* workspace, cudaStream_t stream) {
  if (grads.batch == 0 || grads.d == 0) return cudaSuccess;
  const bool has_m = momentum != nullptr;
  if (grads.n < 1 || (has_m && momentum_out == nullptr) || (l2 && !has_m && workspace == nullptr))
    return cudaErrorInvalidValue;
  return FASTDIV_CUDA_DISPATCH(grads.dtype, [&] {
    using A = acc_t<scalar_t>;
    const EotArgs<scalar_t> p{static_cast<const scalar_t*>(grads.data),
                              grads.stride_b,
                              grads.stride_n,
                              grads.batch,
                              grads.n,
                              grads.d,
                              static_cast<const scalar_t*>(x),
                              x_stride_b,
                              static_cast<const scalar_t*>(x0),
                              x0_stride_b,
                              static_cast<const A*>(alpha),
                              static_cast<const A*>(eps),
                              static_cast<const A*>(momentum),
                              momentum_stride_b,
                              static_cast<A>(lo),
                              static_cast<A>(hi),
                              static_cast<A>(decay),
                              clip,
                              static_cast<scalar_t*>(out),
                              static_cast<A*>(has_m ? momentum_out : workspace)};
    if (!l2 && !has_m) {
      const unsigned threads = block_threads(p.d, kColumnThreads);
      const int64_t tiles = ceil_div(p.d, threads);
      const int64_t blocks = p.batch * tiles;
      const dim3 grid(static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid));
      FASTDIV_LAUNCH(eot_linf_kernel<scalar_t>, grid, dim3(threads), 0, stream, p, tiles);
    } else if (!l2) {
      launch_example_kernel<scalar_t, false, true>(p, stream);
    } else if (!has_m) {
      launch_example_kernel<scalar_t, true, false>(p, stream);
    } else {
      launch_example_kernel<scalar_t, true, true>(p, stream);
    }
    return FASTDIV_LAST_ERROR();
  });
}

}  // namespace fastdiv::cuda
