// Gram-family kernels: one read of X builds the raw Gram (and row l1 norms); the n x n head runs on
// it in registers; the pullback dX = s (A X + beta ⊙ sign(X)) is one read of X and one write of dX.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "head_math.h"
#include "cpu/kernels.h"
#include "cpu/kernels/tile.h"

namespace fastdiv::cpu::FASTDIV_ISA {

namespace gram_impl {

// Dots of two rows xa, xb with four rows x0..x3 at once: eight independent accumulators (enough to hide
// the FMA latency on two FMA ports) and 6 loads per 8 FMAs (one dot at a time needs 2 per FMA), which is
// what keeps the Gram under the memory time for n >= 8.
template <typename A>
inline void dot2x4(const A* xa, const A* xb, const A* x0, const A* x1, const A* x2, const A* x3, int64_t len,
                   double* out_a, double* out_b) {
  A a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
  for (int64_t k = 0; k < len; ++k) {
    const A va = xa[k], vb = xb[k], w0 = x0[k], w1 = x1[k], w2 = x2[k], w3 = x3[k];
    a0 += va * w0, a1 += va * w1, a2 += va * w2, a3 += va * w3;
    b0 += vb * w0, b1 += vb * w1, b2 += vb * w2, b3 += vb * w3;
  }
  out_a[0] += a0, out_a[1] += a1, out_a[2] += a2, out_a[3] += a3;
  out_b[0] += b0, out_b[1] += b1, out_b[2] += b2, out_b[3] += b3;
}

// Accumulates the raw Gram of batch element b into S (n x n, double) and row l1 norms into l1.
// diagonal_only: just the squared row norms (the off-diagonal entries stay 0), for heads that never
// read them.
template <typename T>
void gram_one(const Rows<T>& x, int64_t b, int64_t n, int64_t d, acc_t<T>* tile, double* S,
              double* l1, bool diagonal_only = false) {
  using A = acc_t<T>;
  std::fill(S, S + n * n, 0.0);
  if (l1) std::fill(l1, l1 + n, 0.0);
  constexpr int64_t width = tile_width<T>();
  for (int64_t d0 = 0; d0 < d; d0 += width) {
    const int64_t len = std::min(width, d - d0);
    int64_t rs;
    const A* t = tile_rows(x, b, n, d0, len, tile, &rs);
    if (l1)
      for (int64_t i = 0; i < n; ++i) l1[i] += static_cast<double>(abs_sum(t + i * rs, len));
    if (diagonal_only) {
      for (int64_t i = 0; i < n; ++i) S[i * n + i] += static_cast<double>(dot(t + i * rs, t + i * rs, len));
      continue;
    }
    // Rows i, i + 1 against columns j <= i + 1, four at a time. A block may reach past the diagonal (S[i][i +
    // 1]); entries above the diagonal are overwritten from below it at the end.
    for (int64_t i = 0; i < n; i += 2) {
      prefetch_next_tile(x, b, n, d, d0, i, 2);
      const bool pair = i + 1 < n;
      const A* xa = t + i * rs;
      const A* xb = pair ? xa + rs : xa;
      const int64_t last = pair ? i + 1 : i;
      double* Sa = S + i * n;
      double* Sb = pair ? Sa + n : Sa;
      int64_t j = 0;
      for (; j + 4 <= last + 1; j += 4) {
        const A* xj = t + j * rs;
        if (pair) {
          dot2x4(xa, xb, xj, xj + rs, xj + 2 * rs, xj + 3 * rs, len, Sa + j, Sb + j);
        } else {  // odd n, last row: its four dots twice would add them twice
          for (int64_t c = 0; c < 4; ++c) Sa[j + c] += static_cast<double>(dot(xa, xj + c * rs, len));
        }
      }
      for (; j <= last; ++j) {
        const A* xj = t + j * rs;
        if (j <= i) Sa[j] += static_cast<double>(dot(xa, xj, len));
        if (pair) Sb[j] += static_cast<double>(dot(xb, xj, len));
      }
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) S[j * n + i] = S[i * n + j];
}

// Second pass over batch element b (its slab is still in cache for the paper sizes): the column sums
// m_d = sum_i u_id, accumulated in double. Returns ||m||^2 = ||sum_i u_i||^2; when lq is given, also
// writes ||m / n||_q (the l_q mean resultant length; q = inf gives the max norm). q = 1, 2 and inf, the
// usual orders, are plain vectorized sums / maxima; only other orders pay a pow per column.
template <typename T>
double column_resultant(const Rows<T>& x, int64_t b, int64_t n, int64_t d, acc_t<T>* tile, double* m,
                        const double* inv_r, double q, double* lq) {
  double sq = 0, acc_q = 0;
  bool nan = false;
  const double inv_n = 1.0 / static_cast<double>(n);
  const bool q_inf = std::isinf(q), q_one = q == 1.0, q_two = q == 2.0;
  for (int64_t d0 = 0; d0 < d; d0 += kTile) {
    const int64_t len = std::min(kTile, d - d0);
    int64_t rs;
    const acc_t<T>* t = tile_rows(x, b, n, d0, len, tile, &rs);
    std::fill(m, m + len, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const acc_t<T>* xi = t + i * rs;
      const double w = inv_r[i];
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) m[k] += static_cast<double>(xi[k]) * w;
    }
    double tile_sq = 0;
#pragma omp simd reduction(+ : tile_sq)
    for (int64_t k = 0; k < len; ++k) tile_sq += m[k] * m[k];
    sq += tile_sq;
    if (!lq || q_two) continue;  // ||m / n||_2 comes from sq below
    if (q_one) {
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < len; ++k) s += std::abs(m[k]);
      acc_q += s;  // a NaN column makes the sum NaN
    } else if (q_inf) {
      double mx = 0;
      bool tile_nan = false;
      for (int64_t k = 0; k < len; ++k) {
        const double a = std::abs(m[k]);
        tile_nan |= a != a;
        mx = a > mx ? a : mx;
      }
      nan |= tile_nan;
      acc_q = std::max(acc_q, mx);
    } else {
      for (int64_t k = 0; k < len; ++k) {
        const double a = std::abs(m[k] * inv_n);
        nan |= std::isnan(a);
        acc_q += std::pow(a, q);
      }
    }
  }
  if (lq) {
    if (q_two) *lq = std::sqrt(sq) * inv_n;
    else if (q_one) *lq = acc_q * inv_n;
    else if (q_inf) *lq = nan ? NAN : acc_q * inv_n;
    else *lq = nan ? NAN : std::pow(acc_q, 1.0 / q);
  }
  return sq;
}

// Row scales of batch element b (head_math.h, "Row scaling") from its unscaled Gram S: all 1 unless a
// diagonal entry is suspect and then a row's largest |x_ik| says it needs a scale; then every row's scale
// from its maximum. Returns true when the rows are scaled (their Gram must be accumulated again, by
// scaled_gram).
template <typename T>
bool row_scales(const Rows<T>& x, int64_t b, int64_t n, int64_t d, const double* S, double* scale) {
  constexpr bool wide = std::is_same_v<acc_t<T>, double>;
  std::fill(scale, scale + n, 1.0);
  bool suspect = false;
  for (int64_t i = 0; i < n; ++i) suspect |= heads::square_out_of_range(S[i * n + i], d, wide);
  if (!suspect) return false;
  bool any = false;
  for (int64_t i = 0; i < n; ++i) {
    const double m = row_max_abs(x.row(b, i), d);
    scale[i] = m;  // the maximum, until the scales are known to be needed
    any |= heads::needs_scale(m, wide);
  }
  for (int64_t i = 0; i < n; ++i) scale[i] = any ? heads::row_scale(scale[i], wide) : 1.0;
  return any;
}

// The Gram S and row l1 norms of the rows y_i = scale_i x_i of batch element b, accumulated in double
// (only the diagonal with diagonal_only). The rare path of inputs with out-of-range rows: plain loops,
// each entry a dot product of two rows.
template <typename T>
void scaled_gram(const Rows<T>& x, int64_t b, int64_t n, int64_t d, const double* scale, double* S, double* l1,
                 bool diagonal_only) {
  using A = acc_t<T>;
  std::fill(S, S + n * n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x.row(b, i);
    for (int64_t j = diagonal_only ? i : 0; j <= i; ++j) {
      const T* xj = x.row(b, j);
      const double si = scale[i], sj = scale[j];
      double acc = 0;
      for (int64_t k = 0; k < d; ++k)
        acc += (static_cast<double>(load_as<A>(xi[k])) * si) * (static_cast<double>(load_as<A>(xj[k])) * sj);
      S[i * n + j] = acc;
      S[j * n + i] = acc;
    }
    if (l1) {
      double acc = 0;
      for (int64_t k = 0; k < d; ++k) acc += std::abs(static_cast<double>(load_as<A>(xi[k])) * scale[i]);
      l1[i] = acc;
    }
  }
}

template <typename T>
void gram_kernel(const at::Tensor& x, at::Tensor& s, at::Tensor& l1) {
  using A = acc_t<T>;
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2);
  const auto rows = rows_of<T>(x);
  A* s_out = s.data_ptr<A>();
  A* l1_out = l1.numel() ? l1.data_ptr<A>() : nullptr;
  at::parallel_for(0, B, batch_grain(n, d), [&](int64_t begin, int64_t end) {
    std::vector<A> tile(n * kTile);
    std::vector<double> S(n * n), L1(n);
    for (int64_t b = begin; b < end; ++b) {
      gram_one(rows, b, n, d, tile.data(), S.data(), l1_out ? L1.data() : nullptr);
      for (int64_t i = 0; i < n * n; ++i) s_out[b * n * n + i] = static_cast<A>(S[i]);
      if (l1_out)
        for (int64_t i = 0; i < n; ++i) l1_out[b * n + i] = static_cast<A>(L1[i]);
    }
  });
}

// Output rows i0..i0+kRows-1 of dX = A X + beta ⊙ sign(X) for kVec columns k0.. of one tile. A block of
// kRows x kVec accumulators lives in registers across the whole j loop, so each x_j value loaded from
// the tile feeds kRows FMAs and nothing is re-stored until the block is done. The block is four rows by
// two vectors of the variant (8 registers: a 4 x 32 fp32 block, right for AVX-512, needs all 16 ymm of
// AVX2 and spilled there), leaving registers for the x_j loads and the broadcast coefficients. Eight rows
// on AVX-512 measured slower: n = 10 then pads its second block from 2 rows to 8.
template <typename A>
constexpr int64_t kPullbackVec = 2 * kVectorBytes / static_cast<int64_t>(sizeof(A));
constexpr int64_t kRows = 4;

// tile points at row 0 of the columns, rows row_stride apart (the tile buffer, or X itself when it
// already has the accumulation type).
// row_scale (nullable): the factor of each output row (1 when null).
template <typename T, typename A>
inline void pullback_block(const A* tile, int64_t row_stride, int64_t n, int64_t i0, int64_t k0, const A* ab,
                           const A* beta, const A* row_scale, T* out, int64_t d, int64_t d0) {
  constexpr int64_t kVec = kPullbackVec<A>;
  const int64_t rows = std::min(kRows, n - i0);
  A coef[kRows], bet[kRows], rsc[kRows];
  const A* xr[kRows];
  for (int64_t r = 0; r < kRows; ++r) {
    xr[r] = tile + std::min(i0 + r, n - 1) * row_stride + k0;  // padded rows read a valid row
    bet[r] = (r < rows && beta) ? beta[i0 + r] : A(0);
    rsc[r] = (r < rows && row_scale) ? row_scale[i0 + r] : A(1);
  }
  A acc[kRows][kVec];
  for (int64_t r = 0; r < kRows; ++r)
#pragma omp simd
    for (int64_t v = 0; v < kVec; ++v) acc[r][v] = bet[r] * sign(xr[r][v]);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t r = 0; r < kRows; ++r) coef[r] = r < rows ? ab[(i0 + r) * n + j] : A(0);
    const A* xj = tile + j * row_stride + k0;
    for (int64_t r = 0; r < kRows; ++r)
#pragma omp simd
      for (int64_t v = 0; v < kVec; ++v) acc[r][v] += coef[r] * xj[v];
  }
  for (int64_t r = 0; r < rows; ++r) {  // padded rows are not stored
    T* dst = out + (i0 + r) * d + d0 + k0;
#pragma omp simd
    for (int64_t v = 0; v < kVec; ++v) dst[v] = store_as<T>(acc[r][v] * rsc[r]);
  }
}

// dX for the columns [d0, d0 + len) of one tile: a block of kRows rows along the whole tile before the
// next rows (kVec columns at a time), then the columns past the last full kVec block, plainly. Rows
// outermost keeps each output row one long write stream; walking all rows of each kVec slice first
// (so the slice stays in L1) interleaves n short streams and measured 2x slower.
template <typename T, typename A>
inline void pullback_tile(const Rows<T>& x, int64_t b, const A* tile, int64_t row_stride, int64_t len, int64_t n,
                          const A* ab, const A* beta, const A* row_scale, T* out, int64_t d, int64_t d0) {
  constexpr int64_t kVec = kPullbackVec<A>;
  const int64_t full = len - len % kVec;
  for (int64_t i0 = 0; i0 < n; i0 += kRows) {
    prefetch_next_tile(x, b, n, d, d0, i0, kRows);
    for (int64_t k0 = 0; k0 < full; k0 += kVec)
      pullback_block(tile, row_stride, n, i0, k0, ab, beta, row_scale, out, d, d0);
  }
  const int64_t k0 = full;
  for (int64_t i = 0; i < n; ++i) {
    const A bet = beta ? beta[i] : A(0), rsc = row_scale ? row_scale[i] : A(1);
    for (int64_t k = k0; k < len; ++k) {
      A o = bet * sign(tile[i * row_stride + k]);
      for (int64_t j = 0; j < n; ++j) o += ab[i * n + j] * tile[j * row_stride + k];
      out[i * d + d0 + k] = store_as<T>(o * rsc);
    }
  }
}

template <typename A>
bool off_diagonal_zero(const A* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (i != j && a[i * n + j] != A(0)) return false;
  return true;
}

// scale (nullable) is the per-input factor of the fused backward, scale[b * scale_stride]. It is folded
// into a per-task copy of the coefficients, (s A_b, s beta_b), so dX is bit for bit the unscaled kernel
// on the coefficients the unfused a * s, beta * s would give (NaN / Inf scales included), and the
// off-diagonal test below still sees exact zeros. row_scale (nullable, [B, n]) multiplies row i of the
// result: gram_loss's scales of rows whose coefficients are not representable unscaled (head_math.h).
template <typename T>
void pullback_kernel(const at::Tensor& x, const at::Tensor& a, const at::Tensor* beta, const at::Tensor* scale,
                     const at::Tensor* row_scale, at::Tensor& dx) {
  using A = acc_t<T>;
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2);
  const auto rows = rows_of<T>(x);
  const A* a_in = a.const_data_ptr<A>();
  const A* beta_in = beta ? beta->const_data_ptr<A>() : nullptr;
  const A* scale_in = scale ? scale->const_data_ptr<A>() : nullptr;
  const int64_t scale_stride = scale ? scale->stride(0) : 0;
  const A* row_scale_in = row_scale ? row_scale->const_data_ptr<A>() : nullptr;
  T* out = dx.data_ptr<T>();
  at::parallel_for(0, B, batch_grain(n, d), [&](int64_t begin, int64_t end) {
    std::vector<A> tile(n * kTile);
    std::vector<A> a_scaled(scale_in ? n * n : 0), beta_scaled(scale_in && beta_in ? n : 0);
    for (int64_t b = begin; b < end; ++b) {
      const A* ab = a_in + b * n * n;
      const A* bb = beta_in ? beta_in + b * n : nullptr;
      const A* rs = row_scale_in ? row_scale_in + b * n : nullptr;
      if (scale_in) {
        const A s = scale_in[b * scale_stride];
        for (int64_t i = 0; i < n * n; ++i) a_scaled[i] = ab[i] * s;
        ab = a_scaled.data();
        if (bb) {
          for (int64_t i = 0; i < n; ++i) beta_scaled[i] = bb[i] * s;
          bb = beta_scaled.data();
        }
      }
      if (off_diagonal_zero(ab, n)) {  // e.g. Omega_S: O(n D) instead of O(n^2 D)
        for (int64_t i = 0; i < n; ++i) {
          const T* xi = rows.row(b, i);
          const A aii = ab[i * n + i], bi = bb ? bb[i] : A(0), si = rs ? rs[i] : A(1);
          T* dst = out + (b * n + i) * d;
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) {
            const A v = load_as<A>(xi[k]);
            dst[k] = store_as<T>((aii * v + bi * sign(v)) * si);
          }
        }
        continue;
      }
      constexpr int64_t width = tile_width<T>();
      for (int64_t d0 = 0; d0 < d; d0 += width) {
        const int64_t len = std::min(width, d - d0);
        int64_t row_stride;
        const A* base = tile_rows(rows, b, n, d0, len, tile.data(), &row_stride);
        pullback_tile(rows, b, base, row_stride, len, n, ab, bb, rs, out + b * n * d, d, d0);
      }
    }
  });
}

// The inverse norms 1 / ||x_i|| of the unscaled rows (the weights of column_resultant) from the Gram of
// the rows scaled by scale: s_i / ||y_i||, in double, whose range holds them for every fp32 input.
inline void unscaled_inverse_norms(const double* S, int64_t n, double eps, const double* scale, double* inv_r) {
  heads::inverse_norms(S, n, eps, scale, inv_r);
  for (int64_t i = 0; i < n; ++i) inv_r[i] *= scale[i];
}

template <typename T>
void gram_loss_kernel(const at::Tensor& x, heads::Head head, const heads::Params& prm, at::Tensor& loss,
                      at::Tensor& a, at::Tensor& beta, at::Tensor& row_scale) {
  using A = acc_t<T>;
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2);
  const auto rows = rows_of<T>(x);
  const bool with_l1 = head == heads::Head::kSparsity;
  A* loss_out = loss.data_ptr<A>();
  A* a_out = a.data_ptr<A>();
  A* beta_out = beta.numel() ? beta.data_ptr<A>() : nullptr;
  A* scale_out = row_scale.data_ptr<A>();
  const bool with_resultant = heads::needs_resultant(head);
  at::parallel_for(0, B, batch_grain(n, d), [&](int64_t begin, int64_t end) {
    std::vector<A> tile(n * kTile);
    std::vector<double> S(n * n), L1(n), Ab(n * n), betab(n), work(heads::workspace(n)), inv_r(n), m(kTile),
        scale(n);
    for (int64_t b = begin; b < end; ++b) {
      // Omega_S reads only the row norms and l1 norms; its pullback matrix is diagonal
      gram_one(rows, b, n, d, tile.data(), S.data(), with_l1 ? L1.data() : nullptr, with_l1);
      if (row_scales(rows, b, n, d, S.data(), scale.data()))
        scaled_gram(rows, b, n, d, scale.data(), S.data(), with_l1 ? L1.data() : nullptr, with_l1);
      double resultant = 0;
      if (with_resultant) {
        unscaled_inverse_norms(S.data(), n, prm.eps, scale.data(), inv_r.data());
        resultant = column_resultant(rows, b, n, d, tile.data(), m.data(), inv_r.data(), 0.0, nullptr);
      }
      loss_out[b] = static_cast<A>(heads::head_forward(head, S.data(), L1.data(), resultant, n, d, prm,
                                                       scale.data(), Ab.data(), betab.data(), work.data()));
      for (int64_t i = 0; i < n * n; ++i) a_out[b * n * n + i] = static_cast<A>(Ab[i]);
      if (beta_out)
        for (int64_t i = 0; i < n; ++i) beta_out[b * n + i] = static_cast<A>(betab[i]);
      for (int64_t i = 0; i < n; ++i) scale_out[b * n + i] = static_cast<A>(scale[i]);
    }
  });
}

// One read of X from memory per input: the Gram tiles, then the column sums of u from the same
// n x D slab (still in cache for the paper sizes) for rho, kappa and the l_q-MRL.
template <typename T>
void stats_kernel(const at::Tensor& x, double q, const heads::Params& prm, at::Tensor& out) {
  using A = acc_t<T>;
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2);
  const auto rows = rows_of<T>(x);
  A* o = out.data_ptr<A>();
  at::parallel_for(0, B, batch_grain(n, d), [&](int64_t begin, int64_t end) {
    std::vector<A> tile(n * kTile);
    std::vector<double> S(n * n), inv_r(n), stats(5), work(heads::workspace(n)), m(kTile), scale(n);
    for (int64_t b = begin; b < end; ++b) {
      gram_one(rows, b, n, d, tile.data(), S.data(), nullptr);
      if (row_scales(rows, b, n, d, S.data(), scale.data()))
        scaled_gram(rows, b, n, d, scale.data(), S.data(), nullptr, false);
      unscaled_inverse_norms(S.data(), n, prm.eps, scale.data(), inv_r.data());
      double rho_q = 0;
      const double resultant = column_resultant(rows, b, n, d, tile.data(), m.data(), inv_r.data(), q, &rho_q);
      heads::gram_statistics(S.data(), resultant, n, d, prm, scale.data(), stats.data(), work.data());
      const double row[6] = {stats[0], rho_q, stats[1], stats[2], stats[3], stats[4]};
      for (int64_t k = 0; k < 6; ++k) o[b * 6 + k] = static_cast<A>(row[k]);
    }
  });
}

}  // namespace gram_impl

using namespace gram_impl;

std::tuple<at::Tensor, at::Tensor> gram(const at::Tensor& x, bool with_l1) {
  auto [s, l1] = prepare_gram(x, with_l1, at::kCPU);
  FASTDIV_DISPATCH(x, "fastdiv::gram", [&] { gram_kernel<scalar_t>(x, s, l1); });
  return {s, l1};
}

at::Tensor gram_pullback(const at::Tensor& x, const at::Tensor& a, const std::optional<at::Tensor>& beta,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& row_scale) {
  GramPullbackArgs args = prepare_gram_pullback(x, a, beta, scale, row_scale, at::kCPU);
  FASTDIV_DISPATCH(x, "fastdiv::gram_pullback", [&] {
    pullback_kernel<scalar_t>(x, args.a, args.beta.defined() ? &args.beta : nullptr, args.scale,
                              args.row_scale.defined() ? &args.row_scale : nullptr, args.dx);
  });
  return args.dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_loss(const at::Tensor& x, const std::string& head,
                                                                     double eps, double jitter, double p,
                                                                     double rho_max) {
  const heads::Head h = parse_head(head);
  auto [loss, a, beta, row_scale] = prepare_gram_loss(x, h == heads::Head::kSparsity, at::kCPU);
  const heads::Params prm{eps, jitter, p, rho_max};
  FASTDIV_DISPATCH(x, "fastdiv::gram_loss",
                   [&] { gram_loss_kernel<scalar_t>(x, h, prm, loss, a, beta, row_scale); });
  return {loss, a, beta, row_scale};
}

at::Tensor concentration_stats(const at::Tensor& x, double q, double eps, double jitter, double rho_max) {
  at::Tensor out = prepare_concentration_stats(x, q, at::kCPU);
  const heads::Params prm{eps, jitter, 0.0, rho_max};
  FASTDIV_DISPATCH(x, "fastdiv::concentration_stats", [&] { stats_kernel<scalar_t>(x, q, prm, out); });
  return out;
}

}  // namespace fastdiv::cpu::FASTDIV_ISA
