"""Building the attacks of an evaluation: each attack's keyword arguments from :class:`.EvalConfig` (only
those its class accepts) and the attack objects, white-box or crafted on a transfer surrogate."""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from .. import analysis as A
from ..analysis.predict import _chunks
from .config import EvalConfig


def attack_registry() -> dict:
    """:data:`fastdiv.attacks.ATTACKS`, imported on first use."""
    try:
        from ..attacks import ATTACKS
    except ImportError as exc:  # pragma: no cover - only while fastdiv.attacks is missing
        raise ImportError(f"fastdiv evaluate needs fastdiv.attacks (ATTACKS registry): {exc}") from exc
    return ATTACKS


def accepted(cls) -> set[str]:
    """The keyword arguments ``cls(model, ...)`` accepts: the named parameters of every ``__init__``
    along the MRO up to the first one without ``**kwargs`` (the attacks forward ``**kw`` to
    :class:`fastdiv.attacks.Attack`)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            break
        names |= {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    names.discard("self")
    names.discard("model")
    return names


def attack_settings(name: str, *, eps: float, form: str | None, cfg: EvalConfig, steps: int | None = None,
                    alpha: float | None = None, class_defaults: bool = False, **extra) -> dict:
    """The keyword arguments of attack ``name`` from the evaluation settings (only those its class
    accepts): ε, the EOT form and n, and unless ``class_defaults``: ``steps``, α = alpha_factor·ε
    (not for R-FGSM, whose α is its random step) and Square's ``n_queries``."""
    allowed = accepted(attack_registry()[name])
    wanted = {"eps": float(eps), "eot": form or "fixed", "eot_samples": int(cfg.eot_samples)}
    # recorded with the row's settings only when not the attacks' defaults
    if cfg.stochastic is not None:
        wanted["stochastic"] = cfg.stochastic
    if cfg.model_mode != "eval":
        wanted["model_mode"] = cfg.model_mode
    if cfg.norm != "linf":
        wanted["norm"] = cfg.norm
    if cfg.protocol is not None and not class_defaults:
        from .protocols import PROTOCOLS

        wanted.update(PROTOCOLS[cfg.protocol].attack_settings.get(name, {}))
    if not class_defaults:
        wanted["steps"] = int(steps or cfg.steps)
        wanted["n_queries"] = int(cfg.square_queries)
        if name != "rfgsm":
            wanted["alpha"] = float(alpha if alpha is not None else cfg.alpha_factor * eps)
    wanted.update(extra)
    return {k: v for k, v in wanted.items() if k in allowed}


def build_attack(name: str, model: nn.Module, settings: dict, seed: int):
    """Attack ``name`` on ``model`` with ``settings``, seeded when its class takes a seed."""
    kw = dict(settings)
    if "seed" in accepted(attack_registry()[name]):
        kw["seed"] = int(seed)
    return attack_registry()[name](model, **kw)


def build_transfer_attack(name: str, surrogate: nn.Module, settings: dict, seed: int):
    """An attack crafted on the surrogate's average loss (:class:`fastdiv.attacks.TransferAttack`:
    each member of an ensemble surrogate once per step; a randomized single surrogate gets n draws)."""
    from ..attacks import TransferAttack

    kw = {k: v for k, v in settings.items() if k != "eot"}
    members = A.members_of(surrogate) or [surrogate]
    k = len(members)
    n = kw.pop("eot_samples", k)
    kw["eot_samples"] = k * max(1, math.ceil(n / k)) if any(A.is_stochastic(m) for m in members) else k
    return TransferAttack(surrogate, name, seed=int(seed), **kw)


def run_attack_batches(make, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Adversarial examples of ``x``, crafted in batches of ``batch_size`` by a fresh attack ``make()`` each."""
    pieces = []
    for sl in _chunks(x.shape[0], batch_size):
        pieces.append(make()(x[sl], y[sl]).detach())
    return torch.cat(pieces) if pieces else x.clone()
