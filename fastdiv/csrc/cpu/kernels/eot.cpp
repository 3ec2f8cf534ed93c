// The fused EOT step (docs/design.md §2.6): mean of the n sample gradients, sign (l_inf) or l2 direction,
// optional MI-FGSM momentum, step, projection onto the eps-ball around x0 and clamp to [lo, hi].
//
// One batch element per iteration. The mean gradient (then the momentum) lives in a D-long acc
// buffer, so grads is read once whatever the norm: l_inf needs nothing else; l2 sums, while it forms the
// mean, the direction's norm and the two sums that give the stepped offset's norm, then makes one pass
// to write (MI-FGSM's l2 direction is the momentum, so there one pass more forms the offset's norm). Norms are
// reduced in the accumulation type per block or tile and in double across them, as rows.cpp does.
//
// NaN/Inf propagate: sign(NaN) = NaN, and the clamps below pass NaN through (std::clamp does not
// promise to), so a NaN gradient poisons only its own example.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/kernels/tile.h"

namespace fastdiv::cpu::FASTDIV_ISA {
namespace eot_impl {

constexpr int64_t kVec = 64;  // columns of the mean gradient kept in registers across the n rows

// Both written as single selects, which every variant vectorizes (nested selects stayed scalar with
// branches in the AVX2 and default variants).
template <typename A>
inline A sign_nan(A v) {
  const A s = static_cast<A>(v > 0) - static_cast<A>(v < 0);  // 0 stays 0
  return v != v ? v : s;                                        // NaN stays NaN
}

template <typename A>
inline A clamp_nan(A v, A lo, A hi) {
  const A t = v < lo ? lo : v;  // NaN compares false both times and passes through
  return t > hi ? hi : t;
}

// 1 / norm, 0 for a zero norm (no direction), NaN for a NaN norm.
template <typename A>
inline A inv_or_zero(double norm) {
  return norm == 0 ? A(0) : static_cast<A>(1.0 / norm);
}

template <typename A>
double sum_sq(const A* v, int64_t d) {
  double s = 0;
  for (int64_t d0 = 0; d0 < d; d0 += kTile) s += static_cast<double>(dot(v + d0, v + d0, std::min(kTile, d - d0)));
  return s;
}

template <typename A>
double sum_abs(const A* v, int64_t d) {
  double s = 0;
  for (int64_t d0 = 0; d0 < d; d0 += kTile) s += static_cast<double>(abs_sum(v + d0, std::min(kTile, d - d0)));
  return s;
}

// The l_inf step of columns [0, len): out = clamp(x0 + clamp((x + a sign(dir)) - x0, -e, e), lo, hi) (the
// outer clamp only with clip). Raw pointers and the clip test outside the loop: written as a closure
// called from the mean loop, the AVX2 and default variants compiled it to scalar code with branches
// (7x slower than the AVX-512 one).
template <typename T, typename A>
void linf_write(const T* x, const T* x0, const A* dir, A a, A e, bool clip, A lo, A hi, T* out, int64_t len) {
  if (clip) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      const A x0v = load_as<A>(x0[k]);
      const A y = x0v + clamp_nan((load_as<A>(x[k]) + a * sign_nan(dir[k])) - x0v, -e, e);
      out[k] = store_as<T>(clamp_nan(y, lo, hi));
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      const A x0v = load_as<A>(x0[k]);
      out[k] = store_as<T>(x0v + clamp_nan((load_as<A>(x[k]) + a * sign_nan(dir[k])) - x0v, -e, e));
    }
  }
}

// The l2 step's offset delta_k = (x_k + a v_k inv) - x0_k: one definition for both passes below.
template <typename T, typename A>
inline A l2_offset(const T* x, const T* x0, const A* v, A a, A inv, int64_t k) {
  return (load_as<A>(x[k]) + a * (v[k] * inv)) - load_as<A>(x0[k]);
}

// ||delta||^2, per tile in A and across tiles in double (as the other norms here). Raw pointers, no closure:
// the loops vectorize.
template <typename T, typename A>
double l2_offset_sumsq(const T* x, const T* x0, const A* v, A a, A inv, int64_t d) {
  double s = 0;
  for (int64_t d0 = 0; d0 < d; d0 += kTile) {
    const int64_t end = std::min(kTile, d - d0) + d0;
    A t = 0;
#pragma omp simd reduction(+ : t)
    for (int64_t k = d0; k < end; ++k) {
      const A delta = l2_offset(x, x0, v, a, inv, k);
      t += delta * delta;
    }
    s += static_cast<double>(t);
  }
  return s;
}

// out = clamp(x0 + delta f) (the clamp only with clip).
template <typename T, typename A>
void l2_write(const T* x, const T* x0, const A* v, A a, A inv, A f, bool clip, A lo, A hi, T* out, int64_t d) {
  if (clip) {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k)
      out[k] = store_as<T>(clamp_nan(load_as<A>(x0[k]) + l2_offset(x, x0, v, a, inv, k) * f, lo, hi));
  } else {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) out[k] = store_as<T>(load_as<A>(x0[k]) + l2_offset(x, x0, v, a, inv, k) * f);
  }
}

template <typename T>
void eot_kernel(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& g, const at::Tensor& alpha,
                const at::Tensor& eps, bool l2, double lo, double hi, bool clip, const at::Tensor* m,
                double decay, at::Tensor& out, at::Tensor* m_out) {
  using A = acc_t<T>;
  const int64_t B = g.size(0), n = g.size(1), d = g.size(2);
  const auto rows = rows_of<T>(g);
  const T* xp = x.const_data_ptr<T>();
  const T* x0p = x0.const_data_ptr<T>();
  const int64_t sx = x.stride(0), sx0 = x0.stride(0);
  const A* ap = alpha.const_data_ptr<A>();
  const A* ep = eps.const_data_ptr<A>();
  const A* mp = m ? m->const_data_ptr<A>() : nullptr;
  const int64_t sm = m ? m->stride(0) : 0;
  A* mo = m_out ? m_out->data_ptr<A>() : nullptr;
  T* op = out.data_ptr<T>();
  const A lo_a = static_cast<A>(lo), hi_a = static_cast<A>(hi), decay_a = static_cast<A>(decay);
  const A n_a = static_cast<A>(n);
  at::parallel_for(0, B, batch_grain(n + 2, d), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(d);
    A* v = buf.data();
    for (int64_t b = begin; b < end; ++b) {
      const A a = ap[b], e = ep[b];
      const T* xb = xp + b * sx;
      const T* x0b = x0p + b * sx0;
      T* ob = op + b * d;
      // l_inf without momentum needs nothing but the mean: write the output from each block's means
      const bool direct = !l2 && !mp;
      // Mean gradient, kVec columns at a time summed over the n rows in registers (the buffer is not
      // re-streamed once per row). Rows are added in order, as the reference does: the sign of a
      // near-zero sum must not depend on the backend.
      // l2 without momentum: ||mean||^2 is summed here, per kVec block in A and across blocks in double, so
      // the direction needs no pass of its own.
      const bool l2_sq_here = l2 && !mp;
      // ... and with them the two sums that give the stepped offset's norm without a pass of its own:
      // delta = p + a v / ||v|| with p = x - x0, so ||delta||^2 = ||p||^2 + 2 (a / ||v||) <p, v> + a^2 (the last
      // a^2 ||v||^2 / ||v||^2, written out below so a zero direction gives 0).
      double vsq = 0, pp = 0, pv = 0;
      int64_t k0 = 0;
      for (; k0 + kVec <= d; k0 += kVec) {
        A acc[kVec];
        const T* r0 = rows.row(b, 0) + k0;
#pragma omp simd
        for (int64_t j = 0; j < kVec; ++j) acc[j] = load_as<A>(r0[j]);
        for (int64_t i = 1; i < n; ++i) {
          const T* ri = rows.row(b, i) + k0;
#pragma omp simd
          for (int64_t j = 0; j < kVec; ++j) acc[j] += load_as<A>(ri[j]);
        }
        if (direct) {
          A mean[kVec];
#pragma omp simd
          for (int64_t j = 0; j < kVec; ++j) mean[j] = acc[j] / n_a;
          linf_write(xb + k0, x0b + k0, mean, a, e, clip, lo_a, hi_a, ob + k0, kVec);
        } else if (l2_sq_here) {
          A block_sq = 0, block_pp = 0, block_pv = 0;
          const T* xk = xb + k0;
          const T* x0k = x0b + k0;
#pragma omp simd reduction(+ : block_sq, block_pp, block_pv)
          for (int64_t j = 0; j < kVec; ++j) {
            const A mean = acc[j] / n_a;
            const A p = load_as<A>(xk[j]) - load_as<A>(x0k[j]);
            v[k0 + j] = mean;
            block_sq += mean * mean;
            block_pp += p * p;
            block_pv += p * mean;
          }
          vsq += static_cast<double>(block_sq);
          pp += static_cast<double>(block_pp);
          pv += static_cast<double>(block_pv);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < kVec; ++j) v[k0 + j] = acc[j] / n_a;
        }
      }
      for (; k0 < d; ++k0) {  // the last d % kVec columns
        A s = load_as<A>(rows.row(b, 0)[k0]);
        for (int64_t i = 1; i < n; ++i) s += load_as<A>(rows.row(b, i)[k0]);
        if (direct) {
          const A mean = s / n_a;
          linf_write(xb + k0, x0b + k0, &mean, a, e, clip, lo_a, hi_a, ob + k0, 1);
        } else {
          v[k0] = s / n_a;
          const A p = load_as<A>(xb[k0]) - load_as<A>(x0b[k0]);
          vsq += static_cast<double>(v[k0] * v[k0]);
          pp += static_cast<double>(p * p);
          pv += static_cast<double>(p * v[k0]);
        }
      }
      if (direct) continue;
      if (mp) {  // MI-FGSM: m <- decay m + g / ||g||_1
        const A inv_l1 = inv_or_zero<A>(sum_abs(v, d));
        const A* mb = mp + b * sm;
        A* mob = mo + b * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) {
          v[k] = decay_a * mb[k] + v[k] * inv_l1;
          mob[k] = v[k];
        }
      }
      if (!l2) {
        linf_write(xb, x0b, v, a, e, clip, lo_a, hi_a, ob, d);
        continue;
      }
      double norm;
      A inv;
      if (l2_sq_here) {
        const double vn = std::sqrt(vsq);
        inv = inv_or_zero<A>(vn);
        const double step = inv == A(0) ? 0.0 : static_cast<double>(a);  // ||a v / ||v||||; a NaN inv makes sq NaN
        const double sq = pp + 2.0 * static_cast<double>(a) * static_cast<double>(inv) * pv + step * step;
        // rounding can take a vanishing ||delta||^2 below 0; it is then < eps^2 either way (no projection)
        norm = std::sqrt(sq < 0 ? 0.0 : sq);
      } else {  // MI-FGSM: the direction is the momentum, known only now
        inv = inv_or_zero<A>(std::sqrt(sum_sq(v, d)));
        // the stepped offset delta = (x + a v / ||v||) - x0 and its norm, then the write of x0 + delta f: delta
        // is formed in both passes (the same expression, so the same values) instead of stored and re-read
        norm = std::sqrt(l2_offset_sumsq(xb, x0b, v, a, inv, d));
      }
      // scale delta by min(1, eps / ||delta||); a zero (or NaN) norm leaves it unchanged
      const A f = norm > static_cast<double>(e) ? static_cast<A>(static_cast<double>(e) / norm) : A(1);
      l2_write(xb, x0b, v, a, inv, f, clip, lo_a, hi_a, ob, d);
    }
  });
}

}  // namespace eot_impl

using namespace eot_impl;

std::tuple<at::Tensor, at::Tensor> eot_step(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grads,
                                            const at::Tensor& alpha, const at::Tensor& eps, const std::string& norm,
                                            double lo, double hi, bool clip,
                                            const std::optional<at::Tensor>& momentum, double decay) {
  EotStepArgs args = prepare_eot_step(x, x0, grads, alpha, eps, norm, momentum, at::kCPU);
  const bool has_m = args.momentum.defined();
  if (args.out.numel() == 0) return {args.out, args.momentum_out};
  FASTDIV_DISPATCH(grads, "fastdiv::eot_step", [&] {
    eot_kernel<scalar_t>(x, x0, grads, args.alpha, args.eps, args.l2, lo, hi, clip, has_m ? &args.momentum : nullptr,
                         decay, args.out, has_m ? &args.momentum_out : nullptr);
  });
  return {args.out, args.momentum_out};
}

}  // namespace fastdiv::cpu::FASTDIV_ISA
