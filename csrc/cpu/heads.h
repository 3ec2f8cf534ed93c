// The n x n "heads": every Gram-family loss of one input as a function of its raw Gram S = X X^T.
//
// A head returns the loss and the coefficients of its pullback, dL/dX = A X + beta ⊙ sign(X)
// (DESIGN.md §2), so the backward pass is a single read of X. Heads run in double: they cost O(n^3)
// per input against O(n^2 D) for the Gram, and double keeps log det and 1 - rho^2 accurate.
#pragma once

#include <cstdint>
#include <string>

namespace fastdiv::cpu {

enum class Head { kDpp, kMeanCos, kKappa, kMaxCos, kSmoothmax, kGal, kMeanPenalty, kSparsity };

// Parses the head name used in the op schema; throws c10::Error naming the valid names.
Head parse_head(const std::string& name);

struct HeadParams {
  double eps;      // floor on row norms: rows with ||x_i|| <= eps have no direction (u_i = 0)
  double jitter;   // R_DPP diagonal jitter
  double p;        // R_kappa dimension; <= 0 means D
  double rho_max;  // R_kappa clamp on the mean resultant length
};

// Scratch doubles head_forward needs for n samples.
inline int64_t head_workspace(int64_t n) { return 4 * n * n + 4 * n; }

// True for the heads whose value is a function of the resultant ||sum_i u_i||^2 (R_kappa, Omega_M).
// Their callers pass that resultant computed from the column sums of u: the Gram's sum_ij C_ij has an
// absolute error of ~1e-7 n^2 in fp32, and sqrt turns that into ~3e-4 when the gradients cancel.
bool needs_resultant(Head head);

// 1 / ||x_i|| from the Gram's diagonal, 0 for rows at or below the norm floor (NaN stays NaN).
void inverse_norms(const double* S, int64_t n, double eps, double* inv_r);

// S: n x n raw Gram (double), l1: row l1 norms (only read by kSparsity), d: feature dimension,
// resultant: ||sum_i u_i||^2 (only read when needs_resultant(head)).
// Writes A (n x n, symmetric) and beta (n). When the loss is NaN (NaN/Inf input), A and beta are NaN.
double head_forward(Head head, const double* S, const double* l1, double resultant, int64_t n, int64_t d,
                    const HeadParams& params, double* A, double* beta, double* work);

// The concentration statistics of one input from its Gram and resultant ||sum_i u_i||^2: writes rho,
// kappa (p = d, rho clamped), mean cosine, coherence (max cosine) and the DPP value into out[0..4].
void gram_statistics(const double* S, double resultant, int64_t n, int64_t d, const HeadParams& params,
                     double* out, double* work);

}  // namespace fastdiv::cpu
