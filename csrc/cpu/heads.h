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
  double eps;      // floor on row norms: r_i = max(sqrt(S_ii), eps)
  double jitter;   // R_DPP diagonal jitter
  double p;        // R_kappa dimension; <= 0 means D
  double rho_max;  // R_kappa clamp on the mean resultant length
};

// Scratch doubles head_forward needs for n samples.
inline int64_t head_workspace(int64_t n) { return 4 * n * n + 4 * n; }

// S: n x n raw Gram (double), l1: row l1 norms (only read by kSparsity), d: feature dimension.
// Writes A (n x n, symmetric) and beta (n). When the loss is NaN (NaN/Inf input), A and beta are NaN.
double head_forward(Head head, const double* S, const double* l1, int64_t n, int64_t d,
                    const HeadParams& params, double* A, double* beta, double* work);

// The concentration statistics of one input from its Gram: writes rho, kappa (p = d, clamped),
// mean cosine, coherence (max cosine) and the DPP value into out[0..4].
void gram_statistics(const double* S, int64_t n, int64_t d, const HeadParams& params, double* out,
                     double* work);

}  // namespace fastdiv::cpu
