"""Transferability among sample models or members (GradDiv Fig. 7) and CLM's model robustness average."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..nn.randomness import Randomness, reseeded_before_every_forward
from ..nn.sampling import frozen_sample
from .predict import derive_seed


@contextlib.contextmanager
def _pinned(model: nn.Module, members: list[nn.Module] | None, index: int, seed: int,
            randomness: Randomness | None = None, device: torch.device | None = None):
    """The ``index``-th sample model: a member, or ``model`` pinned to one weight draw. A model that draws
    from the global RNG is pinned by re-seeding it before every forward: draws made once per forward
    (another library's Bayesian weights) are then the same in every forward, per-element ones (dropout
    masks, input noise) the same for every batch of one size."""
    if members is not None:
        yield members[index]
        return
    pin_seed = derive_seed(seed, 3, index)
    with frozen_sample(model, seed=pin_seed), (
            reseeded_before_every_forward(model, pin_seed, device) if randomness is not None and randomness.global_rng
            else contextlib.nullcontext()):
        yield model


def transfer_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, make_attack: Callable[[nn.Module], Callable],
                     *, k: int, seed: int, members: list[nn.Module] | None = None,
                     randomness: Randomness | None = None) -> torch.Tensor:
    """Transferability among ``k`` sample models (GradDiv Fig. 7): adversarial examples crafted on
    source i (a member, or ``model`` pinned with :func:`fastdiv.nn.frozen_sample`), classified by
    target j. Returns ``[k, k, B]`` bool (``[source, target, example]`` correct); the diagonal is
    the white-box accuracy of each sample model. ``randomness`` (of ``model``, see
    :func:`fastdiv.nn.detect_randomness`) says whether its samples must also pin the global RNG."""
    if members is not None:
        k = len(members)
    out = torch.zeros(k, k, x.shape[0], dtype=torch.bool, device=x.device)
    if x.shape[0] == 0:
        return out
    for i in range(k):
        with _pinned(model, members, i, seed, randomness, x.device) as src:
            x_adv = make_attack(src)(x, y).detach()
        for j in range(k):
            with _pinned(model, members, j, seed, randomness, x.device) as tgt, torch.no_grad():
                out[i, j] = tgt(x_adv).argmax(-1) == y
    return out


def transfer_summary(correct: torch.Tensor) -> dict:
    """Accuracy matrix ``[k, k]`` (fractions) and its off-diagonal mean / min / max and diagonal mean."""
    acc = correct.float().mean(-1) if correct.shape[-1] else torch.zeros(correct.shape[:2])
    k = acc.shape[0]
    off = acc[~torch.eye(k, dtype=torch.bool, device=acc.device)]
    return {
        "matrix": acc.cpu().tolist(),
        "off_diagonal_mean": float(off.mean()) if off.numel() else None,
        "off_diagonal_min": float(off.min()) if off.numel() else None,
        "off_diagonal_max": float(off.max()) if off.numel() else None,
        "diagonal_mean": float(acc.diagonal().mean()),
    }


def mra_correct(members: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                make_attack: Callable[[nn.Module], Callable] | None, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLM eq. (6): each example is perturbed on a random submodel (uniform, seeded), then every
    submodel classifies the whole perturbed set. Returns ``(correct [K, B] bool, source [B] int64)``;
    ``MRA = correct.float().mean()``. ``make_attack=None`` gives the benign MRA (no perturbation)."""
    k = len(members)
    gen = torch.Generator().manual_seed(derive_seed(seed, 4))
    # drawn on the CPU for every example index up to B so that the draw does not depend on the device
    source = torch.randint(0, k, (x.shape[0],), generator=gen).to(x.device)
    x_adv = x.clone()
    if make_attack is not None:
        for i in range(k):
            sel = source == i
            if sel.any():
                x_adv[sel] = make_attack(members[i])(x[sel], y[sel]).detach()
    with torch.no_grad():
        correct = torch.stack([m(x_adv).argmax(-1) == y for m in members]) if x.shape[0] else \
            torch.zeros(k, 0, dtype=torch.bool, device=x.device)
    return correct, source
