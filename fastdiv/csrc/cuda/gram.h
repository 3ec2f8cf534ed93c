// Launchers of the Gram-family CUDA kernels (fastdiv/csrc/cuda/gram.cu). Pure CUDA: raw device pointers, sizes,
// strides and a stream; the torch glue is fastdiv/csrc/cuda/gram_ops.cpp. "acc" buffers have the accumulation
// type of x (double for fp64 x, float otherwise) and are contiguous. Every launcher returns the launch
// status (cudaSuccess without launching anything for an empty batch).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/common.h"
#include "head_math.h"

namespace fastdiv::cuda {

// Up to this many samples, gram_loss and concentration_stats are one launch per call: the Gram, the
// column resultant and the n x n head of an input all run in one thread block.
constexpr int64_t kMaxFusedSamples = 32;

// Raw Gram S = X X^T [B, n, n] and, when l1 is not null, row l1 norms [B, n]. One launch.
cudaError_t gram(const RowsView& x, void* s, void* l1, cudaStream_t stream);

// Bytes of device scratch gram_loss / concentration_stats need: 0 for n <= kMaxFusedSamples, else the
// double-precision Gram, head coefficients and head scratch of a chunk of inputs.
size_t gram_workspace_bytes(int64_t batch, int64_t n);

// Per-input loss [B], pullback coefficients A [B, n, n], for Head::kSparsity beta [B, n] (beta may be null
// for the other heads), and the row scales [B, n] the pullback multiplies its rows by (1 except for rows
// whose squares leave the accumulation range: head_math.h, "Row scaling"). workspace:
// gram_workspace_bytes(B, n) bytes (may be null when 0).
cudaError_t gram_loss(const RowsView& x, heads::Head head, const heads::Params& prm, void* loss, void* a,
                      void* beta, void* row_scale, void* workspace, cudaStream_t stream);

// [B, 6] acc: rho, rho_q (l_q mean resultant length, q >= 1, q = inf for the max norm), kappa, mean
// cosine, coherence, dpp. workspace as for gram_loss.
cudaError_t concentration_stats(const RowsView& x, double q, const heads::Params& prm, void* out, void* workspace,
                                cudaStream_t stream);

// dX_bi = scale_b row_scale_bi (A_b X_b + beta_b ⊙ sign(X_b))_i into dx (contiguous [B, n, D], x's dtype).
// a [B, n, n] and beta [B, n] (null: no l1 term) contiguous acc; scale [B] acc with element stride
// scale_stride (null: 1); row_scale [B, n] contiguous acc (null: 1).
cudaError_t gram_pullback(const RowsView& x, const void* a, const void* beta, const void* scale,
                          int64_t scale_stride, const void* row_scale, void* dx, cudaStream_t stream);

}  // namespace fastdiv::cuda
