"""The models of a run: the (untrained) model a config describes (:func:`build_model_from_config`) and
the trained model of a run directory (:func:`load_run`)."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import CorruptFileError, MissingFileError
from ..files import load_torch_file, match_state_dict, read_json_file
from .config import TrainConfig

__all__ = ["MemberLogits", "build_model_from_config", "load_run", "read_run_config"]


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
                                   alpha=c.dropout_alpha, beta=c.dropout_beta, gamma=c.dropout_gamma,
                                   rescale=c.dropout_rescale)


class MemberLogits(nn.Module):
    """``forward(x) = ensemble.member_logits(x)`` (``[K, N, C]``): one pass of every member under
    the priority dropout, as a module DDP can wrap."""

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.member_logits(x)


def load_run(run_dir: str | os.PathLike, *, which: str = "best", device: str = "cpu",
             quiet: bool = False) -> tuple[nn.Module, dict]:
    """The trained model of a run directory and its config.

    which: 'best' (``best.pt``, the best validation accuracy) or 'last' (the newest complete checkpoint:
    ``checkpoint.pt``, else ``checkpoint.prev.pt`` with a warning on stderr unless ``quiet``).
    Returns ``(model in eval mode on device, config_dict)``; ``config_dict`` is ``config.json``:
    every :class:`TrainConfig` setting (preset, dataset, data_dir, resize, seed, model, kind,
    eps_train, samples, ...) plus ``in_shape``, ``num_classes`` and ``n_train``.

    Raises :class:`~fastdiv.errors.MissingFileError` when the run directory, its ``config.json`` or the
    checkpoint does not exist, :class:`~fastdiv.errors.CorruptFileError` (or
    :class:`~fastdiv.errors.UnsafeFileError`) when one of them cannot be read or does not fit the other.
    """
    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise ValueError(f"load_run: which must be 'best' or 'last', got {which!r}")
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise MissingFileError(f"load_run: {cfg_path} does not exist (not a fastdiv run directory?)", cfg_path)
    config = read_run_config(cfg_path)
    model = build_model_from_config(config, config["in_shape"], config["num_classes"])
    if which == "best":
        path = run_dir / "best.pt"
        if not path.exists():
            raise MissingFileError(f"load_run: {path} does not exist (the run has not finished an epoch)", path)
        state = load_torch_file(path, "best weights", fix=_DAMAGED_BEST)
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise CorruptFileError(f"best weights {path} is not a fastdiv best.pt: expected a dict with the model's "
                                   f"state dict under 'model'; found {_described(state)}. {_DAMAGED_BEST}", path)
        match_state_dict(model, state["model"], "best weights", path, fix=_DAMAGED_BEST)
    else:
        from .checkpoint import TrainingCheckpoint
        from .store import CheckpointStore

        def decode(state, file):
            ckpt = TrainingCheckpoint.from_state(state, file)
            match_state_dict(model, ckpt.model, "checkpoint", file, fix="it belongs to another run, or the run's "
                             "config.json was changed")
            return ckpt

        loaded = CheckpointStore(run_dir).load_latest(decode)
        if loaded is None:
            raise MissingFileError(f"load_run: {run_dir / 'checkpoint.pt'} does not exist (the run has not saved a "
                                   "checkpoint yet)", run_dir / "checkpoint.pt")
        if loaded.skipped and not quiet:
            print(f"fastdiv: warning: {'; '.join(loaded.skipped)}; using {loaded.path} (epoch "
                  f"{loaded.checkpoint.epoch})", file=sys.stderr)
    model.to(device).eval()
    return model, config


_DAMAGED_BEST = "Use --which last (the newest checkpoint), or restore best.pt from a copy of the run directory"


def _described(value) -> str:
    return f"keys {sorted(map(str, value))[:8]}" if isinstance(value, dict) else f"a {type(value).__name__}"


def read_run_config(path: Path) -> dict:
    """A run's ``config.json``: a JSON object of :class:`TrainConfig` settings with ``in_shape`` and
    ``num_classes``; anything else raises :class:`~fastdiv.errors.CorruptFileError` naming the file."""
    fix = "It is written by fastdiv train: restore it from a copy of the run directory"
    config = read_json_file(path, "run config", fix=fix)
    in_shape, classes = config.get("in_shape"), config.get("num_classes")
    if not (isinstance(in_shape, list) and in_shape and all(isinstance(s, int) and s > 0 for s in in_shape)
            and isinstance(classes, int) and classes > 0):
        raise CorruptFileError(f"run config {path}: expected 'in_shape' (a list of positive ints) and 'num_classes' "
                               f"(a positive int); found in_shape={in_shape!r}, num_classes={classes!r}. {fix}", path)
    try:
        TrainConfig.from_dict({k: v for k, v in config.items() if k in TrainConfig.field_names()})
    except ValueError as exc:
        raise CorruptFileError(f"run config {path} holds settings fastdiv refuses ({exc}). {fix}", path) from None
    return config
