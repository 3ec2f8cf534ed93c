"""The stages of an evaluation on one rank's shard of the test set, each returning a typed result
(:mod:`.shard`): clean accuracy, the robust-accuracy rows, the extra curve points, the obfuscation
checklist's runs, transferability, MRA, transfer attacks from a surrogate and the gradient analysis.

The sample models and attacks are seeded by ``derive_seed(cfg.seed, tag, ...)``, a tag per stage;
:func:`run_shard` runs the stages in a fixed order, so the same settings give the same numbers.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .. import analysis as A
from ..nn.randomness import Randomness
from ..runtime import Ranks, crash_point
from .attack_setup import accepted, attack_registry, attack_settings, build_attack, build_transfer_attack
from .attack_setup import run_attack_batches as _batches
from .config import EvalConfig, attack_label
from .outputs import save_adversarial
from .partial import RowCache
from .shard import (
    ChecklistResult,
    CurvePoint,
    GradientResult,
    MRAResult,
    Predictions,
    RowResult,
    RowSpec,
    SampleTransfer,
    ShardResult,
    SurrogateRow,
)


class Progress:
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

    def stage(self, text: str) -> None:
        self.bar.set_description(f"{self.name}: {text}")
        if not self.quiet and not self.tty:
            print(f"[{self.name} {time.perf_counter() - self.t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def table_rows(cfg: EvalConfig, stochastic: bool) -> list[RowSpec]:
    """The rows of the robust-accuracy table: every attack in every form (one plain row per attack for
    a deterministic model)."""
    return [RowSpec(name, form, attack_label(name, form), f"{name}/{form or 'plain'}")
            for name in cfg.attacks for form in (cfg.forms if stochastic else [None])]


def strongest_form(cfg: EvalConfig, stochastic: bool) -> str | None:
    """The form of the curve and checklist attacks: the last (strongest) selected form."""
    return (cfg.forms[-1] if cfg.forms else "mean") if stochastic else None


@dataclasses.dataclass
class Context:
    """What every stage needs: the model, this rank's examples ``x``/``y`` (positions ``index`` in the
    test set), the settings, and test example 0 (``x0``/``y0``) for the per-input analyses."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    cfg: EvalConfig
    progress: Progress
    rank: int
    x0: torch.Tensor
    y0: torch.Tensor
    randomness: Randomness
    save_adv: Path | None = None  #: where each attack's adversarial examples go (None: not kept)
    world: int = 1
    cache: RowCache | None = None  #: the finished table units, kept for a resumed evaluation (None: not kept)

    def __post_init__(self):
        self.stochastic = self.randomness.stochastic
        self.members = A.members_of(self.model)
        self.strongest = strongest_form(self.cfg, self.stochastic)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(number of ε, repeats, examples of this shard)."""
        return len(self.cfg.eps), self.cfg.repeats, self.x.shape[0]

    def predict(self, x: torch.Tensor, repeat: int, sel: torch.Tensor | None = None) -> Predictions:
        """Ensemble and worst-case correctness (on the CPU) of ``x``, this shard's examples (or those at
        positions ``sel``) or their adversarial versions, by the ensemble of sample models of ``repeat``."""
        cfg = self.cfg
        y = self.y if sel is None else self.y[sel]
        ens, worst = A.predict_correct(self.model, x, y, cfg.ensemble_samples, A.derive_seed(cfg.seed, 13, repeat),
                                       batch_size=4 * cfg.batch_size, stochastic=self.randomness)
        return Predictions(ens.cpu(), worst.cpu())

    def attack(self, name: str, form: str | None, eps: float, seed: int, sel: torch.Tensor | None = None,
               **kw) -> tuple[torch.Tensor, dict]:
        """``(x_adv, settings)``: attack ``name`` in ``form`` at ``eps`` on the whole shard (or the examples
        at positions ``sel``), in batches."""
        settings = attack_settings(name, eps=eps, form=form, cfg=self.cfg, **kw)
        x, y = (self.x, self.y) if sel is None else (self.x[sel], self.y[sel])
        x_adv = _batches(lambda: build_attack(name, self.model, settings, seed), x, y, self.cfg.batch_size)
        return x_adv, settings


def clean_accuracy(ctx: Context) -> Predictions:
    """Clean correctness ``[R, N]``, one ensemble per repeat."""
    ctx.progress.stage("clean accuracy")
    preds = [ctx.predict(ctx.x, r) for r in range(ctx.cfg.repeats)]
    ctx.progress.update(ctx.cfg.repeats)
    return Predictions(torch.stack([p.ensemble for p in preds]), torch.stack([p.worst for p in preds]))


def attack_row(ctx: Context, spec: RowSpec, row: int, alive: torch.Tensor | None = None) -> RowResult:
    """One row of the table: its attack at every ε, once per repeat. ``alive`` ``[E, R, N]`` (a protocol's
    cascade): attack only the examples still correct there; the others count as broken already. Each ε
    finished is recorded in ``ctx.cache``, and one it already holds (a resumed evaluation) is taken from it."""
    cfg = ctx.cfg
    E, R, N = ctx.shape
    flags = Predictions(torch.zeros(E, R, N, dtype=torch.bool), torch.zeros(E, R, N, dtype=torch.bool))
    settings = []
    seconds = 0.0
    for ei, eps in enumerate(cfg.eps):
        done = ctx.cache.get(spec.key, ei, R, N) if ctx.cache is not None else None
        if done is not None:
            unit, s, spent = done
            flags.ensemble[ei], flags.worst[ei] = unit.ensemble, unit.worst
            settings.append(s)
            seconds += spent
            ctx.progress.update(R)
            continue
        t0 = time.perf_counter()
        ctx.progress.stage(f"{spec.label} ε={eps:g}")
        for r in range(R):
            sel = None if alive is None else alive[ei, r].nonzero().flatten()
            on = None if sel is None else sel.to(ctx.x.device)
            x_adv, s = ctx.attack(spec.attack, spec.form, eps, A.derive_seed(cfg.seed, 11, r, row, ei), sel=on)
            p = ctx.predict(x_adv, r, sel=on)
            if sel is None:
                flags.ensemble[ei, r], flags.worst[ei, r] = p.ensemble, p.worst
            else:
                flags.ensemble[ei, r, sel], flags.worst[ei, r, sel] = p.ensemble, p.worst
            if ctx.save_adv is not None:
                shard = f".rank{ctx.rank}" if ctx.world > 1 else ""
                name = f"{spec.key.replace('/', '-')}_eps{ei}_r{r}{shard}.safetensors"
                save_adversarial(ctx.save_adv / name, x_adv=x_adv, y=ctx.y if on is None else ctx.y[on],
                                 index=ctx.index if sel is None else ctx.index[sel],
                                 ensemble_correct=p.ensemble, worst_correct=p.worst,
                                 info={"attack": spec.attack, "form": spec.form, "label": spec.label, "eps": eps,
                                       "repeat": r, "settings": s, "ensemble_samples": cfg.ensemble_samples,
                                       "prediction_seed": A.derive_seed(cfg.seed, 13, r),
                                       "stochastic": ctx.stochastic, "model_mode": cfg.model_mode})
            ctx.progress.update()
        settings.append(s)
        spent = time.perf_counter() - t0
        seconds += spent
        if ctx.cache is not None:
            ctx.cache.put(spec.key, ei, Predictions(flags.ensemble[ei], flags.worst[ei]), s, spent)
            crash_point("evaluate-unit-saved")
    return RowResult(spec, flags, settings, seconds=seconds)


def table(ctx: Context, specs: list[RowSpec], clean: Predictions) -> list[RowResult]:
    """Every row of the table; under a protocol, as its cascade: each row attacks only the examples that the
    clean prediction and every earlier row left correct (AutoAttack's order and accounting)."""
    if ctx.cfg.protocol is None:
        return [attack_row(ctx, spec, i) for i, spec in enumerate(specs)]
    E = len(ctx.cfg.eps)
    alive = clean.ensemble.unsqueeze(0).expand(E, -1, -1).clone()
    rows = []
    for i, spec in enumerate(specs):
        result = attack_row(ctx, spec, i, alive)
        # cumulative, as AutoAttack reports after each attack: broken by this row or any before
        result.flags.ensemble &= alive
        result.flags.worst &= alive
        alive = result.flags.ensemble.clone()
        rows.append(result)
    return rows


def curve_points(ctx: Context, extra_eps: list[float]) -> list[CurvePoint]:
    """The curve attack (strongest form) at the ε of the curve that are not in the table."""
    cfg = ctx.cfg
    _, R, N = ctx.shape
    points = []
    for ci, eps in enumerate(extra_eps):
        ctx.progress.stage(f"curve {attack_label(cfg.curve_attack, ctx.strongest)} ε={eps:g}")
        flags = Predictions(torch.zeros(R, N, dtype=torch.bool), torch.zeros(R, N, dtype=torch.bool))
        for r in range(R):
            x_adv, _ = ctx.attack(cfg.curve_attack, ctx.strongest, eps, A.derive_seed(cfg.seed, 17, r, ci))
            p = ctx.predict(x_adv, r)
            flags.ensemble[r], flags.worst[r] = p.ensemble, p.worst
            ctx.progress.update()
        points.append(CurvePoint(eps, flags))
    return points


def checklist_runs(ctx: Context, rows: list[RowResult]) -> ChecklistResult:
    """The checklist's own runs: an unbounded iterative attack (check 3) and random search on the
    examples every white-box row left correct at repeat 0 (check 4)."""
    cfg, attacks = ctx.cfg, attack_registry()
    E, _, N = ctx.shape
    out = ChecklistResult()
    if cfg.norm == "linf":
        unbounded = "bim" if "bim" in attacks else ("pgd" if "pgd" in attacks else None)
    else:
        unbounded = "pgd-l2" if "pgd-l2" in attacks else None
    if unbounded is not None:
        ctx.progress.stage(f"unbounded {attack_label(unbounded, ctx.strongest)}")
        steps = max(cfg.steps, 20)
        extra = ({"random_start": False} if unbounded in ("pgd", "pgd-l2")
                 and "random_start" in accepted(attacks[unbounded]) else {})
        # a ball that holds the whole [0, 1] box (ℓ∞ radius 1, ℓ2 radius √D), and α = 2.5·radius/steps so
        # that the iterates can cross it
        radius = 1.0 if cfg.norm == "linf" else math.sqrt(ctx.x[0].numel())
        x_adv, settings = ctx.attack(unbounded, ctx.strongest, radius, A.derive_seed(cfg.seed, 19), steps=steps,
                                     alpha=2.5 * radius / steps, **extra)
        out.unbounded = ctx.predict(x_adv, 0).ensemble
        out.unbounded_attack = {"attack": unbounded, "form": ctx.strongest,
                                "label": attack_label(unbounded, ctx.strongest), "settings": settings}
    ctx.progress.update()
    white_box = [r for r in rows if r.spec.attack in A.ONE_STEP_ATTACKS + A.ITERATIVE_ATTACKS]
    if white_box and cfg.random_samples > 0:
        out.random_survived = torch.zeros(E, N, dtype=torch.bool)
        out.random_found = torch.zeros(E, N, dtype=torch.bool)
        for ei, eps in enumerate(cfg.eps):
            ctx.progress.stage(f"random search ε={eps:g}")
            survived = torch.ones(N, dtype=torch.bool)
            for row in white_box:
                survived &= row.flags.ensemble[ei, 0]
            sel = survived.nonzero().flatten().to(ctx.x.device)
            if sel.numel():
                out.random_found[ei, sel.cpu()] = A.random_search(
                    ctx.model, ctx.x[sel], ctx.y[sel], eps=eps, samples=cfg.random_samples,
                    pred_samples=cfg.ensemble_samples, seed=A.derive_seed(cfg.seed, 23, ei), norm=cfg.norm).cpu()
            out.random_survived[ei] = survived
            ctx.progress.update()
    else:
        ctx.progress.update(E)
    ctx.progress.update()
    return out


def sample_transfer(ctx: Context) -> SampleTransfer:
    """Transferability among k sample models (or the members) at the largest ε (GradDiv Fig. 7)."""
    cfg, members = ctx.cfg, ctx.members
    k = len(members) if members is not None else cfg.transfer_models
    eps = max(cfg.eps)
    ctx.progress.stage(f"transferability among {k} {'members' if members else 'sample models'}")
    settings = attack_settings(cfg.transfer_attack, eps=eps, form="fixed", cfg=cfg)
    seed = A.derive_seed(cfg.seed, 29)

    def make(src):
        return lambda xb, yb: _batches(lambda: build_attack(cfg.transfer_attack, src, settings, seed), xb, yb,
                                       cfg.batch_size)

    correct = A.transfer_correct(ctx.model, ctx.x, ctx.y, make, k=k, seed=A.derive_seed(cfg.seed, 31),
                                 members=members, randomness=ctx.randomness).cpu()
    ctx.progress.update()
    return SampleTransfer(correct, {"k": k, "eps": eps, "attack": cfg.transfer_attack, "settings": settings,
                                    "source": "members" if members else "sample_models",
                                    "label": attack_label(cfg.transfer_attack, None)})


def model_robustness_average(ctx: Context) -> MRAResult:
    """CLM eq. 6 for an ensemble or population: benign, then the transfer attack at every ε."""
    cfg, members = ctx.cfg, ctx.members
    ctx.progress.stage("MRA")
    benign = A.mra_correct(members, ctx.x, ctx.y, None, seed=A.derive_seed(cfg.seed, 37))[0].cpu()
    ctx.progress.update()
    correct, settings = [], []
    for ei, eps in enumerate(cfg.eps):
        s = attack_settings(cfg.transfer_attack, eps=eps, form="fixed", cfg=cfg)
        seed = A.derive_seed(cfg.seed, 41, ei)

        def make(src, s=s, seed=seed):
            return lambda xb, yb: _batches(lambda: build_attack(cfg.transfer_attack, src, s, seed), xb, yb,
                                           cfg.batch_size)

        correct.append(A.mra_correct(members, ctx.x, ctx.y, make, seed=A.derive_seed(cfg.seed, 43, ei))[0].cpu())
        settings.append(s)
        ctx.progress.update()
    return MRAResult(benign, torch.stack(correct), settings)


def surrogate_rows(ctx: Context, surrogate: nn.Module) -> list[SurrogateRow]:
    """Transfer attacks crafted on ``surrogate`` and evaluated on the model (GAL Table 2)."""
    cfg = ctx.cfg
    E, R, N = ctx.shape
    rows = []
    for si, name in enumerate(cfg.transfer_attacks):
        ens = torch.zeros(E, R, N, dtype=torch.bool)
        settings = []
        for ei, eps in enumerate(cfg.eps):
            ctx.progress.stage(f"transfer {attack_label(name, None)} from the surrogate ε={eps:g}")
            # GAL Table 2: the attacks' own defaults (I-FGSM/MI-FGSM 10 steps of ε/10, PGD-CW κ=50, 30 steps)
            s = attack_settings(name, eps=eps, form="mean", cfg=cfg, class_defaults=True)
            for r in range(R):
                seed = A.derive_seed(cfg.seed, 47, r, si, ei)
                make = functools.partial(build_transfer_attack, name, surrogate, s, seed)
                x_adv = _batches(make, ctx.x, ctx.y, cfg.batch_size)
                ens[ei, r] = ctx.predict(x_adv, r).ensemble
                ctx.progress.update()
            settings.append(s)
        rows.append(SurrogateRow(name, ens, settings))
    return rows


def gradient_analysis(ctx: Context) -> GradientResult:
    """Concentration statistics and LPD diversity on the first ``grad_examples`` test examples, GAAS on
    the first ``gaas_examples``, and (rank 0) the gradient samples at test example 0."""
    cfg, members, model, x, y, index = ctx.cfg, ctx.members, ctx.model, ctx.x, ctx.y, ctx.index
    n_grad = len(members) if members is not None else cfg.grad_samples
    gmask = (index < cfg.grad_examples) if cfg.grad_examples is not None else torch.ones_like(index, dtype=torch.bool)
    gm = gmask.to(x.device)
    out = GradientResult(dimension=int(ctx.x0[0].numel()), grad_index=index[gmask])
    if ctx.stochastic and n_grad >= 2:
        ctx.progress.stage(f"gradient concentration ({n_grad} samples per input)")
        stats = A.gradient_stats(model, x[gm], y[gm], n_grad, A.derive_seed(cfg.seed, 53), batch_size=cfg.batch_size,
                                 members=members)
        out.stats = {k: v.cpu() for k, v in stats.items()}
    ctx.progress.update()
    k_div = len(members) if members is not None else cfg.diversity_k
    if ctx.stochastic and k_div >= 2:
        ctx.progress.stage(f"ensemble diversity (K={k_div})")
        dv = A.member_diversity(model, x[gm], y[gm], k_div, A.derive_seed(cfg.seed, 59), batch_size=cfg.batch_size,
                                members=members)
        out.diversity = {k: dv[k].cpu() for k in ("correct", "l_d", "l_s")}
    ctx.progress.update()
    # GAAS's directions ε·sign(ĝ) ⊙ h_i are ℓ∞ perturbations: not run for the ℓ2 threat model
    out.gaas_ks = [k for k in cfg.gaas_k if k <= x[0].numel()] if cfg.norm == "linf" else []
    if out.gaas_ks and cfg.gaas_examples > 0:
        ctx.progress.stage(f"GAAS k={out.gaas_ks}")
        amask = index < cfg.gaas_examples
        am = amask.to(x.device)
        out.gaas = A.gaas(model, x[am], y[am], ks=out.gaas_ks, eps=cfg.eps, grad_samples=cfg.eot_samples,
                          pred_samples=cfg.ensemble_samples, seed=A.derive_seed(cfg.seed, 61),
                          batch_size=cfg.batch_size).cpu()
        out.gaas_index = index[amask]
    ctx.progress.update()
    if ctx.stochastic and n_grad >= 2 and ctx.rank == 0:
        ctx.progress.stage("gradient samples at test example 0")
        samples = A.gradient_samples_at(model, ctx.x0, ctx.y0, n_grad, A.derive_seed(cfg.seed, 67), members=members)
        basis = A.projection_basis(A.unit_mean(samples), samples=samples)
        out.projection = {**A.project(samples, basis), "num_samples": n_grad}
        out.cosine = A.cosine_matrix(samples)
    ctx.progress.update()
    return out


def run_shard(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, cfg: EvalConfig, *,
              surrogate: nn.Module | None, ranks: Ranks, quiet: bool, x0: torch.Tensor,
              y0: torch.Tensor, randomness: Randomness, save_adv: Path | None = None,
              cache: RowCache | None = None) -> tuple[ShardResult, dict[str, float]]:
    """Every stage on this rank's examples ``x``/``y`` (test-set positions ``index``) of a model whose
    ``randomness`` is known; returns the result and the seconds per stage. ``cache``: the table units
    finished so far (:class:`~fastdiv.evaluate.partial.RowCache`)."""
    stochastic = randomness.stochastic
    members = A.members_of(model)
    specs = table_rows(cfg, stochastic)
    E, R = len(cfg.eps), cfg.repeats
    curve_extra = [e for e in cfg.curve_eps if e not in cfg.eps]
    do_transfer = (cfg.transfer_models >= 2 and (stochastic or members is not None)
                   and (members is None or len(members) >= 2))
    do_mra = members is not None and len(members) >= 2
    surrogate_attacks = list(cfg.transfer_attacks) if surrogate is not None else []
    total = (R + len(specs) * E * R + len(curve_extra) * R + (2 + E if cfg.checklist else 0) + (1 if do_transfer else 0)
             + (E + 1 if do_mra else 0) + len(surrogate_attacks) * E * R + (4 if cfg.analysis else 0))
    progress = Progress(total, quiet, ranks.rank, "evaluate")
    with torch.no_grad():
        num_classes = int(model(x0).shape[-1])
    ctx = Context(model, x, y, index, cfg, progress, ranks.rank, x0, y0, randomness, save_adv, ranks.world, cache)
    out = ShardResult(index.cpu(), num_classes, stochastic, len(members) if members else None, ctx.strongest,
                      randomness=randomness.reason)
    timing: dict[str, float] = {}

    def timed(key: str, stage, *args):
        t0 = time.perf_counter()
        result = stage(*args)
        timing[key] = time.perf_counter() - t0
        return result

    try:
        out.clean = timed("clean_s", clean_accuracy, ctx)
        out.rows = timed("table_s", table, ctx, specs, out.clean)
        out.curve = timed("curve_s", curve_points, ctx, curve_extra)
        if cfg.checklist:
            out.checklist = timed("checklist_s", checklist_runs, ctx, out.rows)
        if do_transfer:
            out.transfer = timed("transfer_s", sample_transfer, ctx)
        if do_mra:
            out.mra = timed("mra_s", model_robustness_average, ctx)
        if surrogate is not None:
            out.surrogate = timed("surrogate_s", surrogate_rows, ctx, surrogate)
        if cfg.analysis:
            out.gradients = timed("analysis_s", gradient_analysis, ctx)
    finally:
        progress.close()
    return out, timing
