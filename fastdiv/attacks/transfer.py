"""Transfer (black-box) attacks crafted on a surrogate ensemble: :class:`TransferAttack`.

As in the Diversity Training (GAL) paper, the objective is the average cross-entropy of the
surrogate models, ``(1/K) Σ_k CE(f_k(x), y)``. fastdiv expresses the surrogates as one randomized
model whose sample model ``s`` is surrogate ``s mod K`` (:class:`SurrogateEnsemble`); the wrapped
attack runs with ``eot='mean'`` and ``eot_samples = K``, so its mean gradient is exactly the
gradient of the average loss, and each step still uses one :func:`fastdiv.eot_step`.
"""
from __future__ import annotations

import torch
from torch import nn

from .._seeds import mix_seed
from ..nn.sampling import RandomizedModule, is_randomized, sampling
from .base import Attack, _check_int

__all__ = ["SurrogateEnsemble", "TransferAttack"]


class SurrogateEnsemble(RandomizedModule):
    """K surrogate models as one randomized model: inside a :func:`fastdiv.nn.sampling` block,
    sample model ``s`` is member ``s mod K`` (a pinned :func:`~fastdiv.nn.frozen_sample` is member
    ``seed mod K``); outside, the forward returns the log of the members' mean softmax (clamped at
    1e-12), i.e. logits of the ensemble prediction.

    Randomized members (e.g. Bayesian surrogates) get their own draw per sample model, seeded by
    (seed, sample index). Members run one after another on their rows of the replicated batch.
    """

    def __init__(self, members) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("SurrogateEnsemble: needs at least one surrogate model")
        for i, m in enumerate(members):
            if not isinstance(m, nn.Module):
                raise TypeError(f"SurrogateEnsemble: surrogate_models[{i}] must be an nn.Module, got "
                                f"{type(m).__name__}")
        self.members = nn.ModuleList(members)

    @property
    def supports_sample_batching(self) -> bool:  # type: ignore[override]
        # a train-mode BatchNorm inside a member would be regrouped by the batched sampling block
        # although each member only sees its own rows: use the loop then
        return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.modules())

    def _member(self, i: int, x: torch.Tensor, state, sample: int) -> torch.Tensor:
        member = self.members[i]
        if not is_randomized(member):
            return member(x)
        with sampling(member, 1, mix_seed(state.seed, sample)):
            return member(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.sample_state()
        k = len(self.members)
        if state is None:
            probs = torch.stack([m(x).softmax(-1) for m in self.members]).mean(0)
            return probs.clamp_min(1e-12).log()
        active = state.active
        if x.shape[0] % active:
            raise ValueError(f"SurrogateEnsemble: in a batched sampling context the input's dim 0 must be "
                             f"{active} * batch, got shape {tuple(x.shape)}")
        rows = x.shape[0] // active
        first = 0 if state.index is None else state.index
        outs = []
        for j in range(active):
            sample = first + j
            i = state.seed % k if state.frozen else sample % k
            outs.append(self._member(i, x[j * rows:(j + 1) * rows], state, sample))
        return torch.cat(outs)


class TransferAttack(Attack):
    """An attack crafted on surrogate models (average CE over the surrogates), to be evaluated by the
    caller on another (target) model; it evaluates nothing itself.

    Args:
        surrogate_models: a sequence of ``nn.Module`` (or one module; one with a ``members``
            attribute, e.g. :class:`fastdiv.nn.Ensemble`, contributes its members).
        attack_cls: an attack class (:class:`PGD`, :class:`MIFGSM`, ...) or a name of
            :data:`fastdiv.attacks.ATTACKS`.
        **kw: the attack's arguments (eps, alpha, steps, seed, ...). ``eot`` is 'mean' and
            ``eot_samples`` defaults to K (one sample per surrogate; a multiple of K gives randomized
            surrogates several draws each).

    >>> atk = TransferAttack([m1, m2, m3, m4, m5], MIFGSM, eps=0.3, steps=10)
    >>> x_adv = atk(images, labels)          # then evaluate target(x_adv)
    """

    def __init__(self, surrogate_models, attack_cls, **kw) -> None:
        from . import ATTACKS

        if isinstance(surrogate_models, nn.Module):
            members = getattr(surrogate_models, "members", None)
            members = list(members) if members is not None else [surrogate_models]
        else:
            try:
                members = list(surrogate_models)
            except TypeError:
                raise TypeError(f"TransferAttack: surrogate_models must be a sequence of nn.Module, got "
                                f"{type(surrogate_models).__name__}") from None
        self.surrogate = SurrogateEnsemble(members)
        if isinstance(attack_cls, str):
            if attack_cls not in ATTACKS:
                raise ValueError(f"TransferAttack: attack_cls must be an Attack class or one of {tuple(ATTACKS)}, "
                                 f"got {attack_cls!r}")
            attack_cls = ATTACKS[attack_cls]
        if not (isinstance(attack_cls, type) and issubclass(attack_cls, Attack)) or issubclass(attack_cls,
                                                                                            TransferAttack):
            raise TypeError(f"TransferAttack: attack_cls must be a fastdiv Attack class, got {attack_cls!r}")
        if kw.get("eot", "mean") != "mean":
            raise ValueError(f"TransferAttack: the surrogates' average loss needs eot='mean', got {kw['eot']!r}")
        kw["eot"] = "mean"
        k = len(members)
        samples = _check_int(kw.get("eot_samples", k), "eot_samples", "TransferAttack")
        if samples % k:
            raise ValueError(f"TransferAttack: eot_samples must be a multiple of the {k} surrogates, got {samples}")
        kw["eot_samples"] = samples
        self.attack = attack_cls(self.surrogate, **kw)

    @property
    def name(self) -> str:
        return f"TransferAttack[{type(self.attack).__name__}]"

    def __getattr__(self, name: str):
        # eps, steps, eot, ... of the wrapped attack (only called for attributes not found here)
        if name == "attack":
            raise AttributeError(name)
        return getattr(self.attack, name)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.attack(images, labels)

    def __repr__(self) -> str:
        return f"TransferAttack(surrogates={len(self.surrogate.members)}, attack={self.attack!r})"
