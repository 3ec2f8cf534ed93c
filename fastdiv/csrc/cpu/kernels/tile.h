// Tiled access to a batch of n gradient rows X[B, n, D] (unit stride on D, any strides on B and n).
//
// Every CPU kernel walks one batch element at a time and streams its n rows in column tiles of
// kTile values, converted to the accumulation type. A tile of n rows (n * kTile * 4 bytes, 80 KiB for
// n = 10) stays in L2 while all pairwise products of that tile are formed, so X is read from memory
// once per pass however large n is. Tiles shorter than ~2048 values starve the hardware prefetcher
// (each row segment is its own short stream): 512 ran the Gram ~2x slower on the CI-class CPU. Half-precision
// rows are the exception (tile_width, prefetch_next_tile below): staged in narrower tiles, with a software prefetch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "checks.h"
#include "cpu/kernels.h"

namespace fastdiv::cpu::FASTDIV_ISA {

// The variant's vector registers (cpu/isa_*.cpp; #pragma GCC target does not define __AVX2__ and the like):
// their width in bytes and how many there are (16 xmm without AVX, 16 ymm with AVX2, 32 zmm with AVX-512).
// Register-blocked loops size their accumulator blocks from these so that the block, the values it
// multiplies and the loads fit without spilling.
constexpr int64_t kVectorBytes = FASTDIV_ISA_VECTOR_BYTES;
constexpr int64_t kVectorRegisters = FASTDIV_ISA_VECTOR_REGISTERS;

// Half-precision inputs accumulate in fp32; fp64 inputs accumulate in fp64.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

#define FASTDIV_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)


template <typename T>
struct Rows {
  const T* base;
  int64_t stride_b, stride_n;
  const T* row(int64_t b, int64_t i) const { return base + b * stride_b + i * stride_n; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& x) {
  return Rows<T>{x.const_data_ptr<T>(), x.stride(0), x.stride(1)};
}

// The compiler's native half-precision type, whose conversions are instructions (F16C / AVX-512 FP16 on
// x86-64, FCVT on aarch64): x86-64 GCC has _Float16 in C++; aarch64 GCC 12 defines __FLT16_MAX__ but has
// _Float16 only in C, and its C++ type for IEEE half is __fp16.
#if defined(__aarch64__)
#define FASTDIV_NATIVE_HALF __fp16
#elif defined(__FLT16_MAX__)
#define FASTDIV_NATIVE_HALF _Float16
#endif

// Element conversions between the storage type T and the accumulation type A, written so that loops
// over them vectorize: c10's BFloat16 rounding branches on NaN, and its Half conversion is bit
// manipulation, which left half-precision passes ~2x slower than fp32. Both round to nearest even,
// as c10 does.
template <typename A, typename T>
inline A load_as(T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return static_cast<A>(f);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#ifdef FASTDIV_NATIVE_HALF
    FASTDIV_NATIVE_HALF h;
    std::memcpy(&h, &v.x, sizeof h);
    return static_cast<A>(h);
#else
    return static_cast<A>(v);
#endif
  } else {
    return static_cast<A>(v);
  }
}

template <typename T, typename A>
inline T store_as(A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const float f = static_cast<float>(v);
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;  // keep NaN a (quiet) NaN, not rounded to Inf
    return T(static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded), T::from_bits());
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#ifdef FASTDIV_NATIVE_HALF
    const FASTDIV_NATIVE_HALF h = static_cast<FASTDIV_NATIVE_HALF>(static_cast<float>(v));
    uint16_t bits;
    std::memcpy(&bits, &h, sizeof bits);
    return T(bits, T::from_bits());
#else
    return static_cast<T>(v);
#endif
  } else {
    return static_cast<T>(v);
  }
}

// The largest |x_k| of one row of d values, in double (the row scales of head_math.h start from it); a NaN
// sticks: no later value compares greater than it.
template <typename T>
double row_max_abs(const T* row, int64_t d) {
  double m = 0;
  for (int64_t k = 0; k < d; ++k) {
    const double a = std::abs(static_cast<double>(load_as<acc_t<T>>(row[k])));
    m = (a > m || a != a) ? a : m;
  }
  return m;
}

// Copies columns [d0, d0 + len) of the n rows of batch element b into buf (row-major n x len).
template <typename T, typename A>
inline void load_tile(const Rows<T>& x, int64_t b, int64_t n, int64_t d0, int64_t len, A* buf) {
  for (int64_t i = 0; i < n; ++i) {
    const T* src = x.row(b, i) + d0;
    A* dst = buf + i * len;
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) dst[k] = load_as<A>(src[k]);
  }
}

// Columns [d0, d0 + len) of the n rows of batch element b in the accumulation type: X itself when it
// already has that type (no staging copy), else converted into tile. Returns row 0; rows are
// *row_stride apart.
template <typename T>
inline const acc_t<T>* tile_rows(const Rows<T>& x, int64_t b, int64_t n, int64_t d0, int64_t len,
                                 acc_t<T>* tile, int64_t* row_stride) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    *row_stride = x.stride_n;
    return x.row(b, 0) + d0;
  } else {
    load_tile(x, b, n, d0, len, tile);
    *row_stride = len;
    return tile;
  }
}

// Half-precision rows are converted into a tile first, and that conversion pass is where X is read from
// memory; the Gram or pullback that follows works on the tile in cache with no memory reads in flight, so
// the two costs add up instead of overlapping as they do for fp32 rows (perf: a quarter of the bf16
// Gram's time in the conversion loop, and the bf16 pass at 0.55x the fp32 one). Kernels therefore
// prefetch rows [i0, i0 + rows) of the *next* tile of columns while they compute on the current one, a few
// rows at a time so that the requests are spread over the compute instead of filling the miss queues at
// once. Not used for fp32/fp64 rows, which the kernels read in place and the hardware prefetcher streams.
//
// The staged tile itself is narrower than kTile for half-precision rows (tile_width): n rows of 512 fp32
// values (20 KiB at n = 10) stay in L1 between the conversion and the compute, where 2048 (80 KiB) went
// out to L2 and back (the conversion loop was bound on its stores). The software prefetch keeps the rows'
// memory streams going, which is what the wide tiles were for.
template <typename T>
constexpr int64_t tile_width() {
  return std::is_same_v<T, acc_t<T>> ? kTile : kTile / 4;
}

template <typename T>
inline void prefetch_next_tile(const Rows<T>& x, int64_t b, int64_t n, int64_t d, int64_t d0, int64_t i0,
                               int64_t rows) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return;
  } else {
    const int64_t next = d0 + tile_width<T>();
    if (next >= d) return;
    const int64_t bytes = std::min(tile_width<T>(), d - next) * static_cast<int64_t>(sizeof(T));
    for (int64_t i = i0; i < std::min(n, i0 + rows); ++i) {
      const char* p = reinterpret_cast<const char*>(x.row(b, i) + next);
      for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
    }
  }
}

template <typename A>
inline A dot(const A* a, const A* b, int64_t len) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < len; ++k) s += a[k] * b[k];
  return s;
}

template <typename A>
inline A abs_sum(const A* a, int64_t len) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < len; ++k) s += a[k] < 0 ? -a[k] : a[k];
  return s;
}

template <typename A>
inline A sign(A v) {
  return static_cast<A>((v > 0) - (v < 0));
}

// Batch elements per parallel task: enough work per task to amortize the fork.
inline int64_t batch_grain(int64_t n, int64_t d) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, n * d));
}

}  // namespace fastdiv::cpu::FASTDIV_ISA
