// CUDA kernels of the "rows" ops: unit rows u_i = x_i / r_i with r_i = max(||x_i||, eps), the per-column
// statistics of u behind the Diverse-Directions variance penalty, and their pullbacks. The math, the
// edge cases (rows at or below the norm floor get u = 0 and zero gradient, NaN rows stay NaN) and the
// order of the per-column sums are those of fastdiv/csrc/cpu/kernels/rows.cpp; read its header comment first.
//
// Two kernel shapes:
//  - Row kernels (normalize, normalize_pullback, the row norms of column_stats, column_stats_pullback):
//    a "team" of 32..1024 threads (a power of two, ~8 elements per thread) owns one row, reads it along
//    D with consecutive threads on consecutive elements (coalesced), reduces over the row in a fixed
//    order, and for the ops that need a second look at the row writes the output from a copy kept in
//    shared memory, so X is read from DRAM once. Rows too large to keep are read again (mostly from L2).
//  - The column kernel of column_stats: one thread per column d of a batch element, walking the n rows
//    in order exactly as the CPU does (mean, then the two-pass variance), so the column sums are the
//    same sequence of operations as on the CPU; consecutive threads read consecutive columns.
// No atomics: every reduction has a fixed order, so results are bitwise reproducible.
//
// Rows whose sum of squares leaves the accumulation range (fp32: |x| ~ 1e19 overflows, ~1e-23 flushes to
// 0; head_math.h, "Row scaling") take the rare path of rows.cpp: the norm again from y = s x in double
// (s a power of two from the row's maximum) and u from y. A team cannot take a barrier alone, so whether
// any row of the block needs it is voted (__syncthreads_or) and then every team runs the rare reductions,
// keeping their results only for its own row if that row needs them.
#include <cmath>  // sqrt: the CUDA headers declare it, the host emulation of device.cuh does not

#include "cuda/device.cuh"
#include "cuda/rows.h"
#include "head_math.h"

// The pass-1 loops are independent loads feeding one accumulator; unrolling lets a thread keep several
// loads in flight. (A host compiler, for the emulated tests, would warn about the unknown pragma.)
#if defined(__CUDACC__)
#define FASTDIV_ROWS_UNROLL _Pragma("unroll 4")
#else
#define FASTDIV_ROWS_UNROLL
#endif

namespace fastdiv::cuda {
namespace {

// Row elements per thread a team is sized for: enough loads per thread to cover DRAM latency, few
// enough that a whole row's kept copy (8 elements x arrays x sizeof(T) per thread) leaves full occupancy.
constexpr int64_t kItemsPerThread = 8;
constexpr unsigned kMaxTeam = 1024;
// Small teams share a block: 128 threads keep the SM's thread limit (not its 32-block limit) binding.
constexpr unsigned kMinRowBlock = 128;
constexpr unsigned kColumnBlock = 256;
// Resident blocks the kernels are compiled for (__launch_bounds__): 32 registers per thread, so a full
// SM (2048 threads) fits in the register file, wherever that costs no spills; the fp64 kernels and
// column_stats_pullback (six pointers) would spill at 32 and are left more.
template <typename T> constexpr int kRowMinBlocks = sizeof(T) == 8 ? 1 : 2;
template <typename T> constexpr int kColumnMinBlocks = sizeof(T) == 8 ? 3 : 8;
// Inverse norms the column kernel stages in shared memory at a time.
constexpr int64_t kRowChunk = 256;
// Dynamic shared memory beyond this needs an opt-in per kernel.
constexpr size_t kDefaultSmem = 48 * 1024;
// Kept copies of rows up to this size: under the 227 KiB per block of sm_90 with room for the static
// reduction scratch. Devices with less shared memory refuse the opt-in, and the rows are re-read instead.
constexpr size_t kMaxRowCache = 224 * 1024;

template <typename A>
__device__ __forceinline__ bool is_nan(A v) {
  return v != v;
}

// row_norm of rows.cpp from the accumulated sum of squares: 1 / ||x|| above the floor, 0 at or below
// it, and a NaN norm kept as the scale so the NaN reaches every output of the row. In double, as the
// CPU does, so the floor test and the reciprocal round the same way.
__device__ __forceinline__ double inverse_of_norm(double norm, double eps) {
  return is_nan(norm) ? norm : (norm > eps ? 1.0 / norm : 0.0);
}

// inverse_norm of rows.cpp: the same from a stored norm r (acc), compared in acc.
template <typename A>
__device__ __forceinline__ A inverse_norm(A r, A eps) {
  return is_nan(r) ? r : (r > eps ? A(1) / r : A(0));
}

// Reduction of v with an associative op over each team of `team` consecutive threads (team a power of
// two, 32 <= team <= blockDim.x), returned to every thread of the team: warp butterflies, then the team's
// warp results combined in warp order, so the result never depends on scheduling. scratch holds
// blockDim.x / 32 values of shared memory. Every thread of the block must call it (teams larger than a
// warp synchronize the block).
template <typename A, typename Op>
__device__ __forceinline__ A team_reduce(A v, A* scratch, unsigned team, Op op) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  if (team == static_cast<unsigned>(kWarp)) return v;
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  const unsigned warps = team / kWarp, first = threadIdx.x / team * warps;
  A total = scratch[first];
  for (unsigned w = 1; w < warps; ++w) total = op(total, scratch[first + w]);
  __syncthreads();  // scratch is reused by the next call
  return total;
}

template <typename A>
__device__ __forceinline__ A team_sum(A v, A* scratch, unsigned team) {
  if (team == static_cast<unsigned>(kWarp)) return warp_sum(v);
  return team_reduce(v, scratch, team, Plus{});
}

// max with a NaN kept when it comes first (enough: a NaN row is NaN whatever its scale)
struct MaxOp {
  __host__ __device__ __forceinline__ double operator()(double a, double b) const { return a < b ? b : a; }
};

// The rare path of one team's row (head_math.h, "Row scaling"): its scale s from its largest |x|, ||x||,
// 1 / ||y|| of y = s x above the floor (||y|| > eps s; 0 at or below it, NaN kept) and, with grad,
// <grad, y>; all in double, every (s x)^2 at most 16. row / grad: the elements lane, lane + team, ... of
// this thread (from its kept copy or from memory). Every thread of the block must call it.
struct ScaledNorm {
  double scale, norm, inv_y, grad_dot;
};

template <typename T>
__device__ ScaledNorm scaled_team_norm(const T* row, const T* grad, int64_t d, unsigned lane, unsigned team,
                                       bool active, double eps, double* scratch) {
  constexpr bool wide = std::is_same_v<acc_t<T>, double>;
  double m = 0;
  if (active)
    for (int64_t k = lane; k < d; k += team) {
      const double a = fabs(load_as<double>(row[k]));
      m = (a > m || a != a) ? a : m;
    }
  m = team_reduce(m, scratch, team, MaxOp{});
  const double sc = heads::row_scale(m, wide);
  double ss = 0, gy = 0;
  if (active)
    for (int64_t k = lane; k < d; k += team) {
      const double y = load_as<double>(row[k]) * sc;
      ss += y * y;
      if (grad) gy += load_as<double>(grad[k]) * y;
    }
  ss = team_reduce(ss, scratch, team, Plus{});
  gy = team_reduce(gy, scratch, team, Plus{});
  const double norm_y = sqrt(ss);
  return {sc, norm_y / sc, is_nan(norm_y) ? norm_y : (norm_y > eps * sc ? 1.0 / norm_y : 0.0), gy};
}

// Where a thread of a row kernel works: its team's row (b * n + i), its position in the team, and the
// row's first element in x.
template <typename T>
struct RowSlot {
  unsigned lane;  // thread index within the team: it handles elements lane, lane + team, ...
  unsigned slot;  // team index within the block
  int64_t row;
  bool active;    // the last block may have teams past the last row
  int64_t b;      // batch element of the row (0 when inactive)
  const T* src;   // x's row (row 0 of x when inactive: never read)
};

template <typename T>
__device__ __forceinline__ RowSlot<T> row_slot(const RowsView& x, unsigned team) {
  RowSlot<T> s;
  s.lane = threadIdx.x % team;
  s.slot = threadIdx.x / team;
  s.row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / team) + s.slot;
  s.active = s.row < x.batch * x.n;
  s.b = s.active ? s.row / x.n : 0;
  s.src = static_cast<const T*>(x.data) + (s.active ? s.b * x.stride_b + (s.row - s.b * x.n) * x.stride_n : 0);
  return s;
}

// The team's kept copy of its row in dynamic shared memory: `arrays` rows of d values of V per team,
// after `skip` bytes (a multiple of sizeof(V)), or null when the launch keeps nothing. Each thread
// later re-reads only the elements it stored itself, so the copies need no barrier.
template <typename V>
__device__ __forceinline__ V* kept_rows(unsigned char* smem, bool keep, int64_t skip, unsigned slot, int arrays,
                                        int64_t d) {
  return keep ? reinterpret_cast<V*>(smem + skip) + static_cast<int64_t>(slot) * arrays * d : nullptr;
}

// ---------------------------------------------------------------------------------- normalize

template <typename T>
__global__ void __launch_bounds__(kMaxTeam, kRowMinBlocks<T>)
    normalize_kernel(RowsView x, unsigned team, bool keep, double eps, T* u) {
  using A = acc_t<T>;
  constexpr bool wide = std::is_same_v<A, double>;
  __shared__ A scratch[kMaxTeam / kWarp];
  __shared__ double scratch64[kMaxTeam / kWarp];
  FASTDIV_DYNAMIC_SMEM(smem);
  const auto s = row_slot<T>(x, team);
  const int64_t d = x.d;
  T* kept = kept_rows<T>(smem, keep, 0, s.slot, 1, d);
  A sumsq = 0;
  if (s.active) {
    FASTDIV_ROWS_UNROLL
    for (int64_t k = s.lane; k < d; k += team) {
      const T v = s.src[k];
      if (kept) kept[k] = v;
      const A a = load_as<A>(v);
      sumsq += a * a;
    }
  }
  sumsq = team_sum(sumsq, scratch, team);
  const T* again = kept ? kept : s.src;
  const bool rare = s.active && heads::square_out_of_range(static_cast<double>(sumsq), d, wide);
  double inv = inverse_of_norm(sqrt(static_cast<double>(sumsq)), eps), sc = 1.0;
  if (__syncthreads_or(rare)) {
    const ScaledNorm sn = scaled_team_norm<T>(again, nullptr, d, s.lane, team, s.active, eps, scratch64);
    if (rare) inv = sn.inv_y, sc = sn.scale;
  }
  if (!s.active) return;  // past the last barrier
  const A inv_r = static_cast<A>(inv);
  T* dst = u + s.row * d;
  if (sc == 1.0) {
    for (int64_t k = s.lane; k < d; k += team) dst[k] = store_as<T>(load_as<A>(again[k]) * inv_r);
  } else {  // u = (s x) / ||s x||: 1 / ||x|| itself may not be representable
    const A sa = static_cast<A>(sc);
    for (int64_t k = s.lane; k < d; k += team) dst[k] = store_as<T>((load_as<A>(again[k]) * sa) * inv_r);
  }
}

// dX = (G - <G, u> u) / r = (G - <G, x> x / r^2) / r: one reduction pass for ||x||^2 and <G, x>, one
// writing pass.
template <typename T>
__global__ void __launch_bounds__(kMaxTeam, kRowMinBlocks<T>)
    normalize_pullback_kernel(RowsView x, unsigned team, bool keep, const T* grad, double eps, T* dx) {
  using A = acc_t<T>;
  constexpr bool wide = std::is_same_v<A, double>;
  __shared__ A scratch[kMaxTeam / kWarp];
  __shared__ double scratch64[kMaxTeam / kWarp];
  FASTDIV_DYNAMIC_SMEM(smem);
  const auto s = row_slot<T>(x, team);
  const int64_t d = x.d;
  const T* gr = grad + (s.active ? s.row * d : 0);
  T* kept_x = kept_rows<T>(smem, keep, 0, s.slot, 2, d);
  T* kept_g = kept_x ? kept_x + d : nullptr;
  A sumsq = 0, gx = 0;
  if (s.active) {
    FASTDIV_ROWS_UNROLL
    for (int64_t k = s.lane; k < d; k += team) {
      const T xv = s.src[k], gv = gr[k];
      if (kept_x) kept_x[k] = xv, kept_g[k] = gv;
      const A a = load_as<A>(xv);
      sumsq += a * a;
      gx += load_as<A>(gv) * a;
    }
  }
  sumsq = team_sum(sumsq, scratch, team);
  gx = team_sum(gx, scratch, team);
  const T* xa = kept_x ? kept_x : s.src;
  const T* ga = kept_g ? kept_g : gr;
  double inv = inverse_of_norm(sqrt(static_cast<double>(sumsq)), eps), sc = 1.0, gxd = static_cast<double>(gx);
  // the rare path also when <G, x> overflowed (finite G and x; NaN stays NaN either way)
  const bool rare = s.active && (heads::square_out_of_range(static_cast<double>(sumsq), d, wide) || isinf(gxd));
  if (__syncthreads_or(rare)) {
    const ScaledNorm sn = scaled_team_norm<T>(xa, ga, d, s.lane, team, s.active, eps, scratch64);
    if (rare) inv = sn.inv_y, sc = sn.scale, gxd = sn.grad_dot;
  }
  if (!s.active) return;  // past the last barrier
  const A inv_r = static_cast<A>(inv);
  const A proj = static_cast<A>(gxd * inv * inv);  // <G, u> / r, times x below (with y = s x: of y)
  T* dst = dx + s.row * d;
  if (sc == 1.0) {
    for (int64_t k = s.lane; k < d; k += team)
      dst[k] = store_as<T>((load_as<A>(ga[k]) - proj * load_as<A>(xa[k])) * inv_r);
  } else {  // times s last: s / ||y|| may not be representable
    const A sa = static_cast<A>(sc);
    for (int64_t k = s.lane; k < d; k += team)
      dst[k] = store_as<T>(((load_as<A>(ga[k]) - proj * (load_as<A>(xa[k]) * sa)) * inv_r) * sa);
  }
}

// ------------------------------------------------------------------------------- column_stats

// r_i = ||x_i|| (no floor), one pass; nothing is kept (keep is always false).
template <typename T>
__global__ void __launch_bounds__(kMaxTeam, kRowMinBlocks<T>)
    row_norms_kernel(RowsView x, unsigned team, bool /*keep*/, acc_t<T>* r) {
  using A = acc_t<T>;
  constexpr bool wide = std::is_same_v<A, double>;
  __shared__ A scratch[kMaxTeam / kWarp];
  __shared__ double scratch64[kMaxTeam / kWarp];
  const auto s = row_slot<T>(x, team);
  const int64_t d = x.d;
  A sumsq = 0;
  if (s.active) {
    FASTDIV_ROWS_UNROLL
    for (int64_t k = s.lane; k < d; k += team) {
      const A a = load_as<A>(s.src[k]);
      sumsq += a * a;
    }
  }
  sumsq = team_sum(sumsq, scratch, team);
  double norm = sqrt(static_cast<double>(sumsq));
  const bool rare = s.active && heads::square_out_of_range(static_cast<double>(sumsq), d, wide);
  if (__syncthreads_or(rare)) {
    const ScaledNorm sn = scaled_team_norm<T>(s.src, nullptr, d, s.lane, team, s.active, 0.0, scratch64);
    if (rare) norm = sn.norm;
  }
  if (s.active && s.lane == 0) r[s.row] = static_cast<A>(norm);
}

// mean_d = (sum_i x_id / r_i) / n and var_d = (sum_i (x_id / r_i - mean_d)^2) / n for the columns
// d of batch element b = blockIdx.x / col_blocks, one column per thread: the sums run over i in order,
// as in column_stats_kernel of rows.cpp. 1 / r_i comes from the stored r (the CPU uses the unrounded
// double norm: for float inputs the two may differ in the last bit). A norm out of range is split as
// r = ||s x|| / s with s = row_scale(r), so that u = (s x) / ||s x|| needs no subnormal 1 / r; a row whose
// norm passed the accumulation dtype's maximum (r = Inf, elements within sqrt(D) of it) gets u = 0.
template <typename T>
__global__ void __launch_bounds__(kColumnBlock, kColumnMinBlocks<T>)
    column_moments_kernel(RowsView x, const acc_t<T>* r, double eps, int64_t col_blocks, acc_t<T>* mean,
                          acc_t<T>* var) {
  using A = acc_t<T>;
  constexpr bool wide = std::is_same_v<A, double>;
  __shared__ A inv_r[kRowChunk];
  __shared__ A row_sc[kRowChunk];
  const int64_t n = x.n, d = x.d;
  const int64_t b = blockIdx.x / col_blocks;
  const int64_t k = (blockIdx.x % col_blocks) * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const bool active = k < d;
  const T* col = static_cast<const T*>(x.data) + b * x.stride_b + (active ? k : 0);
  const A* rb = r + b * n;
  // 1 / r_i of rows [i0, i0 + len) for the whole block; every thread reaches both barriers.
  auto stage = [&](int64_t i0, int64_t len) {
    __syncthreads();  // the previous chunk's readers are done
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
      const double r = static_cast<double>(rb[i0 + j]);
      const double sc = heads::needs_scale(r, wide) ? heads::row_scale(r, wide) : 1.0;
      inv_r[j] = static_cast<A>(is_nan(r) ? r : (r > eps ? 1.0 / (r * sc) : 0.0));
      row_sc[j] = static_cast<A>(sc);
    }
    __syncthreads();
  };
  // n = 0 gives 0 * inf = NaN, as on the CPU.
  const A inv_n = A(1) / static_cast<A>(n);
  A m = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kRowChunk) {
    const int64_t len = n - i0 < kRowChunk ? n - i0 : kRowChunk;
    stage(i0, len);
    if (active)
      for (int64_t j = 0; j < len; ++j) m += (load_as<A>(col[(i0 + j) * x.stride_n]) * row_sc[j]) * inv_r[j];
  }
  m *= inv_n;
  // Two-pass variance: E[(u - m)^2] avoids the cancellation of E[u^2] - m^2. The rows come again from
  // L1/L2: this thread read them a moment ago.
  A v = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kRowChunk) {
    const int64_t len = n - i0 < kRowChunk ? n - i0 : kRowChunk;
    if (n > kRowChunk) stage(i0, len);  // a single chunk is still staged (n is the same for the block)
    if (active)
      for (int64_t j = 0; j < len; ++j) {
        const A t = (load_as<A>(col[(i0 + j) * x.stride_n]) * row_sc[j]) * inv_r[j] - m;
        v += t * t;
      }
  }
  v *= inv_n;
  if (active) {
    mean[b * d + k] = m;
    var[b * d + k] = v;
  }
}

// ---------------------------------------------------------------------- column_stats_pullback

// With G_id = dL/du_id = alpha_d + beta_d u_id (alpha_d = (g_mean_d - 2 g_var_d m_d) / n, beta_d =
// 2 g_var_d / n), dX_i = (G_i - c_i u_i) / r_i + g_r_i u_i with c_i = <G_i, u_i>: one reduction pass
// for c_i and one writing pass per row. G is formed in the first pass from the [B, D] inputs (shared
// by the n rows of a batch element, so mostly L2 hits) and kept in shared memory next to the row, so
// the writing pass reads neither X nor them again; rows too large to keep recompute G.
template <typename T>
__global__ void __launch_bounds__(kMaxTeam, 1)
    column_stats_pullback_kernel(RowsView x, unsigned team, bool keep, const acc_t<T>* r, const acc_t<T>* mean,
                                 const acc_t<T>* g_r, const acc_t<T>* g_mean, const acc_t<T>* g_var, acc_t<T> eps,
                                 T* dx) {
  using A = acc_t<T>;
  constexpr bool wide = std::is_same_v<A, double>;
  __shared__ A scratch[kMaxTeam / kWarp];
  __shared__ double scratch64[kMaxTeam / kWarp];
  FASTDIV_DYNAMIC_SMEM(smem);
  const auto s = row_slot<T>(x, team);
  const int64_t d = x.d;
  // All teams' G rows (acc), then all teams' x rows: every row starts aligned for its type.
  A* kept_g = kept_rows<A>(smem, keep, 0, s.slot, 1, d);
  T* kept_x = kept_rows<T>(smem, keep, static_cast<int64_t>(blockDim.x / team) * d * sizeof(A), s.slot, 1, d);
  const A inv_n = A(1) / static_cast<A>(x.n);
  A inv_r = s.active ? inverse_norm(r[s.row], eps) : A(0);  // 0 below the floor: the row gets 0
  // A stored norm out of range (1 / r not a normal number, or r = Inf for a finite row past the dtype's
  // maximum) is taken again from the row, scaled: u = (s x) inv_r with inv_r = 1 / ||s x|| (rows.cpp).
  A sc = A(1);
  const double rd = s.active ? static_cast<double>(r[s.row]) : 1.0;
  const bool rare = s.active && heads::square_out_of_range(rd * rd, 1, wide);
  if (__syncthreads_or(rare)) {
    const ScaledNorm sn = scaled_team_norm<T>(s.src, nullptr, d, s.lane, team, s.active,
                                              static_cast<double>(eps), scratch64);
    if (rare) inv_r = static_cast<A>(sn.inv_y), sc = static_cast<A>(sn.scale);
  }
  const bool scaled = sc != A(1);
  const int64_t col0 = s.b * d;
  // G_id for column k of this row, in the CPU's order of operations (column_coefficients in rows.cpp).
  auto grad_u = [&](int64_t k, A a) {
    A alpha = g_mean ? g_mean[col0 + k] * inv_n : A(0), beta = A(0);
    if (g_var) {
      beta = A(2) * g_var[col0 + k] * inv_n;
      alpha -= beta * mean[col0 + k];
    }
    return scaled ? alpha + beta * ((a * sc) * inv_r) : alpha + beta * a * inv_r;
  };
  A c = 0;
  if (s.active) {
    FASTDIV_ROWS_UNROLL
    for (int64_t k = s.lane; k < d; k += team) {
      const T v = s.src[k];
      const A a = load_as<A>(v), g = grad_u(k, a);
      if (kept_x) kept_x[k] = v, kept_g[k] = g;
      c += scaled ? g * ((a * sc) * inv_r) : g * a;  // scaled: c = <G, u> directly
    }
  }
  c = team_sum(c, scratch, team);
  if (!s.active) return;  // past the last barrier
  const A gr = g_r ? g_r[s.row] : A(0);
  T* dst = dx + s.row * d;
  if (scaled) {  // (G - c u) / r + g_r u with 1 / r = s inv_r applied last
    for (int64_t k = s.lane; k < d; k += team) {
      const A a = load_as<A>(kept_x ? kept_x[k] : s.src[k]);
      const A u = (a * sc) * inv_r, g = kept_x ? kept_g[k] : grad_u(k, a);
      dst[k] = store_as<T>(((g - c * u) * inv_r) * sc + gr * u);
    }
    return;
  }
  // (G - c u) / r + g_r u with u = x / r; the x terms share one coefficient.
  const A cu = static_cast<A>(static_cast<double>(c) * static_cast<double>(inv_r)) * inv_r;
  const A x_coef = (gr - cu) * inv_r;
  if (kept_x) {
    for (int64_t k = s.lane; k < d; k += team)
      dst[k] = store_as<T>(kept_g[k] * inv_r + x_coef * load_as<A>(kept_x[k]));
  } else {
    for (int64_t k = s.lane; k < d; k += team) {
      const A a = load_as<A>(s.src[k]);
      dst[k] = store_as<T>(grad_u(k, a) * inv_r + x_coef * a);
    }
  }
}

// ------------------------------------------------------------------------------------ launches

// Launch shape of a row kernel over `rows` rows of d elements, keeping kept_bytes per element of a row
// (0: nothing) in shared memory when the block's rows fit.
struct RowLaunch {
  unsigned team, threads;
  int64_t blocks;
  size_t smem;
  bool keep;
};

inline RowLaunch plan_rows(int64_t rows, int64_t d, size_t kept_bytes) {
  unsigned team = kWarp;
  while (team < kMaxTeam && team * kItemsPerThread < d) team *= 2;
  // Teams per block: enough for kMinRowBlock threads, no more than there are rows.
  int64_t per_block = team >= kMinRowBlock ? 1 : kMinRowBlock / team;
  if (per_block > rows) per_block = rows;
  RowLaunch p{team, static_cast<unsigned>(per_block) * team, ceil_div(rows, per_block), 0, false};
  const size_t bytes = static_cast<size_t>(per_block * d) * kept_bytes;
  if (kept_bytes > 0 && bytes <= kMaxRowCache) {
    p.smem = bytes;
    p.keep = true;
  }
  return p;
}

// Opts the kernel in to p.smem bytes of dynamic shared memory where that exceeds the default; a device
// that cannot give that much gets a launch that re-reads its rows instead of keeping them.
template <typename Kernel>
void allow_smem(Kernel kernel, RowLaunch& p) {
  (void)kernel;  // unused where FASTDIV_SET_MAX_DYNAMIC_SMEM is emulated
  if (p.keep && p.smem > kDefaultSmem && FASTDIV_SET_MAX_DYNAMIC_SMEM(kernel, p.smem) != cudaSuccess) {
    (void)FASTDIV_LAST_ERROR();  // clear the refused opt-in so it is not reported as a launch failure
    p.keep = false;
    p.smem = 0;
  }
}

// grid.x holds up to 2^31 - 1 blocks.
inline bool grid_fits(int64_t blocks) { return blocks <= int64_t{0x7fffffff}; }

// Plans a row kernel over x's rows, keeping kept_bytes per element of a row where they fit, and launches
// kernel(x, team, keep, args...).
template <typename Kernel, typename... Args>
cudaError_t launch_rows(Kernel kernel, const RowsView& x, size_t kept_bytes, cudaStream_t stream, Args... args) {
  RowLaunch p = plan_rows(x.batch * x.n, x.d, kept_bytes);
  if (!grid_fits(p.blocks)) return cudaErrorInvalidConfiguration;
  allow_smem(kernel, p);
  FASTDIV_LAUNCH(kernel, dim3(static_cast<unsigned>(p.blocks)), dim3(p.threads), p.smem, stream, x, p.team, p.keep,
                 args...);
  return FASTDIV_LAST_ERROR();
}

template <typename T>
cudaError_t launch_normalize(const RowsView& x, double eps, T* u, cudaStream_t stream) {
  return launch_rows(normalize_kernel<T>, x, sizeof(T), stream, eps, u);
}

template <typename T>
cudaError_t launch_normalize_pullback(const RowsView& x, const T* grad, double eps, T* dx, cudaStream_t stream) {
  return launch_rows(normalize_pullback_kernel<T>, x, 2 * sizeof(T), stream, grad, eps, dx);
}

template <typename T>
cudaError_t launch_column_stats(const RowsView& x, double eps, acc_t<T>* r, acc_t<T>* mean, acc_t<T>* var,
                                cudaStream_t stream) {
  if (x.n > 0) {  // D = 0 still has norms (0)
    const cudaError_t err = launch_rows(row_norms_kernel<T>, x, 0, stream, r);
    if (err != cudaSuccess) return err;
  }
  if (x.d > 0) {  // n = 0 still has (NaN) columns
    // Up to kColumnBlock columns per block, spread evenly over the blocks of a batch element.
    const int64_t col_blocks = ceil_div(x.d, kColumnBlock);
    const auto threads = static_cast<unsigned>(ceil_div(ceil_div(x.d, col_blocks), kWarp) * kWarp);
    if (!grid_fits(x.batch * col_blocks)) return cudaErrorInvalidConfiguration;
    FASTDIV_LAUNCH(column_moments_kernel<T>, dim3(static_cast<unsigned>(x.batch * col_blocks)), dim3(threads), 0,
                   stream, x, r, eps, col_blocks, mean, var);
    return FASTDIV_LAST_ERROR();
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_column_stats_pullback(const RowsView& x, const acc_t<T>* r, const acc_t<T>* mean,
                                         const acc_t<T>* g_r, const acc_t<T>* g_mean, const acc_t<T>* g_var,
                                         double eps, T* dx, cudaStream_t stream) {
  return launch_rows(column_stats_pullback_kernel<T>, x, sizeof(T) + sizeof(acc_t<T>), stream, r, mean, g_r, g_mean,
                     g_var, static_cast<acc_t<T>>(eps), dx);
}

}  // namespace

cudaError_t normalize(const RowsView& x, double eps, void* u, cudaStream_t stream) {
  if (x.batch == 0 || x.n == 0 || x.d == 0) return cudaSuccess;
  return FASTDIV_CUDA_DISPATCH(x.dtype, [&] {
    return launch_normalize<scalar_t>(x, eps, static_cast<scalar_t*>(u), stream);
  });
}

cudaError_t normalize_pullback(const RowsView& x, const void* grad, double eps, void* dx, cudaStream_t stream) {
  if (x.batch == 0 || x.n == 0 || x.d == 0) return cudaSuccess;
  return FASTDIV_CUDA_DISPATCH(x.dtype, [&] {
    return launch_normalize_pullback<scalar_t>(x, static_cast<const scalar_t*>(grad), eps,
                                               static_cast<scalar_t*>(dx), stream);
  });
}

cudaError_t column_stats(const RowsView& x, double eps, void* r, void* mean, void* var, cudaStream_t stream) {
  if (x.batch == 0 || (x.n == 0 && x.d == 0)) return cudaSuccess;
  return FASTDIV_CUDA_DISPATCH(x.dtype, [&] {
    using A = acc_t<scalar_t>;
    return launch_column_stats<scalar_t>(x, eps, static_cast<A*>(r), static_cast<A*>(mean), static_cast<A*>(var),
                                         stream);
  });
}

cudaError_t column_stats_pullback(const RowsView& x, const void* r, const void* mean, const void* grad_r,
                                  const void* grad_mean, const void* grad_var, double eps, void* dx,
                                  cudaStream_t stream) {
  if (x.batch == 0 || x.n == 0 || x.d == 0) return cudaSuccess;
  return FASTDIV_CUDA_DISPATCH(x.dtype, [&] {
    using A = acc_t<scalar_t>;
    return launch_column_stats_pullback<scalar_t>(
        x, static_cast<const A*>(r), static_cast<const A*>(mean), static_cast<const A*>(grad_r),
        static_cast<const A*>(grad_mean), static_cast<const A*>(grad_var), eps, static_cast<scalar_t*>(dx),
        stream);
  });
}

}  // namespace fastdiv::cuda
