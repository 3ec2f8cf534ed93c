// Launcher of the fused EOT step CUDA kernels (fastdiv/csrc/cuda/eot.cu), with the semantics of the CPU kernel
// fastdiv::cpu::eot_step (fastdiv/csrc/cpu/kernels/eot.cpp). Pure CUDA: raw device pointers, sizes, strides and a stream;
// the torch glue is fastdiv/csrc/cuda/eot_ops.cpp. "acc" buffers have the accumulation type of grads (double for
// fp64 grads, float otherwise).
#pragma once

#include <cstdint>

#include "cuda/common.h"

namespace fastdiv::cuda {

// Bytes of device scratch eot_step needs: a [B, D] acc buffer for the mean gradient when l2 is set and
// there is no momentum (with momentum, momentum_out holds it); 0 otherwise.
int64_t eot_step_workspace_bytes(DType dtype, int64_t batch, int64_t d, bool l2, bool momentum);

// One EOT-PGD / EOT-MI-FGSM step on grads [B, n, D] (n >= 1), the CPU kernel's semantics:
//   g = mean_i grads[b, i, :];  v = g, or with momentum v = m_new = decay m + g / ||g||_1 (0 for ||g||_1 = 0);
//   l_inf: x_new = x0 + clamp(x + alpha_b sign(v) - x0, -eps_b, eps_b)   (sign(NaN) = NaN)
//   l2:    delta = x + alpha_b v / ||v||_2 - x0 (0 step for ||v|| = 0), x_new = x0 + delta min(1, eps_b / ||delta||_2)
//   then, when clip, x_new = clamp(x_new, lo, hi). NaN propagates through every clamp.
// x, x0: [B, D] of grads' dtype, unit stride on D, row strides x_stride_b / x0_stride_b (elements).
// alpha, eps: [B] acc, contiguous. momentum: [B, D] acc with row stride momentum_stride_b, or null (no
// momentum). out: contiguous [B, D] of grads' dtype. momentum_out: contiguous [B, D] acc (ignored
// without momentum). workspace: eot_step_workspace_bytes(...) bytes (may be null when 0). Outputs and
// workspace must not overlap the inputs; the inputs are only read.
// Returns the launch status; cudaSuccess without launching for B = 0 or D = 0; cudaErrorInvalidValue for
// n < 1 or a missing momentum_out / workspace.
cudaError_t eot_step(const RowsView& grads, const void* x, int64_t x_stride_b, const void* x0, int64_t x0_stride_b,
                     const void* alpha, const void* eps, bool l2, double lo, double hi, bool clip,
                     const void* momentum, int64_t momentum_stride_b, double decay, void* out, void* momentum_out,
                     void* workspace, cudaStream_t stream);

}  // namespace fastdiv::cuda
