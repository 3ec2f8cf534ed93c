"""The per-example losses the attacks ascend (``[N]`` from logits ``[N, C]`` and labels ``[N]``), their
targeted forms, and the ensemble margin that decides success; each is usable as ``loss=`` of
:func:`fastdiv.sample_input_grads`."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..grads import per_example_loss

__all__ = ["cw_loss", "dlr_loss", "dlr_targeted_loss", "ensemble_margin", "mean_sample_loss", "targeted_loss"]


# ------------------------------------------------------------------------------------------------
# Losses the attacks ascend (per example, [N]); usable as ``loss=`` of fastdiv.sample_input_grads.
# ------------------------------------------------------------------------------------------------


def _other_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j`` per row."""
    mask = nn.functional.one_hot(y, logits.shape[1]).bool()
    return logits.masked_fill(mask, float("-inf")).amax(1)


class cw_loss:
    """Carlini–Wagner hinge to ascend: ``min(max_{j≠y} z_j − z_y, confidence)`` on logits ``z``.

    The attack pushes each example until some wrong class beats the true one by ``confidence``
    (κ); beyond that the loss is flat. ``cw_loss(0.0)`` is ``sample_input_grads``' ``loss='cw'``.
    """

    def __init__(self, confidence: float = 0.0) -> None:
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not (
                0 <= confidence < math.inf):
            raise ValueError(f"cw_loss: confidence must be a finite number >= 0, got {confidence!r}")
        self.confidence = float(confidence)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        true = logits.gather(1, y[:, None]).squeeze(1)
        return (_other_max(logits, y) - true).clamp(max=self.confidence)

    def targeted(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The targeted hinge to ascend: ``min(z_t − max_{j≠t} z_j, confidence)`` (flat once the
        target class leads every other class by κ)."""
        target = logits.gather(1, t[:, None]).squeeze(1)
        return (target - _other_max(logits, t)).clamp(max=self.confidence)

    def __repr__(self) -> str:
        return f"cw_loss(confidence={self.confidence:g})"


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio to ascend (Croce & Hein 2020, eq. 6):
    ``−(z_y − max_{j≠y} z_j) / (z_π1 − z_π3 + 1e−12)`` with ``z_π1 ≥ z_π2 ≥ z_π3`` the sorted logits.

    Invariant to shifting and scaling the logits; needs at least 3 classes.
    """
    if logits.shape[1] < 3:
        raise ValueError(f"dlr_loss: the DLR loss needs at least 3 classes, the model has {logits.shape[1]}")
    top = logits.topk(3, dim=1).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    return -(true - _other_max(logits, y)) / (top[:, 0] - top[:, 2] + 1e-12)


class dlr_targeted_loss:
    """Targeted DLR to ascend (Croce & Hein, ICML 2020, arXiv:2003.01690, §4):
    ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e−12)`` for true labels ``y`` (bound here) and the
    targets ``t`` passed as the loss' labels. Needs at least 4 classes.

    Called as ``loss(logits [M, C], t [M])`` where M is a multiple of ``len(y)``: the labels of a
    batch replicated over sample models (:func:`fastdiv.sample_input_grads`) are ``y`` tiled.
    """

    def __init__(self, y: torch.Tensor) -> None:
        self.y = y

    def __call__(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] < 4:
            raise ValueError(f"the targeted DLR loss needs at least 4 classes, the model has {logits.shape[1]}")
        y = self.y.to(t.device).repeat(t.shape[0] // max(self.y.shape[0], 1))
        top = logits.topk(4, dim=1).values
        true, target = logits.gather(1, y[:, None]).squeeze(1), logits.gather(1, t[:, None]).squeeze(1)
        return -(true - target) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


class _Negated:
    """``−loss(logits, t)``: descending an untargeted loss on the target class (torchattacks' targeted mode)."""

    def __init__(self, loss) -> None:
        self.loss = loss

    def __call__(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -per_example_loss(self.loss, logits, t)


def targeted_loss(loss, y: torch.Tensor):
    """The loss a targeted attack ascends, as a callable ``(logits, target) -> [N]``, for the untargeted
    ``loss`` of an attack and the true labels ``y``:

    * 'cw' / :class:`cw_loss` (κ): the targeted hinge ``min(z_t − max_{j≠t} z_j, κ)`` (negating the
      untargeted hinge would make it unbounded);
    * :func:`dlr_loss` ('dlr'): the targeted DLR loss :class:`dlr_targeted_loss` (needs ``y``);
    * anything else ('ce', 'logit', a callable): ``−loss(logits, t)``, so that the attack descends
      the loss of the target class (as torchattacks' targeted mode).
    """
    if isinstance(loss, str) and loss == "cw":
        loss = cw_loss(0.0)
    if isinstance(loss, cw_loss):
        return loss.targeted
    if loss is dlr_loss or (isinstance(loss, str) and loss == "dlr"):
        return dlr_targeted_loss(y)
    return _Negated(loss)


def ensemble_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j≠y} p̄_j − p̄_y`` with ``p̄`` the softmax averaged over the sample models
    (``logits [n, B, C]``): positive exactly when the ensemble prediction is wrong."""
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1).mean(0)
    true = probs.gather(1, y[:, None]).squeeze(1)
    return _other_max(probs, y) - true


def mean_sample_loss(loss, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example loss averaged over the sample models: ``logits [n, B, C]`` -> ``[B]``."""
    n, b = logits.shape[:2]
    return per_example_loss(loss, logits.reshape(n * b, -1), y.repeat(n)).view(n, b).mean(0)
