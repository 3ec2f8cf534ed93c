// The n x n "heads": every Gram-family loss of one input as a function of its raw Gram S = X X^T.
//
// A head returns the loss and the coefficients of its pullback, dL/dX = A X + beta ⊙ sign(X)
// (docs/design.md §2.3), so the backward pass is a single read of X. Heads run in double: they cost O(n^3)
// per input against O(n^2 D) for the Gram, and double keeps log det and 1 - rho^2 accurate.
//
// Header-only and free of the C++ standard library's math so the same code runs in the CPU kernels
// (fastdiv/csrc/cpu/) and, on one thread per input, in the epilogue of the fused CUDA kernel (fastdiv/csrc/cuda/gram.cu):
// the CPU tests of every head then cover the device code too.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define FASTDIV_HD __host__ __device__
#else
#define FASTDIV_HD
#endif

namespace fastdiv::heads {

enum class Head { kDpp, kMeanCos, kKappa, kMaxCos, kSmoothmax, kGal, kMeanPenalty, kSparsity };

struct Params {
  double eps;      // floor on row norms: rows with ||x_i|| <= eps have no direction (u_i = 0)
  double jitter;   // R_DPP diagonal jitter
  double p;        // R_kappa dimension; <= 0 means D
  double rho_max;  // R_kappa clamp on the mean resultant length
};

// Below this mean resultant length R_kappa has zero gradient (see kappa_loss).
constexpr double kRhoFloor = 1e-10;

// Scratch doubles head_forward and gram_statistics need for n samples.
FASTDIV_HD inline int64_t workspace(int64_t n) { return 4 * n * n + 4 * n; }

// ---- Row scaling: norms and cosines of rows whose squares leave the accumulation dtype's range.
//
// Every loss is a function of the unit rows u_i = x_i / ||x_i|| only, so it is unchanged when row i is
// multiplied by any s_i > 0. The kernels square x in the accumulation dtype (fp32 for fp32 / bf16 / fp16
// inputs), where ||x||^2 overflows for |x| ~ 1e19 and underflows to 0 for |x| ~ 1e-23 although x and the
// losses are perfectly finite. A row "needs a scale" when its largest |x_ik| is finite, nonzero and
// outside [2^-kSafe, 2^kSafe]. An input with such a row uses every row as y_i = s_i x_i, s_i the power of
// two that brings max |y_i| into [0.5, 1) (row_scale): multiplying by a power of two is exact, so the
// cosines are those of x, and the Gram of y is far from both ends of the range. All its rows, not only
// the ones that need it: the pullback coefficients A'_ij s_j below are ~ 1 / (||y_i|| ||x_j||), normal
// numbers when every ||y_i|| is ~1, not when an unscaled row has ||y_i|| = ||x_i|| ~ 2^30 beside a row
// scaled by 2^-100. Inputs without such a row keep s = 1 (and every result bit for bit). With the
// scales, what the kernels use is
//   S'_ij = <y_i, y_j>,  r'_i = ||y_i|| = s_i ||x_i||,  floor ||x_i|| <= eps  <=>  r'_i <= eps s_i,
// and the pullback dL/dx_i = sum_j A_ij x_j + beta_i sign(x_i) of the unscaled rows has
// A_ij = s_i A'_ij s_j and beta_i = s_i beta'_i, with A', beta' the coefficients of the head on y. A_ij
// ~ 1 / (||x_i|| ||x_j||) itself is not representable in fp32 for such rows, so A'_ij s_j (the size of the
// gradient) is what a head writes, and the pullback multiplies row i of its result by s_i (the row_scale
// output of gram_loss).
//
// Scaling costs a pass over the input's rows for their maxima, so the kernels first accumulate the Gram
// unscaled (the fast path) and look at the maxima only when a diagonal entry is suspect
// (square_out_of_range: it covers every row that needs a scale), then accumulate the Gram again from y
// where a row needs one. For fp32 (kSafe = 40) a fast-path Gram has every partial sum below 2^78, far
// from the overflow at 2^128; products flushed to zero below 2^-126 change an S_ij by at most D 2^-126
// against S_ii >= D 2^-78; and the coefficients ~ 1 / (||x_i|| ||x_j||) stay normal numbers. NaN / Inf
// rows keep s = 1 and give NaN.
constexpr int kSafeExpFloat = 40, kSafeExpDouble = 450;
// Largest |exponent| of a scale: s stays a normal number of the accumulation dtype (it is an output).
constexpr int kMaxScaleExpFloat = 126, kMaxScaleExpDouble = 1022;

FASTDIV_HD inline int safe_exp(bool acc_double) { return acc_double ? kSafeExpDouble : kSafeExpFloat; }

// True when a row with largest |x_ik| = max_abs needs a scale: finite, nonzero and outside
// [2^-kSafe, 2^kSafe].
FASTDIV_HD inline bool needs_scale(double max_abs, bool acc_double) {
  const int safe = safe_exp(acc_double);
  return max_abs > 0 && max_abs - max_abs == 0 && !(max_abs >= ldexp(1.0, -safe) && max_abs <= ldexp(1.0, safe));
}

// True when the sum of squares sq of a row of d values, accumulated unscaled, may have lost its value or
// belong to a row that needs a scale: outside [d 2^(2 - 2 kSafe), 2^(2 kSafe - 2)] (0 and Inf included;
// a row of d values, all below 2^-kSafe, has sq < d 2^-2 kSafe; the margin of 4 covers the rounding of
// sq). NaN is not: NaN input stays NaN.
FASTDIV_HD inline bool square_out_of_range(double sq, int64_t d, bool acc_double) {
  const int e = 2 * safe_exp(acc_double) - 2;
  return sq == sq && !(sq >= static_cast<double>(d) * ldexp(1.0, -e) && sq <= ldexp(1.0, e));
}

// The scale s = 2^-e of a row with largest |x_ik| = max_abs = f 2^e, f in [0.5, 1), e clamped so that s
// stays a normal number; 1 for an all-zero row and for NaN / Inf (which must reach the output).
FASTDIV_HD inline double row_scale(double max_abs, bool acc_double) {
  if (!(max_abs > 0) || max_abs - max_abs != 0) return 1.0;  // 0, NaN, Inf
  int e = 0;
  (void)frexp(max_abs, &e);
  const int lim = acc_double ? kMaxScaleExpDouble : kMaxScaleExpFloat;
  e = e < -lim ? -lim : (e > lim ? lim : e);
  return ldexp(1.0, -e);
}

// True for the heads whose value is a function of the resultant ||sum_i u_i||^2 (R_kappa, Omega_M).
// Their callers pass that resultant computed from the column sums of u: the Gram's sum_ij C_ij has an
// absolute error of ~1e-7 n^2 in fp32, and sqrt turns that into ~3e-4 when the gradients cancel.
FASTDIV_HD inline bool needs_resultant(Head head) { return head == Head::kKappa || head == Head::kMeanPenalty; }

namespace detail {

FASTDIV_HD inline double quiet_nan() { return __builtin_nan(""); }
FASTDIV_HD inline bool is_nan(double v) { return v != v; }
// std::min / std::max semantics (the first argument wins unless the second compares smaller/larger),
// which decide where a NaN goes.
FASTDIV_HD inline double min_of(double a, double b) { return b < a ? b : a; }
FASTDIV_HD inline double max_of(double a, double b) { return a < b ? b : a; }

// -log det(C + jitter I) by Cholesky; W = dL/dC = -(C + jitter I)^{-1} when W is given.
FASTDIV_HD inline double dpp(const double* C, int64_t n, double jitter, double* W, double* work) {
  double* L = work;             // lower Cholesky factor
  double* Linv = work + n * n;  // its inverse (lower)
  for (int64_t i = 0; i < n * n; ++i) L[i] = C[i];
  for (int64_t i = 0; i < n; ++i) L[i * n + i] += jitter;
  double logdet = 0;
  for (int64_t j = 0; j < n; ++j) {
    double pivot = L[j * n + j];
    for (int64_t k = 0; k < j; ++k) pivot -= L[j * n + k] * L[j * n + k];
    // A non-positive pivot cannot happen for finite cosines with jitter > 0; NaN input lands here.
    if (!(pivot > 0)) return quiet_nan();
    const double ljj = sqrt(pivot);
    L[j * n + j] = ljj;
    logdet += 2 * log(ljj);
    for (int64_t i = j + 1; i < n; ++i) {
      double v = L[i * n + j];
      for (int64_t k = 0; k < j; ++k) v -= L[i * n + k] * L[j * n + k];
      L[i * n + j] = v / ljj;
    }
  }
  if (W != nullptr) {
    for (int64_t i = 0; i < n * n; ++i) Linv[i] = 0;
    for (int64_t col = 0; col < n; ++col) {  // forward substitution, L Linv = I
      for (int64_t i = col; i < n; ++i) {
        double v = (i == col) ? 1.0 : 0.0;
        for (int64_t k = col; k < i; ++k) v -= L[i * n + k] * Linv[k * n + col];
        Linv[i * n + col] = v / L[i * n + i];
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j <= i; ++j) {
        double v = 0;  // (M^{-1})_ij = sum_k Linv_ki Linv_kj, k >= max(i, j)
        for (int64_t k = i; k < n; ++k) v += Linv[k * n + i] * Linv[k * n + j];
        W[i * n + j] = -v;
        W[j * n + i] = -v;
      }
    }
  }
  return -logdet;
}

FASTDIV_HD inline double mean_cos(const double* C, int64_t n, double* W) {
  const double w = 1.0 / static_cast<double>(n * (n - 1));
  double s = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (i != j) {
        s += C[i * n + j];
        if (W) W[i * n + j] = w;
      }
  return s * w;
}

// rho_hat = ||mean_i u_i|| = sqrt(||sum_i u_i||^2) / n.
FASTDIV_HD inline double mrl(double resultant, int64_t n) {
  return is_nan(resultant) ? resultant : sqrt(max_of(resultant, 0.0)) / static_cast<double>(n);
}

FASTDIV_HD inline double kappa_of(double rho, double p) { return rho * (p - rho) / (1 - rho * rho); }

// R_kappa = kappa_hat / p, rho clamped at rho_max. W_ij = dL/d(sum C) for every (i, j).
FASTDIV_HD inline double kappa_loss(int64_t n, double resultant, double p, double rho_max, double* W) {
  const double rho = mrl(resultant, n);
  const double rc = min_of(rho, rho_max);
  const double loss = is_nan(rho) ? rho : kappa_of(rc, p) / p;
  if (W) {
    double w = 0;
    // Zero gradient above the clamp, and where the gradients cancel (rho ~ 0): there the MRL has no
    // derivative (the norm's kink at the origin; torch.linalg.vector_norm also gives 0) and a rho of
    // rounding size (~1e-17, fused multiply-adds leave it where plain arithmetic cancels exactly)
    // would turn d rho / d u = m / (n rho) into amplified noise.
    if (rho < rho_max && rho > kRhoFloor) {
      const double one_m = 1 - rho * rho;
      const double dk_drho = (p * (1 + rho * rho) - 2 * rho) / (one_m * one_m);
      const double drho_ds = 1.0 / (2.0 * static_cast<double>(n * n) * rho);
      w = dk_drho / p * drho_ds;
    }
    for (int64_t i = 0; i < n * n; ++i) W[i] = w;
  }
  return loss;
}

FASTDIV_HD inline double max_cos(const double* C, int64_t n, double* W) {
  int64_t bi = 0, bj = 1;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) {
      if (is_nan(C[i * n + j])) return quiet_nan();
      if (C[i * n + j] > C[bi * n + bj]) bi = i, bj = j;
    }
  if (W) W[bi * n + bj] = 1;
  return C[bi * n + bj];
}

// log sum exp of C over the pairs i != j (smoothmax) or i < j (GAL); W gets the softmax weights.
FASTDIV_HD inline double logsumexp_pairs(const double* C, int64_t n, bool ordered_pairs, double* W) {
  auto in_set = [&](int64_t i, int64_t j) { return ordered_pairs ? i != j : i < j; };
  double m = -__builtin_inf();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (in_set(i, j)) m = max_of(m, C[i * n + j]);
  double z = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (in_set(i, j)) z += exp(C[i * n + j] - m);
  if (W)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        if (in_set(i, j)) W[i * n + j] = exp(C[i * n + j] - m) / z;
  return m + log(z);
}

// Omega_M = rho_hat^2 = ||sum_i u_i||^2 / n^2 = sum_ij C_ij / n^2.
FASTDIV_HD inline double mean_penalty(double resultant, int64_t n, double* W) {
  const double w = 1.0 / static_cast<double>(n * n);
  if (W)
    for (int64_t i = 0; i < n * n; ++i) W[i] = w;
  return resultant * w;
}

FASTDIV_HD inline void cosines(const double* S, const double* inv_r, int64_t n, double* C) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) C[i * n + j] = S[i * n + j] * inv_r[i] * inv_r[j];
}

}  // namespace detail

// 1 / ||y_i|| from the Gram's diagonal, 0 for rows at or below the norm floor (NaN stays NaN). scale:
// the row scales s_i of the rows the Gram was accumulated from (y_i = s_i x_i; null: all 1), so the floor
// ||x_i|| = ||y_i|| / s_i <= eps compares ||y_i|| with eps s_i.
FASTDIV_HD inline void inverse_norms(const double* S, int64_t n, double eps, const double* scale, double* inv_r) {
  for (int64_t i = 0; i < n; ++i) {
    const double sq = S[i * n + i];
    const double norm = sqrt(detail::max_of(sq, 0.0));
    const double floor = scale ? eps * scale[i] : eps;
    inv_r[i] = detail::is_nan(sq) ? sq : (norm > floor ? 1.0 / norm : 0.0);
  }
}

// S: n x n raw Gram (double) of the rows y_i = s_i x_i, l1: their l1 norms (only read by kSparsity),
// scale: the s_i (null: all 1; see row_scale), d: feature dimension, resultant: ||sum_i u_i||^2 (only
// read when needs_resultant(head)), work: workspace(n) doubles. Writes the pullback coefficients of the
// rows of x as A'_ij s_j (n x n; symmetric when no row is scaled) and beta' (n), the pullback multiplying
// row i of its result by s_i. When the loss is NaN (NaN/Inf input), A and beta are NaN.
FASTDIV_HD inline double head_forward(Head head, const double* S, const double* l1, double resultant, int64_t n,
                                      int64_t d, const Params& prm, const double* scale, double* A, double* beta,
                                      double* work) {
  double* C = work;
  double* W = work + n * n;
  double* inv_r = work + 2 * n * n;
  double* inner = work + 2 * n * n + 2 * n;  // 2 n^2 + 2 n scratch for the Cholesky

  inverse_norms(S, n, prm.eps, scale, inv_r);
  detail::cosines(S, inv_r, n, C);
  for (int64_t i = 0; i < n * n; ++i) W[i] = 0;
  for (int64_t i = 0; i < n; ++i) beta[i] = 0;

  const double p = prm.p > 0 ? prm.p : static_cast<double>(d);
  const double nn = static_cast<double>(n);
  double loss = 0;
  switch (head) {
    case Head::kDpp: loss = detail::dpp(C, n, prm.jitter, W, inner); break;
    case Head::kMeanCos: loss = detail::mean_cos(C, n, W); break;
    case Head::kKappa: loss = detail::kappa_loss(n, resultant, p, prm.rho_max, W); break;
    case Head::kMaxCos: loss = detail::max_cos(C, n, W); break;
    case Head::kSmoothmax: loss = detail::logsumexp_pairs(C, n, true, W); break;
    case Head::kGal: loss = detail::logsumexp_pairs(C, n, false, W); break;
    case Head::kMeanPenalty: loss = detail::mean_penalty(resultant, n, W); break;
    case Head::kSparsity:
      for (int64_t i = 0; i < n; ++i) {
        loss -= l1[i] * inv_r[i] / nn;
        beta[i] = -inv_r[i] / nn;
      }
      break;
  }

  // Chain rule from dL/dC to dL/dS (S entries taken as independent, docs/design.md §2.3): C_ij = S_ij r_i^-1
  // r_j^-1 with r_i = sqrt(S_ii), so C_ii is the constant 1 and dC_ij/dS_ii = -C_ij / (2 S_ii). Rows
  // below the norm floor have C = 0 identically and get no gradient.
  double* Shat = inner;
  for (int64_t i = 0; i < n; ++i) {
    double diag = 0;
    if (inv_r[i] != 0) {
      for (int64_t j = 0; j < n; ++j)
        if (j != i) diag -= (W[i * n + j] + W[j * n + i]) * C[i * n + j];
      diag *= 0.5 * inv_r[i] * inv_r[i];
      if (head == Head::kSparsity) diag += l1[i] * inv_r[i] * inv_r[i] * inv_r[i] / (2 * nn);
    }
    for (int64_t j = 0; j < n; ++j) Shat[i * n + j] = (i == j) ? diag : W[i * n + j] * inv_r[i] * inv_r[j];
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      A[i * n + j] = (Shat[i * n + j] + Shat[j * n + i]) * (scale ? scale[j] : 1.0);

  if (detail::is_nan(loss)) {
    for (int64_t i = 0; i < n * n; ++i) A[i] = detail::quiet_nan();
    for (int64_t i = 0; i < n; ++i) beta[i] = detail::quiet_nan();
  }
  return loss;
}

// The concentration statistics of one input from its Gram (of the rows scaled by scale, null: 1, as for
// head_forward) and resultant ||sum_i u_i||^2: writes rho, kappa (p = d, rho clamped), mean cosine,
// coherence (max cosine) and the DPP value into out[0..4].
FASTDIV_HD inline void gram_statistics(const double* S, double resultant, int64_t n, int64_t d, const Params& prm,
                                       const double* scale, double* out, double* work) {
  double* C = work;
  double* inv_r = work + n * n;
  double* inner = work + n * n + n;
  inverse_norms(S, n, prm.eps, scale, inv_r);
  detail::cosines(S, inv_r, n, C);
  const double rho = detail::mrl(resultant, n);
  out[0] = rho;
  out[1] = detail::is_nan(rho) ? rho : detail::kappa_of(detail::min_of(rho, prm.rho_max), static_cast<double>(d));
  out[2] = detail::mean_cos(C, n, nullptr);
  out[3] = detail::max_cos(C, n, nullptr);
  out[4] = detail::dpp(C, n, prm.jitter, nullptr, inner);
}

}  // namespace fastdiv::heads
