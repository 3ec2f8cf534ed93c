// Kernels on unit rows u_i = x_i / r_i, r_i = max(||x_i||, eps): normalization and the per-column
// statistics behind the Diverse-Directions variance penalties (docs/design.md §2.5).
//
// Norms are summed in the accumulation dtype, which squares overflow (fp32: |x| ~ 1e19) or flush to 0
// (|x| ~ 1e-23) for finite rows. A row whose sum of squares is out of range (head_math.h, "Row
// scaling") takes the rare path: its norm again from y = s x, s the power of two of row_scale, and u
// from y, so every finite row gets its unit direction; the other rows keep their results bit for bit.
//
// Pullbacks share one rule. With G = dL/du, the derivative through the normalization is
// dL/dx_i = (G_i - <G_i, u_i> u_i) / r_i for rows above the norm floor; rows at or below it have no
// direction (u_i = 0) and get zero gradient. Each kernel first reduces <G_i, u_i> over a batch element's slab and then writes
// dX from the same slab, which is still in cache.
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "head_math.h"
#include "cpu/kernels.h"
#include "cpu/kernels/tile.h"

namespace fastdiv::cpu::FASTDIV_ISA {
namespace rows_impl {

struct RowNorm {
  double norm;   // ||x||
  double inv_r;  // 1 / ||y|| above the norm floor, 0 at or below it, for y = scale x
  double scale;  // 1, or the power of two of a row whose squares leave the accumulation range
};

inline RowNorm row_norm(double sumsq, double eps) {
  const double norm = std::sqrt(sumsq);
  // NaN rows keep a NaN scale so the NaN reaches the output.
  return {norm, std::isnan(norm) ? norm : (norm > eps ? 1.0 / norm : 0.0), 1.0};
}

template <typename T>
constexpr bool kWide = std::is_same_v<acc_t<T>, double>;

// The rare path: the row's largest |x_k|, its scale s (head_math.h's row_scale), and ||y||^2 of y = s x
// summed in double (every (x s)^2 is at most 16); with grad, also <grad, y> in double. The floor compares
// ||x|| = ||y|| / s with eps as ||y|| with eps s.
template <typename T>
RowNorm scaled_row_norm(const T* row, int64_t d, double eps, const T* grad = nullptr, double* grad_dot = nullptr) {
  using A = acc_t<T>;
  const double s = heads::row_scale(row_max_abs(row, d), kWide<T>);
  double ss = 0, gy = 0;
  for (int64_t k = 0; k < d; ++k) {
    const double y = static_cast<double>(load_as<A>(row[k])) * s;
    ss += y * y;
    if (grad) gy += static_cast<double>(load_as<A>(grad[k])) * y;
  }
  if (grad_dot) *grad_dot = gy;
  const double norm_y = std::sqrt(ss);
  return {norm_y / s, std::isnan(norm_y) ? norm_y : (norm_y > eps * s ? 1.0 / norm_y : 0.0), s};
}

// row_norm of the sum of squares accumulated unscaled, or the rare path where it is out of range.
template <typename T>
RowNorm checked_row_norm(double sumsq, const T* row, int64_t d, double eps) {
  return heads::square_out_of_range(sumsq, d, kWide<T>) ? scaled_row_norm(row, d, eps) : row_norm(sumsq, eps);
}

// The same from a stored norm (r outputs hold ||x||, whatever the floor).
template <typename A>
inline A inverse_norm(A r, A eps) {
  return std::isnan(r) ? r : (r > eps ? A(1) / r : A(0));
}

// Sum of squares of one row, per tile in the accumulation type and across tiles in double; half-precision
// rows are converted into tile first, fp32 / fp64 rows are read in place.
template <typename T>
double row_sumsq(const T* row, int64_t d, acc_t<T>* tile) {
  double s = 0;
  for (int64_t d0 = 0; d0 < d; d0 += kTile) {
    const int64_t len = std::min(kTile, d - d0);
    const acc_t<T>* v = tile;
    if constexpr (std::is_same_v<T, acc_t<T>>) {
      v = row + d0;
    } else {
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) tile[k] = load_as<acc_t<T>>(row[d0 + k]);
    }
    s += static_cast<double>(dot(v, v, len));
  }
  return s;
}

template <typename T>
void normalize_kernel(const at::Tensor& x, double eps, at::Tensor& u) {
  using A = acc_t<T>;
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2);
  const auto rows = rows_of<T>(x);
  T* out = u.data_ptr<T>();
  at::parallel_for(0, B * n, batch_grain(1, d), [&](int64_t begin, int64_t end) {
    std::vector<A> tile(kTile);
    for (int64_t row = begin; row < end; ++row) {
      const T* src = rows.row(row / n, row % n);
      const RowNorm rn = checked_row_norm(row_sumsq(src, d, tile.data()), src, d, eps);
      const A inv_r = static_cast<A>(rn.inv_r);
      T* dst = out + row * d;
      if (rn.scale == 1.0) {
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) dst[k] = store_as<T>(load_as<A>(src[k]) * inv_r);
      } else {  // u = (s x) / ||s x||: 1 / ||x|| itself may not be representable
        const A sc = static_cast<A>(rn.scale);
        for (int64_t k = 0; k < d; ++k) dst[k] = store_as<T>((load_as<A>(src[k]) * sc) * inv_r);
      }
    }
  });
}

template <typename T>
void normalize_pullback_kernel(const at::Tensor& x, const at::Tensor& g, double eps, at::Tensor& dx) {
  using A = acc_t<T>;
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2);
  const auto rows = rows_of<T>(x);
  const T* gin = g.const_data_ptr<T>();
  T* out = dx.data_ptr<T>();
  at::parallel_for(0, B * n, batch_grain(1, d), [&](int64_t begin, int64_t end) {
    std::vector<A> xt(kTile), gt(kTile);
    for (int64_t row = begin; row < end; ++row) {
      const T* xr = rows.row(row / n, row % n);
      const T* gr = gin + row * d;
      double sumsq = 0, gx = 0;
      for (int64_t d0 = 0; d0 < d; d0 += kTile) {
        const int64_t len = std::min(kTile, d - d0);
        for (int64_t k = 0; k < len; ++k) xt[k] = load_as<A>(xr[d0 + k]), gt[k] = load_as<A>(gr[d0 + k]);
        sumsq += static_cast<double>(dot(xt.data(), xt.data(), len));
        gx += static_cast<double>(dot(gt.data(), xt.data(), len));
      }
      // the rare path also when <G, x> overflowed (finite G and x, NaN stays NaN either way)
      const bool rare = heads::square_out_of_range(sumsq, d, kWide<T>) || std::isinf(gx);
      const RowNorm rn = rare ? scaled_row_norm(xr, d, eps, gr, &gx) : row_norm(sumsq, eps);
      const A inv_r = static_cast<A>(rn.inv_r);
      // <G, u> u / r = <G, x> x / r^3 (with y = s x: <G, y> y / ||y||^2, times s / ||y||)
      const A proj = static_cast<A>(gx * rn.inv_r * rn.inv_r);
      T* dst = out + row * d;
      if (rn.scale == 1.0) {
#pragma omp simd
        for (int64_t k = 0; k < d; ++k)
          dst[k] = store_as<T>((load_as<A>(gr[k]) - proj * load_as<A>(xr[k])) * inv_r);
      } else {
        const A sc = static_cast<A>(rn.scale);
        for (int64_t k = 0; k < d; ++k)
          dst[k] = store_as<T>(((load_as<A>(gr[k]) - proj * (load_as<A>(xr[k]) * sc)) * inv_r) * sc);
      }
    }
  });
}

template <typename T>
void column_stats_kernel(const at::Tensor& x, double eps, at::Tensor& r, at::Tensor& mean, at::Tensor& var) {
  using A = acc_t<T>;
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2);
  const auto rows = rows_of<T>(x);
  A* r_out = r.data_ptr<A>();
  A* m_out = mean.data_ptr<A>();
  A* v_out = var.data_ptr<A>();
  const A inv_n = A(1) / static_cast<A>(n);
  at::parallel_for(0, B, batch_grain(n, d), [&](int64_t begin, int64_t end) {
    std::vector<A> tile(n * kTile), inv_r(n), scale(n);
    for (int64_t b = begin; b < end; ++b) {
      bool scaled = false;
      for (int64_t i = 0; i < n; ++i) {
        const T* xi = rows.row(b, i);
        const RowNorm rn = checked_row_norm(row_sumsq(xi, d, tile.data()), xi, d, eps);
        inv_r[i] = static_cast<A>(rn.inv_r);
        scale[i] = static_cast<A>(rn.scale);
        scaled |= rn.scale != 1.0;
        r_out[b * n + i] = static_cast<A>(rn.norm);
      }
      for (int64_t d0 = 0; d0 < d; d0 += kTile) {
        const int64_t len = std::min(kTile, d - d0);
        int64_t rs = len;
        const A* t = tile.data();
        if (scaled) {  // a copy holding y = s x of the scaled rows (exact: s is a power of two)
          load_tile(rows, b, n, d0, len, tile.data());
          for (int64_t i = 0; i < n; ++i)
            if (scale[i] != A(1))
              for (int64_t k = 0; k < len; ++k) tile[i * len + k] *= scale[i];
        } else {
          t = tile_rows(rows, b, n, d0, len, tile.data(), &rs);
        }
        A* m = m_out + b * d + d0;
        A* v = v_out + b * d + d0;
        for (int64_t k = 0; k < len; ++k) m[k] = 0, v[k] = 0;
        for (int64_t i = 0; i < n; ++i) {
          const A* xi = t + i * rs;
#pragma omp simd
          for (int64_t k = 0; k < len; ++k) m[k] += xi[k] * inv_r[i];
        }
        for (int64_t k = 0; k < len; ++k) m[k] *= inv_n;
        // Two-pass variance: E[(u - m)^2] avoids the cancellation of E[u^2] - m^2.
        for (int64_t i = 0; i < n; ++i) {
          const A* xi = t + i * rs;
#pragma omp simd
          for (int64_t k = 0; k < len; ++k) {
            const A t = xi[k] * inv_r[i] - m[k];
            v[k] += t * t;
          }
        }
        for (int64_t k = 0; k < len; ++k) v[k] *= inv_n;
      }
    }
  });
}

// G_id = dL/du_id = g_mean_d / n + g_var_d * 2 (u_id - m_d) / n = alpha_d + beta_d u_id, with
// alpha_d = (g_mean_d - 2 g_var_d m_d) / n and beta_d = 2 g_var_d / n shared by the n rows of a column;
// the norm's own gradient adds g_r_i x_id / r_i.
//
// The loops below take raw pointers (no closure state) so that they vectorize.

// alpha and beta of one batch element's d columns (gm, gv: its rows of the gradients, or null).
template <typename A>
void column_coefficients(const A* gm, const A* gv, const A* m, int64_t d, A inv_n, A* alpha, A* beta) {
  if (gm) {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) alpha[k] = gm[k] * inv_n;
  } else {
    std::fill(alpha, alpha + d, A(0));
  }
  if (gv) {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) {
      beta[k] = A(2) * gv[k] * inv_n;
      alpha[k] -= beta[k] * m[k];
    }
  } else {
    std::fill(beta, beta + d, A(0));
  }
}

// sum_k (alpha_k + beta_k u_k) x_k with u = x ir: <G_i, x_i> of an unscaled row (times ir it is <G_i, u_i>).
template <typename A>
A coefficient_dot(const A* alpha, const A* beta, const A* xi, A ir, int64_t len) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < len; ++k) s += (alpha[k] + beta[k] * xi[k] * ir) * xi[k];
  return s;
}

// dst = (G - c u) / r + g_r u of an unscaled row, with u = x ir: G ir + x_coef x, x_coef = (g_r - c ir) ir.
template <typename T, typename A>
void write_unscaled_row(T* dst, const A* alpha, const A* beta, const A* xi, A ir, A x_coef, int64_t len) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) dst[k] = store_as<T>((alpha[k] + beta[k] * xi[k] * ir) * ir + x_coef * xi[k]);
}

template <typename T>
void column_stats_pullback_kernel(const at::Tensor& x, const at::Tensor& r, const at::Tensor& mean,
                                  const at::Tensor* g_r, const at::Tensor* g_mean, const at::Tensor* g_var,
                                  double eps, at::Tensor& dx) {
  using A = acc_t<T>;
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2);
  const auto rows = rows_of<T>(x);
  const A* r_in = r.const_data_ptr<A>();
  const A* m_in = mean.const_data_ptr<A>();
  const A* gr_in = g_r ? g_r->const_data_ptr<A>() : nullptr;
  const A* gm_in = g_mean ? g_mean->const_data_ptr<A>() : nullptr;
  const A* gv_in = g_var ? g_var->const_data_ptr<A>() : nullptr;
  T* out = dx.data_ptr<T>();
  const A inv_n = A(1) / static_cast<A>(n);
  const A eps_a = static_cast<A>(eps);
  at::parallel_for(0, B, batch_grain(n, d), [&](int64_t begin, int64_t end) {
    std::vector<A> tile(n * kTile), alpha_buf(d), beta_buf(d), inv_r(n), scale(n);
    std::vector<double> c(n);
    A* const alpha = alpha_buf.data();
    A* const beta = beta_buf.data();
    for (int64_t b = begin; b < end; ++b) {
      const A* rb = r_in + b * n;
      std::fill(c.begin(), c.end(), 0.0);
      // 1 / r_i from the stored norms; a norm out of range (1 / r not a normal number, or r = Inf for a
      // finite row whose norm passed the dtype's maximum) is taken again from the row, scaled.
      for (int64_t i = 0; i < n; ++i) {
        const double r = static_cast<double>(rb[i]);
        if (heads::square_out_of_range(r * r, 1, kWide<T>)) {
          const RowNorm rn = scaled_row_norm(rows.row(b, i), d, eps);
          inv_r[i] = static_cast<A>(rn.inv_r);
          scale[i] = static_cast<A>(rn.scale);
        } else {
          inv_r[i] = inverse_norm(rb[i], eps_a);
          scale[i] = A(1);
        }
      }
      column_coefficients(gm_in ? gm_in + b * d : nullptr, gv_in ? gv_in + b * d : nullptr, m_in + b * d, d,
                          inv_n, alpha, beta);
      for (int64_t d0 = 0; d0 < d; d0 += kTile) {  // pass 1: c_i = <G_i, u_i>
        const int64_t len = std::min(kTile, d - d0);
        int64_t rs;
        const A* t = tile_rows(rows, b, n, d0, len, tile.data(), &rs);
        const A* al = alpha + d0;
        const A* be = beta + d0;
        for (int64_t i = 0; i < n; ++i) {
          const A* xi = t + i * rs;
          const A ir = inv_r[i], sc = scale[i];
          if (sc == A(1)) {
            c[i] += static_cast<double>(coefficient_dot(al, be, xi, ir, len)) * static_cast<double>(ir);
          } else {  // u = (s x) / ||s x||
            A s = 0;
            for (int64_t k = 0; k < len; ++k) {
              const A u = (xi[k] * sc) * ir;
              s += (al[k] + be[k] * u) * u;
            }
            c[i] += static_cast<double>(s);
          }
        }
      }
      for (int64_t d0 = 0; d0 < d; d0 += kTile) {  // pass 2: write dX
        const int64_t len = std::min(kTile, d - d0);
        int64_t rs;
        const A* t = tile_rows(rows, b, n, d0, len, tile.data(), &rs);
        const A* al = alpha + d0;
        const A* be = beta + d0;
        for (int64_t i = 0; i < n; ++i) {
          const A* xi = t + i * rs;
          const A ir = inv_r[i], sc = scale[i];  // ir = 0 below the floor: the whole row gets 0
          const A gr = gr_in ? gr_in[b * n + i] : A(0);
          T* dst = out + (b * n + i) * d + d0;
          if (sc == A(1)) {
            // (G - c u) / r + g_r u with u = x / r; the x terms share one coefficient.
            const A cu = static_cast<A>(c[i]) * ir;
            write_unscaled_row(dst, al, be, xi, ir, (gr - cu) * ir, len);
          } else {  // 1 / r = s / ||y||, applied last: s / ||y|| may not be representable
            const A ci = static_cast<A>(c[i]);
            for (int64_t k = 0; k < len; ++k) {
              const A u = (xi[k] * sc) * ir;
              dst[k] = store_as<T>(((al[k] + be[k] * u - ci * u) * ir) * sc + gr * u);
            }
          }
        }
      }
    }
  });
}

}  // namespace rows_impl

using namespace rows_impl;

at::Tensor normalize(const at::Tensor& x, double eps) {
  check_rows(x, "normalize", at::kCPU);
  at::Tensor u = contiguous_like(x);
  FASTDIV_DISPATCH(x, "fastdiv::normalize", [&] { normalize_kernel<scalar_t>(x, eps, u); });
  return u;
}

at::Tensor normalize_pullback(const at::Tensor& x, const at::Tensor& grad, double eps) {
  auto [g, dx] = prepare_normalize_pullback(x, grad, at::kCPU);
  FASTDIV_DISPATCH(x, "fastdiv::normalize_pullback", [&] { normalize_pullback_kernel<scalar_t>(x, g, eps, dx); });
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> column_stats(const at::Tensor& x, double eps) {
  auto [r, mean, var] = prepare_column_stats(x, at::kCPU);
  FASTDIV_DISPATCH(x, "fastdiv::column_stats", [&] { column_stats_kernel<scalar_t>(x, eps, r, mean, var); });
  return {r, mean, var};
}

at::Tensor column_stats_pullback(const at::Tensor& x, const at::Tensor& r, const at::Tensor& mean,
                                 const std::optional<at::Tensor>& grad_r,
                                 const std::optional<at::Tensor>& grad_mean,
                                 const std::optional<at::Tensor>& grad_var, double eps) {
  ColumnStatsPullbackArgs args = prepare_column_stats_pullback(x, r, mean, grad_r, grad_mean, grad_var, at::kCPU);
  auto given = [](const at::Tensor& t) { return t.defined() ? &t : nullptr; };
  FASTDIV_DISPATCH(x, "fastdiv::column_stats_pullback", [&] {
    column_stats_pullback_kernel<scalar_t>(x, args.r, args.mean, given(args.grad_r), given(args.grad_mean),
                                           given(args.grad_var), eps, args.dx);
  });
  return args.dx;
}

}  // namespace fastdiv::cpu::FASTDIV_ISA
