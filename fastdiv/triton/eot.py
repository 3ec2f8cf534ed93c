"""Triton kernel of the fused EOT step, mirroring fastdiv/csrc/cpu/kernels/eot.cpp: one program per example.

l_inf without momentum is one pass over the n gradient rows, x and x0. Otherwise pass 1 writes the mean
gradient to an acc-dtype buffer (the momentum output, or a scratch [B, D]) while reducing its norm, and
the later passes read that buffer instead of the n rows: momentum (needs ||g||_1), the l2 norm of the
stepped offset (needs ||direction||), then the write. The n rows are summed in order, as the reference
does, so the sign of a near-zero mean does not depend on the backend.

lo, hi and decay travel in an acc-dtype tensor: Triton would round Python float arguments to fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.schemas import acc_dtype
from ._common import acc_tl, block_d


@triton.jit
def _sign(v):
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, v * 0.0))  # 0 * NaN keeps NaN


@triton.jit
def _clamp(v, lo, hi):
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))  # NaN passes through


@triton.jit
def _write_linf(x_row, x0_row, out_row, offs, ok, v, a, e, lo, hi, CLIP: tl.constexpr, ACC: tl.constexpr):
    xv = tl.load(x_row + offs, mask=ok, other=0).to(ACC)
    x0v = tl.load(x0_row + offs, mask=ok, other=0).to(ACC)
    y = x0v + _clamp((xv + a * _sign(v)) - x0v, -e, e)
    if CLIP:
        y = _clamp(y, lo, hi)
    tl.store(out_row + offs, y.to(out_row.dtype.element_ty), mask=ok)


@triton.jit
def _eot_kernel(x_ptr, x0_ptr, g_ptr, alpha_ptr, eps_ptr, m_ptr, out_ptr, buf_ptr, params_ptr,
                n, d, sx, sx0, sg_b, sg_n, sm,
                L2: tl.constexpr, HAS_M: tl.constexpr, CLIP: tl.constexpr, ACC: tl.constexpr,
                BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    a = tl.load(alpha_ptr + b).to(ACC)
    e = tl.load(eps_ptr + b).to(ACC)
    lo = tl.load(params_ptr).to(ACC)
    hi = tl.load(params_ptr + 1).to(ACC)
    decay = tl.load(params_ptr + 2).to(ACC)
    x_row = x_ptr + b * sx
    x0_row = x0_ptr + b * sx0
    g_row = g_ptr + b * sg_b
    out_row = out_ptr + b * d
    v_row = buf_ptr + b * d
    m_row = m_ptr + b * sm
    n_acc = tl.full((), 0, ACC) + n
    l1 = tl.zeros((BLOCK_D,), dtype=ACC)
    ss = tl.zeros((BLOCK_D,), dtype=ACC)
    # pass 1: mean gradient
    for d0 in range(0, d, BLOCK_D):
        offs = d0 + cols
        ok = offs < d
        v = tl.load(g_row + offs, mask=ok, other=0).to(ACC)
        for i in range(1, n):
            v += tl.load(g_row + i * sg_n + offs, mask=ok, other=0).to(ACC)
        v = v / n_acc
        if HAS_M:
            l1 += tl.abs(v)
            tl.store(v_row + offs, v, mask=ok)
        elif L2:
            ss += v * v
            tl.store(v_row + offs, v, mask=ok)
        else:
            _write_linf(x_row, x0_row, out_row, offs, ok, v, a, e, lo, hi, CLIP, ACC)
    tl.debug_barrier()
    if HAS_M:  # MI-FGSM: m <- decay m + g / ||g||_1 (0 for a zero gradient)
        l1s = tl.sum(l1, axis=0)
        inv_l1 = tl.where(l1s == 0, 0.0, 1.0 / tl.where(l1s == 0, 1.0, l1s))  # no 1/0 evaluated
        for d0 in range(0, d, BLOCK_D):
            offs = d0 + cols
            ok = offs < d
            v = tl.load(v_row + offs, mask=ok, other=0)
            v = decay * tl.load(m_row + offs, mask=ok, other=0).to(ACC) + v * inv_l1
            tl.store(v_row + offs, v, mask=ok)
            if L2:
                ss += v * v
            else:
                _write_linf(x_row, x0_row, out_row, offs, ok, v, a, e, lo, hi, CLIP, ACC)
        tl.debug_barrier()
    if L2:
        nrm = tl.sqrt(tl.sum(ss, axis=0))
        inv = tl.where(nrm == 0, 0.0, 1.0 / tl.where(nrm == 0, 1.0, nrm))
        dd = tl.zeros((BLOCK_D,), dtype=ACC)
        for d0 in range(0, d, BLOCK_D):  # ||delta|| of the stepped offset
            offs = d0 + cols
            ok = offs < d
            v = tl.load(v_row + offs, mask=ok, other=0)
            xv = tl.load(x_row + offs, mask=ok, other=0).to(ACC)
            x0v = tl.load(x0_row + offs, mask=ok, other=0).to(ACC)
            s = (xv + a * (v * inv)) - x0v
            dd += s * s
        dn = tl.sqrt(tl.sum(dd, axis=0))
        f = tl.where(dn > e, e / tl.where(dn > e, dn, 1.0), 1.0)  # min(1, eps / ||delta||); zero or NaN norm: unchanged
        for d0 in range(0, d, BLOCK_D):
            offs = d0 + cols
            ok = offs < d
            v = tl.load(v_row + offs, mask=ok, other=0)
            xv = tl.load(x_row + offs, mask=ok, other=0).to(ACC)
            x0v = tl.load(x0_row + offs, mask=ok, other=0).to(ACC)
            y = x0v + ((xv + a * (v * inv)) - x0v) * f
            if CLIP:
                y = _clamp(y, lo, hi)
            tl.store(out_row + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def eot_step(x: torch.Tensor, x0: torch.Tensor, grads: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor,
             norm: str, lo: float, hi: float, clip: bool, momentum, decay: float):
    """x_new [B, D] (x's dtype) and new momentum [B, D] (acc; [B, 0] without momentum)."""
    B, n, d = grads.shape
    acc = acc_dtype(grads.dtype)
    has_m = momentum is not None
    out = torch.empty((B, d), dtype=x.dtype, device=x.device)
    m_out = torch.empty((B, d if has_m else 0), dtype=acc, device=x.device)
    if B == 0 or d == 0:
        return out, m_out
    l2 = norm == "l2"
    if has_m and d > 1 and momentum.stride(1) != 1:
        momentum = momentum.contiguous()
    buf = m_out if has_m else (torch.empty((B, d), dtype=acc, device=x.device) if l2 else m_out)
    params = torch.tensor([lo, hi, decay], dtype=acc, device=x.device)
    _eot_kernel[(B,)](x, x0, grads, alpha.contiguous(), eps.contiguous(), momentum if has_m else params, out, buf,
                      params, n, d, x.stride(0), x0.stride(0), grads.stride(0), grads.stride(1),
                      momentum.stride(0) if has_m else 0,
                      L2=l2, HAS_M=has_m, CLIP=clip, ACC=acc_tl(grads.dtype), BLOCK_D=block_d(d))
    return out, m_out
