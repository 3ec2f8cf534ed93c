"""Sample models and their predictions: seeds, the members of an ensemble or population, the logits of
n sample models, and per-example correctness of ensemble inference and of the worst case."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .._seeds import mix_seed
from ..nn.randomness import Randomness, detect_randomness, one_sample
from ..nn.sampling import sampling, supports_batched

#: Upper bound on the rows of one replicated forward (``num_samples * batch``), to bound memory.
MAX_ROWS = 8192


def derive_seed(*values: int) -> int:
    """A 62-bit seed derived from integers (a splitmix64 hash), so that the seeds of repeats,
    attacks and ε values are unrelated streams yet reproducible."""
    return mix_seed(*values) >> 1


def members_of(model: nn.Module) -> list[nn.Module] | None:
    """The member models of an ensemble or population (its ``members`` attribute), else ``None``."""
    members = getattr(model, "members", None)
    if isinstance(members, (nn.ModuleList, list, tuple)) and len(members) >= 1 and all(
            isinstance(m, nn.Module) for m in members):
        return list(members)
    return None


def _chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, max(1, size)):
        yield slice(start, min(total, start + max(1, size)))


@torch.no_grad()
def sample_logits(model: nn.Module, x: torch.Tensor, num_samples: int, seed: int, *,
                  stochastic: bool | Randomness | None = None) -> torch.Tensor:
    """Logits of ``num_samples`` sample models drawn from ``seed``: ``[S, B, C]`` (``S = 1`` for a
    model without randomness; for a :class:`fastdiv.nn.Ensemble` its members, each once).
    Uses one replicated forward per chunk when the model supports sample
    batching, else one forward per sample (with the global RNG seeded per sample when the model draws
    from it). Weight-noise draws depend on ``seed`` only, so the same seed gives the same sample models
    for every batch. ``stochastic``: see :func:`fastdiv.nn.detect_randomness`."""
    randomness = detect_randomness(model, x, stochastic=stochastic)
    if not randomness:
        return model(x).unsqueeze(0)
    from ..nn.ensemble import Ensemble

    if isinstance(model, Ensemble):  # its sample models are the members: each exactly once (as fastdiv.nn.predict)
        num_samples = len(model.members)
    if x.shape[0] == 0:
        with sampling(model, 1, seed, index=0):
            classes = model(x[:1].new_zeros((1, *x.shape[1:]))).shape[1] if x.dim() > 1 else 0
        return x.new_zeros((num_samples, 0, classes))
    pieces = []
    if supports_batched(model) and not randomness.global_rng:
        step = max(1, MAX_ROWS // num_samples)
        for sl in _chunks(x.shape[0], step):
            xb = x[sl]
            with sampling(model, num_samples, seed):
                out = model(xb.repeat(num_samples, *([1] * (xb.dim() - 1))))
            pieces.append(out.view(num_samples, xb.shape[0], -1))
        return torch.cat(pieces, dim=1)
    for s in range(num_samples):
        with one_sample(model, num_samples, seed, s, randomness, x.device):
            pieces.append(model(x))
    return torch.stack(pieces)


def predict_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int, seed: int,
                    *, batch_size: int = 512, stochastic: bool | Randomness | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ensemble_correct [B], worst_case_correct [B])`` (bool, on ``x.device``).

    ensemble: argmax of the mean softmax of ``num_samples`` sample models (GradDiv's inference);
    worst case: every sample model's argmax equals the label (stricter: a stochastic model that is
    queried once may answer with any of its samples).
    """
    ens, worst = [], []
    for sl in _chunks(x.shape[0], batch_size):
        logits = sample_logits(model, x[sl], num_samples, seed, stochastic=stochastic)
        yb = y[sl]
        probs = logits.float().softmax(-1).mean(0)
        ens.append(probs.argmax(-1) == yb)
        worst.append((logits.argmax(-1) == yb).all(0))
    if not ens:
        empty = torch.zeros(0, dtype=torch.bool, device=x.device)
        return empty, empty
    return torch.cat(ens), torch.cat(worst)
