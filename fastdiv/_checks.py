"""Argument checks shared by the public API. Errors name the argument, what was expected and what
was given."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_float_tensor(t, name: str, fn: str) -> torch.Tensor:
    """``t`` itself, after checking it is a tensor of a floating dtype the kernels support."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must have a floating dtype (float16, bfloat16, float32 or float64), "
                        f"got {t.dtype}")
    return t


def as_rows(grads: torch.Tensor, sample_dim: int, fn: str, min_samples: int = 2) -> torch.Tensor:
    """``grads`` as a [B, n, D] view (features flattened, unit stride on D; copies only if needed)."""
    check_float_tensor(grads, "grads", fn)
    if sample_dim not in (0, 1):
        raise ValueError(f"{fn}: sample_dim must be 0 ([n, B, *features]) or 1 ([B, n, *features]), "
                         f"got {sample_dim!r}")
    if grads.dim() < 3:
        layout = "[n, B, *features]" if sample_dim == 0 else "[B, n, *features]"
        raise ValueError(f"{fn}: grads must be {layout} with at least one feature dim (3 or more dims), "
                         f"got shape {tuple(grads.shape)}")
    x = grads.transpose(0, 1) if sample_dim == 0 else grads
    if x.shape[1] < min_samples:
        raise ValueError(f"{fn}: needs at least {min_samples} gradient samples per input (dim {sample_dim} "
                         f"of grads), got {x.shape[1]} in shape {tuple(grads.shape)}")
    x = x.flatten(2)
    if x.shape[2] == 0:
        raise ValueError(f"{fn}: grads has no features (shape {tuple(grads.shape)})")
    if x.shape[2] > 1 and x.stride(2) != 1:
        x = x.contiguous()
    return x


def check_reduction(reduction: str, fn: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_positive(value, name: str, fn: str) -> float:
    # comparisons instead of math.isfinite: dynamo traces them on symbolic floats (NaN fails both)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{fn}: {name} must be a positive finite number, got {value!r}")
    return float(value)


def check_open_unit(value, name: str, fn: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{fn}: {name} must be in (0, 1), got {value!r}")
    return float(value)


def reduce(per_input: torch.Tensor, reduction: str) -> torch.Tensor:
    """Applies ``reduction`` over the batch. The mean of an empty batch is 0 (not NaN), so an empty
    batch contributes nothing to a training loss."""
    if reduction == "none":
        return per_input
    total = per_input.sum()
    return total if reduction == "sum" else total / max(per_input.shape[0], 1)


def check_model_and_batch(model, x, fn: str) -> None:
    """``model`` is an nn.Module and ``x`` a floating-point batch ``[B, ...]``."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor [B, ...], got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{fn}: x must be a batch [B, *input_shape], got shape {tuple(x.shape)}")


def check_budget(value, name: str, *, norm: str = "linf", strict: bool = False) -> float:
    """An attack budget or step size (ε, α) as a float: finite and in [0, 1] for the ℓ∞ threat model, whose
    inputs live in [0, 1] (in (0, 1] with ``strict``), finite and >= 0 (> 0) for ``'l2'``. Numbers may be
    given as strings (``'0.1'``, ``'8/255'``). Raises ``ValueError`` naming ``name``."""
    from fractions import Fraction

    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(Fraction(value)) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError, TypeError, OverflowError):
        raise ValueError(f"{name}: {value!r} is not a number (write 0.03 or 8/255)") from None
    low = "> 0" if strict else ">= 0"
    if norm == "linf" and not (math.isfinite(v) and (0.0 < v if strict else 0.0 <= v) and v <= 1.0):
        interval = "(0, 1]" if strict else "[0, 1]"
        raise ValueError(f"{name} must be in {interval} for the ℓ∞ threat model (inputs live in [0, 1]), got {value!r}")
    if not (math.isfinite(v) and (0.0 < v if strict else 0.0 <= v)):
        raise ValueError(f"{name} must be a finite number {low}, got {value!r}")
    return v


def check_logits_output(out, batch: int, fn: str) -> torch.Tensor:
    """``out`` itself, after checking that a model returned floating-point logits ``[batch, C]`` (the
    attacks, the training losses and the evaluation take their softmax and gradients). Raises
    ``ValueError`` naming ``fn`` and what the model returned."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != batch:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{fn}: the model must return logits [N, C] for an input batch of {batch}, got {got}")
    if not out.is_floating_point():
        raise ValueError(f"{fn}: the model must return floating-point logits [N, C], got {out.dtype} (return the "
                         "scores before any argmax or rounding)")
    return out
