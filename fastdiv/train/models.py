"""The models of a run: the (untrained) model a config describes (:func:`build_model_from_config`) and
the trained model of a run directory (:func:`load_run`)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["MemberLogits", "build_model_from_config", "load_run"]


def build_model_from_config(cfg: TrainConfig | dict, in_shape, num_classes: int) -> nn.Module:
    """The (untrained) model a config describes: one network, an :class:`~fastdiv.nn.Ensemble` or a
    :class:`~fastdiv.nn.Population` of ``members`` networks (with priority dropout when set)."""
    from ..nn.models import build_model

    c = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(
        {k: v for k, v in cfg.items() if k in TrainConfig.field_names()})
    in_shape = tuple(int(s) for s in in_shape)

    def one(kind: str) -> nn.Module:
        return build_model(c.model, in_shape=in_shape, num_classes=int(num_classes), kind=kind, sigma0=c.sigma0,
                           sigma_init=c.sigma_init, sigma_inner=c.sigma_inner)

    if c.wrapper == "single":
        model = one(c.kind)
        if c.sigma_post is not None:
            _set_posterior_std(model, c.sigma_post)
        return model
    members = [one(c.kind) for _ in range(c.members)]
    if c.wrapper == "ensemble":
        if c.dropout is not None:
            return _priority_ensemble(c, members)
        from ..nn.ensemble import Ensemble
        return Ensemble(members)
    from ..nn.population import Population
    return Population(members, dispatch="random", seed=c.seed)


def _set_posterior_std(model: nn.Module, sigma: float) -> None:
    """Start every Bayesian layer's posterior at std ``sigma`` (build_model starts it at the prior's)."""
    from ..nn.bayes import BayesianLayer
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BayesianLayer):
                for _, _, log_sigma in m.gaussians():
                    log_sigma.fill_(math.log(sigma))


def _priority_ensemble(c: TrainConfig, members: list[nn.Module]) -> nn.Module:
    from ..nn.dropout import PriorityDropoutEnsemble
    return PriorityDropoutEnsemble(members, kind=c.dropout, s=c.dropout_s, lam=c.dropout_lambda,
                                   alpha=c.dropout_alpha, beta=c.dropout_beta, gamma=c.dropout_gamma)


class MemberLogits(nn.Module):
    """``forward(x) = ensemble.member_logits(x)`` (``[K, N, C]``): one pass of every member under
    the priority dropout, as a module DDP can wrap."""

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.member_logits(x)


def load_run(run_dir: str | os.PathLike, *, which: str = "best", device: str = "cpu") -> tuple[nn.Module, dict]:
    """The trained model of a run directory and its config.

    which: 'best' (``best.pt``, the best validation accuracy) or 'last' (``checkpoint.pt``).
    Returns ``(model in eval mode on device, config_dict)``; ``config_dict`` is ``config.json``:
    every :class:`TrainConfig` setting (preset, dataset, data_dir, resize, seed, model, kind,
    eps_train, samples, ...) plus ``in_shape``, ``num_classes`` and ``n_train``.
    """
    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise ValueError(f"load_run: which must be 'best' or 'last', got {which!r}")
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"load_run: {cfg_path} does not exist (not a fastdiv run directory?)")
    config = json.loads(cfg_path.read_text())
    path = run_dir / ("best.pt" if which == "best" else "checkpoint.pt")
    if not path.exists():
        raise FileNotFoundError(f"load_run: {path} does not exist (the run has not finished an epoch)")
    state = torch.load(path, map_location=device, weights_only=True)
    settings = {k: v for k, v in config.items() if k in TrainConfig.field_names()}
    model = build_model_from_config(settings, config["in_shape"], config["num_classes"])
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, config
