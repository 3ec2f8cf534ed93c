#include "heads.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace fastdiv::cpu {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Cosines {
  const double* C;  // n x n cosine matrix
  int64_t n;
  double at(int64_t i, int64_t j) const { return C[i * n + j]; }
};

// -log det(C + jitter I) by Cholesky; W = dL/dC = -(C + jitter I)^{-1} when W is given.
double dpp(const Cosines& c, double jitter, double* W, double* work) {
  const int64_t n = c.n;
  double* L = work;           // lower Cholesky factor
  double* Linv = work + n * n;  // its inverse (lower)
  for (int64_t i = 0; i < n * n; ++i) L[i] = c.C[i];
  for (int64_t i = 0; i < n; ++i) L[i * n + i] += jitter;
  double logdet = 0;
  for (int64_t j = 0; j < n; ++j) {
    double pivot = L[j * n + j];
    for (int64_t k = 0; k < j; ++k) pivot -= L[j * n + k] * L[j * n + k];
    // A non-positive pivot cannot happen for finite cosines with jitter > 0; NaN input lands here.
    if (!(pivot > 0)) return kNaN;
    const double ljj = std::sqrt(pivot);
    L[j * n + j] = ljj;
    logdet += 2 * std::log(ljj);
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

double mean_cos(const Cosines& c, double* W) {
  const int64_t n = c.n;
  const double w = 1.0 / static_cast<double>(n * (n - 1));
  double s = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (i != j) {
        s += c.at(i, j);
        if (W) W[i * n + j] = w;
      }
  return s * w;
}

// rho_hat = ||mean_i u_i|| = sqrt(||sum_i u_i||^2) / n.
double mrl(double resultant, int64_t n) {
  return std::isnan(resultant) ? resultant : std::sqrt(std::max(resultant, 0.0)) / static_cast<double>(n);
}

double kappa_of(double rho, double p) { return rho * (p - rho) / (1 - rho * rho); }

// R_kappa = kappa_hat / p, rho clamped at rho_max. W_ij = dL/d(sum C) for every (i, j).
double kappa_loss(const Cosines& c, double resultant, double p, double rho_max, double* W) {
  const int64_t n = c.n;
  const double rho = mrl(resultant, n);
  const double rc = std::min(rho, rho_max);
  const double loss = std::isnan(rho) ? rho : kappa_of(rc, p) / p;
  if (W) {
    double w = 0;
    // Zero gradient above the clamp, and where the gradients cancel (rho ~ 0): there the MRL has no
    // derivative (the norm's kink at the origin; torch.linalg.vector_norm also gives 0) and a rho of
    // rounding size (~1e-17, fused multiply-adds leave it where plain arithmetic cancels exactly)
    // would turn d rho / d u = m / (n rho) into amplified noise.
    constexpr double kRhoFloor = 1e-10;
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

double max_cos(const Cosines& c, double* W) {
  const int64_t n = c.n;
  int64_t bi = 0, bj = 1;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) {
      if (std::isnan(c.at(i, j))) return kNaN;
      if (c.at(i, j) > c.at(bi, bj)) bi = i, bj = j;
    }
  if (W) W[bi * n + bj] = 1;
  return c.at(bi, bj);
}

// log sum exp of C over the pairs i != j (smoothmax) or i < j (GAL); W gets the softmax weights.
double logsumexp_pairs(const Cosines& c, bool ordered_pairs, double* W) {
  const int64_t n = c.n;
  auto in_set = [&](int64_t i, int64_t j) { return ordered_pairs ? i != j : i < j; };
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (in_set(i, j)) m = std::max(m, c.at(i, j));
  double z = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (in_set(i, j)) z += std::exp(c.at(i, j) - m);
  if (W)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        if (in_set(i, j)) W[i * n + j] = std::exp(c.at(i, j) - m) / z;
  return m + std::log(z);
}

// Omega_M = rho_hat^2 = ||sum_i u_i||^2 / n^2 = sum_ij C_ij / n^2.
double mean_penalty(double resultant, int64_t n, double* W) {
  const double w = 1.0 / static_cast<double>(n * n);
  if (W)
    for (int64_t i = 0; i < n * n; ++i) W[i] = w;
  return resultant * w;
}

}  // namespace

bool needs_resultant(Head head) { return head == Head::kKappa || head == Head::kMeanPenalty; }

void inverse_norms(const double* S, int64_t n, double eps, double* inv_r) {
  for (int64_t i = 0; i < n; ++i) {
    const double sq = S[i * n + i];
    const double norm = std::sqrt(std::max(sq, 0.0));
    inv_r[i] = std::isnan(sq) ? sq : (norm > eps ? 1.0 / norm : 0.0);
  }
}

Head parse_head(const std::string& name) {
  if (name == "dpp") return Head::kDpp;
  if (name == "mean") return Head::kMeanCos;
  if (name == "kappa") return Head::kKappa;
  if (name == "max") return Head::kMaxCos;
  if (name == "smoothmax") return Head::kSmoothmax;
  if (name == "gal") return Head::kGal;
  if (name == "mean_penalty") return Head::kMeanPenalty;
  if (name == "sparsity") return Head::kSparsity;
  TORCH_CHECK_VALUE(false, "fastdiv: head must be one of dpp, mean, kappa, max, smoothmax, gal, ",
                    "mean_penalty, sparsity; got '", name, "'");
}

double head_forward(Head head, const double* S, const double* l1, double resultant, int64_t n, int64_t d,
                    const HeadParams& prm, double* A, double* beta, double* work) {
  double* C = work;
  double* W = work + n * n;
  double* inv_r = work + 2 * n * n;
  double* inner = work + 2 * n * n + 2 * n;  // 2 n^2 + 2 n scratch for the Cholesky

  inverse_norms(S, n, prm.eps, inv_r);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) C[i * n + j] = S[i * n + j] * inv_r[i] * inv_r[j];
  for (int64_t i = 0; i < n * n; ++i) W[i] = 0;
  for (int64_t i = 0; i < n; ++i) beta[i] = 0;

  const Cosines c{C, n};
  const double p = prm.p > 0 ? prm.p : static_cast<double>(d);
  const double nn = static_cast<double>(n);
  double loss = 0;
  switch (head) {
    case Head::kDpp: loss = dpp(c, prm.jitter, W, inner); break;
    case Head::kMeanCos: loss = mean_cos(c, W); break;
    case Head::kKappa: loss = kappa_loss(c, resultant, p, prm.rho_max, W); break;
    case Head::kMaxCos: loss = max_cos(c, W); break;
    case Head::kSmoothmax: loss = logsumexp_pairs(c, true, W); break;
    case Head::kGal: loss = logsumexp_pairs(c, false, W); break;
    case Head::kMeanPenalty: loss = mean_penalty(resultant, n, W); break;
    case Head::kSparsity:
      for (int64_t i = 0; i < n; ++i) {
        loss -= l1[i] * inv_r[i] / nn;
        beta[i] = -inv_r[i] / nn;
      }
      break;
  }

  // Chain rule from dL/dC to dL/dS (S entries taken as independent, DESIGN.md §2): C_ij = S_ij r_i^-1
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
    for (int64_t j = 0; j < n; ++j) A[i * n + j] = Shat[i * n + j] + Shat[j * n + i];

  if (std::isnan(loss)) {
    for (int64_t i = 0; i < n * n; ++i) A[i] = kNaN;
    for (int64_t i = 0; i < n; ++i) beta[i] = kNaN;
  }
  return loss;
}

void gram_statistics(const double* S, double resultant, int64_t n, int64_t d, const HeadParams& prm,
                     double* out, double* work) {
  double* C = work;
  double* inv_r = work + n * n;
  double* inner = work + n * n + n;
  inverse_norms(S, n, prm.eps, inv_r);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) C[i * n + j] = S[i * n + j] * inv_r[i] * inv_r[j];
  const Cosines c{C, n};
  const double rho = mrl(resultant, n);
  out[0] = rho;
  out[1] = std::isnan(rho) ? rho : kappa_of(std::min(rho, prm.rho_max), static_cast<double>(d));
  out[2] = mean_cos(c, nullptr);
  out[3] = max_cos(c, nullptr);
  out[4] = dpp(c, prm.jitter, nullptr, inner);
}

}  // namespace fastdiv::cpu
