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

// rho_hat = ||mean_i u_i|| = sqrt(sum_ij C_ij) / n.
double mrl(const Cosines& c) {
  double s = 0;
  for (int64_t i = 0; i < c.n * c.n; ++i) s += c.C[i];
  // Rounding can leave sum_ij C_ij a hair below zero for anti-aligned rows.
  return std::isnan(s) ? s : std::sqrt(std::max(s, 0.0)) / static_cast<double>(c.n);
}

double kappa_of(double rho, double p) { return rho * (p - rho) / (1 - rho * rho); }

// R_kappa = kappa_hat / p, rho clamped at rho_max. W_ij = dL/d(sum C) for every (i, j).
double kappa_loss(const Cosines& c, double p, double rho_max, double* W) {
  const int64_t n = c.n;
  const double rho = mrl(c);
  const double rc = std::min(rho, rho_max);
  const double loss = std::isnan(rho) ? rho : kappa_of(rc, p) / p;
  if (W) {
    double w = 0;
    // Zero gradient above the clamp and at rho = 0 (where d rho / d sum C is infinite but the
    // reference's norm backward is zero, like torch.linalg.vector_norm at the origin).
    if (rho < rho_max && rho > 0) {
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

double mean_penalty(const Cosines& c, double* W) {
  const double w = 1.0 / static_cast<double>(c.n * c.n);
  double s = 0;
  for (int64_t i = 0; i < c.n * c.n; ++i) {
    s += c.C[i];
    if (W) W[i] = w;
  }
  return s * w;
}

}  // namespace

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

double head_forward(Head head, const double* S, const double* l1, int64_t n, int64_t d,
                    const HeadParams& prm, double* A, double* beta, double* work) {
  double* C = work;
  double* W = work + n * n;
  double* r = work + 2 * n * n;
  double* active = r + n;
  double* inner = work + 2 * n * n + 2 * n;  // 2 n^2 + 2 n scratch for the Cholesky

  for (int64_t i = 0; i < n; ++i) {
    const double norm = std::sqrt(std::max(S[i * n + i], 0.0));
    active[i] = norm > prm.eps ? 1.0 : 0.0;
    r[i] = active[i] != 0 ? norm : prm.eps;
    // A NaN norm must stay NaN (std::max would hide it).
    if (std::isnan(S[i * n + i])) r[i] = S[i * n + i];
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) C[i * n + j] = S[i * n + j] / (r[i] * r[j]);
  for (int64_t i = 0; i < n * n; ++i) W[i] = 0;
  for (int64_t i = 0; i < n; ++i) beta[i] = 0;

  const Cosines c{C, n};
  const double p = prm.p > 0 ? prm.p : static_cast<double>(d);
  double loss = 0;
  switch (head) {
    case Head::kDpp: loss = dpp(c, prm.jitter, W, inner); break;
    case Head::kMeanCos: loss = mean_cos(c, W); break;
    case Head::kKappa: loss = kappa_loss(c, p, prm.rho_max, W); break;
    case Head::kMaxCos: loss = max_cos(c, W); break;
    case Head::kSmoothmax: loss = logsumexp_pairs(c, true, W); break;
    case Head::kGal: loss = logsumexp_pairs(c, false, W); break;
    case Head::kMeanPenalty: loss = mean_penalty(c, W); break;
    case Head::kSparsity:
      for (int64_t i = 0; i < n; ++i) {
        loss -= l1[i] / (static_cast<double>(n) * r[i]);
        beta[i] = -1.0 / (static_cast<double>(n) * r[i]);
      }
      break;
  }

  // Chain rule from dL/dC to dL/dS (S entries taken as independent, DESIGN.md §2). C_ii is the
  // constant 1 for rows above the norm floor; below it r_i = eps is constant and C_ii = S_ii / eps^2.
  double* Shat = inner;
  for (int64_t i = 0; i < n; ++i) {
    double diag = 0;
    if (active[i] != 0) {
      for (int64_t j = 0; j < n; ++j)
        if (j != i) diag -= (W[i * n + j] + W[j * n + i]) * C[i * n + j];
      diag /= 2 * S[i * n + i];
      if (head == Head::kSparsity) diag += l1[i] / (2 * static_cast<double>(n) * r[i] * r[i] * r[i]);
    } else {
      diag = W[i * n + i] / (prm.eps * prm.eps);
    }
    for (int64_t j = 0; j < n; ++j) Shat[i * n + j] = (i == j) ? diag : W[i * n + j] / (r[i] * r[j]);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) A[i * n + j] = Shat[i * n + j] + Shat[j * n + i];

  if (std::isnan(loss)) {
    for (int64_t i = 0; i < n * n; ++i) A[i] = kNaN;
    for (int64_t i = 0; i < n; ++i) beta[i] = kNaN;
  }
  return loss;
}

void gram_statistics(const double* S, int64_t n, int64_t d, const HeadParams& prm, double* out,
                     double* work) {
  double* C = work;
  double* inner = work + n * n;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double ri = std::max(std::sqrt(std::max(S[i * n + i], 0.0)), prm.eps);
      const double rj = std::max(std::sqrt(std::max(S[j * n + j], 0.0)), prm.eps);
      C[i * n + j] = std::isnan(S[i * n + i] + S[j * n + j]) ? kNaN : S[i * n + j] / (ri * rj);
    }
  const Cosines c{C, n};
  const double rho = mrl(c);
  out[0] = rho;
  out[1] = std::isnan(rho) ? rho : kappa_of(std::min(rho, prm.rho_max), static_cast<double>(d));
  out[2] = mean_cos(c, nullptr);
  out[3] = max_cos(c, nullptr);
  out[4] = dpp(c, prm.jitter, nullptr, inner);
}

}  // namespace fastdiv::cpu
