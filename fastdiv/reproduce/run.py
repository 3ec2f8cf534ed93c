"""``fastdiv.reproduce.reproduce``: train every arm the chosen claims need (once per seed, shared between claims),
evaluate each trained model once, measure, judge and write ``reproduction.json`` and ``reproduction.md``.

Layout of ``out``: ``runs/<dataset>-<size>/<arm>-s<seed>/`` (``fastdiv train`` run directories, reused when
complete), ``evals/<dataset>-<size>/<arm>-s<seed>/results.json`` (``fastdiv evaluate`` outputs, reused when the
settings match), ``reproduction.json`` (every measurement, verdict and setting) and ``reproduction.md``.
"""
from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..files import prepare_output_dir
from ..runtime import atomic_write_text
from .claims import SIZES, Arm, Claim, resolve_claims
from .measure import MEASURES, Measured
from .verdict import judge

__all__ = ["reproduce"]


def reproduce(claims: Sequence[str] | None = None, *, size: str = "standard", dataset: str = "digits",
              seeds: int = 3, out: str | Path = "fastdiv-reproduce", device: str = "auto",
              quiet: bool = False) -> dict:
    """Runs ``claims`` (ids or paper names of :data:`~fastdiv.reproduce.CLAIMS`; all when None) at ``size``
    ('quick' or 'standard', :data:`~fastdiv.reproduce.SIZES`) on ``dataset`` ('digits' or 'mnist5k') with seeds
    0 … ``seeds``−1, and writes ``out/reproduction.json`` and ``out/reproduction.md``. Returns the JSON dict."""
    from ..report.reproduction import render_reproduction

    chosen = resolve_claims(claims)
    if size not in SIZES:
        raise ValueError(f"size: must be one of {sorted(SIZES)}, got {size!r}")
    spec = SIZES[size]
    if dataset not in spec["datasets"]:
        raise ValueError(f"dataset: the {size} size runs on {sorted(spec['datasets'])}, got {dataset!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds: must be an int >= 1, got {seeds!r}")
    out = prepare_output_dir(out, "--out")  # before any training: a file or a read-only place is refused
    t_start = time.perf_counter()
    arms = _arms_of(chosen)
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    measured: dict[tuple[str, int], dict[str, float]] = {}
    timing: dict[str, float] = {}
    diagnostics: dict[str, dict] = {}
    tag = f"{dataset}-{size}"
    for seed in range(seeds):
        for arm in arms.values():
            key = f"{arm.name}-s{seed}"
            say(f"[seed {seed + 1}/{seeds}] {arm.name}: train ({arm.preset}"
                + (", " + ", ".join(f"{k}={v}" for k, v in arm.overrides.items()) if arm.overrides else "") + ")")
            t0 = time.perf_counter()
            reused = _complete(out / "runs" / tag / key)
            run_dir = _train(arm, dataset, spec, seed, out / "runs" / tag / key, device, quiet)
            t1 = time.perf_counter()
            needs = sorted({c.metric for c in chosen if arm.name in (c.defense.name, c.baseline.name)})
            measured[(arm.name, seed)] = _measure(arm, run_dir, needs, dataset, spec, seed,
                                                  out / "evals" / tag / key, device, out / "runs" / tag)
            # train_s of a reused run is the time to find it, not the time it took to train
            timing[key] = {"train_s": round(t1 - t0, 1), "measure_s": round(time.perf_counter() - t1, 1),
                           "run_reused": reused}
            diagnostics[key] = run_diagnostics(run_dir)
            say("      " + ", ".join(f"{k} {v:.4g}" for k, v in measured[(arm.name, seed)].items()))
    results = []
    for claim in chosen:
        d = [measured[(claim.defense.name, s)][claim.metric] for s in range(seeds)]
        b = [measured[(claim.baseline.name, s)][claim.metric] for s in range(seeds)]
        results.append({**claim.record(), "measured": {"defense": d, "baseline": b},
                        **judge(d, b, claim.better)})
    report = {"size": size, "dataset": dataset, "seeds": seeds, "settings": _jsonable(spec),
              "eps": list(_eps(spec, dataset)), "claims": results, "timing": timing, "diagnostics": diagnostics,
              "total_s": round(time.perf_counter() - t_start, 1), "torch_version": torch.__version__,
              "threads": torch.get_num_threads()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(report, indent=1), out / "reproduction.json")
    atomic_write_text(render_reproduction(report), out / "reproduction.md")
    say(f"wrote {out / 'reproduction.md'}")
    return report


def _arms_of(claims: Sequence[Claim]) -> dict[str, Arm]:
    arms: dict[str, Arm] = {}
    for c in claims:
        for arm in (c.baseline, c.defense):
            if arms.setdefault(arm.name, arm) != arm:
                raise ValueError(f"two different arms are named {arm.name!r}")
            for extra in arm.needs:
                arms.setdefault(extra.name, extra)
    # the arms others need (a static source model) train first
    return dict(sorted(arms.items(), key=lambda kv: bool(kv[1].needs)))


def _eps(spec: dict, dataset: str) -> tuple[float, ...]:
    eps_train = spec["datasets"][dataset]["eps_train"]
    return tuple(round(f * eps_train, 6) for f in spec["eps_factors"])


def _complete(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run of an earlier call (reused instead of trained again)."""
    return (run_dir / "best.pt").is_file() and (run_dir / "done.json").is_file()


def _train(arm: Arm, dataset: str, spec: dict, seed: int, run_dir: Path, device: str, quiet: bool) -> Path:
    from ..train import train

    if _complete(run_dir):
        return run_dir  # a complete run of an earlier call: reused
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # an interrupted run of an earlier call: train it again from the start
    config = {"preset": arm.preset, "dataset": dataset, "out": str(run_dir), "device": device,
              "seed": seed + arm.seed_offset,
              **spec["datasets"][dataset].get("train", {}), **arm.overrides}
    for key in arm.drop:
        config.pop(key, None)
    if quiet:  # the trainer prints one line per epoch
        with contextlib.redirect_stdout(io.StringIO()):
            train(config, quiet=True)
    else:
        train(config, quiet=True)
    atomic_write_text(json.dumps({"config": _jsonable(config)}), run_dir / "done.json")
    return run_dir


def _measure(arm: Arm, run_dir: Path, needs: list[str], dataset: str, spec: dict, seed: int, eval_dir: Path,
             device: str, runs: Path) -> dict[str, float]:
    from ..data import load_dataset
    from ..evaluate import evaluate_model
    from ..train import load_run

    model, config = load_run(run_dir, which="best", device="cpu")
    data = load_dataset(dataset, config.get("data_dir"), resize=config.get("resize"), seed=config.get("seed", 0))
    settings = dict(spec["evaluate"], eps=_eps(spec, dataset), seed=seed)
    surrogate = None
    if "offline" in needs:
        if not arm.needs:
            raise ValueError(f"arm {arm.name}: the 'offline' measurement needs a source arm")
        surrogate, _ = load_run(runs / f"{arm.needs[0].name}-s{seed}", which="best", device="cpu")
        settings["transfer_attacks"] = spec["offline_attacks"]
    # an evaluation of an earlier call is reused when it ran with the same settings (stamp beside it)
    stamp, wanted = eval_dir / "reproduce-settings.json", _jsonable(settings)
    if stamp.is_file() and (eval_dir / "results.json").is_file() and json.loads(stamp.read_text()) == wanted:
        results = json.loads((eval_dir / "results.json").read_text())
    else:
        results = evaluate_model(model, data, out=eval_dir, quiet=True, device=device, name=arm.name,
                                 dataset_name=dataset, surrogate=surrogate,
                                 surrogate_name=None if surrogate is None else f"{arm.needs[0].name}-s{seed}",
                                 **settings)
        atomic_write_text(json.dumps(wanted), stamp)
    x, y = data.test.tensors
    n = settings.get("limit") or len(y)
    context = Measured(model, x[:n], y[:n].long(), results, _eps(spec, dataset), spec["measure"], seed)
    out = {}
    for name in needs:
        with torch.random.fork_rng():
            out[name] = MEASURES[name](context)
    return out


def run_diagnostics(run_dir: Path) -> dict:
    """What the trained model of a run is, beyond its scores: the epoch ``best.pt`` kept (of how many) and its
    validation accuracy, and for Bayesian layers the posterior standard deviations ``exp(log_sigma)`` of all
    weights against the prior ``sigma0``: whether the randomness was learned or stayed at its initialization."""
    state = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    config = json.loads((run_dir / "config.json").read_text())
    out = {"best_epoch": int(state["epoch"]), "epochs": int(config["epochs"]), "best_val_acc": float(state["val_acc"])}
    sigmas = [t.detach().double().exp().flatten() for name, t in state["model"].items() if name.endswith("_log_sigma")]
    if sigmas:
        s = torch.cat(sigmas)
        q = torch.quantile(s[torch.randperm(len(s), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                           torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
        out["posterior_sigma"] = {"sigma0": float(config["sigma0"]), "q05": float(q[0]), "median": float(q[1]),
                                  "q95": float(q[2]), "min": float(s.min()), "max": float(s.max())}
    return out


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=list))
