"""``fastdiv evaluate``: robust accuracy, transferability, gradient analysis and the obfuscation checklist.

Turns a trained run (``fastdiv train``) — or any model and test set, in memory — into the evidence a
robustness paper needs:

* the robust-accuracy table in the shape of GradDiv's Table 1: rows None, FGSM, PGD, APGD-CE,
  APGD-DLR, Square, MI-FGSM, PGD-CW (any names of :data:`fastdiv.attacks.ATTACKS`), each as
  ``[Attack]`` (one fixed sample model), ``EOT¹-[Attack]`` (a fresh sample each iteration) and
  ``EOT-[Attack]`` (the mean gradient of n samples) for stochastic models; columns per ε; mean ± std
  over ``repeats``; a **Total** row = the per-example worst case over None and every attack row.
  Predictions are ensemble inference over ``ensemble_samples`` sample models; the stricter worst case
  (every sample model correct) is reported beside it;
* the accuracy-vs-ε curve (GradDiv Fig. 6), transferability among k sample models or ensemble /
  population members (Fig. 7), MRA for populations (CLM eq. 6), transfer attacks from a surrogate
  run (GAL Table 2);
* gradient analysis: κ̂, ρ̂, mean cosine, DPP and coherence over the test set (Fig. 5, GAL Fig. 4), a
  2-D projection of 100 gradient samples at one input (Fig. 4), their cosine heatmap (Fig. 8), LPD's
  ambiguity entropy and L_d / L_s quantiles, GAAS with regular Hadamard directions (GAL §4.4);
* the gradient-obfuscation checklist of GradDiv §5, each check pass/fail with its numbers.

Outputs (``--out``, default ``RUN_DIR/eval``): ``results.json`` (schema :data:`RESULTS_SCHEMA`,
checked by :func:`validate_results`), ``report.md`` and its PNG plots. Under ``torchrun`` every rank
evaluates a shard of the test set and rank 0 gathers the per-example results and writes the files.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import inspect
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from . import analysis as A
from .runtime import resolve_device, setup_ranks

__all__ = [
    "DEFAULT_ATTACKS", "FORMS", "EvalConfig", "RESULTS_SCHEMA", "SCHEMA_NAME", "SCHEMA_VERSION", "evaluate",
    "evaluate_model", "validate_results", "write_outputs", "attack_label", "add_parser", "parse_eps",
    "decode_flags",
]

SCHEMA_NAME = "fastdiv.evaluate.results"
SCHEMA_VERSION = 1

#: GradDiv Table 1's attacks (B&B and FAB are not in fastdiv; Square, MI-FGSM and PGD-CW are added).
DEFAULT_ATTACKS = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "square", "mifgsm", "pgdcw")
#: The three forms of an attack on a stochastic model, in table order.
FORMS = ("fixed", "one", "mean")
_FORM_PREFIX = {"fixed": "", "one": "EOT¹-", "mean": "EOT-"}
_DISPLAY = {"fgsm": "FGSM", "fgm": "FGM", "rfgsm": "R-FGSM", "bim": "I-FGSM", "pgd": "PGD", "pgd-l2": "PGD-ℓ2",
            "mifgsm": "MI-FGSM", "pgdcw": "PGD-CW", "apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR",
            "square": "Square"}
#: GAL Table 2's transfer attacks (crafted on the surrogate).
DEFAULT_TRANSFER_ATTACKS = ("fgsm", "rfgsm", "bim", "mifgsm", "pgdcw")


def attack_label(name: str, form: str | None) -> str:
    """``('pgd', 'mean') -> 'EOT-PGD'``; ``form=None`` (deterministic model) gives the plain name."""
    return _FORM_PREFIX.get(form or "fixed", "") + _DISPLAY.get(name, name.upper())


def _attack_registry() -> dict:
    try:
        from .attacks import ATTACKS
    except ImportError as exc:  # pragma: no cover - only while fastdiv.attacks is missing
        raise ImportError(f"fastdiv evaluate needs fastdiv.attacks (ATTACKS registry): {exc}") from exc
    return ATTACKS


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------

def parse_eps(text: str | Sequence) -> list[float]:
    """ε values from ``'0.1,0.2,8/255'`` or a sequence of numbers / strings; each must lie in [0, 1]."""
    items = [t.strip() for t in text.split(",") if t.strip()] if isinstance(text, str) else list(text)
    if not items:
        raise ValueError("eps: give at least one ε value, e.g. --eps 0.1,0.2,0.3")
    out = []
    for t in items:
        try:
            v = float(Fraction(t)) if isinstance(t, str) else float(t)
        except (ValueError, ZeroDivisionError, TypeError):
            raise ValueError(f"eps: {t!r} is not a number (write 0.03 or 8/255)") from None
        if isinstance(t, bool) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"eps: every ε must be in [0, 1] (inputs live in [0, 1]), got {t!r}")
        out.append(v)
    return out


def _names(text: str | Sequence[str] | None, what: str) -> list[str]:
    if text is None:
        return []
    items = [t.strip().lower() for t in text.split(",")] if isinstance(text, str) else [str(t).lower() for t in text]
    items = [t for t in items if t]
    seen = []
    for t in items:
        if t not in seen:
            seen.append(t)
    return seen


@dataclasses.dataclass
class EvalConfig:
    """The settings of one evaluation (CLI flags in brackets). Validated by :meth:`check`."""

    attacks: Sequence[str] = DEFAULT_ATTACKS   #: [--attacks] names of fastdiv.attacks.ATTACKS
    eps: Sequence[float] = (0.1, 0.2, 0.3)     #: [--eps] ℓ∞ budgets in [0, 1]
    forms: Sequence[str] = FORMS               #: [--forms] for stochastic models
    steps: int = 20                            #: [--steps] attack iterations
    square_queries: int = 200                  #: [--square-queries] queries of Square (each n samples for EOT)
    alpha_factor: float = 0.25                 #: [--alpha-factor] step size α = factor·ε (GradDiv: ε/4)
    eot_samples: int = 10                      #: [--eot-samples] n of EOT-[Attack]
    ensemble_samples: int = 20                 #: [--ensemble-samples] sample models of ensemble inference
    repeats: int = 1                           #: [--repeats] independent evaluations (mean ± std)
    seed: int = 0                              #: [--seed]
    limit: int | None = None                   #: [--limit] first N test examples
    batch_size: int = 128                      #: [--batch-size]
    curve_eps: Sequence[float] = ()            #: [--curve-eps] extra ε of the accuracy curve
    curve_attack: str = "pgd"                  #: [--curve-attack]
    transfer_models: int = 5                   #: [--transfer-models] k sample models (0 = off)
    transfer_attack: str = "pgd"               #: [--transfer-attack] for the matrix and MRA
    transfer_attacks: Sequence[str] = DEFAULT_TRANSFER_ATTACKS  #: [--transfer-attacks] from --transfer-from
    analysis: bool = True                      #: [--no-analysis] turns the gradient analysis off
    grad_samples: int = 100                    #: [--grad-samples] gradient samples per input
    grad_examples: int | None = None           #: [--grad-examples] examples of the concentration stats
    diversity_k: int = 3                       #: [--diversity-k] K of LPD measures (members if any)
    gaas_k: Sequence[int] = (4, 16, 64)        #: [--gaas-k] orders of the regular Hadamard matrices
    gaas_examples: int = 100                   #: [--gaas-examples]
    checklist: bool = True                     #: [--no-checklist]
    random_samples: int = 100                  #: [--random-samples] random-search samples (check 4)
    min_margin: float = 0.01                   #: [--min-margin] smallest difference the checks count
    per_example: bool = True                   #: [--no-per-example] keep per-example flags in results.json

    def check(self, attack_names: Sequence[str] | None = None) -> "EvalConfig":
        """Normalizes and validates every field; raises ``ValueError`` naming the argument."""
        self.attacks = _names(self.attacks, "attacks")
        self.transfer_attacks = _names(self.transfer_attacks, "transfer_attacks")
        self.forms = _names(self.forms, "forms")
        self.eps = parse_eps(self.eps)
        self.curve_eps = parse_eps(self.curve_eps) if (self.curve_eps if isinstance(self.curve_eps, str)
                                                       else len(self.curve_eps)) else []
        if attack_names is not None:
            known = sorted(attack_names)
            for field, names in (("attacks", self.attacks), ("transfer_attacks", self.transfer_attacks)):
                bad = [a for a in names if a not in attack_names]
                if bad:
                    raise ValueError(f"{field}: unknown attack(s) {bad}; choose from {known}")
            for field in ("curve_attack", "transfer_attack"):
                if getattr(self, field) not in attack_names:
                    raise ValueError(f"{field}: unknown attack {getattr(self, field)!r}; choose from {known}")
        bad = [f for f in self.forms if f not in FORMS]
        if bad or not self.forms:
            raise ValueError(f"forms: each must be one of {FORMS}, got {list(self.forms) or 'nothing'}")
        self.forms = [f for f in FORMS if f in self.forms]
        for field, lo in (("steps", 1), ("square_queries", 1), ("eot_samples", 1), ("ensemble_samples", 1),
                          ("repeats", 1), ("batch_size", 1), ("grad_samples", 2), ("diversity_k", 2),
                          ("gaas_examples", 0), ("random_samples", 0), ("transfer_models", 0)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{field}: must be an int >= {lo}, got {v!r}")
        if self.transfer_models == 1:
            raise ValueError("transfer_models: must be 0 (off) or >= 2, got 1")
        for field in ("limit", "grad_examples"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{field}: must be None or an int >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: must be an int, got {self.seed!r}")
        for field in ("alpha_factor", "min_margin"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 10 if field == "alpha_factor"
                                                                               else 0 <= v < 1):
                raise ValueError(f"{field}: out of range, got {v!r}")
        try:
            ks = [int(k) for k in (self.gaas_k.split(",") if isinstance(self.gaas_k, str) else self.gaas_k)]
        except (TypeError, ValueError):
            raise ValueError(f"gaas_k: expected Hadamard orders like 4,16,64, got {self.gaas_k!r}") from None
        bad = [k for k in ks if k < 4 or 4 ** round(math.log(k, 4)) != k]
        if bad:
            raise ValueError(f"gaas_k: regular Hadamard orders must be powers of 4 (4, 16, 64, 256, ...), got {bad}")
        self.gaas_k = ks
        return self


# ------------------------------------------------------------------------------------------------
# Attacks
# ------------------------------------------------------------------------------------------------

def _accepted(cls) -> set[str]:
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


def _attack_settings(name: str, *, eps: float, form: str | None, cfg: EvalConfig, steps: int | None = None,
                     alpha: float | None = None, class_defaults: bool = False, **extra) -> dict:
    """The keyword arguments of attack ``name`` from the evaluation settings (only those its class
    accepts): ε, the EOT form and n, and unless ``class_defaults``: ``steps``, α = alpha_factor·ε
    (not for R-FGSM, whose α is its random step) and Square's ``n_queries``."""
    accepted = _accepted(_attack_registry()[name])
    wanted = {"eps": float(eps), "eot": form or "fixed", "eot_samples": int(cfg.eot_samples)}
    if not class_defaults:
        wanted["steps"] = int(steps or cfg.steps)
        wanted["n_queries"] = int(cfg.square_queries)
        if name != "rfgsm":
            wanted["alpha"] = float(alpha if alpha is not None else cfg.alpha_factor * eps)
    wanted.update(extra)
    return {k: v for k, v in wanted.items() if k in accepted}


def _build_attack(name: str, model: nn.Module, settings: dict, seed: int):
    kw = dict(settings)
    if "seed" in _accepted(_attack_registry()[name]):
        kw["seed"] = int(seed)
    return _attack_registry()[name](model, **kw)


def _build_transfer_attack(name: str, surrogate: nn.Module, settings: dict, seed: int):
    """An attack crafted on the surrogate's average loss (:class:`fastdiv.attacks.TransferAttack`:
    each member of an ensemble surrogate once per step; a randomized single surrogate gets n draws)."""
    from .attacks import TransferAttack

    kw = {k: v for k, v in settings.items() if k != "eot"}
    members = A.members_of(surrogate) or [surrogate]
    k = len(members)
    n = kw.pop("eot_samples", k)
    kw["eot_samples"] = k * max(1, math.ceil(n / k)) if any(A.is_stochastic(m) for m in members) else k
    return TransferAttack(surrogate, name, seed=int(seed), **kw)


# ------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------

class _Progress:
    """A tqdm bar over the evaluation's work units (disabled when quiet or stderr is not a TTY); when
    the bar is off and not quiet, one line per stage on stderr."""

    def __init__(self, total: int, quiet: bool, rank: int, name: str):
        from tqdm.auto import tqdm

        self.quiet = quiet or rank != 0
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, disable=self.quiet or not self.tty, desc=name, unit="run", leave=False,
                        dynamic_ncols=True)
        self.name = name
        self.t0 = time.perf_counter()

    def stage(self, text: str):
        self.bar.set_description(f"{self.name}: {text}")
        if not self.quiet and not self.tty:
            print(f"[{self.name} {time.perf_counter() - self.t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    def update(self, n: int = 1):
        self.bar.update(n)

    def close(self):
        self.bar.close()


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def _as_xy(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a TensorDataset, a DatasetSplits (its test split) or a pair of tensors."""
    if hasattr(data, "test") and not isinstance(data, (tuple, list)):
        data = data.test
    if hasattr(data, "tensors"):
        data = data.tensors
    if not (isinstance(data, (tuple, list)) and len(data) >= 2 and all(isinstance(t, torch.Tensor) for t in data[:2])):
        raise TypeError("data: expected a TensorDataset, a DatasetSplits or a pair (images [N,C,H,W], labels [N]), "
                        f"got {type(data).__name__}")
    x, y = data[0], data[1]
    if not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"data: images must be a float tensor [N, ...], got {x.dtype} {tuple(x.shape)}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"data: labels must have shape [{x.shape[0]}], got {tuple(y.shape)}")
    return x, y.long()


def _acc(flags: torch.Tensor) -> dict:
    """``[R, N]`` bool -> ``{'mean', 'std', 'values'}`` over repeats (std: sample std, 0 for one repeat)."""
    vals = flags.float().mean(-1) if flags.shape[-1] else torch.zeros(flags.shape[0])
    vals = vals.double().cpu()
    return {"mean": float(vals.mean()), "std": float(vals.std(unbiased=True)) if vals.numel() > 1 else 0.0,
            "values": [float(v) for v in vals]}


def encode_flags(flags: torch.Tensor) -> str:
    """A bool vector as a string of '0'/'1', one character per example in test-set order."""
    return bytes((flags.to(torch.uint8).cpu() + 48).tolist()).decode("ascii")


def decode_flags(text: str) -> torch.Tensor:
    """The inverse of :func:`encode_flags`."""
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def _finite(v):
    """``v`` with NaN / ±Inf floats replaced by None (strict JSON); numbers keep full precision (the
    bulky per-example arrays are rounded where they are built)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, list):
        return [_finite(x) for x in v]
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return v


def _stat_record(values: torch.Tensor, keep_values: bool) -> dict:
    v = values.double().cpu()
    fin = v[torch.isfinite(v)]
    rec = {"mean": float(fin.mean()) if fin.numel() else None,
           "std": float(fin.std(unbiased=True)) if fin.numel() > 1 else 0.0,
           "quantiles": A.quantiles(v)}
    if keep_values:
        rec["values"] = [round(float(x), 6) if math.isfinite(float(x)) else None for x in v]
    return rec


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _model_name(model: nn.Module, run_config: dict | None) -> str:
    if run_config:
        for key in ("preset", "model"):
            if isinstance(run_config.get(key), str):
                return run_config[key]
    return type(model).__name__


# ------------------------------------------------------------------------------------------------
# The evaluation
# ------------------------------------------------------------------------------------------------

def evaluate_model(model: nn.Module, data, *, out: str | os.PathLike | None = None, quiet: bool = False,
                   device: str | torch.device | None = "auto", surrogate: nn.Module | None = None,
                   surrogate_name: str | None = None, name: str | None = None, dataset_name: str = "custom",
                   run_info: dict | None = None, command: str | None = None, **settings) -> dict:
    """Evaluates ``model`` on ``data`` (a TensorDataset, a DatasetSplits — its test split — or
    ``(images, labels)``) and returns the results dictionary (schema :data:`RESULTS_SCHEMA`).

    ``settings`` are the fields of :class:`EvalConfig` (attacks, eps, forms, steps, alpha_factor,
    eot_samples, ensemble_samples, repeats, seed, limit, ...). ``surrogate``: a model to craft transfer
    attacks on (GAL Table 2). ``out``: when given, ``results.json``, ``report.md`` and the plots are
    written there (by rank 0). Invalid settings raise ``ValueError`` before any work or file.

    >>> res = fastdiv.evaluate.evaluate_model(model, (x, y), attacks="fgsm,pgd", eps=[0.1, 0.3], repeats=3)
    >>> res["table"]["total"]["results"][0]["ensemble"]["mean"]
    """
    cfg = EvalConfig(**settings).check(_attack_registry())
    x_all, y_all = _as_xy(data)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    dev = resolve_device(device)
    if cfg.limit is not None:
        x_all, y_all = x_all[:cfg.limit], y_all[:cfg.limit]
    if x_all.shape[0] == 0:
        raise ValueError("data: the test set is empty")
    dist = setup_ranks(dev)
    t_start = time.perf_counter()
    try:
        model = model.to(dev)
        if surrogate is not None:
            surrogate = surrogate.to(dev)
        with _eval_mode(model), (_eval_mode(surrogate) if surrogate is not None else contextlib.nullcontext()):
            shard = torch.arange(x_all.shape[0])[dist.rank::dist.world]
            payload, timing, meta = _run_shard(model, x_all[shard].to(dev), y_all[shard].to(dev), shard, cfg,
                                               surrogate=surrogate, dist=dist, quiet=quiet, x0=x_all[:1].to(dev),
                                               y0=y_all[:1].to(dev))
        merged = _merge(dist.gather(payload))
    finally:
        dist.close()
    timing["total_s"] = time.perf_counter() - t_start
    results = _aggregate(merged, cfg, meta, model=model, x_all=x_all, name=name, dataset_name=dataset_name,
                         run_info=run_info, surrogate=surrogate, surrogate_name=surrogate_name, timing=timing,
                         device=dev, world=dist.world, command=command)
    validate_results(results)
    if out is not None and dist.rank == 0:
        write_outputs(results, out)
    return results


def _rows_of(cfg: EvalConfig, stochastic: bool) -> list[dict]:
    rows = []
    for name in cfg.attacks:
        for form in (cfg.forms if stochastic else [None]):
            rows.append({"attack": name, "form": form, "label": attack_label(name, form),
                         "key": f"{name}/{form or 'plain'}"})
    return rows


def _strongest_form(cfg: EvalConfig, stochastic: bool) -> str | None:
    return (cfg.forms[-1] if cfg.forms else "mean") if stochastic else None


def _run_attack_batches(make, x, y, batch_size) -> torch.Tensor:
    pieces = []
    for sl in A._chunks(x.shape[0], batch_size):
        pieces.append(make()(x[sl], y[sl]).detach())
    return torch.cat(pieces) if pieces else x.clone()


def _run_shard(model, x, y, index, cfg: EvalConfig, *, surrogate, dist, quiet, x0, y0):
    """Everything per example on this rank's shard; returns (payload, timing, meta)."""
    attacks = _attack_registry()
    stochastic = A.is_stochastic(model)
    members = A.members_of(model)
    rows = _rows_of(cfg, stochastic)
    R, E = cfg.repeats, len(cfg.eps)
    strongest = _strongest_form(cfg, stochastic)
    curve_attack = cfg.curve_attack
    curve_extra = [e for e in cfg.curve_eps if e not in cfg.eps]
    white_box = [r for r in rows if r["attack"] in A.ONE_STEP_ATTACKS + A.ITERATIVE_ATTACKS]
    unb_name = "bim" if "bim" in attacks else ("pgd" if "pgd" in attacks else None)
    do_transfer = (cfg.transfer_models >= 2 and (stochastic or members is not None)
                   and (members is None or len(members) >= 2))
    surrogate_rows = list(cfg.transfer_attacks) if surrogate is not None else []
    pred = lambda r: A.derive_seed(cfg.seed, 13, r)  # noqa: E731  (the ensemble of repeat r)
    total = (R + len(rows) * E * R + len(curve_extra) * R
             + (2 + E if cfg.checklist else 0) + (1 if do_transfer else 0)
             + (E + 1 if members and len(members) >= 2 else 0)
             + len(surrogate_rows) * E * R + (4 if cfg.analysis else 0))
    prog = _Progress(total, quiet, dist.rank, "evaluate")
    timing: dict[str, float] = {}
    payload: dict[str, torch.Tensor] = {"index": index.cpu()}
    with torch.no_grad():
        num_classes = int(model(x0).shape[-1])
    meta: dict = {"num_classes": num_classes, "rows": rows, "stochastic": stochastic,
                  "members": len(members) if members else None,
                  "strongest": strongest, "curve_extra": curve_extra, "surrogate_rows": surrogate_rows,
                  "row_settings": {}, "unbounded": None, "transfer": None}

    def attack_flags(name, form, eps, seed, steps=None, alpha=None, **extra):
        settings = _attack_settings(name, eps=eps, form=form, cfg=cfg, steps=steps, alpha=alpha, **extra)
        x_adv = _run_attack_batches(lambda: _build_attack(name, model, settings, seed), x, y, cfg.batch_size)
        return x_adv, settings

    try:
        # -- clean ------------------------------------------------------------------------------
        t0 = time.perf_counter()
        prog.stage("clean accuracy")
        clean = [A.predict_correct(model, x, y, cfg.ensemble_samples, pred(r), batch_size=4 * cfg.batch_size)
                 for r in range(R)]
        payload["clean"] = torch.stack([c[0] for c in clean]).cpu()
        payload["clean_worst"] = torch.stack([c[1] for c in clean]).cpu()
        prog.update(R)
        timing["clean_s"] = time.perf_counter() - t0

        # -- the table ----------------------------------------------------------------------------
        t0 = time.perf_counter()
        for ri, row in enumerate(rows):
            ens = torch.zeros(E, R, x.shape[0], dtype=torch.bool)
            worst = torch.zeros_like(ens)
            for ei, eps in enumerate(cfg.eps):
                prog.stage(f"{row['label']} ε={eps:g}")
                for r in range(R):
                    x_adv, settings = attack_flags(row["attack"], row["form"], eps,
                                                   A.derive_seed(cfg.seed, 11, r, ri, ei))
                    meta["row_settings"][(row["key"], ei)] = settings
                    a, b = A.predict_correct(model, x_adv, y, cfg.ensemble_samples, pred(r),
                                             batch_size=4 * cfg.batch_size)
                    ens[ei, r], worst[ei, r] = a.cpu(), b.cpu()
                    prog.update()
            payload[f"row:{row['key']}"] = ens
            payload[f"row_worst:{row['key']}"] = worst
        timing["table_s"] = time.perf_counter() - t0

        # -- extra points of the accuracy curve ---------------------------------------------------
        t0 = time.perf_counter()
        for ci, eps in enumerate(curve_extra):
            prog.stage(f"curve {attack_label(curve_attack, strongest)} ε={eps:g}")
            ens = torch.zeros(R, x.shape[0], dtype=torch.bool)
            worst = torch.zeros_like(ens)
            for r in range(R):
                x_adv, settings = attack_flags(curve_attack, strongest, eps, A.derive_seed(cfg.seed, 17, r, ci))
                a, b = A.predict_correct(model, x_adv, y, cfg.ensemble_samples, pred(r), batch_size=4 * cfg.batch_size)
                ens[r], worst[r] = a.cpu(), b.cpu()
                prog.update()
            payload[f"curve:{ci}"] = ens
            payload[f"curve_worst:{ci}"] = worst
        timing["curve_s"] = time.perf_counter() - t0

        # -- obfuscation checklist extras: an unbounded attack, random search ---------------------
        if cfg.checklist:
            t0 = time.perf_counter()
            if unb_name is not None:
                prog.stage(f"unbounded {attack_label(unb_name, strongest)}")
                steps = max(cfg.steps, 20)
                extra = ({"random_start": False} if unb_name == "pgd" and "random_start" in _accepted(attacks["pgd"])
                         else {})
                # α = 2.5/steps: the iterates can cross the whole [0, 1] box
                x_adv, settings = attack_flags(unb_name, strongest, 1.0, A.derive_seed(cfg.seed, 19), steps=steps,
                                               alpha=2.5 / steps, **extra)
                payload["unbounded"] = A.predict_correct(model, x_adv, y, cfg.ensemble_samples, pred(0),
                                                         batch_size=4 * cfg.batch_size)[0].cpu()
                meta["unbounded"] = {"attack": unb_name, "form": strongest, "label": attack_label(unb_name, strongest),
                                     "settings": settings}
            prog.update()
            if white_box and cfg.random_samples > 0:
                for ei, eps in enumerate(cfg.eps):
                    prog.stage(f"random search ε={eps:g}")
                    survived = torch.ones(x.shape[0], dtype=torch.bool)
                    for row in white_box:
                        survived &= payload[f"row:{row['key']}"][ei, 0]
                    found = torch.zeros(x.shape[0], dtype=torch.bool)
                    sel = survived.nonzero().flatten().to(x.device)
                    if sel.numel():
                        found[sel.cpu()] = A.random_search(model, x[sel], y[sel], eps=eps, samples=cfg.random_samples,
                                                           pred_samples=cfg.ensemble_samples,
                                                           seed=A.derive_seed(cfg.seed, 23, ei)).cpu()
                    payload[f"random_survived:{ei}"] = survived
                    payload[f"random_found:{ei}"] = found
                    prog.update()
            else:
                prog.update(E)
            prog.update()
            timing["checklist_s"] = time.perf_counter() - t0

        # -- transferability among sample models / members ----------------------------------------
        if do_transfer:
            t0 = time.perf_counter()
            k = len(members) if members is not None else cfg.transfer_models
            eps_t = max(cfg.eps)
            prog.stage(f"transferability among {k} {'members' if members else 'sample models'}")
            settings = _attack_settings(cfg.transfer_attack, eps=eps_t, form="fixed", cfg=cfg)
            make = lambda src: (lambda xb, yb: _run_attack_batches(  # noqa: E731
                lambda: _build_attack(cfg.transfer_attack, src, settings, A.derive_seed(cfg.seed, 29)), xb, yb,
                cfg.batch_size))
            payload["transfer"] = A.transfer_correct(model, x, y, make, k=k, seed=A.derive_seed(cfg.seed, 31),
                                                     members=members).cpu()
            meta["transfer"] = {"k": k, "eps": eps_t, "attack": cfg.transfer_attack, "settings": settings,
                                "source": "members" if members else "sample_models",
                                "label": attack_label(cfg.transfer_attack, None)}
            prog.update()
            timing["transfer_s"] = time.perf_counter() - t0

        # -- MRA (CLM eq. 6) for populations / ensembles ------------------------------------------
        if members is not None and len(members) >= 2:
            t0 = time.perf_counter()
            prog.stage("MRA")
            payload["mra_benign"] = A.mra_correct(members, x, y, None, seed=A.derive_seed(cfg.seed, 37))[0].cpu()
            prog.update()
            meta["mra_settings"] = {}
            for ei, eps in enumerate(cfg.eps):
                settings = _attack_settings(cfg.transfer_attack, eps=eps, form="fixed", cfg=cfg)
                meta["mra_settings"][ei] = settings
                make = lambda src, s=settings, e=ei: (lambda xb, yb: _run_attack_batches(  # noqa: E731
                    lambda: _build_attack(cfg.transfer_attack, src, s, A.derive_seed(cfg.seed, 41, e)), xb, yb,
                    cfg.batch_size))
                payload[f"mra:{ei}"] = A.mra_correct(members, x, y, make, seed=A.derive_seed(cfg.seed, 43, ei))[0].cpu()
                prog.update()
            timing["mra_s"] = time.perf_counter() - t0

        # -- transfer attacks from a surrogate -----------------------------------------------------
        if surrogate is not None:
            t0 = time.perf_counter()
            for si, name in enumerate(surrogate_rows):
                ens = torch.zeros(E, R, x.shape[0], dtype=torch.bool)
                for ei, eps in enumerate(cfg.eps):
                    prog.stage(f"transfer {attack_label(name, None)} from the surrogate ε={eps:g}")
                    # GAL Table 2: the attacks' own defaults (I-FGSM/MI-FGSM 10 steps of ε/10, PGD-CW κ=50, 30 steps)
                    settings = _attack_settings(name, eps=eps, form="mean", cfg=cfg, class_defaults=True)
                    for r in range(R):
                        seed_r = A.derive_seed(cfg.seed, 47, r, si, ei)
                        x_adv = _run_attack_batches(
                            lambda n_=name, s_=settings, r_=seed_r: _build_transfer_attack(n_, surrogate, s_, r_),
                            x, y, cfg.batch_size)
                        meta["row_settings"][(f"surrogate:{name}", ei)] = settings
                        ens[ei, r] = A.predict_correct(model, x_adv, y, cfg.ensemble_samples, pred(r),
                                                       batch_size=4 * cfg.batch_size)[0].cpu()
                        prog.update()
                payload[f"surrogate:{name}"] = ens
            timing["surrogate_s"] = time.perf_counter() - t0

        # -- gradient analysis -----------------------------------------------------------------------
        if cfg.analysis:
            t0 = time.perf_counter()
            n_grad = len(members) if members is not None else cfg.grad_samples
            gmask = ((index < cfg.grad_examples) if cfg.grad_examples is not None
                     else torch.ones_like(index, dtype=torch.bool))
            gm = gmask.to(x.device)
            if stochastic and n_grad >= 2:
                prog.stage(f"gradient concentration ({n_grad} samples per input)")
                stats = A.gradient_stats(model, x[gm], y[gm], n_grad, A.derive_seed(cfg.seed, 53),
                                         batch_size=cfg.batch_size, members=members)
                for k_, v in stats.items():
                    payload[f"grad:{k_}"] = v.cpu()
                payload["grad_mask"] = gmask
            prog.update()
            k_div = len(members) if members is not None else cfg.diversity_k
            if stochastic and k_div >= 2:
                prog.stage(f"ensemble diversity (K={k_div})")
                dv = A.member_diversity(model, x[gm], y[gm], k_div, A.derive_seed(cfg.seed, 59),
                                        batch_size=cfg.batch_size, members=members)
                payload["div_correct"] = dv["correct"].cpu()
                payload["div_l_d"] = dv["l_d"].cpu()
                payload["div_l_s"] = dv["l_s"].cpu()
            prog.update()
            ks = [k for k in cfg.gaas_k if k <= x[0].numel()]
            meta["gaas_ks"] = ks
            if ks and cfg.gaas_examples > 0:
                prog.stage(f"GAAS k={ks}")
                amask = index < cfg.gaas_examples
                am = amask.to(x.device)
                payload["gaas"] = A.gaas(model, x[am], y[am], ks=ks, eps=cfg.eps,
                                         grad_samples=cfg.eot_samples, pred_samples=cfg.ensemble_samples,
                                         seed=A.derive_seed(cfg.seed, 61), batch_size=cfg.batch_size).cpu()
                payload["gaas_mask"] = amask
            prog.update()
            if stochastic and n_grad >= 2 and dist.rank == 0:
                prog.stage("gradient samples at test example 0")
                samples = A.gradient_samples_at(model, x0, y0, n_grad, A.derive_seed(cfg.seed, 67), members=members)
                basis = A.projection_basis(A.unit_mean(samples), samples=samples)
                meta["projection"] = A.project(samples, basis)
                meta["projection"]["num_samples"] = n_grad
                meta["cosine"] = A.cosine_matrix(samples)
            meta["grad_dimension"] = int(x0[0].numel())
            prog.update()
            timing["analysis_s"] = time.perf_counter() - t0
    finally:
        prog.close()
    return payload, timing, meta


def _merge(payloads: list[dict]) -> dict:
    """Concatenates the per-rank payloads along the example dimension (the last) in test-set order.
    Masked entries (gradient / GAAS subsets) are concatenated in the same rank order and then sorted by
    the indices their masks select."""
    if len(payloads) == 1:
        return payloads[0]
    index = torch.cat([p["index"] for p in payloads])
    order = torch.argsort(index)
    merged = {"index": index[order]}
    masked = {"grad": "grad_mask", "div_": "grad_mask", "gaas": "gaas_mask"}
    for key in payloads[0]:
        if key == "index" or key.endswith("_mask"):
            continue
        cat = torch.cat([p[key] for p in payloads], dim=-1)
        mask_key = next((m for pfx, m in masked.items() if key.startswith(pfx)), None)
        if mask_key is not None:
            sub_index = torch.cat([p["index"][p[mask_key]] for p in payloads])
            merged[key] = cat[..., torch.argsort(sub_index)]
        else:
            merged[key] = cat[..., order]
    for m in ("grad_mask", "gaas_mask"):
        if m in payloads[0]:
            merged[m] = torch.cat([p[m] for p in payloads])[order]
    return merged


def _aggregate(p: dict, cfg: EvalConfig, meta: dict, *, model, x_all, name, dataset_name, run_info, surrogate,
               surrogate_name, timing, device, world, command) -> dict:
    import fastdiv

    n = int(p["index"].numel())
    keep = cfg.per_example
    E = len(cfg.eps)
    rows_out = []
    check_rows: dict[str, dict] = {}
    total_ens = p["clean"].unsqueeze(0).expand(E, -1, -1).clone()
    total_worst = p["clean_worst"].unsqueeze(0).expand(E, -1, -1).clone()
    for row in meta["rows"]:
        ens, worst = p[f"row:{row['key']}"], p[f"row_worst:{row['key']}"]
        total_ens &= ens
        total_worst &= worst
        cells = []
        for ei, eps in enumerate(cfg.eps):
            settings = dict(meta["row_settings"].get((row["key"], ei), {}))
            cell = {"eps": eps, "settings": settings, "ensemble": _acc(ens[ei]), "worst_case": _acc(worst[ei])}
            if keep:
                cell["correct"] = [encode_flags(f) for f in ens[ei]]
                cell["worst_correct"] = [encode_flags(f) for f in worst[ei]]
            cells.append(cell)
            check_rows[f"{row['key']}@{eps:g}"] = {"attack": row["attack"], "eps": eps, "correct": ens[ei],
                                                  "label": row["label"]}
        rows_out.append({"key": row["key"], "label": row["label"], "attack": row["attack"], "form": row["form"],
                         "results": cells})
    total_cells = []
    for ei, eps in enumerate(cfg.eps):
        cell = {"eps": eps, "ensemble": _acc(total_ens[ei]), "worst_case": _acc(total_worst[ei])}
        if keep:
            cell["correct"] = [encode_flags(f) for f in total_ens[ei]]
            cell["worst_correct"] = [encode_flags(f) for f in total_worst[ei]]
        total_cells.append(cell)

    clean = {"ensemble": _acc(p["clean"]), "worst_case": _acc(p["clean_worst"])}
    if keep:
        clean["correct"] = [encode_flags(f) for f in p["clean"]]
        clean["worst_correct"] = [encode_flags(f) for f in p["clean_worst"]]

    # accuracy-vs-ε curve: clean, the table's ε and the extra curve points of the curve attack
    strongest = meta["strongest"]
    curve_key = f"{cfg.curve_attack}/{strongest or 'plain'}"
    curve_pts = {0.0: (p["clean"], p["clean_worst"])}
    if f"row:{curve_key}" in p:
        for ei, eps in enumerate(cfg.eps):
            curve_pts[eps] = (p[f"row:{curve_key}"][ei], p[f"row_worst:{curve_key}"][ei])
    for ci, eps in enumerate(meta["curve_extra"]):
        curve_pts[eps] = (p[f"curve:{ci}"], p[f"curve_worst:{ci}"])
    curve = None
    if len(curve_pts) > 1:
        curve = {"attack": cfg.curve_attack, "form": strongest, "label": attack_label(cfg.curve_attack, strongest),
                 "points": [{"eps": e, "ensemble": _acc(curve_pts[e][0]), "worst_case": _acc(curve_pts[e][1])}
                            for e in sorted(curve_pts)]}

    # checklist
    obf = {"checks": [], "passed": None, "settings": {"min_margin": cfg.min_margin, "min_unbounded_success": 0.99,
                                                      "random_samples": cfg.random_samples}}
    if cfg.checklist:
        unb = None
        if meta.get("unbounded"):
            unb = {"label": meta["unbounded"]["label"], "eps": 1.0, "correct": p["unbounded"]}
            obf["settings"]["unbounded"] = meta["unbounded"]
        rnd = None
        if "random_found:0" in p:
            rnd = {"label": "every white-box attack", "samples": cfg.random_samples,
                   "per_eps": [(eps, p[f"random_survived:{ei}"], p[f"random_found:{ei}"])
                               for ei, eps in enumerate(cfg.eps)]}
        curve_for_check = [(e, curve_pts[e][0]) for e in sorted(curve_pts) if e > 0]
        obf["checks"] = A.obfuscation_checklist(rows=check_rows, clean=p["clean"], curve=curve_for_check or None,
                                                unbounded=unb, random=rnd, min_margin=cfg.min_margin)
        obf["passed"] = all(c["status"] != "fail" for c in obf["checks"])

    transfer: dict = {"sample_models": None, "mra": None, "surrogate": None}
    if "transfer" in p:
        t = meta["transfer"]
        transfer["sample_models"] = {**t, **A.transfer_summary(p["transfer"])}
    if "mra_benign" in p:
        res = []
        for ei, eps in enumerate(cfg.eps):
            c = p[f"mra:{ei}"]  # [K, N]: mean over members of each member's accuracy = MRA
            res.append({"eps": eps, "label": attack_label(cfg.transfer_attack, None),
                        "settings": meta["mra_settings"][ei],
                        "mra": {"mean": float(c.float().mean()), "std": 0.0, "values": [float(c.float().mean())]},
                        "per_member": [float(v) for v in c.float().mean(-1)]})
        transfer["mra"] = {"benign": float(p["mra_benign"].float().mean()), "members": meta["members"], "results": res}
    if surrogate is not None:
        s_rows = []
        for name_ in meta["surrogate_rows"]:
            ens = p[f"surrogate:{name_}"]
            s_rows.append({"attack": name_, "label": attack_label(name_, meta.get("surrogate_form")),
                           "results": [{"eps": eps,
                                        "settings": meta["row_settings"].get((f"surrogate:{name_}", ei), {}),
                                        "ensemble": _acc(ens[ei])} for ei, eps in enumerate(cfg.eps)]})
        transfer["surrogate"] = {"name": surrogate_name or type(surrogate).__name__,
                                 "run_dir": (run_info or {}).get("transfer_from"), "eps": list(cfg.eps), "rows": s_rows}

    gradients = None
    if cfg.analysis:
        gradients = {"num_samples": None, "num_examples": 0, "dimension": meta.get("grad_dimension"), "loss": "ce",
                     "stats": None, "projection": None, "cosine": None, "diversity": None, "gaas": None}
        if "grad:rho" in p:
            gradients["num_samples"] = meta["members"] or cfg.grad_samples
            gradients["num_examples"] = int(p["grad:rho"].numel())
            gradients["stats"] = {k: _stat_record(p[f"grad:{k}"], keep) for k in A.STAT_NAMES if f"grad:{k}" in p}
        else:
            gradients["skipped"] = "the model is deterministic: every gradient sample is the same"
        if meta.get("projection"):
            pr = meta["projection"]
            gradients["projection"] = {"example": 0, "num_samples": pr["num_samples"], "rho": pr["rho"],
                                       "points": [[round(float(a), 5), round(float(b), 5)] for a, b in pr["points"]],
                                       "mean": [float(v) for v in pr["mean"]]}
            c = meta["cosine"]
            off = c[~torch.eye(c.shape[0], dtype=torch.bool)]
            gradients["cosine"] = {"example": 0, "num_samples": c.shape[0],
                                   "off_diagonal_mean": float(off.mean()) if off.numel() else None,
                                   "matrix": [[round(float(v), 4) for v in r] for r in c]}
        if "div_correct" in p:
            gradients["diversity"] = {
                "k": int(p["div_correct"].shape[0]), "source": "members" if meta["members"] else "sample_models",
                "num_examples": int(p["div_l_d"].numel()),
                "ambiguity_entropy": A.ambiguity_entropy(p["div_correct"]),
                "member_accuracy": [float(v) for v in p["div_correct"].float().mean(-1)],
                "l_d": {**A.quantiles(p["div_l_d"]), "mean": float(p["div_l_d"].double().mean())},
                "l_s": {**A.quantiles(p["div_l_s"]), "mean": float(p["div_l_s"].double().mean())}}
        if "gaas" in p:
            g = p["gaas"]  # [E, K, M]
            ks = meta["gaas_ks"]
            kt = torch.tensor(ks, dtype=torch.float64)[None, :, None]
            gradients["gaas"] = {
                "ks": ks, "eps": list(cfg.eps), "num_examples": int(g.shape[-1]), "grad_samples": cfg.eot_samples,
                "fraction": (g.double() / kt).mean(-1).tolist(),
                "all_k": (g.double() == kt).double().mean(-1).tolist(),
                "mean_count": g.double().mean(-1).tolist()}

    m = A.members_of(model)
    results = {
        "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fastdiv_version": fastdiv.__version__, "torch_version": torch.__version__,
        "device": str(device), "world_size": world, "command": command,
        "run": run_info,
        "model": {"name": name or _model_name(model, (run_info or {}).get("config")), "class": type(model).__name__,
                  "stochastic": meta["stochastic"], "members": len(m) if m else None,
                  "parameters": int(sum(t.numel() for t in model.parameters()))},
        "data": {"dataset": dataset_name, "split": "test", "num_examples": n, "in_shape": list(x_all.shape[1:]),
                 "num_classes": meta["num_classes"]},
        "settings": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in dataclasses.asdict(cfg).items()},
        "clean": clean,
        "table": {"eps": list(cfg.eps), "rows": rows_out,
                  "total": {"key": "total", "label": "Total", "attack": None, "form": None, "results": total_cells}},
        "curve": curve,
        "transfer": transfer,
        "gradients": gradients,
        "obfuscation": obf,
        "timing": {k: round(v, 3) for k, v in timing.items()},
    }
    return _finite(results)


# ------------------------------------------------------------------------------------------------
# Schema
# ------------------------------------------------------------------------------------------------

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
_ACC = {"type": "object", "required": ["mean", "std", "values"],
        "properties": {"mean": _FRACTION, "std": {"type": "number", "minimum": 0},
                       "values": {"type": "array", "items": _FRACTION, "minItems": 1}}}
_FLAGS = {"type": "array", "items": {"type": "string", "pattern": "^[01]*$"}}
_CELL = {"type": "object", "required": ["eps", "ensemble", "worst_case"],
         "properties": {"eps": _FRACTION, "settings": {"type": "object"}, "ensemble": _ACC, "worst_case": _ACC,
                        "correct": _FLAGS, "worst_correct": _FLAGS}}
_ROW = {"type": "object", "required": ["key", "label", "attack", "form", "results"],
        "properties": {"key": {"type": "string"}, "label": {"type": "string"},
                       "attack": {"type": ["string", "null"]},
                       "form": {"type": ["string", "null"], "enum": ["fixed", "one", "mean", None]},
                       "results": {"type": "array", "items": _CELL}}}
_STAT = {"type": "object", "required": ["mean", "std", "quantiles"],
         "properties": {"mean": _NUM_OR_NULL, "std": _NUM_OR_NULL, "quantiles": {"type": "object"},
                        "values": {"type": "array", "items": _NUM_OR_NULL}}}
_CHECK = {"type": "object", "required": ["id", "name", "status", "detail", "numbers"],
          "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 5}, "name": {"type": "string"},
                         "status": {"type": "string", "enum": ["pass", "fail", "skipped"]},
                         "detail": {"type": "string"}, "numbers": {"type": ["object", "array"]}}}

#: JSON Schema (draft 2020-12 subset) of ``results.json``; :func:`validate_results` checks it without
#: third-party packages. Accuracies are fractions in [0, 1]; per-example flags are '0'/'1' strings in
#: test-set order, one per repeat.
RESULTS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "fastdiv evaluate results",
    "type": "object",
    "required": ["schema", "schema_version", "created", "fastdiv_version", "torch_version", "device", "world_size",
                 "model", "data", "settings", "clean", "table", "curve", "transfer", "gradients", "obfuscation",
                 "timing"],
    "properties": {
        "schema": {"type": "string", "enum": [SCHEMA_NAME]},
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "created": {"type": "string"}, "fastdiv_version": {"type": "string"}, "torch_version": {"type": "string"},
        "device": {"type": "string"}, "world_size": {"type": "integer", "minimum": 1},
        "command": {"type": ["string", "null"]},
        "run": {"type": ["object", "null"]},
        "model": {"type": "object", "required": ["name", "class", "stochastic", "members", "parameters"],
                  "properties": {"name": {"type": "string"}, "class": {"type": "string"},
                                 "stochastic": {"type": "boolean"}, "members": {"type": ["integer", "null"]},
                                 "parameters": {"type": "integer", "minimum": 0}}},
        "data": {"type": "object", "required": ["dataset", "split", "num_examples", "in_shape"],
                 "properties": {"dataset": {"type": "string"}, "split": {"type": "string"},
                                "num_examples": {"type": "integer", "minimum": 1},
                                "in_shape": {"type": "array", "items": {"type": "integer"}}}},
        "settings": {"type": "object", "required": ["attacks", "eps", "forms", "steps", "alpha_factor", "eot_samples",
                                                    "ensemble_samples", "repeats", "seed"],
                     "properties": {"eps": {"type": "array", "items": _FRACTION, "minItems": 1},
                                    "attacks": {"type": "array", "items": {"type": "string"}},
                                    "repeats": {"type": "integer", "minimum": 1}}},
        "clean": {"type": "object", "required": ["ensemble", "worst_case"],
                  "properties": {"ensemble": _ACC, "worst_case": _ACC, "correct": _FLAGS, "worst_correct": _FLAGS}},
        "table": {"type": "object", "required": ["eps", "rows", "total"],
                  "properties": {"eps": {"type": "array", "items": _FRACTION}, "rows": {"type": "array", "items": _ROW},
                                 "total": _ROW}},
        "curve": {"type": ["object", "null"], "required": ["attack", "form", "label", "points"],
                  "properties": {"points": {"type": "array", "items": {
                      "type": "object", "required": ["eps", "ensemble", "worst_case"],
                      "properties": {"eps": _FRACTION, "ensemble": _ACC, "worst_case": _ACC}}}}},
        "transfer": {"type": "object", "required": ["sample_models", "mra", "surrogate"],
                     "properties": {
                         "sample_models": {"type": ["object", "null"],
                                           "required": ["k", "eps", "attack", "source", "matrix", "off_diagonal_mean"],
                                           "properties": {"k": {"type": "integer", "minimum": 2},
                                                          "source": {"enum": ["members", "sample_models"]},
                                                          "matrix": {"type": "array", "items": {
                                                              "type": "array", "items": _FRACTION}}}},
                         "mra": {"type": ["object", "null"], "required": ["benign", "members", "results"]},
                         "surrogate": {"type": ["object", "null"], "required": ["name", "eps", "rows"]}}},
        "gradients": {"type": ["object", "null"],
                      "properties": {"stats": {"type": ["object", "null"], "additionalProperties": _STAT},
                                     "projection": {"type": ["object", "null"],
                                                    "required": ["example", "num_samples", "rho", "points", "mean"]},
                                     "cosine": {"type": ["object", "null"], "required": ["example", "matrix"]},
                                     "diversity": {"type": ["object", "null"],
                                                   "required": ["k", "ambiguity_entropy", "l_d", "l_s"]},
                                     "gaas": {"type": ["object", "null"],
                                              "required": ["ks", "eps", "fraction", "all_k", "mean_count"]}}},
        "obfuscation": {"type": "object", "required": ["checks", "passed"],
                        "properties": {"checks": {"type": "array", "items": _CHECK},
                                       "passed": {"type": ["boolean", "null"]}}},
        "timing": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _check_schema(value, schema: dict, path: str) -> None:
    import re

    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        ok = False
        for t in types:
            if t == "number":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif t == "integer":
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, _TYPES[t])
            if ok:
                break
        if not ok:
            raise ValueError(f"results{path}: expected {'/'.join(types)}, got {type(value).__name__}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"results{path}: {value!r} is not one of {schema['enum']}")
    if value is None:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ValueError(f"results{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ValueError(f"results{path}: {value} > maximum {schema['maximum']}")
    if isinstance(value, str) and "pattern" in schema and not re.fullmatch(schema["pattern"], value):
        raise ValueError(f"results{path}: {value[:40]!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ValueError(f"results{path}: missing required key {key!r}")
        props = schema.get("properties", {})
        for key, v in value.items():
            if key in props:
                _check_schema(v, props[key], f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                _check_schema(v, schema["additionalProperties"], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                raise ValueError(f"results{path}: unexpected key {key!r}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise ValueError(f"results{path}: needs at least {schema['minItems']} items, got {len(value)}")
        if "items" in schema:
            for i, v in enumerate(value):
                _check_schema(v, schema["items"], f"{path}[{i}]")


def validate_results(results: dict) -> dict:
    """Checks ``results`` against :data:`RESULTS_SCHEMA` plus the cross-field rules (one cell per ε in
    every row, one flag string per repeat, each of ``num_examples`` characters). Raises ``ValueError``
    with the path of the first problem; returns ``results``."""
    _check_schema(results, RESULTS_SCHEMA, "")
    eps = results["table"]["eps"]
    if eps != results["settings"]["eps"]:
        raise ValueError("results.table.eps: differs from settings.eps")
    n, reps = results["data"]["num_examples"], results["settings"]["repeats"]

    def flags_ok(where: str, rec: dict) -> None:
        for key in ("correct", "worst_correct"):
            if key in rec:
                if len(rec[key]) != reps or any(len(s) != n for s in rec[key]):
                    raise ValueError(f"results{where}.{key}: expected {reps} strings of {n} flags")
        for key in ("ensemble", "worst_case"):
            if key in rec and len(rec[key]["values"]) != reps:
                raise ValueError(f"results{where}.{key}.values: expected {reps} values (one per repeat)")

    flags_ok(".clean", results["clean"])
    for i, row in enumerate(results["table"]["rows"] + [results["table"]["total"]]):
        where = f".table.rows[{i}]" if i < len(results["table"]["rows"]) else ".table.total"
        if [c["eps"] for c in row["results"]] != eps:
            raise ValueError(f"results{where}.results: expected one cell per ε {eps}")
        for j, c in enumerate(row["results"]):
            flags_ok(f"{where}.results[{j}]", c)
    return results


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------

def write_outputs(results: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Writes ``results.json``, ``report.md`` and the PNG plots into ``out``; returns their paths."""
    from . import report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)
    rep = report.write_report(results, out)
    return {"results": path, "report": rep, "plots": sorted(out.glob("*.png"))}


# ------------------------------------------------------------------------------------------------
# From a run directory
# ------------------------------------------------------------------------------------------------

_CHECKPOINTS = {"best": "best.pt", "last": "checkpoint.pt"}


def _check_run_dir(run_dir, which: str, arg: str = "run_dir") -> Path:
    if which not in _CHECKPOINTS:
        raise ValueError(f"which: must be 'best' or 'last', got {which!r}")
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{arg}: {str(path)!r} is not a directory (expected a run from `fastdiv train`)")
    if not any((path / f).is_file() for f in _CHECKPOINTS.values()):
        raise FileNotFoundError(f"{arg}: {str(path)!r} has no checkpoint (best.pt or checkpoint.pt); "
                                "train one with `fastdiv train`")
    return path


def _load(run_dir: Path, which: str, device: torch.device):
    from .train import load_run

    if not (run_dir / _CHECKPOINTS[which]).is_file():  # e.g. no best.pt yet: fall back on the other one
        which = "last" if which == "best" else "best"
    model, config = load_run(run_dir, which=which, device=str(device))
    return model, config, which


def _test_data(config: dict):
    from .data import load_dataset

    return load_dataset(config["dataset"], config.get("data_dir"), resize=config.get("resize"),
                        seed=config.get("seed", 0))


def evaluate(run_dir: str | os.PathLike, *, out: str | os.PathLike | None = None, which: str = "best",
             device: str | torch.device | None = "auto", transfer_from: str | os.PathLike | None = None,
             quiet: bool = False, command: str | None = None, write: bool = True, **settings) -> dict:
    """Evaluates the trained run in ``run_dir`` on its dataset's test split and writes ``results.json``,
    ``report.md`` and the plots into ``out`` (default ``run_dir/eval``; ``write=False`` writes nothing).
    ``transfer_from``: a surrogate run to craft transfer attacks on. ``settings``: :class:`EvalConfig`
    fields. Bad input (no checkpoint, unknown attack, ε outside [0, 1]) raises before anything is
    written.

    >>> fastdiv.evaluate.evaluate("runs/advbnn-digits", eps=[0.1, 0.2, 0.3], repeats=3)
    """
    cfg = EvalConfig(**settings).check(_attack_registry())
    path = _check_run_dir(run_dir, which)
    src_path = _check_run_dir(transfer_from, "best", "transfer_from") if transfer_from is not None else None
    dev = resolve_device(device)
    model, config, used = _load(path, which, dev)
    data = _test_data(config)
    surrogate = surrogate_name = None
    if src_path is not None:
        surrogate, s_config, _ = _load(src_path, "best", dev)
        surrogate_name = _model_name(surrogate, s_config)
    run_info = {"run_dir": str(path), "which": used, "config": _jsonable(config),
                "transfer_from": str(src_path) if src_path else None}
    return evaluate_model(model, data, out=(Path(out) if out is not None else path / "eval") if write else None,
                          quiet=quiet, device=dev, surrogate=surrogate, surrogate_name=surrogate_name,
                          name=_model_name(model, config), dataset_name=getattr(data, "name", config["dataset"]),
                          run_info=run_info, command=command, **dataclasses.asdict(cfg))


def _jsonable(obj):
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return str(obj)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``fastdiv evaluate`` to the ``fastdiv`` command line."""
    d = EvalConfig()
    p = subparsers.add_parser(
        "evaluate", help="robust accuracy, gradient analysis and obfuscation checks of a trained run",
        description="Evaluate a trained run: GradDiv Table 1-style robust accuracy ([Attack], EOT¹-, EOT- forms), "
                    "accuracy vs ε, transferability, gradient concentration, GAAS and the gradient-obfuscation "
                    "checklist. Writes results.json, report.md and PNG plots.")
    p.add_argument("run_dir", help="run directory written by `fastdiv train` (config.json + best.pt/checkpoint.pt)")
    p.add_argument("--attacks", default=",".join(d.attacks), help="comma-separated attack names (default: %(default)s)")
    p.add_argument("--eps", default="0.1,0.2,0.3", help="comma-separated ℓ∞ budgets in [0, 1]; fractions like 8/255 ok "
                                                         "(default: %(default)s)")
    p.add_argument("--forms", default=",".join(d.forms), help="attack forms for stochastic models: fixed ([Attack]), "
                                                                "one (EOT¹-), mean (EOT-) (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="attack iterations (default: %(default)s)")
    p.add_argument("--alpha-factor", type=float, default=d.alpha_factor,
                   help="step size α = factor·ε (default: %(default)s)")
    p.add_argument("--eot-samples", type=int, default=d.eot_samples, help="n of EOT-[Attack] (default: %(default)s)")
    p.add_argument("--ensemble-samples", type=int, default=d.ensemble_samples,
                   help="sample models of ensemble inference (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="independent evaluations, mean ± std (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test examples")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--which", choices=("best", "last"), default="best",
                   help="checkpoint to load (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--curve-eps", default="", help="extra ε of the accuracy-vs-ε curve (comma-separated)")
    p.add_argument("--curve-attack", default=d.curve_attack,
                   help="attack of the curve, strongest form (default: %(default)s)")
    p.add_argument("--transfer-from", default=None, metavar="RUN_DIR",
                   help="surrogate run to craft transfer attacks on")
    p.add_argument("--transfer-attacks", default=",".join(d.transfer_attacks),
                   help="attacks crafted on the surrogate (default: %(default)s)")
    p.add_argument("--transfer-models", type=int, default=d.transfer_models,
                   help="k sample models of the transferability matrix, 0 = off (default: %(default)s)")
    p.add_argument("--transfer-attack", default=d.transfer_attack,
                   help="attack of the matrix and MRA (default: %(default)s)")
    p.add_argument("--grad-samples", type=int, default=d.grad_samples,
                   help="gradient samples per input (default: %(default)s)")
    p.add_argument("--grad-examples", type=int, default=None,
                   help="examples of the concentration statistics (default: all)")
    p.add_argument("--diversity-k", type=int, default=d.diversity_k,
                   help="K of the LPD measures (default: %(default)s)")
    p.add_argument("--gaas-k", default=",".join(map(str, d.gaas_k)),
                   help="Hadamard orders, powers of 4 (default: %(default)s)")
    p.add_argument("--gaas-examples", type=int, default=d.gaas_examples, help="(default: %(default)s)")
    p.add_argument("--random-samples", type=int, default=d.random_samples,
                   help="random-search samples per example for check 4 (default: %(default)s)")
    p.add_argument("--min-margin", type=float, default=d.min_margin,
                   help="smallest difference the checks count (default: %(default)s)")
    p.add_argument("--no-analysis", action="store_true", help="skip the gradient analysis")
    p.add_argument("--no-checklist", action="store_true", help="skip the obfuscation checklist")
    p.add_argument("--no-per-example", action="store_true", help="leave per-example flags out of results.json")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    settings = dict(
        attacks=args.attacks, eps=args.eps, forms=args.forms, steps=args.steps, alpha_factor=args.alpha_factor,
        eot_samples=args.eot_samples, ensemble_samples=args.ensemble_samples, repeats=args.repeats, seed=args.seed,
        limit=args.limit, batch_size=args.batch_size, curve_eps=args.curve_eps, curve_attack=args.curve_attack,
        transfer_models=args.transfer_models, transfer_attack=args.transfer_attack,
        transfer_attacks=args.transfer_attacks, analysis=not args.no_analysis, grad_samples=args.grad_samples,
        grad_examples=args.grad_examples, diversity_k=args.diversity_k, gaas_k=args.gaas_k,
        gaas_examples=args.gaas_examples, checklist=not args.no_checklist, random_samples=args.random_samples,
        min_margin=args.min_margin, per_example=not args.no_per_example)
    command = ("fastdiv evaluate " + " ".join(shlex.quote(a) for a in sys.argv[2:])
               if sys.argv[1:2] == ["evaluate"] else None)
    try:
        results = evaluate(args.run_dir, out=args.out, which=args.which, device=args.device,
                           transfer_from=args.transfer_from, quiet=args.quiet, command=command, **settings)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastdiv evaluate: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
        total = results["table"]["total"]["results"]
        print("total robust accuracy: "
              + ", ".join(f"ε={c['eps']:g}: {100 * c['ensemble']['mean']:.2f}%" for c in total))
        failed = [c["id"] for c in results["obfuscation"]["checks"] if c["status"] == "fail"]
        print(f"obfuscation checklist: {'no warning' if not failed else 'FAILED checks ' + str(failed)}")
        print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return 0
