// Launchers of the "rows" CUDA kernels (fastdiv/csrc/cuda/rows.cu): unit rows u_i = x_i / r_i with
// r_i = max(||x_i||, eps), the per-column statistics of u behind the Diverse-Directions variance
// penalty, and their pullbacks (docs/design.md §2.5). Pure CUDA: raw device pointers, sizes, strides and a
// stream; the torch glue is fastdiv/csrc/cuda/rows_ops.cpp and the semantics are those of fastdiv/csrc/cpu/kernels/rows.cpp.
//
// x is a RowsView [B, n, D]. "acc" buffers have the accumulation type of x (double for fp64 x, float
// otherwise); every buffer other than x is contiguous. Each launcher returns the launch status
// (cudaSuccess without launching anything when there is nothing to compute).
#pragma once

#include <cstdint>

#include "cuda/common.h"

namespace fastdiv::cuda {

// u = x / ||x_i|| per row (0 for rows with ||x_i|| <= eps, NaN for rows with a NaN norm) into u
// (contiguous [B, n, D], x's dtype). One launch.
cudaError_t normalize(const RowsView& x, double eps, void* u, cudaStream_t stream);

// dX_i = (G_i - <G_i, u_i> u_i) / ||x_i|| (0 for rows at or below eps) into dx (contiguous [B, n, D],
// x's dtype); grad is contiguous [B, n, D] of x's dtype. One launch.
cudaError_t normalize_pullback(const RowsView& x, const void* grad, double eps, void* dx, cudaStream_t stream);

// Row norms r [B, n] (||x_i||, no floor), column means mean [B, D] and population variances var [B, D]
// of u over the n rows (all acc). Two launches: the row norms, then the columns.
cudaError_t column_stats(const RowsView& x, double eps, void* r, void* mean, void* var, cudaStream_t stream);

// The pullback of column_stats into dx (contiguous [B, n, D], x's dtype). r [B, n] and mean [B, D] are
// column_stats' outputs (acc); grad_r [B, n], grad_mean [B, D], grad_var [B, D] (acc) may each be null,
// meaning zero. One launch.
cudaError_t column_stats_pullback(const RowsView& x, const void* r, const void* mean, const void* grad_r,
                                  const void* grad_mean, const void* grad_var, double eps, void* dx,
                                  cudaStream_t stream);

}  // namespace fastdiv::cuda
