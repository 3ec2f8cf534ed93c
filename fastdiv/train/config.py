"""The settings of a training run: :class:`TrainConfig`, their resolution from a preset, a JSON file
and overrides (:func:`resolve_config`), the regularizer spec (:func:`parse_reg`) and the lambda
schedule (:func:`lambda_at`).

Each field carries its command-line metadata (help, flag, choices, group), from which
:mod:`fastdiv.train.cli` generates the flags of ``fastdiv train``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from .._checks import check_budget
from ..errors import BadInputError, CorruptFileError
from ..files import read_json_file
from ..nn.models import MODELS
from ..presets import PRESETS, TRAINABLE_DATASETS, get_preset

__all__ = ["TrainConfig", "best_from_epoch", "config_for_run", "lambda_at", "load_config_file", "parse_reg",
           "resolve_config"]

#: keys of a run's ``config.json`` that are facts of the run, not settings (dropped when it is read back)
DERIVED_KEYS = ("in_shape", "num_classes", "n_train", "fastdiv_version", "torch_version", "world_size",
                "num_samples_eval")
#: the settings a resumed run may change
RESUME_MUTABLE = ("epochs", "device", "resume", "out")
#: the largest count (epochs, batch size, steps, samples) a setting may take: torch's int32 index range
MAX_COUNT = 2 ** 31 - 1


def _field(default, help: str, *, flag: str | None = None, choices=None, group: str = "training",
           cli: bool = True):
    """A TrainConfig field with its command-line metadata: help text, flag (default ``--field-name``),
    choices, argument group, and whether it is a flag at all."""
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
    dataset: str = _field("digits", "dataset", choices=TRAINABLE_DATASETS, group="run")
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
    dropout_rescale: bool = _field(False, "priority dropout: divide kept units by their keep rate in training "
                                   "(inverted dropout; the paper does not rescale)", group="model")

    # -- optimization -----------------------------------------------------------------------------
    optimizer: str = _field("adam", "optimizer", choices=("adam", "sgd"))
    epochs: int = _field(10, "number of epochs")
    batch_size: int = _field(128, "global batch size (split over DDP processes)")
    lr: float = _field(1e-3, "initial learning rate")
    sigma_lr: float | None = _field(None, "initial learning rate of the Bayesian layers' posterior log sigma "
                                    "(default --lr; decays with it)")
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
    best_from: int | None = _field(None, "first epoch whose model may become best.pt (default: the first epoch "
                                   "trained to its end at the full lambda, ceil(warmup + rampup), at most --epochs; "
                                   "1 without a regularizer)", group="evaluation")

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

    @classmethod
    def flag_of(cls, name: str) -> str:
        """The command-line flag of the setting ``name`` (``--lambda`` for ``lam``, else ``--name-with-dashes``)."""
        f = cls.__dataclass_fields__[name]
        return f.metadata.get("flag") or "--" + name.replace("_", "-")

    def validate(self) -> None:
        """Type and range checks with errors naming the setting and its flag."""
        flag = self.flag_of
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ValueError(f"TrainConfig: {f.name} must be one of {list(choices)} ({flag(f.name)}), "
                                 f"got {value!r}")

        def positive_int(name, minimum=1, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= MAX_COUNT:
                raise ValueError(f"TrainConfig: {name} must be an int >= {minimum} and <= {MAX_COUNT} ({flag(name)}), "
                                 f"got {v!r}")

        def number(name, minimum=0.0, strict=False, optional=False, maximum=math.inf):
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (v <= minimum if strict else v < minimum) or v > maximum:
                rel = ">" if strict else ">="
                raise ValueError(f"TrainConfig: {name} must be a finite number {rel} {minimum:g}"
                                 + (f" and <= {maximum:g}" if maximum < math.inf else "")
                                 + f" ({flag(name)}), got {v!r}")
            setattr(self, name, float(v))

        def budget(name, strict=False, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            setattr(self, name, check_budget(v, f"TrainConfig: {name} ({flag(name)})", strict=strict))

        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"TrainConfig: preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if not isinstance(self.model, str) or self.model not in MODELS:
            raise ValueError(f"TrainConfig: model must be one of {list(MODELS)} (--model), got {self.model!r}")
        for name in ("epochs", "batch_size", "members", "samples", "adv_steps", "adv_eot_samples",
                     "offline_steps", "eval_samples", "stats_samples", "eval_rows"):
            positive_int(name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TrainConfig: seed must be an int >= 0 (--seed), got {self.seed!r}")
        positive_int("prse_every", minimum=0)
        positive_int("stats_limit", minimum=0)
        positive_int("shift", minimum=0)
        positive_int("resize", optional=True)
        positive_int("limit", optional=True)
        positive_int("source_epochs", minimum=0, optional=True)
        positive_int("best_from", optional=True)
        number("lr", strict=True)
        for name in ("momentum", "weight_decay", "lam", "warmup", "rampup", "kl_factor", "clm_alpha", "clm_delta",
                     "dropout_s", "dropout_lambda", "dropout_alpha", "dropout_beta", "dropout_gamma"):
            number(name)
        # l_inf budgets and step sizes of the training attacks and noise: inputs live in [0, 1]
        budget("eps_train")
        budget("noise_eps")
        for name in ("adv_alpha", "offline_eps", "offline_alpha"):
            budget(name, strict=True, optional=True)
        number("lr_decay", strict=True)
        number("link_fraction", maximum=1.0)
        for name in ("sigma0", "sigma_init", "sigma_inner"):
            number(name, strict=True)
        number("sigma_post", strict=True, optional=True)
        number("sigma_lr", strict=True, optional=True)
        number("grad_clip", strict=True, optional=True)
        if not isinstance(self.milestones, (list, tuple)) or any(
                isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.milestones):
            raise ValueError("TrainConfig: milestones must be a list of positive epoch numbers, "
                             f"got {self.milestones!r}")
        self.milestones = sorted(int(m) for m in self.milestones)
        for name in ("adv", "adv_random_start", "noise_aug", "resume", "dropout_rescale"):
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
    from ..losses import DIVERSITY_LOSSES

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


def best_from_epoch(cfg: TrainConfig) -> int:
    """The first epoch (1-based) whose model may become ``best.pt``: ``cfg.best_from`` when set, else the
    first epoch whose last step has lambda at its target, so that the model kept was trained with the
    whole objective and not one from the warm-up, before the regularizer acts; 1 without a regularizer.
    Never later than the last epoch, so every run has a ``best.pt``."""
    if cfg.best_from is not None:
        first = cfg.best_from
    elif parse_reg(cfg.reg) and cfg.lam > 0:
        first = max(1, math.ceil(cfg.warmup + cfg.rampup))
    else:
        first = 1
    return min(first, cfg.epochs)


def lambda_at(t: float, target: float, warmup: float, rampup: float) -> float:
    """The regularization weight at training time ``t`` (in epochs, fractional within an epoch):
    0 while ``t < warmup``, then linear from 0 to ``target`` over ``rampup`` epochs, then ``target``
    (``target`` straight after the warm-up when ``rampup`` is 0)."""
    if t < warmup:
        return 0.0
    if rampup <= 0:
        return float(target)
    return float(target) * min(1.0, (t - warmup) / rampup)


def load_config_file(path: str | os.PathLike, *, what: str = "--config", error=BadInputError) -> dict[str, Any]:
    """The settings in a JSON file: a ``--config`` file, or a run's ``config.json`` without its derived
    facts (:data:`DERIVED_KEYS`); a ``lambda`` key is read as ``lam``. A file that is missing or holds no
    JSON object raises ``error`` (:class:`~fastdiv.errors.BadInputError` for a file the user gave) naming
    ``what``."""
    data = read_json_file(path, what, error=error)
    # config.json of a run directory carries derived facts; keep only the settings
    data.pop("derived", None)
    for key in DERIVED_KEYS:
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
    file_values = load_config_file(config_file) if config_file is not None else {}
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


def config_for_run(values: dict[str, Any], config_file=None) -> TrainConfig:
    """Resolve a fresh run's config, or the stored config of a run being resumed (whose settings may not
    change, except :data:`RESUME_MUTABLE`)."""
    if values.get("resume"):
        out = values.get("out")
        if not out:
            raise ValueError("resume needs out (--out RUN_DIR): the run directory to continue")
        stored = Path(out) / "config.json"
        if stored.exists():
            base = load_config_file(stored, what="run config", error=CorruptFileError)
            changed = {k: v for k, v in values.items()
                       if k not in RESUME_MUTABLE and k in base and base[k] != v and k != "lam"}
            if "lam" in values and values["lam"] != base.get("lam"):
                changed["lambda"] = values["lam"]
            if changed:
                raise ValueError(f"resume: the run's settings cannot change (only {list(RESUME_MUTABLE[:2])}); "
                                 f"got different {sorted(changed)}")
            try:  # the stored settings alone: a fault there is the file's, not the flags'
                TrainConfig.from_dict({**base, "out": out})
            except ValueError as exc:
                raise CorruptFileError(f"run config {stored} holds settings fastdiv refuses ({exc}); it is written by "
                                       "fastdiv train: restore it from a copy of the run directory", stored) from None
            base.update({k: values[k] for k in RESUME_MUTABLE if k in values})
            base["out"] = out
            return TrainConfig.from_dict(base)
        if values.get("preset") is None and config_file is None:
            raise ValueError(f"resume: {stored} does not exist, so there is no run to continue in {out!r} "
                             f"(start one with --preset)")
    return resolve_config(values, config_file=config_file)
