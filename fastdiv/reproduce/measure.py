"""The measurements behind the claims: numbers read from a ``fastdiv evaluate`` result, and two that the
evaluation does not compute (GradDiv's loss increase under EOT-PGD, Diverse Directions' Ω penalties).

Every measurement is a function ``(context) -> float`` registered in :data:`MEASURES` under the name a claim
uses; :class:`Measured` is the context: the trained model, its test data, its evaluation result and the size's
settings.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from .. import analysis as A

__all__ = ["MEASURES", "Measured"]


@dataclasses.dataclass
class Measured:
    """What a measurement sees: ``model`` (eval mode), test images ``x`` / labels ``y`` (the evaluated prefix),
    ``results`` (the ``evaluate_model`` dict), ``eps`` (the size's ε list, ``eps[i]`` relative to ε_train by the
    size's factors), ``settings`` (the size's measurement settings) and ``seed``."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    results: dict
    eps: tuple[float, ...]
    settings: dict
    seed: int


def _stat(name: str) -> Callable[[Measured], float]:
    def read(m: Measured) -> float:
        stats = (m.results.get("gradients") or {}).get("stats")
        if not stats:
            raise ValueError(f"the evaluation has no gradient statistics (is the model deterministic?): no {name}")
        return float(stats[name]["mean"])
    read.__doc__ = f"mean over test examples of the gradient statistic {name!r}"
    return read


def _robust(index: int) -> Callable[[Measured], float]:
    def read(m: Measured) -> float:
        return float(m.results["table"]["total"]["results"][index]["ensemble"]["mean"])
    read.__doc__ = f"robust accuracy (ensemble inference) under the table's attacks at the size's ε number {index}"
    return read


def _member_transfer(m: Measured) -> float:
    """mean accuracy of a member (sample model) on adversarial examples crafted on another (off-diagonal of the
    transferability matrix): higher = less transfer"""
    sm = (m.results.get("transfer") or {}).get("sample_models")
    if not sm or sm.get("off_diagonal_mean") is None:
        raise ValueError("the evaluation has no transferability matrix")
    return float(sm["off_diagonal_mean"])


def _mra(m: Measured) -> float:
    """CLM's mean robust accuracy at the size's main ε"""
    mra = (m.results.get("transfer") or {}).get("mra")
    if not mra:
        raise ValueError("the evaluation has no MRA (the model has no members)")
    return float(mra["results"][m.settings["main_eps_index"]]["mra"]["mean"])


def _diversity(key: str) -> Callable[[Measured], float]:
    def read(m: Measured) -> float:
        dv = (m.results.get("gradients") or {}).get("diversity")
        if not dv:
            raise ValueError("the evaluation has no ensemble-diversity measures")
        value = dv[key]
        return float(value["mean"] if isinstance(value, dict) else value)
    read.__doc__ = f"LPD's {key} over the members (or sample models)"
    return read


def _offline(m: Measured) -> float:
    """accuracy on adversarial examples crafted offline on the static source model (the evaluation's surrogate
    rows, the strongest row at the size's main ε)"""
    sur = (m.results.get("transfer") or {}).get("surrogate")
    if not sur:
        raise ValueError("the evaluation has no surrogate (offline) attacks")
    i = m.settings["main_eps_index"]
    return min(float(row["results"][i]["ensemble"]["mean"]) for row in sur["rows"])


def _loss_increase(m: Measured) -> float:
    """GradDiv Fig. 4 (bottom): mean over test examples of CE(ensemble prediction at x_adv) − CE(at x), x_adv
    from EOT-PGD at the size's loss_eps_index ε (1.33 × ε_train); lower = the attack gains less"""
    from ..attacks import PGD

    s = m.settings
    eps = m.eps[s["loss_eps_index"]]
    attack = PGD(m.model, eps=eps, alpha=eps / 4, steps=s["steps"], eot="mean", eot_samples=s["eot_samples"],
                 seed=A.derive_seed(m.seed, 91))
    x_adv = attack(m.x, m.y)
    losses = []
    for inputs in (m.x, x_adv):
        logits = A.sample_logits(m.model, inputs, s["ensemble_samples"], A.derive_seed(m.seed, 92))
        p = torch.softmax(logits.double(), -1).mean(0)
        losses.append(-torch.log(p.gather(1, m.y[:, None]).clamp_min(1e-300)).squeeze(1))
    return float((losses[1] - losses[0]).mean())


def _omega(kind: str) -> Callable[[Measured], float]:
    def read(m: Measured) -> float:
        import fastdiv

        k = m.settings["omega_samples"]
        grads, _ = fastdiv.sample_input_grads(m.model, m.x, m.y, k, loss="logit", generator=A.derive_seed(m.seed, 93))
        fn = {"mean": fastdiv.mean_penalty, "var": fastdiv.variance_penalty, "sparse": fastdiv.sparsity_penalty}[kind]
        return float(fn(grads.flatten(2), sample_dim=0).double().mean())
    read.__doc__ = (f"Diverse Directions' Ω ({kind}) of the unit true-class-logit gradients of "
                    "the size's omega_samples weight draws, mean over test examples")
    return read


#: name -> measurement.
MEASURES: dict[str, Callable[[Measured], float]] = {
    "rho": _stat("rho"), "coherence": _stat("coherence"), "mean_cos": _stat("mean_cos"),
    "robust_below": _robust(0), "robust_at": _robust(1), "robust_above": _robust(2),
    "member_transfer": _member_transfer, "mra": _mra,
    "ambiguity_entropy": _diversity("ambiguity_entropy"), "l_d": _diversity("l_d"),
    "offline": _offline, "loss_increase": _loss_increase,
    "omega_mean": _omega("mean"), "omega_var": _omega("var"), "omega_sparse": _omega("sparse"),
}
