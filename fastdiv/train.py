"""The training driver: ``fastdiv train --preset NAME`` and :func:`train`.

One function trains any defense of :mod:`fastdiv.presets` the way its paper did. Per training step:

1. a batch in an order that is a function of ``(seed, epoch)`` only (so a resumed run sees the same
   batches), augmented (random shifts / flips, D_noise copies, static-model FGSM copies) as the
   recipe says, with every random draw seeded by ``(seed, epoch, step, rank)``;
2. adversarial examples on the fly when the recipe says so (:class:`fastdiv.attacks.PGD`,
   alpha = eps/4, 10 steps, eval-mode model);
3. the input gradients of n sample models in one sample-batched pass with ``create_graph=True``
   (:func:`fastdiv.sample_input_grads`) and the fused regularizer on them
   (:func:`fastdiv.diversity_loss`, ``sample_dim=0``; a weighted sum for Defense through Diverse
   Directions);
4. ``loss = CE averaged over the n samples + lambda(t) * regularizer + kl_factor * KL / N_train``
   with lambda 0 during warm-up and a linear ramp-up after (:func:`lambda_at`);
5. Adam (or SGD) with a multi-step decay per epoch; PRSE for counter-linked populations; priority
   dropout statistics for LPD/PDD.

After every epoch: validation accuracy of the defense's inference, concentration statistics of
held-out gradients (:func:`fastdiv.concentration_stats`: rho, kappa/p, mean cos, coherence, DPP),
one line of ``metrics.jsonl``, ``checkpoint.pt`` (atomically: temp file + ``os.replace``) and
``best.pt`` when the validation accuracy improved.

Run directory::

    RUN_DIR/config.json     the resolved TrainConfig (+ in_shape, num_classes, n_train, versions)
    RUN_DIR/metrics.jsonl   one JSON object per epoch
    RUN_DIR/checkpoint.pt   model, optimizer, scheduler, position, RNG states (weights_only-loadable)
    RUN_DIR/best.pt         the model of the best validation accuracy
    RUN_DIR/source.pt       (ens-adv / d3-*-off) the static source model, if trained here
    RUN_DIR/offline.pt      (d3-*-off) the offline adversarial training examples

Resume: ``--resume`` continues from ``checkpoint.pt`` with the same model, optimizer, scheduler,
position (epoch and step), lambda schedule and RNG states. Checkpoints are written at every epoch
end and when SIGINT/SIGTERM arrives (after the current step); since every random draw of a step
is seeded by its position, a run killed at any point (even with SIGKILL) and resumed produces the
same metrics as an uninterrupted one on the same device.

Distributed: ``torchrun --nproc_per_node=K -m fastdiv train ...`` (DDP; nccl on GPU, gloo on CPU;
``--batch-size`` is the global batch, split over the processes; rank 0 writes the run directory).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._seeds import mix_seed
from .nn.sampling import is_stochastic
from .presets import DATASET_NAMES, PRESETS, format_presets, get_preset
from .runtime import atomic_save, atomic_write_text, resolve_device, rng_state, seed_globals, set_rng_state, setup_ranks

__all__ = [
    "CHECKPOINT_FORMAT", "TrainConfig", "TrainingDiverged", "TrainingInterrupted", "add_parser",
    "build_model_from_config", "lambda_at", "load_run", "main", "parse_reg", "resolve_config", "train",
]

CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


def _field(default, help: str, *, flag: str | None = None, choices=None, group: str = "training",
           cli: bool = True):
    meta = {"help": help, "flag": flag, "choices": choices, "group": group, "cli": cli}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run. A preset (:mod:`fastdiv.presets`) fills in the recipe's
    values; a JSON config file and then command-line flags override them
    (:func:`resolve_config`). ``config.json`` in the run directory is this, resolved."""

    # -- run --------------------------------------------------------------------------------------
    preset: str | None = _field(None, "training recipe (see --list-presets)", choices=(None, *PRESETS), group="run")
    dataset: str = _field("digits", "dataset", choices=DATASET_NAMES, group="run")
    base: str | None = _field(None, "alternative baseline of the preset (graddiv-*: 'rse')", group="run")
    data_dir: str | None = _field(None, "directory with the dataset files (mnist, cifar10, stl10)", group="run")
    resize: int | None = _field(None, "resize images to SxS (e.g. 28 for digits as MNIST-sized input)", group="run")
    limit: int | None = _field(None, "keep only the first N examples of each split (quick runs)", group="run")
    out: str | None = _field(None, "run directory (default runs/PRESET-DATASET-sSEED)", group="run")
    seed: int = _field(0, "seed of the initialization, data order, augmentation and sample draws", group="run")
    device: str = _field("auto", "cpu, cuda, cuda:N or auto (cuda when available)", group="run")
    resume: bool = _field(False, "continue the run in --out from its checkpoint.pt", group="run", cli=False)

    # -- model ------------------------------------------------------------------------------------
    model: str = _field("graddiv-mnist", "architecture (fastdiv.nn.MODELS)", group="model")
    kind: str = _field("deterministic", "layers: deterministic, bayes (Adv-BNN) or noise (RSE)",
                       choices=("deterministic", "bayes", "noise"), group="model")
    wrapper: str = _field("single", "single network, ensemble of members, or random-dispatch population",
                          choices=("single", "ensemble", "population"), group="model")
    members: int = _field(1, "ensemble / population size", group="model")
    sigma0: float = _field(0.1, "prior std of the Bayesian layers (kind=bayes)", group="model")
    sigma_post: float | None = _field(None, "initial posterior std of the Bayesian layers (default: sigma0)",
                                      group="model")
    sigma_init: float = _field(0.2, "RSE noise std on the input (kind=noise)", group="model")
    sigma_inner: float = _field(0.1, "RSE noise std inside the network (kind=noise)", group="model")
    dropout: str | None = _field(None, "priority dropout on the last FC layer of the members: lpd or pdd",
                                 choices=(None, "lpd", "pdd"), group="model")
    dropout_s: float = _field(0.1, "priority dropout: activation interval size s", group="model")
    dropout_lambda: float = _field(0.5, "LPD: Laplace scale lambda", group="model")
    dropout_alpha: float = _field(0.85, "priority dropout: alpha (LPD kernel weight / PDD priority keep rate)",
                                  group="model")
    dropout_beta: float = _field(0.127, "priority dropout: beta (LPD floor / PDD non-priority factor)", group="model")
    dropout_gamma: float = _field(1.0, "LPD: gamma, scale of the kernel z", group="model")

    # -- optimization -----------------------------------------------------------------------------
    optimizer: str = _field("adam", "optimizer", choices=("adam", "sgd"))
    epochs: int = _field(10, "number of epochs")
    batch_size: int = _field(128, "global batch size (split over DDP processes)")
    lr: float = _field(1e-3, "initial learning rate")
    momentum: float = _field(0.9, "SGD momentum")
    weight_decay: float = _field(0.0, "weight decay")
    milestones: list = _field([], "epochs at which the learning rate is multiplied by --lr-decay (e.g. 30 60)")
    lr_decay: float = _field(0.1, "learning-rate decay factor at each milestone")
    grad_clip: float | None = _field(None, "clip the parameter gradient norm to this value")

    # -- objective --------------------------------------------------------------------------------
    reg: str | None = _field(None, "gradient-diversity regularizer: a fastdiv.DIVERSITY_LOSSES name or a weighted "
                             "sum 'name:w+name:w' (e.g. d3-mean:20+d3-var:40); 'none' for no regularizer",
                             group="objective")
    lam: float = _field(0.0, "target regularization weight lambda (multiplies --reg)", flag="--lambda",
                        group="objective")
    warmup: float = _field(0.0, "epochs with lambda = 0", group="objective")
    rampup: float = _field(0.0, "epochs of linear ramp-up of lambda after the warm-up", group="objective")
    samples: int = _field(1, "n: sample models (weight/noise draws, members) per input per step", group="objective")
    grad_loss: str = _field("ce", "loss whose input gradient is regularized: ce or logit (true-class logit)",
                            choices=("ce", "logit", "cw"), group="objective")
    kl_factor: float = _field(0.0, "weight of KL(q||prior)/N_train for Bayesian layers", group="objective")
    strategy: str = _field("auto", "sample_input_grads strategy", choices=("auto", "batched", "loop"),
                           group="objective")

    # -- adversarial training ---------------------------------------------------------------------
    adv: bool = _field(False, "train on PGD adversarial examples crafted on the fly", group="adversarial")
    eps_train: float = _field(0.3, "l_inf radius of the training attacks (and of evaluation by default)",
                              group="adversarial")
    adv_steps: int = _field(10, "PGD steps", group="adversarial")
    adv_alpha: float | None = _field(None, "PGD step size (default eps/4)", group="adversarial")
    adv_eot: str = _field("one", "PGD against a randomized model: one (fresh sample per step), mean, fixed",
                          choices=("one", "mean", "fixed"), group="adversarial")
    adv_eot_samples: int = _field(3, "sample models per PGD step for --adv-eot mean", group="adversarial")
    adv_random_start: bool = _field(True, "PGD starts at a random point of the eps-ball", group="adversarial")
    offline: str = _field("none", "extra training examples from a static source model: pgd (D3 'Off': PGD examples "
                          "added to the training set once) or fgsm (Ensemble Adversarial Training: an FGSM copy of "
                          "every batch)", choices=("none", "pgd", "fgsm"), group="adversarial")
    offline_eps: float | None = _field(None, "radius of the offline examples (default eps_train)", group="adversarial")
    offline_steps: int = _field(40, "PGD steps of the offline examples", group="adversarial")
    offline_alpha: float | None = _field(None, "PGD step of the offline examples (default eps/30)",
                                         group="adversarial")
    source_run: str | None = _field(None, "run directory of the static source model (default: train one first)",
                                    group="adversarial")
    source_epochs: int | None = _field(None, "epochs of the source model trained here (default --epochs)",
                                       group="adversarial")

    # -- data augmentation ------------------------------------------------------------------------
    augment: str = _field("none", "random shifts (zero padding + crop), optionally with horizontal flips",
                          choices=("none", "shift", "shift-flip"), group="augmentation")
    shift: int = _field(2, "maximum shift in pixels for --augment", group="augmentation")
    noise_aug: bool = _field(False, "add a D_noise copy of every batch: x + truncated N(0, (noise_eps/2)^2)",
                             group="augmentation")
    noise_eps: float = _field(0.3, "eps of D_noise (std eps/2, truncated at 2 std)", group="augmentation")

    # -- counter-linked populations ---------------------------------------------------------------
    clm_alpha: float = _field(0.1, "PRSE step alpha", group="population")
    clm_delta: float = _field(0.1, "PRSE similarity threshold delta", group="population")
    prse_every: int = _field(0, "run PRSE for every submodel every N steps (0: never = ULM)", group="population")
    link_fraction: float = _field(0.5, "fraction of the first layer's weights that are counter-linked",
                                  group="population")
    init_from: str | None = _field(None, "initialize the model from this run directory's best.pt (e.g. a ULM run "
                                   "retrained as a CLM)", group="population")

    # -- evaluation during training ---------------------------------------------------------------
    eval_samples: int = _field(20, "sample models of the validation inference (mean softmax)", group="evaluation")
    stats_samples: int = _field(10, "gradient samples per held-out input for the concentration statistics "
                                "(ensembles / populations: all members)", group="evaluation")
    stats_limit: int = _field(256, "held-out inputs for the concentration statistics (0: off)", group="evaluation")
    eval_rows: int = _field(2048, "rows (examples x samples) per evaluation forward", group="evaluation")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a dict of field values (unknown keys are an error); validated."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"TrainConfig: unknown setting(s) {unknown}; known: {sorted(cls.field_names())}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Type and range checks with errors naming the setting."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ValueError(f"TrainConfig: {f.name} must be one of {list(choices)}, got {value!r}")

        def positive_int(name, minimum=1, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"TrainConfig: {name} must be an int >= {minimum}, got {v!r}")

        def number(name, minimum=0.0, strict=False, optional=False, maximum=math.inf):
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (v <= minimum if strict else v < minimum) or v > maximum:
                rel = ">" if strict else ">="
                raise ValueError(f"TrainConfig: {name} must be a finite number {rel} {minimum:g}"
                                 + (f" and <= {maximum:g}" if maximum < math.inf else "") + f", got {v!r}")
            setattr(self, name, float(v))

        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"TrainConfig: preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("epochs", "batch_size", "members", "samples", "adv_steps", "adv_eot_samples",
                     "offline_steps", "eval_samples", "stats_samples", "eval_rows"):
            positive_int(name)
        positive_int("seed", minimum=0)
        positive_int("prse_every", minimum=0)
        positive_int("stats_limit", minimum=0)
        positive_int("shift", minimum=0)
        positive_int("resize", optional=True)
        positive_int("limit", optional=True)
        positive_int("source_epochs", minimum=0, optional=True)
        number("lr", strict=True)
        for name in ("momentum", "weight_decay", "lam", "warmup", "rampup", "kl_factor", "eps_train",
                     "noise_eps", "clm_alpha", "clm_delta", "dropout_s", "dropout_lambda", "dropout_alpha",
                     "dropout_beta", "dropout_gamma"):
            number(name)
        number("lr_decay", strict=True)
        number("link_fraction", maximum=1.0)
        for name in ("sigma0", "sigma_init", "sigma_inner"):
            number(name, strict=True)
        number("sigma_post", strict=True, optional=True)
        for name in ("adv_alpha", "offline_eps", "offline_alpha", "grad_clip"):
            number(name, strict=True, optional=True)
        if not isinstance(self.milestones, (list, tuple)) or any(
                isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.milestones):
            raise ValueError("TrainConfig: milestones must be a list of positive epoch numbers, "
                             f"got {self.milestones!r}")
        self.milestones = sorted(int(m) for m in self.milestones)
        for name in ("adv", "adv_random_start", "noise_aug", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig: {name} must be true or false, got {getattr(self, name)!r}")
        if self.reg in ("none", ""):
            self.reg = None
        parse_reg(self.reg)  # raises on an unknown name
        terms = parse_reg(self.reg)
        if terms and self.samples < 2:
            raise ValueError(f"TrainConfig: the regularizer {self.reg!r} needs samples >= 2 gradient samples per "
                             f"input, got samples={self.samples}")
        if self.wrapper != "single" and self.members < 2:
            raise ValueError(f"TrainConfig: wrapper={self.wrapper!r} needs members >= 2, got {self.members}")
        if self.wrapper != "single" and self.kind != "deterministic":
            raise ValueError(f"TrainConfig: ensemble and population members must be deterministic (kind="
                             f"'deterministic'), got kind={self.kind!r}")
        if self.dropout is not None and self.wrapper != "ensemble":
            raise ValueError("TrainConfig: dropout (lpd/pdd) needs wrapper='ensemble'")
        if self.prse_every and self.wrapper != "population":
            raise ValueError("TrainConfig: prse_every > 0 (counter-linking) needs wrapper='population'")
        for name in ("data_dir", "out", "source_run", "init_from", "base"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"TrainConfig: {name} must be a string or null, got {v!r}")


def parse_reg(reg: str | None) -> list[tuple[str, float]]:
    """``'d3-mean:20+d3-var:40'`` -> ``[('d3-mean', 20.0), ('d3-var', 40.0)]``; a bare name has weight 1;
    None / 'none' -> ``[]``. Names must be in :data:`fastdiv.DIVERSITY_LOSSES`."""
    from .losses import DIVERSITY_LOSSES

    if reg is None or reg in ("none", ""):
        return []
    if not isinstance(reg, str):
        raise ValueError(f"reg must be a string like 'kappa' or 'd3-mean:20+d3-var:40', got {reg!r}")
    terms = []
    for part in reg.split("+"):
        name, _, weight = part.strip().partition(":")
        if name not in DIVERSITY_LOSSES:
            raise ValueError(f"reg: {name!r} is not a regularizer; choose from {sorted(DIVERSITY_LOSSES)} "
                             f"(weighted sums as 'd3-mean:20+d3-var:40')")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reg: the weight of {name!r} must be a number, got {weight!r}") from None
        if not math.isfinite(w):
            raise ValueError(f"reg: the weight of {name!r} must be finite, got {weight!r}")
        terms.append((name, w))
    return terms


def lambda_at(t: float, target: float, warmup: float, rampup: float) -> float:
    """The regularization weight at training time ``t`` (in epochs, fractional within an epoch):
    0 while ``t < warmup``, then linear from 0 to ``target`` over ``rampup`` epochs, then ``target``
    (``target`` straight after the warm-up when ``rampup`` is 0)."""
    if t < warmup:
        return 0.0
    if rampup <= 0:
        return float(target)
    return float(target) * min(1.0, (t - warmup) / rampup)


def _load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config: {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {p} must hold a JSON object of settings, got {type(data).__name__}")
    # config.json of a run directory carries derived facts; keep only the settings
    data.pop("derived", None)
    for key in _DERIVED_KEYS:
        data.pop(key, None)
    if "lambda" in data:
        data["lam"] = data.pop("lambda")
    return data


def resolve_config(overrides: dict[str, Any] | None = None, *, config_file: str | os.PathLike | None = None
                   ) -> TrainConfig:
    """Preset defaults for the dataset (and ``base``) < ``config_file`` (JSON) < ``overrides``.

    ``preset``, ``dataset`` and ``base`` are taken from ``overrides``, else the file, else the
    defaults ('digits'); a config without a preset uses :class:`TrainConfig`'s defaults alone.
    """
    overrides = dict(overrides or {})
    if "lambda" in overrides:
        overrides["lam"] = overrides.pop("lambda")
    file_values = _load_config_file(config_file) if config_file is not None else {}
    merged_keys = {**file_values, **overrides}
    preset_name = merged_keys.get("preset")
    dataset = merged_keys.get("dataset", TrainConfig.dataset)
    base = merged_keys.get("base")
    values: dict[str, Any] = {}
    if preset_name is not None:
        values.update(get_preset(preset_name).resolve(dataset, base))
    values.update(file_values)
    values.update(overrides)
    values.setdefault("preset", preset_name)
    values.setdefault("dataset", dataset)
    return TrainConfig.from_dict(values)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run stopped and kept its last good checkpoint."""

    exit_code = 3


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: the run saved a checkpoint after the current step and stopped.
    ``signum`` is the signal; the CLI exits with ``128 + signum``."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# ------------------------------------------------------------------------------------------------
# Small helpers: random-stream tags, scheduler state (seeds, RNG states and atomic saves: runtime.py)
# ------------------------------------------------------------------------------------------------


# tags of the per-step random streams
_T_AUG, _T_NOISE, _T_ENSADV, _T_ADV, _T_SAMPLES, _T_PRSE, _T_DROPOUT, _T_EPOCH = range(1, 9)


def _scheduler_state(sched) -> dict[str, Any]:
    sd = dict(sched.state_dict())
    if isinstance(sd.get("milestones"), Counter):
        sd["milestones"] = {int(k): int(v) for k, v in sd["milestones"].items()}
    return sd


def _load_scheduler_state(sched, sd: dict[str, Any]) -> None:
    sd = dict(sd)
    if isinstance(sd.get("milestones"), dict):
        sd["milestones"] = Counter({int(k): int(v) for k, v in sd["milestones"].items()})
    sched.load_state_dict(sd)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def build_model_from_config(cfg: TrainConfig | dict, in_shape, num_classes: int) -> nn.Module:
    """The (untrained) model a config describes: one network, an :class:`~fastdiv.nn.Ensemble` or a
    :class:`~fastdiv.nn.Population` of ``members`` networks (with priority dropout when set)."""
    from .nn.models import build_model

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
        from .nn.ensemble import Ensemble
        return Ensemble(members)
    from .nn.population import Population
    return Population(members, dispatch="random", seed=c.seed)


def _set_posterior_std(model: nn.Module, sigma: float) -> None:
    """Start every Bayesian layer's posterior at std ``sigma`` (build_model starts it at the prior's)."""
    from .nn.bayes import BayesianLayer
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BayesianLayer):
                for _, _, log_sigma in m.gaussians():
                    log_sigma.fill_(math.log(sigma))


def _priority_ensemble(c: TrainConfig, members: list[nn.Module]) -> nn.Module:
    from .nn.dropout import PriorityDropoutEnsemble
    return PriorityDropoutEnsemble(members, kind=c.dropout, s=c.dropout_s, lam=c.dropout_lambda,
                                   alpha=c.dropout_alpha, beta=c.dropout_beta, gamma=c.dropout_gamma)


class _MemberLogits(nn.Module):
    """``forward(x) = ensemble.member_logits(x)`` (``[K, N, C]``): one pass of every member under
    the priority dropout, as a module DDP can wrap."""

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.member_logits(x)


def _members(model: nn.Module) -> list[nn.Module] | None:
    members = getattr(model, "members", None)
    return list(members) if members is not None else None


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

_DERIVED_KEYS = ("in_shape", "num_classes", "n_train", "fastdiv_version", "torch_version", "world_size",
                 "num_samples_eval")
_TIME_KEYS = ("time_s", "train_time_s")


class _SignalFlag:
    """SIGINT/SIGTERM set a flag that the loop checks after every step (a second SIGINT raises
    KeyboardInterrupt at once)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _SignalFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no handlers, the flag stays 0
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Run:
    def __init__(self, cfg: TrainConfig, quiet: bool) -> None:
        self.cfg = cfg
        self.quiet = quiet
        self.device = resolve_device(cfg.device)
        self.dist = setup_ranks(self.device)
        if self.dist.enabled and cfg.batch_size % self.dist.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes "
                             f"({self.dist.world}): it is the global batch")
        self.reg_terms = parse_reg(cfg.reg)
        self.run_dir = Path(cfg.out if cfg.out else f"runs/{cfg.preset or 'custom'}-{cfg.dataset}-s{cfg.seed}"
                            + (f"-{cfg.base}" if cfg.base else ""))
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.best_path = self.run_dir / "best.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.signals: _SignalFlag | None = None

    # -- output helpers ---------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.dist.main:
            try:
                from tqdm import tqdm
                tqdm.write(msg, file=sys.stdout)
            except ImportError:  # pragma: no cover
                print(msg, flush=True)
            sys.stdout.flush()

    def _barrier(self) -> None:
        if self.dist.enabled:
            torch.distributed.barrier()

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        from .data import load_dataset

        if not cfg.resume and self.ckpt_path.exists():  # every rank sees it: no rank waits for a dead one
            raise FileExistsError(f"{self.run_dir} already holds a checkpoint.pt; pass --resume to continue it "
                                  f"or choose another --out")
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.run_dir.glob(".*.tmp"):  # left by a run killed while saving
                stale.unlink(missing_ok=True)
        self._barrier()
        self.data = load_dataset(cfg.dataset, cfg.data_dir, resize=cfg.resize, seed=cfg.seed, limit=cfg.limit)
        self.x_train, self.y_train = self.data.train.tensors
        self.x_val, self.y_val = self.data.val.tensors
        if len(self.x_train) == 0:
            raise ValueError(f"dataset {cfg.dataset!r} has an empty training split")
        self.in_shape = tuple(int(s) for s in self.data.in_shape)
        self.num_classes = int(self.data.num_classes)
        self.n_train_clean = len(self.x_train)

        seed_globals(cfg.seed)
        self.model = build_model_from_config(cfg, self.in_shape, self.num_classes).to(self.device)
        if cfg.init_from:
            src, _ = load_run(cfg.init_from, which="best", device=str(self.device))
            try:
                self.model.load_state_dict(src.state_dict())
            except RuntimeError as e:
                raise ValueError(f"init_from {cfg.init_from!r}: its model does not match this run's "
                                 f"({cfg.model}, {cfg.wrapper} of {cfg.members}): {e}") from None
        self.members = _members(self.model)
        # the module the training (and evaluation) forwards go through: a population trains every
        # member on every batch through an Ensemble view of its members (sample s = member s; the
        # population's own forward dispatches at random); a priority-dropout ensemble gives all its
        # members' logits under the dropout in one pass
        self.member_view = None
        if cfg.wrapper == "population":
            from .nn.ensemble import Ensemble
            self.member_view = Ensemble(self.members)
        self.eval_module = self.member_view if self.member_view is not None else self.model
        self.dropout_logits = cfg.dropout is not None and not self.reg_terms
        if self.dropout_logits:
            self.train_module = _MemberLogits(self.model)
        else:
            self.train_module = self.eval_module
        self.randomized = is_stochastic(self.eval_module)
        if cfg.prse_every:
            from .nn.population import counter_link_masks
            counter_link_masks(self.model, fraction=cfg.link_fraction, generator=mix_seed(cfg.seed, 0x4C494E4B))

        # static source model and offline examples (ens-adv, d3-*-off): rank 0 prepares, others load
        self.source = None
        if cfg.offline != "none":
            if self.dist.main:
                self.source = self._prepare_source()
            self._barrier()
            if not self.dist.main:
                self.source = self._prepare_source()
            if cfg.offline == "pgd":
                x_off, y_off = self._offline_examples()
                self.x_train = torch.cat([self.x_train, x_off])
                self.y_train = torch.cat([self.y_train, y_off])
        self.n_train = len(self.x_train)

        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=list(cfg.milestones),
                                                          gamma=cfg.lr_decay)
        self.ddp = None
        if self.dist.enabled:
            # plain DDP supports the double backward of the regularizer: autograd.grad w.r.t. the
            # input does not fire the parameter hooks, the final backward fires each once
            self.ddp = nn.parallel.DistributedDataParallel(
                self.train_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.local_batch = cfg.batch_size // self.dist.world
        self.steps_per_epoch = self._steps_per_epoch()

        # position
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best = {"val_acc": -1.0, "epoch": 0}
        self.partial = None
        resumed = False
        if cfg.resume and self.ckpt_path.exists():
            self._load_checkpoint()
            resumed = True
        if self.dist.main:
            # rewritten on resume too: --epochs may have been extended
            atomic_write_text(json.dumps(self.config_record(), indent=2) + "\n", self.run_dir / "config.json")
            if not resumed and self.metrics_path.exists() and not cfg.resume:
                self.metrics_path.unlink()
            self._truncate_metrics(self.epoch)
        self.log(f"fastdiv train: {cfg.preset or 'custom'} on {self.data.describe()}; {self._model_summary()}; "
                 f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs on {self.device}"
                 + (f" x {self.dist.world} processes" if self.dist.enabled else "")
                 + (f"; resumed at epoch {self.epoch + 1} step {self.step_in_epoch + 1}" if resumed else "")
                 + f"; run dir {self.run_dir}")

    def _model_summary(self) -> str:
        cfg = self.cfg
        n = sum(p.numel() for p in self.model.parameters())
        what = cfg.model + (f" ({cfg.kind})" if cfg.kind != "deterministic" else "")
        if cfg.wrapper != "single":
            what = f"{cfg.wrapper} of {cfg.members} x {what}"
        return f"{what}, {n:,} parameters"

    def config_record(self) -> dict[str, Any]:
        import fastdiv
        rec = self.cfg.to_dict()
        rec.pop("resume", None)
        rec["out"] = str(self.run_dir)
        rec.update(in_shape=list(self.in_shape), num_classes=self.num_classes, n_train=self.n_train,
                   fastdiv_version=fastdiv.__version__, torch_version=torch.__version__,
                   world_size=self.dist.world)
        return rec

    def _steps_per_epoch(self) -> int:
        per_rank = math.ceil(self.n_train / self.dist.world)
        return max(1, math.ceil(per_rank / self.local_batch))

    # -- source model and offline examples ------------------------------------------------------
    def _prepare_source(self) -> nn.Module:
        cfg = self.cfg
        if cfg.source_run:
            model, _ = load_run(cfg.source_run, which="best", device=str(self.device))
            return model.eval()
        from .nn.models import build_model
        path = self.run_dir / "source.pt"
        torch.manual_seed(mix_seed(cfg.seed, 0x534F5552))
        src = build_model(cfg.model, in_shape=self.in_shape, num_classes=self.num_classes,
                          kind="deterministic").to(self.device)
        if path.exists():
            state = torch.load(path, map_location=self.device, weights_only=True)
            src.load_state_dict(state["model"])
            return src.eval()
        if not self.dist.main:
            raise RuntimeError(f"{path} is missing on rank {self.dist.rank}")
        epochs = cfg.epochs if cfg.source_epochs is None else cfg.source_epochs
        self.log(f"training the static source model ({cfg.model}, deterministic) for {epochs} epochs")
        opt = torch.optim.Adam(src.parameters(), lr=cfg.lr)
        n = self.n_train_clean
        for e in range(epochs):
            g = torch.Generator().manual_seed(mix_seed(cfg.seed, 0x534F5552, e))
            order = torch.randperm(n, generator=g)
            src.train()
            for i in range(0, n, cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                x, y = self.x_train[idx].to(self.device), self.y_train[idx].to(self.device)
                loss = F.cross_entropy(src(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        src.eval()
        acc = self._plain_accuracy(src)
        self.log(f"source model: val acc {acc:.4f}")
        atomic_save({"model": src.state_dict(), "epochs": epochs, "val_acc": acc}, path)
        return src

    @torch.no_grad()
    def _plain_accuracy(self, model: nn.Module) -> float:
        correct = 0
        for i in range(0, len(self.x_val), 512):
            x, y = self.x_val[i:i + 512].to(self.device), self.y_val[i:i + 512].to(self.device)
            correct += int((model(x).argmax(1) == y).sum())
        return correct / max(1, len(self.x_val))

    def _offline_examples(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        path = self.run_dir / "offline.pt"
        if self.dist.main and not path.exists():
            from .attacks import PGD
            eps = cfg.offline_eps if cfg.offline_eps is not None else cfg.eps_train
            alpha = cfg.offline_alpha if cfg.offline_alpha is not None else eps / 30
            self.log(f"crafting offline PGD-{cfg.offline_steps} examples (eps {eps:g}, step {alpha:g}) of "
                     f"{self.n_train_clean} training images on the source model")
            xs = []
            for k, i in enumerate(range(0, self.n_train_clean, 256)):
                x = self.x_train[i:i + 256].to(self.device)
                y = self.y_train[i:i + 256].to(self.device)
                atk = PGD(self.source, eps=eps, alpha=alpha, steps=cfg.offline_steps,
                          seed=mix_seed(cfg.seed, 0x4F46464C, k))
                xs.append(atk(x, y).cpu())
            atomic_save({"x": torch.cat(xs), "y": self.y_train[: self.n_train_clean].clone()}, path)
        self._barrier()
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state["x"], state["y"]

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": _scheduler_state(self.sched),
            "rng": rng_state(self.device),
            "best": dict(self.best),
            "partial": self.partial,
            "preset": self.cfg.preset,
        }

    def save_checkpoint(self) -> None:
        if self.dist.main:
            atomic_save(self._checkpoint_state(), self.ckpt_path)

    def _load_checkpoint(self) -> None:
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.ckpt_path}: unknown checkpoint format {state.get('format')!r}")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        _load_scheduler_state(self.sched, state["scheduler"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.best = dict(state["best"])
        self.partial = state.get("partial")
        set_rng_state(state["rng"], self.device)

    def _truncate_metrics(self, completed_epochs: int) -> None:
        """Drop metric lines of epochs after the checkpoint (written before a kill)."""
        if not self.metrics_path.exists():
            return
        lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
        keep = []
        for ln in lines:
            try:
                if int(json.loads(ln)["epoch"]) <= completed_epochs:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):
                continue
        if len(keep) != len(lines):
            atomic_write_text("".join(k + "\n" for k in keep), self.metrics_path)

    # -- batches ----------------------------------------------------------------------------------
    def _epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's example indices for ``epoch``: the global order is a function of (seed, epoch)
        only (the order of :func:`fastdiv.data.make_loader`), sharded as DistributedSampler does."""
        from .data import make_loader
        loader = make_loader(_Sized(self.n_train), self.local_batch, shuffle=True, seed=self.cfg.seed,
                             distributed=self.dist.enabled)
        loader.sampler.set_epoch(epoch)
        return torch.tensor(list(iter(loader.sampler)), dtype=torch.long)

    def _prepare_batch(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        from .data import random_flip, random_shift, truncated_normal_noise
        cfg = self.cfg
        if cfg.augment != "none" and cfg.shift > 0:
            x = random_shift(x, cfg.shift, generator=mix_seed(seed, _T_AUG))
        if cfg.augment == "shift-flip":
            x = random_flip(x, generator=mix_seed(seed, _T_AUG, 1))
        extra_x, extra_y = [], []
        if cfg.noise_aug:
            extra_x.append(truncated_normal_noise(x, cfg.noise_eps / 2, generator=mix_seed(seed, _T_NOISE)))
            extra_y.append(y)
        if cfg.offline == "fgsm":
            extra_x.append(self._static_fgsm(x, y, mix_seed(seed, _T_ENSADV)))
            extra_y.append(y)
        if extra_x:
            x, y = torch.cat([x, *extra_x]), torch.cat([y, *extra_y])
        return x, y

    def _static_fgsm(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        """Ensemble Adversarial Training's D_adv: FGSM on the static source model with a per-example
        step |N(0, (eps/2)^2)| truncated at eps."""
        from .data import truncated_normal_noise
        eps = self.cfg.offline_eps if self.cfg.offline_eps is not None else self.cfg.eps_train
        size = truncated_normal_noise(torch.zeros(x.shape[0], device=x.device), eps / 2, generator=seed,
                                      clip=None).abs()
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(F.cross_entropy(self.source(leaf), y, reduction="sum"), leaf)
        step = size.view(-1, *([1] * (x.dim() - 1))) * g.sign()
        return (x + step).clamp(0, 1).detach()

    def _adversarial(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        """PGD examples on the fly; populations: each member on examples crafted on itself, stacked
        sample-major ``[K*B, ...]``."""
        from .attacks import PGD
        cfg = self.cfg

        def attack(model, s):
            return PGD(model, eps=cfg.eps_train, alpha=cfg.adv_alpha, steps=cfg.adv_steps,
                       random_start=cfg.adv_random_start, eot=cfg.adv_eot, eot_samples=cfg.adv_eot_samples,
                       seed=s, strategy=cfg.strategy)(x, y)

        if cfg.wrapper == "population":
            return torch.cat([attack(m, mix_seed(seed, _T_ADV, i)) for i, m in enumerate(self.members)])
        return attack(self.model, mix_seed(seed, _T_ADV))

    # -- one step ---------------------------------------------------------------------------------
    def _forward_model(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.train_module

    def _sample_logits(self, model: nn.Module, x: torch.Tensor, n: int, seed: int, stacked: bool) -> torch.Tensor:
        """Logits ``[n, B, C]`` of n sample models with graph, without input gradients (lambda = 0 or
        no regularizer): the forward :func:`fastdiv.sample_input_grads` would do. ``stacked``: x is
        already ``[n*B, ...]`` sample-major (per-member adversarial examples)."""
        from .nn.sampling import sampling, supports_batched
        batch = x.shape[0] // n if stacked else x.shape[0]
        if not self.randomized:
            out = model(x)
            return out.view(n, batch, -1) if stacked else out.unsqueeze(0).expand(n, *out.shape)
        if self.cfg.strategy != "loop" and supports_batched(self.train_module):
            xr = x if stacked else x.repeat(n, *([1] * (x.dim() - 1)))
            with sampling(model, n, seed):
                out = model(xr)
            return out.view(n, batch, -1)
        parts = []
        for s in range(n):
            xs = x[s * batch:(s + 1) * batch] if stacked else x
            with sampling(model, n, seed, index=s):
                parts.append(model(xs))
        return torch.stack(parts)

    def _train_step(self, xb: torch.Tensor, yb: torch.Tensor, epoch: int, step: int, lam: float):
        """One optimization step; returns a dict of floats (or None when the loss is not finite,
        after all processes agreed on it) and whether a stop signal arrived anywhere."""
        from .grads import sample_input_grads
        from .losses import concentration_stats, diversity_loss
        cfg = self.cfg
        seed = mix_seed(cfg.seed, epoch, step, self.dist.rank)
        x, y = self._prepare_batch(xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True), seed)
        stacked = False
        if cfg.adv:
            x = self._adversarial(x, y, seed)
            stacked = cfg.wrapper == "population"
        n = cfg.samples
        if stacked and n != len(self.members):
            raise ValueError(f"population adversarial training needs samples = members ({len(self.members)}), "
                             f"got samples={n}")
        model = self._forward_model()
        self.model.train()
        sample_seed = mix_seed(seed, _T_SAMPLES)
        grads = None
        reg = torch.zeros((), device=self.device)
        if self.dropout_logits:
            logits = model(x)
            if logits.shape[0] != n:
                raise ValueError(f"a priority-dropout ensemble of {logits.shape[0]} members trains with samples = "
                                 f"members, got samples={n}")
        elif self.reg_terms and lam > 0:
            if stacked:
                raise ValueError("a gradient regularizer with per-member adversarial examples is not supported")
            grads, logits = sample_input_grads(model, x, y, n, loss=cfg.grad_loss, create_graph=True,
                                               strategy=cfg.strategy, generator=sample_seed)
            for name, w in self.reg_terms:
                reg = reg + w * diversity_loss(name, grads, sample_dim=0)
        else:
            logits = self._sample_logits(model, x, n, sample_seed, stacked)
        classes = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, classes), y.repeat(n))
        loss = ce + lam * reg
        kl = torch.zeros((), device=self.device)
        if cfg.kl_factor > 0:
            from .nn.bayes import kl_divergence
            kl = kl_divergence(self.model) * (cfg.kl_factor / self.n_train)
            loss = loss + kl
        nonfinite = not bool(torch.isfinite(loss.detach()))
        stop = self._stop_flags(nonfinite)
        if stop["nonfinite"]:
            return None, stop["signal"], float(loss.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self._after_step(epoch, step)
        with torch.no_grad():
            acc = (logits.detach().argmax(-1) == y).float().mean()
            out = {"loss": float(loss.detach()), "ce": float(ce.detach()), "reg": float(reg.detach()),
                   "kl": float(kl.detach()), "acc": float(acc), "examples": int(y.shape[0])}
            if grads is not None:
                d = grads[0, 0].numel()
                out["kappa_p"] = float(concentration_stats(grads.detach(), sample_dim=0).kappa.mean()) / d
        return out, stop["signal"], out["loss"]

    def _stop_flags(self, nonfinite: bool) -> dict[str, Any]:
        """Agree across processes on 'some loss is not finite' and 'a stop signal arrived'."""
        signum = self.signals.signum if self.signals is not None else 0
        if not self.dist.enabled:
            return {"nonfinite": nonfinite, "signal": signum}
        t = torch.tensor([float(nonfinite), float(signum)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return {"nonfinite": bool(t[0] > 0), "signal": int(t[1])}

    def _after_step(self, epoch: int, step: int) -> None:
        cfg = self.cfg
        self.global_step += 1
        if cfg.prse_every and self.global_step % cfg.prse_every == 0:
            from .nn.population import prse
            rng = random.Random(mix_seed(cfg.seed, _T_PRSE, self.global_step))
            k = len(self.members)
            for i in range(k):
                j = rng.choice([m for m in range(k) if m != i])
                prse(self.model, i, j, alpha=cfg.clm_alpha, delta=cfg.clm_delta)

    # -- evaluation -------------------------------------------------------------------------------
    def eval_samples(self) -> int:
        if self.cfg.wrapper != "single":
            return len(self.members)
        return self.cfg.eval_samples if self.randomized else 1

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation accuracy of the defense's inference (mean softmax over the sample models; for a
        random-dispatch population the expected accuracy of one random member) and the concentration
        statistics of held-out gradients."""
        from .nn.sampling import sampling, supports_batched
        cfg = self.cfg
        model = self.eval_module
        was_training = self.model.training
        self.model.eval()
        k = self.eval_samples()
        seed = mix_seed(cfg.seed, 0x4556414C)
        per = max(1, cfg.eval_rows // k)
        correct_ens, correct_single, total, nll = 0.0, 0.0, 0, 0.0
        for i in range(0, len(self.x_val), per):
            x = self.x_val[i:i + per].to(self.device)
            y = self.y_val[i:i + per].to(self.device)
            b = x.shape[0]
            if not self.randomized:
                logits = model(x).unsqueeze(0)
            elif supports_batched(model):
                with sampling(model, k, seed):
                    logits = model(x.repeat(k, *([1] * (x.dim() - 1)))).view(k, b, -1)
            else:
                parts = []
                for s in range(k):
                    with sampling(model, k, seed, index=s):
                        parts.append(model(x))
                logits = torch.stack(parts)
            probs = logits.float().softmax(-1)
            mean = probs.mean(0)
            correct_ens += float((mean.argmax(-1) == y).sum())
            correct_single += float((logits.argmax(-1) == y).float().mean(0).sum())
            nll += float(-mean.gather(1, y[:, None]).clamp_min(1e-12).log().sum())
            total += b
        total = max(total, 1)
        out = {"val_acc_ensemble": correct_ens / total, "val_acc_single": correct_single / total,
               "val_nll": nll / total}
        out["val_acc"] = out["val_acc_single"] if cfg.wrapper == "population" else out["val_acc_ensemble"]
        out.update(self._held_out_stats())
        self.model.train(was_training)
        return out

    def _held_out_stats(self) -> dict[str, Any]:
        from .grads import sample_input_grads
        from .losses import concentration_stats
        cfg = self.cfg
        n = self.eval_samples() if cfg.wrapper != "single" else cfg.stats_samples
        if cfg.stats_limit == 0 or not self.randomized or n < 2 or len(self.x_val) == 0:
            return {"rho": None, "kappa_p": None, "mean_cos": None, "coherence": None, "dpp": None}
        x_all = self.x_val[:cfg.stats_limit]
        y_all = self.y_val[:cfg.stats_limit]
        seed = mix_seed(cfg.seed, 0x53544154)
        per = max(1, cfg.eval_rows // n)
        sums = {"rho": 0.0, "kappa_p": 0.0, "mean_cos": 0.0, "coherence": 0.0, "dpp": 0.0}
        for i in range(0, len(x_all), per):
            x, y = x_all[i:i + per].to(self.device), y_all[i:i + per].to(self.device)
            with torch.enable_grad():
                grads, _ = sample_input_grads(self.eval_module, x, y, n, loss=cfg.grad_loss, strategy=cfg.strategy,
                                              generator=seed)
            st = concentration_stats(grads, sample_dim=0)
            d = grads[0, 0].numel()
            sums["rho"] += float(st.rho.sum())
            sums["kappa_p"] += float(st.kappa.sum()) / d
            sums["mean_cos"] += float(st.mean_cos.sum())
            sums["coherence"] += float(st.coherence.sum())
            sums["dpp"] += float(st.dpp.sum())
        return {k: v / len(x_all) for k, v in sums.items()}

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        self.signals = None
        with _SignalFlag() as signals:
            self.signals = signals
            while self.epoch < cfg.epochs:
                self._run_epoch(signals)
        self.log(f"done: best val acc {self.best['val_acc']:.4f} at epoch {self.best['epoch']}; run dir {self.run_dir}")
        return self.run_dir

    def _run_epoch(self, signals: _SignalFlag) -> None:
        cfg = self.cfg
        epoch = self.epoch
        indices = self._epoch_indices(epoch)
        steps = self.steps_per_epoch
        if self.step_in_epoch == 0:
            # every epoch starts from RNG states that depend on (seed, epoch) only
            seed_globals(mix_seed(cfg.seed, _T_EPOCH, epoch, self.dist.rank))
            self.partial = {"loss": 0.0, "ce": 0.0, "reg": 0.0, "kl": 0.0, "correct": 0.0, "examples": 0,
                            "kappa_p": 0.0, "kappa_steps": 0, "time_s": 0.0}
        acc = self.partial
        bar = self._progress(epoch, steps)
        t0 = time.perf_counter()
        for step in range(self.step_in_epoch, steps):
            idx = indices[step * self.local_batch:(step + 1) * self.local_batch]
            lam = lambda_at(epoch + step / steps, cfg.lam, cfg.warmup, cfg.rampup) if self.reg_terms else 0.0
            out, signum, loss_value = self._train_step(self.x_train[idx], self.y_train[idx], epoch, step, lam)
            if out is None:
                if bar is not None:
                    bar.close()
                good = (f"the last good checkpoint is {self.ckpt_path} (after epoch {self.epoch}, step "
                        f"{self.step_in_epoch})" if self.ckpt_path.exists() else "no checkpoint was written yet")
                raise TrainingDiverged(f"non-finite loss ({loss_value}) at epoch {epoch + 1}, step {step + 1}: "
                                       f"training stopped; {good}")
            n_ex = out["examples"]
            for key in ("loss", "ce", "reg", "kl"):
                acc[key] += out[key] * n_ex
            acc["correct"] += out["acc"] * n_ex
            acc["examples"] += n_ex
            if "kappa_p" in out:
                acc["kappa_p"] += out["kappa_p"]
                acc["kappa_steps"] += 1
            self.step_in_epoch = step + 1
            if bar is not None:
                post = {"loss": f"{out['loss']:.4f}", "acc": f"{out['acc']:.3f}", "λ": f"{lam:.3g}"}
                post["κ̂/p"] = f"{out['kappa_p']:.3g}" if "kappa_p" in out else "-"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if signum:
                acc["time_s"] += time.perf_counter() - t0
                if bar is not None:
                    bar.close()
                self.save_checkpoint()
                name = signal.Signals(signum).name
                raise TrainingInterrupted(f"{name}: saved {self.ckpt_path} at epoch {epoch + 1}, step {step + 1}; "
                                          f"continue with --resume", signum)
        if bar is not None:
            bar.close()
        acc["time_s"] += time.perf_counter() - t0
        self._end_epoch(epoch)
        if signals.signum:
            name = signal.Signals(signals.signum).name
            raise TrainingInterrupted(f"{name}: stopped after epoch {epoch + 1} (checkpoint saved); continue with "
                                      f"--resume", signals.signum)

    def _progress(self, epoch: int, steps: int):
        if self.quiet or not self.dist.main or not sys.stderr.isatty():
            return None
        from tqdm import tqdm
        return tqdm(total=steps, initial=self.step_in_epoch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                    leave=False, dynamic_ncols=True)

    def _reduce_partial(self) -> dict[str, float]:
        acc = dict(self.partial)
        if self.dist.enabled:
            keys = ["loss", "ce", "reg", "kl", "correct", "examples", "kappa_p", "kappa_steps"]
            t = torch.tensor([float(acc[k]) for k in keys], device=self.device, dtype=torch.float64)
            torch.distributed.all_reduce(t)
            acc.update({k: float(v) for k, v in zip(keys, t.tolist())})
        return acc

    def _end_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        acc = self._reduce_partial()
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        self.epoch = epoch + 1
        self.step_in_epoch = 0
        if self.dist.main:
            t_eval = time.perf_counter()
            ev = self.evaluate()
            ex = max(acc["examples"], 1)
            record = {
                "epoch": epoch + 1, "step": self.global_step, "lr": lr,
                "lambda": lambda_at(epoch + (self.steps_per_epoch - 1) / self.steps_per_epoch, cfg.lam,
                                    cfg.warmup, cfg.rampup) if self.reg_terms else 0.0,
                "train_loss": acc["loss"] / ex, "train_ce": acc["ce"] / ex, "train_reg": acc["reg"] / ex,
                "train_kl": acc["kl"] / ex, "train_acc": acc["correct"] / ex,
                "train_kappa_p": acc["kappa_p"] / acc["kappa_steps"] if acc["kappa_steps"] else None,
                **ev,
                "train_time_s": acc["time_s"], "time_s": acc["time_s"] + (time.perf_counter() - t_eval),
            }
            improved = ev["val_acc"] > self.best["val_acc"]
            record["best"] = improved
            if improved:
                self.best = {"val_acc": ev["val_acc"], "epoch": epoch + 1}
                atomic_save({"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "val_acc": ev["val_acc"],
                              "model": self.model.state_dict(), "preset": cfg.preset}, self.best_path)
            # the metrics line goes first: a kill before the checkpoint is replaced re-runs the epoch
            # and _truncate_metrics drops the stale line
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        self.partial = None
        if self.dist.enabled:
            best = torch.tensor([self.best["val_acc"], float(self.best["epoch"])], device=self.device,
                                dtype=torch.float64)
            torch.distributed.broadcast(best, 0)
            self.best = {"val_acc": float(best[0]), "epoch": int(best[1])}
        self.save_checkpoint()
        if self.dist.main:
            r = record
            stats = "" if r["kappa_p"] is None else (f"  ρ̂ {r['rho']:.3f}  κ̂/p {r['kappa_p']:.4g}  cos "
                                                      f"{r['mean_cos']:.3f}  dpp {r['dpp']:.3g}")
            self.log(f"epoch {epoch + 1}/{cfg.epochs}  loss {r['train_loss']:.4f}  acc {r['train_acc']:.4f}  "
                     f"val {r['val_acc']:.4f}  λ {r['lambda']:.3g}  lr {lr:.3g}{stats}  ({r['time_s']:.1f} s)")
        self._barrier()


class _Sized:
    """Just a length, for the samplers of :func:`fastdiv.data.make_loader`."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # pragma: no cover - the samplers never index
        return i


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------


def train(config: dict | TrainConfig, *, quiet: bool = False) -> Path:
    """Trains the run ``config`` describes; returns its run directory.

    ``config``: a :class:`TrainConfig` (used as is) or a dict of settings resolved with
    :func:`resolve_config` (the preset's values for the dataset, overridden by the dict), e.g.
    ``train({'preset': 'graddiv-kappa', 'dataset': 'digits', 'epochs': 3, 'out': 'runs/x'})``.
    ``resume=True`` continues the run in ``out`` from its checkpoint (settings come from its
    ``config.json``; only ``epochs`` and ``device`` may differ).

    Raises :class:`TrainingDiverged` on a non-finite loss and :class:`TrainingInterrupted` after
    SIGINT/SIGTERM (both after keeping a usable checkpoint), ``FileExistsError`` when ``out``
    already holds a checkpoint and ``resume`` is false.
    """
    if isinstance(config, TrainConfig):
        cfg = config
        cfg.validate()
    elif isinstance(config, dict):
        cfg = _config_for_run(dict(config))
    else:
        raise TypeError(f"train: config must be a dict or a TrainConfig, got {type(config).__name__}")
    run = _Run(cfg, quiet)
    try:
        run.setup()
        return run.run()
    finally:
        run.dist.close()


_RESUME_MUTABLE = ("epochs", "device", "resume", "out")


def _config_for_run(values: dict[str, Any], config_file=None) -> TrainConfig:
    """Resolve a fresh run's config, or the stored config of a run being resumed."""
    if values.get("resume"):
        out = values.get("out")
        if not out:
            raise ValueError("resume needs out (--out RUN_DIR): the run directory to continue")
        stored = Path(out) / "config.json"
        if stored.exists():
            base = _load_config_file(stored)
            changed = {k: v for k, v in values.items()
                       if k not in _RESUME_MUTABLE and k in base and base[k] != v and k != "lam"}
            if "lam" in values and values["lam"] != base.get("lam"):
                changed["lambda"] = values["lam"]
            if changed:
                raise ValueError(f"resume: the run's settings cannot change (only {list(_RESUME_MUTABLE[:2])}); "
                                 f"got different {sorted(changed)}")
            base.update({k: values[k] for k in _RESUME_MUTABLE if k in values})
            base["out"] = out
            return TrainConfig.from_dict(base)
        if values.get("preset") is None and config_file is None:
            raise ValueError(f"resume: {stored} does not exist, so there is no run to continue in {out!r} "
                             f"(start one with --preset)")
    return resolve_config(values, config_file=config_file)


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


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _cli_type(f: dataclasses.Field):
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t.startswith("bool"):
        return "bool"
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    if t.startswith("list"):
        return "list"
    return str


def _none_or(tp):
    def parse(s: str):
        if s.lower() in ("none", "null"):
            return None
        return tp(s)
    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``train`` subcommand to the ``fastdiv`` CLI (every :class:`TrainConfig` setting is a
    flag; only the flags given override the preset and the --config file)."""
    p = subparsers.add_parser(
        "train", help="train a defense with a paper's recipe (--preset NAME)",
        description=("Train a randomized or ensemble defense with a paper's recipe. Values: the preset's "
                     "defaults for the dataset < --config FILE.json < the flags given. "
                     "Exit codes: 0 done, 2 bad arguments, 3 non-finite loss, 128+N stopped by signal N "
                     "(checkpoint saved; --resume continues)."),
        argument_default=argparse.SUPPRESS, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--list-presets", action="store_true", help="print every preset with its paper and values, exit")
    p.add_argument("--config", metavar="FILE.json", help="JSON object of settings (overridden by flags)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar; one log line per epoch")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        group = groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kind = _cli_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{meta['help']} (default: the preset's value, else {default})"
        help_text = help_text.replace("%", "%%")
        choices = meta.get("choices")
        if kind == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind == "list":
            group.add_argument(flag, dest=f.name, type=int, nargs="*", metavar="EPOCH", help=help_text)
        else:
            tp = kind
            optional = "None" in str(f.type)
            if choices is not None:
                none = None in choices and f.name != "preset"
                choices = [c for c in choices if c is not None] + (["none"] if none else [])
                group.add_argument(flag, dest=f.name, choices=choices, help=help_text)
            else:
                group.add_argument(flag, dest=f.name, type=_none_or(tp) if optional else tp,
                                   metavar=(flag[2:].upper().replace("-", "_")), help=help_text)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """The ``fastdiv train`` command: returns the exit code."""
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    if values.get("dropout") == "none":
        values["dropout"] = None
    if getattr(args, "list_presets", False):
        print(format_presets())
        return 0
    quiet = bool(getattr(args, "quiet", False))
    if getattr(args, "resume", False):
        values["resume"] = True
    try:
        cfg = _config_for_run(values, getattr(args, "config", None))
        if cfg.preset is None and not values.get("resume"):
            print("fastdiv train: error: --preset NAME is required (or a --config file that sets it); "
                  "see --list-presets", file=sys.stderr)
            return 2
        train(cfg, quiet=quiet)
    except TrainingDiverged as e:
        print(f"fastdiv train: {e}", file=sys.stderr)
        return TrainingDiverged.exit_code
    except TrainingInterrupted as e:
        print(f"fastdiv train: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"fastdiv train: error: {e}", file=sys.stderr)
        return 2
    return 0
