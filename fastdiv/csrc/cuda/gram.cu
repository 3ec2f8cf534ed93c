// Gram-family CUDA kernels: the raw Gram, the fused per-input losses and statistics, and the pullback
// dX = scale (A X + beta ⊙ sign(X)) (docs/design.md §2.3).
//
// Longer than the ~500 lines a file of fastdiv aims at, on purpose: the tile loop, the epilogue and the
// kernels that launch them share the block layout, the shared-memory plan and the launch bounds below,
// and are only correct together; split, each part would have to restate the others' constants.
//
// Gram. The n rows of an input are cut into blocks of kRowBlock = 8; one thread block computes all
// 8 x 8 products of a pair of row blocks per "group" of threads, each lane holding the 64 partial dot
// products (plus 8 row l1 norms on the diagonal) in registers while it strides over the columns of a
// tile of X staged in shared memory. A tile column therefore costs 16 shared loads for 64 FMAs, and X
// is read from memory exactly once. For n <= kMaxFusedSamples (= 32 rows, 4 row blocks, 10 pairs) a
// single thread block owns the whole input; beyond that the rows are cut into "super blocks" of 32
// and every pair of super blocks is a thread block of its own.
//
// Fused losses (n <= 32, one launch): after the Gram, the same block re-reads the input once more for
// the column resultant ||sum_i u_i||^2 when the head needs it (R_kappa, Omega_M, the statistics; the
// slab is then still in L2), and one thread runs the n x n head of fastdiv/csrc/head_math.h in double on the
// Gram held in shared memory: the code, and so the results, of the CPU kernels. Larger n take two
// launches per chunk of inputs: the Gram into a double workspace, then one block per input for the
// resultant and the head.
//
// Row scaling (fastdiv/csrc/head_math.h): when a diagonal entry of an input's Gram is out of range (its
// squares over- or underflowed), the epilogue's block reads the rows again for their maxima and, where a
// row needs a scale, accumulates the whole Gram again in double from the scaled rows (a slow path, one
// thread per entry: only inputs with such rows take it). The head then gets the scales, its A
// is A'_ij s_j and the scales go out as gram_loss's row_scale, which the pullback multiplies its rows by.
//
// Determinism: no atomics; every sum is taken in a fixed order (per-lane column order, then lanes in
// thread order, or the fixed butterflies of block_reduce), so the same input gives the same bits.
#include <math.h>

#include "cuda/device.cuh"
#include "cuda/gram.h"

namespace fastdiv::cuda {
namespace {

constexpr int kRowBlock = 8;        // rows of a register block
constexpr int kSuper = 32;          // rows of a super block (the rows one thread block stages)
constexpr int kTileBytes = 16384;   // shared-memory tile of X per thread block
constexpr int kPairWarps = 8;       // warps per fused block when there are few block pairs
constexpr int kWideThreads = 512;   // threads of a super-pair block (n > 32): up to 16 block pairs
constexpr int kMaxFusedThreads = 320;  // fused_threads(32): 10 block pairs, one warp each
// (The launch bounds cap registers so that a block of these sizes always fits an SM's 64K registers;
// the fp64 instantiations spill a little for it.)
constexpr int kHeadThreads = 256;   // epilogue blocks of the two-launch path
constexpr int kPullbackThreads = 256;
constexpr int kPullbackJ = 64;      // columns of A staged per round of the pullback
constexpr int64_t kChunkBytes = int64_t{256} << 20;  // workspace cap of the two-launch path

struct Max {
  template <typename A>
  __host__ __device__ __forceinline__ A operator()(A a, A b) const { return a < b ? b : a; }
};

__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t max64(int64_t a, int64_t b) { return a < b ? b : a; }

// Pairs (I >= J) of the `blocks` row blocks of one super block, numbered row by row: 0 = (0,0),
// 1 = (1,0), 2 = (1,1), 3 = (2,0), ...
__host__ __device__ inline int triangle_pairs(int blocks) { return blocks * (blocks + 1) / 2; }
__host__ __device__ inline void triangle_pair(int index, int* I, int* J) {
  int i = 0;
  while (index > i) index -= ++i;
  *I = i;
  *J = index;
}

// Columns per shared tile for `rows` staged rows of type A: the tile fills kTileBytes, a multiple of 32.
inline int tile_columns(int64_t rows, size_t acc_bytes) {
  const int64_t k = kTileBytes / (rows * static_cast<int64_t>(acc_bytes));
  return static_cast<int>(max64(kWarp, k / kWarp * kWarp));
}

// Threads of the block that owns a whole input of n <= 32 rows: one group per row-block pair, with
// more than one warp per group while there are fewer than kPairWarps pairs.
inline int fused_threads(int64_t n) {
  const int pairs = triangle_pairs(static_cast<int>(ceil_div(n, kRowBlock)));
  const int warps_per_pair = pairs >= kPairWarps ? 1 : kPairWarps / pairs;
  return kWarp * pairs * warps_per_pair;
}

// Where the Gram of a super pair goes: entries (i, j) and, as S is symmetric, (j, i); row l1 norms.
template <typename O>
struct GramSink {
  O* s;         // n x n of the input
  O* l1;        // n, or null
  int64_t n;
  __device__ void entry(int64_t i, int64_t j, double v) const {
    s[i * n + j] = static_cast<O>(v);
    s[j * n + i] = static_cast<O>(v);
  }
  __device__ void row_l1(int64_t i, double v) const {
    if (l1) l1[i] = static_cast<O>(v);
  }
};

// Gram entries of rows [32 P, 32 P + 32) x [32 Q, 32 Q + 32) (P >= Q) of one input, and the row l1
// norms of super block P when with_l1 and P == Q. Called by every thread of the block. scratch holds
// max(staged rows * tk, 8 * blockDim.x) values of A; it is free again when this returns.
template <typename T, typename A, typename Sink>
__device__ void super_pair_gram(const T* xb, int64_t stride_n, int64_t n, int64_t d, int64_t P, int64_t Q,
                                bool with_l1, int tk, A* scratch, const Sink& sink) {
  const int64_t p0 = P * kSuper, q0 = Q * kSuper;
  const int rows_p = static_cast<int>(min64(kSuper, n - p0)), rows_q = static_cast<int>(min64(kSuper, n - q0));
  const bool diagonal = P == Q;
  const int nb_p = (rows_p + kRowBlock - 1) / kRowBlock, nb_q = (rows_q + kRowBlock - 1) / kRowBlock;
  const int staged_p = nb_p * kRowBlock;  // tile rows of super block P (padded with zeros)
  const int staged = diagonal ? staged_p : staged_p + nb_q * kRowBlock;
  const int pairs = diagonal ? triangle_pairs(nb_p) : nb_p * nb_q;

  const int threads = static_cast<int>(blockDim.x), warps = threads / kWarp;
  const int warps_per_pair = warps >= pairs ? warps / pairs : 1;
  const int group_size = kWarp * warps_per_pair;
  const int group = static_cast<int>(threadIdx.x) / group_size, lane = static_cast<int>(threadIdx.x) % group_size;
  const bool active = group < pairs;
  int I = 0, J = 0;
  if (active) {
    if (diagonal) {
      triangle_pair(group, &I, &J);
    } else {
      I = group / nb_q;
      J = group % nb_q;
    }
  }
  const int ti = I * kRowBlock, tj = diagonal ? J * kRowBlock : staged_p + J * kRowBlock;
  const bool l1_here = with_l1 && diagonal && I == J;

  A acc[kRowBlock][kRowBlock];
  A l1[kRowBlock];
#pragma unroll
  for (int r = 0; r < kRowBlock; ++r) {
    l1[r] = A(0);
#pragma unroll
    for (int c = 0; c < kRowBlock; ++c) acc[r][c] = A(0);
  }

  A* tile = scratch;
  for (int64_t d0 = 0; d0 < d; d0 += tk) {
    const int len = static_cast<int>(min64(tk, d - d0));
    // Stage the tile, coalesced along D; rows past the input and columns past D are zeros.
    for (int idx = static_cast<int>(threadIdx.x); idx < staged * tk; idx += threads) {
      const int r = idx / tk, k = idx % tk;
      const bool in_p = r < staged_p;
      const int local = in_p ? r : r - staged_p;
      const bool valid = k < len && local < (in_p ? rows_p : rows_q);
      const int64_t row = (in_p ? p0 : q0) + local;
      tile[idx] = valid ? load_as<A>(xb[row * stride_n + d0 + k]) : A(0);
    }
    __syncthreads();
    if (active) {
      for (int k = lane; k < len; k += group_size) {
        A xi[kRowBlock], xj[kRowBlock];
#pragma unroll
        for (int r = 0; r < kRowBlock; ++r) {
          xi[r] = tile[(ti + r) * tk + k];
          xj[r] = tile[(tj + r) * tk + k];
        }
#pragma unroll
        for (int r = 0; r < kRowBlock; ++r)
#pragma unroll
          for (int c = 0; c < kRowBlock; ++c) acc[r][c] += xi[r] * xj[c];
        if (l1_here)
#pragma unroll
          for (int r = 0; r < kRowBlock; ++r) l1[r] += xi[r] < A(0) ? -xi[r] : xi[r];
      }
    }
    __syncthreads();
  }

  // Sum the lanes of every group, one accumulator row at a time (round kRowBlock: the l1 norms): each
  // thread posts its 8 values, then one thread per (group, column) adds the group's lanes in order.
  A* posted = scratch;  // [8][threads]: column-major, so the posts of a warp hit 32 banks
  const int rounds = with_l1 && diagonal ? kRowBlock + 1 : kRowBlock;
  for (int round = 0; round < rounds; ++round) {
#pragma unroll
    for (int c = 0; c < kRowBlock; ++c) {
      A v = A(0);
#pragma unroll
      for (int r = 0; r < kRowBlock; ++r)
        if (r == round) v = acc[r][c];  // static register indexing: round is not a compile-time value
      posted[c * threads + threadIdx.x] = round == kRowBlock ? l1[c] : v;
    }
    __syncthreads();
    for (int o = static_cast<int>(threadIdx.x); o < pairs * kRowBlock; o += threads) {
      const int g = o / kRowBlock, c = o % kRowBlock;
      double total = 0;
      {
        A sum = A(0);
        for (int t = g * group_size; t < (g + 1) * group_size; ++t) sum += posted[c * threads + t];
        total = static_cast<double>(sum);
      }
      int gi = 0, gj = 0;
      if (diagonal) {
        triangle_pair(g, &gi, &gj);
      } else {
        gi = g / nb_q;
        gj = g % nb_q;
      }
      if (round == kRowBlock) {  // l1 norms of rows gi * 8 + c, from the groups on the diagonal
        if (gi == gj && gi * kRowBlock + c < rows_p) sink.row_l1(p0 + gi * kRowBlock + c, total);
        continue;
      }
      const int li = gi * kRowBlock + round, lj = gj * kRowBlock + c;
      if (li < rows_p && lj < (diagonal ? rows_p : rows_q)) sink.entry(p0 + li, (diagonal ? p0 : q0) + lj, total);
    }
    __syncthreads();
  }
}

// ||sum_i u_i||^2 with u_i = x_i inv_r_i, the column sums m accumulated in double (as the CPU kernels)
// and, when lq is given, ||m / n||_q (q = inf: the max norm; NaN if any |m_k / n| is NaN). Called by
// every thread of the block; scratch: blockDim.x / 32 + 1 doubles. Results valid in every thread.
template <typename T>
__device__ double column_resultant(const T* xb, int64_t stride_n, int64_t n, int64_t d, const double* inv_r,
                                   double q, double* lq, double* scratch) {
  const double inv_n = 1.0 / static_cast<double>(n);
  const bool q_inf = isinf(q);
  double sq = 0, acc_q = 0, nan = 0;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    double m = 0;
    for (int64_t i = 0; i < n; ++i) m += load_as<double>(xb[i * stride_n + k]) * inv_r[i];
    sq += m * m;
    if (lq) {
      const double a = fabs(m * inv_n);
      if (a != a) nan = 1;
      acc_q = q_inf ? (a > acc_q ? a : acc_q) : acc_q + pow(a, q);
    }
  }
  sq = block_sum(sq, scratch);
  if (lq) {
    acc_q = q_inf ? block_reduce(acc_q, scratch, Max{}) : block_sum(acc_q, scratch);
    nan = block_reduce(nan, scratch, Max{});
    *lq = nan != 0 ? heads::detail::quiet_nan() : (q_inf ? acc_q : pow(acc_q, 1.0 / q));
  }
  return sq;
}

// What the epilogue of an input computes: a head's loss and coefficients, or the statistics.
struct HeadJob {
  bool stats;          // concentration_stats instead of a loss
  heads::Head head;    // the loss's head
  heads::Params prm;
  double q;            // l_q of the statistics
};

// Double-precision arrays of one input's epilogue, in shared memory (fused) or in the workspace.
struct HeadArrays {
  double *S, *l1, *A, *beta, *work, *inv_r, *scale, *scalars;  // scalars: loss / resultant / rho_q / flag
  static __host__ __device__ int64_t doubles(int64_t n) { return 6 * n * n + 8 * n + 4; }
  static __host__ __device__ HeadArrays at(double* base, int64_t n) {
    HeadArrays h;
    h.S = base;
    h.l1 = h.S + n * n;
    h.A = h.l1 + n;
    h.beta = h.A + n * n;
    h.work = h.beta + n;
    h.inv_r = h.work + heads::workspace(n);
    h.scale = h.inv_r + n;
    h.scalars = h.scale + n;
    return h;
  }
};

// Row scaling of one input whose raw Gram (and l1 norms) are in h: all scales 1 unless a diagonal entry
// is suspect and a row's maximum then says it needs a scale; then every row is scaled, and the Gram (the diagonal
// only with diagonal_only, the rest 0 as the CPU's diagonal-only Gram) and the l1 norms are accumulated
// again, in double, from the scaled rows. The rare path: one thread per row maximum and per Gram entry
// (each a plain loop over D, in a fixed order), no reductions. Called by every thread of the block.
template <typename T>
__device__ void scale_rows(const T* xb, int64_t stride_n, int64_t n, int64_t d, bool diagonal_only,
                           const HeadArrays& h) {
  constexpr bool wide = std::is_same_v<acc_t<T>, double>;
  if (threadIdx.x == 0) {
    bool suspect = false;
    for (int64_t i = 0; i < n; ++i) suspect = suspect || heads::square_out_of_range(h.S[i * n + i], d, wide);
    h.scalars[3] = suspect ? 1.0 : 0.0;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) h.scale[i] = 1.0;
  __syncthreads();
  if (h.scalars[3] == 0.0) return;  // the same shared value in every thread: the whole block returns
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {  // the maxima, until the scales are needed
    double m = 0;
    for (int64_t k = 0; k < d; ++k) {
      const double v = fabs(load_as<double>(xb[i * stride_n + k]));
      m = (v > m || v != v) ? v : m;  // a NaN sticks
    }
    h.scale[i] = m;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    bool any = false;
    for (int64_t i = 0; i < n; ++i) any = any || heads::needs_scale(h.scale[i], wide);
    for (int64_t i = 0; i < n; ++i) h.scale[i] = any ? heads::row_scale(h.scale[i], wide) : 1.0;
    h.scalars[3] = any ? 1.0 : 0.0;
  }
  __syncthreads();
  if (h.scalars[3] == 0.0) return;
  for (int64_t p = threadIdx.x; p < n * (n + 1) / 2; p += blockDim.x) {
    int64_t i = 0, j = p;  // the p-th pair (i >= j), row by row
    while (j > i) j -= ++i;
    const T* xi = xb + i * stride_n;
    const T* xj = xb + j * stride_n;
    const double si = h.scale[i], sj = h.scale[j];
    double acc = 0;
    if (!diagonal_only || i == j)
      for (int64_t k = 0; k < d; ++k) acc += (load_as<double>(xi[k]) * si) * (load_as<double>(xj[k]) * sj);
    h.S[i * n + j] = h.S[j * n + i] = acc;
    if (diagonal_only && i == j) {  // Omega_S: the l1 norms too
      double l1 = 0;
      for (int64_t k = 0; k < d; ++k) l1 += fabs(load_as<double>(xi[k]) * si);
      h.l1[i] = l1;
    }
  }
  __syncthreads();
}

// Everything after the Gram, for one input whose raw Gram (and l1 norms) are in h: the row scaling,
// the resultant pass, the head on thread 0, and the outputs written by the whole block. reduce_scratch:
// blockDim.x / 32 + 1 doubles of shared memory.
template <typename T>
__device__ void head_epilogue(const T* xb, int64_t stride_n, int64_t n, int64_t d, const HeadJob& job,
                              const HeadArrays& h, double* reduce_scratch, acc_t<T>* loss, acc_t<T>* a,
                              acc_t<T>* beta, acc_t<T>* row_scale, acc_t<T>* stats) {
  using A = acc_t<T>;
  scale_rows(xb, stride_n, n, d, !job.stats && job.head == heads::Head::kSparsity, h);
  const bool with_resultant = job.stats || heads::needs_resultant(job.head);
  if (with_resultant) {
    if (threadIdx.x == 0) {  // the column sums weigh the unscaled rows by 1 / ||x_i|| = s_i / ||y_i||
      heads::inverse_norms(h.S, n, job.prm.eps, h.scale, h.inv_r);
      for (int64_t i = 0; i < n; ++i) h.inv_r[i] *= h.scale[i];
    }
    __syncthreads();
    double rho_q = 0;
    const double resultant =
        column_resultant(xb, stride_n, n, d, h.inv_r, job.q, job.stats ? &rho_q : nullptr, reduce_scratch);
    if (threadIdx.x == 0) {
      h.scalars[1] = resultant;
      h.scalars[2] = rho_q;
    }
  }
  if (threadIdx.x == 0) {
    const double resultant = with_resultant ? h.scalars[1] : 0.0;
    if (job.stats) {
      double out[5];
      heads::gram_statistics(h.S, resultant, n, d, job.prm, h.scale, out, h.work);
      const double row[6] = {out[0], h.scalars[2], out[1], out[2], out[3], out[4]};
      for (int k = 0; k < 6; ++k) stats[k] = static_cast<A>(row[k]);
    } else {
      h.scalars[0] =
          heads::head_forward(job.head, h.S, h.l1, resultant, n, d, job.prm, h.scale, h.A, h.beta, h.work);
      *loss = static_cast<A>(h.scalars[0]);
    }
  }
  __syncthreads();
  if (job.stats) return;
  for (int64_t i = threadIdx.x; i < n * n; i += blockDim.x) a[i] = static_cast<A>(h.A[i]);
  if (beta)
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) beta[i] = static_cast<A>(h.beta[i]);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) row_scale[i] = static_cast<A>(h.scale[i]);
}

// Shared-memory layout of a block that stages a tile and reduces into it (scratch), then holds an
// input's head arrays (fused kernel only), then the block_reduce scratch.
struct FusedLayout {
  size_t scratch_bytes, head_offset, reduce_offset, total;
  static FusedLayout of(int64_t staged_rows, int tk, int threads, size_t acc_bytes, int64_t head_n) {
    FusedLayout l;
    const size_t tile = static_cast<size_t>(staged_rows) * tk * acc_bytes;
    const size_t posted = static_cast<size_t>(kRowBlock) * threads * acc_bytes;
    l.scratch_bytes = (tile > posted ? tile : posted);
    l.scratch_bytes = (l.scratch_bytes + 15) / 16 * 16;
    l.head_offset = l.scratch_bytes;
    l.reduce_offset = l.head_offset + static_cast<size_t>(HeadArrays::doubles(head_n)) * sizeof(double);
    l.total = l.reduce_offset + static_cast<size_t>(threads / kWarp + 1) * sizeof(double);
    return l;
  }
};

// ---------------------------------------------------------------------------------------- kernels

// One block per input (n <= 32): Gram, resultant and head; grid.x = B.
template <typename T>
__global__ void __launch_bounds__(kMaxFusedThreads)
fused_gram_head_kernel(const T* x, int64_t stride_b, int64_t stride_n, int64_t n, int64_t d,
                                       HeadJob job, int tk, size_t head_offset, size_t reduce_offset,
                                       acc_t<T>* loss, acc_t<T>* a, acc_t<T>* beta, acc_t<T>* row_scale,
                                       acc_t<T>* stats) {
  using A = acc_t<T>;
  FASTDIV_DYNAMIC_SMEM(smem);
  const int64_t b = blockIdx.x;
  const T* xb = x + b * stride_b;
  const HeadArrays h = HeadArrays::at(reinterpret_cast<double*>(smem + head_offset), n);
  double* reduce_scratch = reinterpret_cast<double*>(smem + reduce_offset);
  const bool with_l1 = !job.stats && job.head == heads::Head::kSparsity;
  super_pair_gram(xb, stride_n, n, d, 0, 0, with_l1, tk, reinterpret_cast<A*>(smem),
                  GramSink<double>{h.S, with_l1 ? h.l1 : nullptr, n});
  head_epilogue(xb, stride_n, n, d, job, h, reduce_scratch, loss ? loss + b : nullptr, a ? a + b * n * n : nullptr,
                beta ? beta + b * n : nullptr, row_scale ? row_scale + b * n : nullptr,
                stats ? stats + b * 6 : nullptr);
}

// The Gram of super pair blockIdx.y of input blockIdx.x into the n x n matrix at s + b * pitch (and the
// row l1 norms at l1 + b * pitch). O: the acc type for the raw Gram (pitches n^2 and n), double for the
// per-input slots of the two-launch path's workspace.
template <typename T, typename O>
__global__ void __launch_bounds__(kWideThreads)
gram_kernel(const T* x, int64_t stride_b, int64_t stride_n, int64_t n, int64_t d, int tk, O* s,
                            int64_t s_pitch, O* l1, int64_t l1_pitch) {
  using A = acc_t<T>;
  FASTDIV_DYNAMIC_SMEM(smem);
  const int64_t b = blockIdx.x;
  int P = 0, Q = 0;
  triangle_pair(static_cast<int>(blockIdx.y), &P, &Q);
  super_pair_gram(x + b * stride_b, stride_n, n, d, P, Q, l1 != nullptr, tk, reinterpret_cast<A*>(smem),
                  GramSink<O>{s + b * s_pitch, l1 ? l1 + b * l1_pitch : nullptr, n});
}

// The epilogue of the two-launch path: one block per input of the chunk, its arrays in the workspace.
template <typename T>
__global__ void __launch_bounds__(kHeadThreads)
head_kernel(const T* x, int64_t stride_b, int64_t stride_n, int64_t n, int64_t d, HeadJob job,
                            double* workspace, acc_t<T>* loss, acc_t<T>* a, acc_t<T>* beta, acc_t<T>* row_scale,
                            acc_t<T>* stats) {
  __shared__ double reduce_scratch[kHeadThreads / kWarp + 1];
  const int64_t b = blockIdx.x;
  const HeadArrays h = HeadArrays::at(workspace + b * HeadArrays::doubles(n), n);
  head_epilogue(x + b * stride_b, stride_n, n, d, job, h, reduce_scratch, loss ? loss + b : nullptr,
                a ? a + b * n * n : nullptr, beta ? beta + b * n : nullptr,
                row_scale ? row_scale + b * n : nullptr, stats ? stats + b * 6 : nullptr);
}

// dX = scale (A X + beta ⊙ sign(X)): one thread per column of one input (grid.x = B * column blocks),
// the output rows in register chunks of CH. The block stages the scaled coefficients of a chunk, kJ
// columns of A at a time, in shared memory transposed ([j][c]), so every FMA reads its coefficient at a
// fixed offset from one base register (indexing A in global memory by row cost ~250 registers). Row i
// of the result is multiplied by row_scale[b, i] (null: 1), gram_loss's scale of that row.
template <typename T, int CH>
__global__ void __launch_bounds__(kPullbackThreads)
pullback_kernel(const T* x, int64_t stride_b, int64_t stride_n, int64_t n, int64_t d, int64_t column_blocks,
                const acc_t<T>* a, const acc_t<T>* beta, const acc_t<T>* scale, int64_t scale_stride,
                const acc_t<T>* row_scale, T* dx) {
  using A = acc_t<T>;
  __shared__ A coef[kPullbackJ * CH];
  __shared__ A beta_chunk[CH];
  __shared__ A rows_scale[CH];
  const int64_t b = blockIdx.x / column_blocks;
  const int64_t k = (blockIdx.x % column_blocks) * blockDim.x + threadIdx.x;
  const bool active = k < d;  // no early return: every thread takes part in the staging barriers
  const T* xb = x + b * stride_b + (active ? k : 0);
  const A* ab = a + b * n * n;
  const A s = scale ? scale[b * scale_stride] : A(1);
  T* out = dx + b * n * d + k;
  for (int64_t i0 = 0; i0 < n; i0 += CH) {
    const int rows = static_cast<int>(min64(CH, n - i0));
    if (threadIdx.x < CH) {
      const int c = static_cast<int>(threadIdx.x);
      beta_chunk[c] = (beta && c < rows) ? s * beta[b * n + i0 + c] : A(0);
      rows_scale[c] = (row_scale && c < rows) ? row_scale[b * n + i0 + c] : A(1);
    }
    __syncthreads();
    A acc[CH];
#pragma unroll
    for (int c = 0; c < CH; ++c)
      acc[c] = (beta && c < rows) ? beta_chunk[c] * sign_of(load_as<A>(xb[(i0 + c) * stride_n])) : A(0);
    for (int64_t j0 = 0; j0 < n; j0 += kPullbackJ) {
      const int cols = static_cast<int>(min64(kPullbackJ, n - j0));
      __syncthreads();  // the previous coefficients are consumed
      for (int e = static_cast<int>(threadIdx.x); e < kPullbackJ * CH; e += blockDim.x) {
        const int j = e / CH, c = e % CH;
        coef[e] = (c < rows && j < cols) ? s * ab[(i0 + c) * n + j0 + j] : A(0);
      }
      __syncthreads();
      if (active) {
        for (int j = 0; j < cols; ++j) {
          const A xj = load_as<A>(xb[(j0 + j) * stride_n]);
          const A* cj = coef + j * CH;
#pragma unroll
          for (int c = 0; c < CH; ++c) acc[c] += cj[c] * xj;
        }
      }
    }
    if (active)
#pragma unroll
      for (int c = 0; c < CH; ++c)
        if (c < rows) out[(i0 + c) * d] = store_as<T>(acc[c] * rows_scale[c]);
    __syncthreads();  // beta_chunk and rows_scale are rewritten by the next chunk
  }
}

// ---------------------------------------------------------------------------------------- launchers

template <typename T>
const T* rows_of(const RowsView& x) {
  return static_cast<const T*>(x.data);
}

template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
  return bytes > 48 * 1024 ? FASTDIV_SET_MAX_DYNAMIC_SMEM(kernel, bytes) : cudaSuccess;
}

// Launches gram_kernel for inputs [b0, b0 + count) into s / l1 (pitched, indexed from b0).
template <typename T, typename O>
cudaError_t launch_gram(const RowsView& x, int64_t b0, int64_t count, O* s, int64_t s_pitch, O* l1,
                        int64_t l1_pitch, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t n = x.n;
  const int64_t supers = ceil_div(n, kSuper);
  const int64_t super_pairs = supers * (supers + 1) / 2;
  if (super_pairs > 65535) return cudaErrorInvalidValue;  // grid.y; n > ~11500 samples
  const int threads = n <= kMaxFusedSamples ? fused_threads(n) : kWideThreads;
  const int64_t staged = n <= kMaxFusedSamples ? ceil_div(n, kRowBlock) * kRowBlock : 2 * kSuper;
  const int tk = tile_columns(staged, sizeof(A));
  const FusedLayout layout = FusedLayout::of(staged, tk, threads, sizeof(A), 0);
  auto* kernel = gram_kernel<T, O>;
  if (cudaError_t err = allow_shared(kernel, layout.scratch_bytes); err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(count), static_cast<unsigned>(super_pairs));
  FASTDIV_LAUNCH(kernel, grid, dim3(threads), layout.scratch_bytes, stream, rows_of<T>(x) + b0 * x.stride_b,
                 x.stride_b, x.stride_n, n, x.d, tk, s, s_pitch, l1, l1_pitch);
  return FASTDIV_LAST_ERROR();
}

int64_t chunk_inputs(int64_t batch, int64_t n) {
  const int64_t per_input = HeadArrays::doubles(n) * static_cast<int64_t>(sizeof(double));
  return max64(1, min64(batch, kChunkBytes / per_input));
}

// gram_loss and concentration_stats: fused for n <= 32, else Gram + head kernel per chunk of inputs.
template <typename T>
cudaError_t launch_head(const RowsView& x, const HeadJob& job, acc_t<T>* loss, acc_t<T>* a, acc_t<T>* beta,
                        acc_t<T>* row_scale, acc_t<T>* stats, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t B = x.batch, n = x.n;
  if (n <= kMaxFusedSamples) {
    const int threads = fused_threads(n);
    const int64_t staged = ceil_div(n, kRowBlock) * kRowBlock;
    const int tk = tile_columns(staged, sizeof(A));
    const FusedLayout layout = FusedLayout::of(staged, tk, threads, sizeof(A), n);
    auto* kernel = fused_gram_head_kernel<T>;
    if (cudaError_t err = allow_shared(kernel, layout.total); err != cudaSuccess) return err;
    FASTDIV_LAUNCH(kernel, dim3(static_cast<unsigned>(B)), dim3(threads), layout.total, stream, rows_of<T>(x),
                   x.stride_b, x.stride_n, n, x.d, job, tk, layout.head_offset, layout.reduce_offset, loss, a, beta,
                   row_scale, stats);
    return FASTDIV_LAST_ERROR();
  }
  double* ws = static_cast<double*>(workspace);
  if (ws == nullptr) return cudaErrorInvalidValue;
  const int64_t chunk = chunk_inputs(B, n), pitch = HeadArrays::doubles(n);
  const bool with_l1 = !job.stats && job.head == heads::Head::kSparsity;
  const HeadArrays slot0 = HeadArrays::at(ws, n);  // the first input's slot; the others are pitch apart
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t count = min64(chunk, B - b0);
    cudaError_t err = launch_gram<T, double>(x, b0, count, slot0.S, pitch, with_l1 ? slot0.l1 : nullptr, pitch,
                                             stream);
    if (err != cudaSuccess) return err;
    FASTDIV_LAUNCH(head_kernel<T>, dim3(static_cast<unsigned>(count)), dim3(kHeadThreads), 0, stream,
                   rows_of<T>(x) + b0 * x.stride_b, x.stride_b, x.stride_n, n, x.d, job, ws,
                   loss ? loss + b0 : nullptr, a ? a + b0 * n * n : nullptr, beta ? beta + b0 * n : nullptr,
                   row_scale ? row_scale + b0 * n : nullptr, stats ? stats + b0 * 6 : nullptr);
    if ((err = FASTDIV_LAST_ERROR()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Output rows per register chunk of the pullback: n rounded up to 8, 16 or 32 (32 for larger n).
template <typename T>
cudaError_t launch_pullback(const RowsView& x, const void* a, const void* beta, const void* scale,
                            int64_t scale_stride, const void* row_scale, void* dx, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t column_blocks = ceil_div(x.d, kPullbackThreads);
  const int64_t blocks = x.batch * column_blocks;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const auto run = [&](auto kernel) {
    FASTDIV_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kPullbackThreads), 0, stream, rows_of<T>(x),
                   x.stride_b, x.stride_n, x.n, x.d, column_blocks, static_cast<const A*>(a),
                   static_cast<const A*>(beta), static_cast<const A*>(scale), scale_stride,
                   static_cast<const A*>(row_scale), static_cast<T*>(dx));
    return FASTDIV_LAST_ERROR();
  };
  if (x.n <= 8) return run(pullback_kernel<T, 8>);
  if (x.n <= 16) return run(pullback_kernel<T, 16>);
  return run(pullback_kernel<T, 32>);
}

bool empty_batch(const RowsView& x) { return x.batch == 0 || x.n == 0; }

}  // namespace

cudaError_t gram(const RowsView& x, void* s, void* l1, cudaStream_t stream) {
  if (empty_batch(x)) return cudaSuccess;
  const int64_t n = x.n;
  return FASTDIV_CUDA_DISPATCH(x.dtype, [&] {
    using A = acc_t<scalar_t>;
    return launch_gram<scalar_t, A>(x, 0, x.batch, static_cast<A*>(s), n * n, static_cast<A*>(l1), n, stream);
  });
}

size_t gram_workspace_bytes(int64_t batch, int64_t n) {
  if (n <= kMaxFusedSamples || batch == 0) return 0;
  return static_cast<size_t>(chunk_inputs(batch, n) * HeadArrays::doubles(n)) * sizeof(double);
}

cudaError_t gram_loss(const RowsView& x, heads::Head head, const heads::Params& prm, void* loss, void* a,
                      void* beta, void* row_scale, void* workspace, cudaStream_t stream) {
  if (x.batch == 0) return cudaSuccess;
  const HeadJob job{false, head, prm, 0.0};
  return FASTDIV_CUDA_DISPATCH(x.dtype, [&] {
    using A = acc_t<scalar_t>;
    return launch_head<scalar_t>(x, job, static_cast<A*>(loss), static_cast<A*>(a),
                                 head == heads::Head::kSparsity ? static_cast<A*>(beta) : nullptr,
                                 static_cast<A*>(row_scale), nullptr, workspace, stream);
  });
}

cudaError_t concentration_stats(const RowsView& x, double q, const heads::Params& prm, void* out, void* workspace,
                                cudaStream_t stream) {
  if (x.batch == 0) return cudaSuccess;
  const HeadJob job{true, heads::Head::kDpp, prm, q};
  return FASTDIV_CUDA_DISPATCH(x.dtype, [&] {
    using A = acc_t<scalar_t>;
    return launch_head<scalar_t>(x, job, nullptr, nullptr, nullptr, nullptr, static_cast<A*>(out), workspace,
                                 stream);
  });
}

cudaError_t gram_pullback(const RowsView& x, const void* a, const void* beta, const void* scale,
                          int64_t scale_stride, const void* row_scale, void* dx, cudaStream_t stream) {
  if (empty_batch(x) || x.d == 0) return cudaSuccess;
  return FASTDIV_CUDA_DISPATCH(x.dtype, [&] {
    return launch_pullback<scalar_t>(x, a, beta, scale, scale_stride, row_scale, dx, stream);
  });
}

}  // namespace fastdiv::cuda
