"""The fused EOT attack step: one call updates an adversarial batch from the input gradients of n
sample models (EOT-PGD, EOT-MI-FGSM; docs/design.md §2.6)."""
from __future__ import annotations

import math

import torch

from . import reference
from ._backend import resolve_backend
from ._checks import as_rows, check_float_tensor
from .ops import eot as eot_ops
from .ops.schemas import NAMESPACES
from .reference import EOT_NORMS

__all__ = ["eot_step"]


def _check_number(value, name: str, fn: str, *, minimum: float = 0.0) -> float:
    # comparisons instead of math.isfinite: NaN fails both
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number or a per-example tensor, got {type(value).__name__}")
    if not minimum <= value < math.inf:
        raise ValueError(f"{fn}: {name} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def _per_example(value, name: str, batch: int, x: torch.Tensor, acc: torch.dtype, fn: str) -> torch.Tensor:
    """alpha / eps as a [B] tensor of the accumulation dtype: a number, or a tensor >= 0 that broadcasts per
    example against x ([], [B], or [B, 1, ..., 1] as torchattacks users write it)."""
    if not isinstance(value, torch.Tensor):
        return torch.full((batch,), _check_number(value, name, fn), dtype=acc, device=x.device)
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{fn}: {name} must be a real tensor, got {value.dtype}")
    if value.device != x.device:
        raise ValueError(f"{fn}: {name} is on {value.device} but x is on {x.device}")
    per_example = value.dim() <= x.dim() and all(s == 1 for s in value.shape[1:]) and (
        value.dim() == 0 or value.shape[0] in (1, batch))
    if not per_example:
        raise ValueError(f"{fn}: {name} must be a number or a per-example tensor of shape [{batch}] (or [], or "
                         f"[{batch}, 1, ..., 1]), got shape {tuple(value.shape)}")
    value = value.detach().to(acc).reshape(-1)
    if value.numel() and not bool(((value >= 0) & (value < math.inf)).all()):
        raise ValueError(f"{fn}: {name} must be finite and >= 0 for every example, got {value.tolist()}")
    return value.expand(batch).contiguous()


def _rows_view(t: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, *features] as a [B, D] view with unit stride on D (one copy only if needed)."""
    v = t.detach().reshape(batch, math.prod(t.shape[1:]))
    return v.contiguous() if v.shape[1] > 1 and v.stride(1) != 1 else v


def eot_step(x: torch.Tensor, x0: torch.Tensor, grads: torch.Tensor, *, alpha, eps, norm: str = "linf",
             clip: tuple[float, float] | None = (0.0, 1.0), sample_dim: int = 0,
             momentum: torch.Tensor | None = None, decay: float = 1.0, backend: str = "auto"):
    """One EOT-PGD (or EOT-MI-FGSM) step on a batch, fused: mean of the n sample gradients, step,
    projection onto the eps-ball around ``x0``, clamp to ``clip``.

    Args:
        x: the current adversarial batch ``[B, *features]``.
        x0: the clean batch, same shape.
        grads: the n sample models' input gradients at ``x``, ``[n, B, *features]`` (``sample_dim=0``,
            the default: what a sample-batched backward returns)
            or ``[B, n, *features]`` (``sample_dim=1``); n >= 1. Any strides on the n and B dims; no copy
            when the flattened features have unit stride.
        alpha: step size, a number or a per-example tensor ``[B]`` (or ``[B, 1, ..., 1]``); >= 0 (0 is a
            pure projection).
        eps: radius of the ball around ``x0``, a number or a per-example tensor as ``alpha``; >= 0.
        norm: ``'linf'`` (direction ``sign(g)``, projection clamps each element to ``[-eps, eps]``) or
            ``'l2'`` (direction ``g / ||g||_2``, 0 for a zero gradient; projection scales the offset by
            ``min(1, eps / ||x + alpha d - x0||_2)``). Norms are per example, over all features. Any case is
            accepted (``'Linf'`` and ``'L2'``, as torchattacks and AutoAttack write them).
        clip: ``(lo, hi)`` box of valid inputs (default ``(0, 1)``, images), or None for no clamp.
        momentum: MI-FGSM buffer ``[B, *features]`` (zeros at the first step). Then
            ``m_new = decay * m + g / ||g||_1`` (0 where ``||g||_1 = 0``) and the direction is taken
            from ``m_new`` instead of ``g``. torchattacks' MIFGSM normalizes by ``mean |g|`` instead of
            the l1 norm: its buffer is D times ours and the steps are identical (sign and l2 direction
            are scale invariant); only the decay must be the same.
        decay: momentum decay factor (MI-FGSM's mu), >= 0.
        backend: 'auto', 'cpu', 'cuda', 'triton' or 'torch' (:func:`fastdiv.reference.eot_step`).

    Returns:
        ``x_new`` with x's shape and dtype, or ``(x_new, m_new)`` when ``momentum`` is given (m_new has
        momentum's shape and dtype). Inputs are never modified. The step is computed in float32
        (float64 for float64 inputs) and is not differentiable: inputs are detached. NaN or Inf in an
        example's gradients give NaN in that example only (in the affected elements for l_inf without
        momentum, the whole example otherwise). An empty batch returns empty results.
    """
    fn = "eot_step"
    check_float_tensor(x, "x", fn)
    check_float_tensor(x0, "x0", fn)
    if momentum is not None:
        check_float_tensor(momentum, "momentum", fn)
    rows = as_rows(grads, sample_dim, fn, min_samples=1)
    if x.dim() < 2:
        raise ValueError(f"{fn}: x must be [B, *features] with at least one feature dim, got shape "
                         f"{tuple(x.shape)}")
    if x0.shape != x.shape:
        raise ValueError(f"{fn}: x0 must have x's shape {tuple(x.shape)}, got {tuple(x0.shape)}")
    batch = x.shape[0]
    if grads.shape[1 - sample_dim] != batch or grads.shape[2:] != x.shape[1:]:
        layout = (f"[n, {batch}, {', '.join(map(str, x.shape[1:]))}]" if sample_dim == 0
                  else f"[{batch}, n, {', '.join(map(str, x.shape[1:]))}]")
        raise ValueError(f"{fn}: grads must be {layout} for x of shape {tuple(x.shape)} and "
                         f"sample_dim={sample_dim}, got {tuple(grads.shape)}")
    for name, t in (("x0", x0), ("grads", grads), ("momentum", momentum)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    if not isinstance(norm, str) or norm.lower() not in EOT_NORMS:
        raise ValueError(f"{fn}: norm must be one of {EOT_NORMS} (any case, e.g. 'Linf'), got {norm!r}")
    norm = norm.lower()
    if clip is not None:
        if (not isinstance(clip, (tuple, list)) or len(clip) != 2
                or any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in clip)):
            raise TypeError(f"{fn}: clip must be a (lo, hi) pair of numbers or None, got {clip!r}")
        if not clip[0] <= clip[1]:
            raise ValueError(f"{fn}: clip must be (lo, hi) with lo <= hi, got {tuple(clip)!r}")
    decay = _check_number(decay, "decay", fn)
    if momentum is not None:
        if momentum.shape != x.shape:
            raise ValueError(f"{fn}: momentum must have x's shape {tuple(x.shape)}, got {tuple(momentum.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, x0.dtype), grads.dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    alpha_t = _per_example(alpha, "alpha", batch, x, acc, fn)
    eps_t = _per_example(eps, "eps", batch, x, acc, fn)

    be = resolve_backend(backend, x, fn)
    if be == "torch":
        return reference.eot_step(x, x0, grads, alpha=alpha_t, eps=eps_t, norm=norm, clip=clip,
                                  sample_dim=sample_dim, momentum=momentum, decay=decay)
    # mixed input dtypes run in the promoted dtype (a copy of the narrower ones)
    xv = _rows_view(x, batch).to(dtype)
    x0v = _rows_view(x0, batch).to(dtype)
    rows = rows.detach().to(dtype)
    m = _rows_view(momentum, batch).to(acc) if momentum is not None else None
    lo, hi = (float(clip[0]), float(clip[1])) if clip is not None else (0.0, 0.0)
    out, m_new = eot_ops.eot_step(xv, x0v, rows, alpha_t, eps_t, norm=norm, lo=lo, hi=hi, clip=clip is not None,
                                     momentum=m, decay=decay, ns=NAMESPACES[be])
    out = out.to(x.dtype).reshape(x.shape)
    if momentum is None:
        return out
    return out, m_new.to(momentum.dtype).reshape(momentum.shape)
