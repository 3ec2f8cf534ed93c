"""``fastdiv demo``: train Adv-BNN and Adv-BNN + GradDiv-DPP on digits, evaluate both, compare side by side.

The first command to run after installing fastdiv. On 2 CPU cores it finishes in about 8 minutes
(``benchmarks/RESULTS.md`` records a measured run) and writes ``DIR/report.md``: robust accuracy under
the ``fastdiv-rand`` protocol (EOT-APGD-CE, EOT-APGD-DLR, EOT-Square, judged by ensemble inference) at
ε = 0.1 (the training ε) and 0.2, the concentration of the input gradients (κ̂, ρ̂, mean cosine, DPP,
coherence), the 2-D projection of 100 gradient samples on the plane of the two models' mean gradients
(GradDiv Fig. 4), cosine heatmaps, GAAS, transferability between sample models and the
gradient-obfuscation checklist — plus one full ``fastdiv evaluate`` report per model.

    fastdiv demo                      # digits, about 8 minutes on 2 cores
    fastdiv demo --quick              # synthetic data, tiny settings: a smoke test (< 1 minute)

The demo trains the presets' digits recipe (the MNIST CNN, 15 epochs, PGD-10 adversarial training,
GradDiv λ = 1 after a 3-epoch warm-up and 3-epoch ramp-up) with three changes: learning rate 3e-3, and
a prior σ0 = 0.02 with KL factor 4e-4 — the Adv-BNN KL term is divided by the number of training
images, so the paper's factor 0.02 is 48x stronger on digits' 1,257 images than on MNIST's 60,000,
and 4e-4 = 0.02·1257/60000 restores MNIST's strength (with 0.02 and σ0 = 0.05 the Bayesian nets do
not learn digits at all in a few epochs: the weight noise swamps the means). Everything else is the
presets' (``fastdiv train --list-presets``). To stay within 10 minutes it evaluates the first 60 test
images and runs the protocol's Square with 100 queries instead of 5,000, a deviation the report names
(at 5,000 queries, 20 draws per query and the incumbent re-measured on the same draws, EOT-Square alone
costs more than 10 minutes per model and ε on 2 cores, whatever the number of images: the weight draws
of the 20 sample models, not the images, dominate each query). Its numbers show what GradDiv does in a few
minutes of training on digits (far less concentrated sample gradients, and no robust-accuracy gain over Adv-BNN,
as ``fastdiv reproduce graddiv`` also finds there), not the papers' values: for those, train the presets in full
(``fastdiv train --preset graddiv-kappa --dataset mnist``) and run ``fastdiv evaluate``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import analysis as A
from .errors import BadInputError
from .files import prepare_output_dir
from .runtime import atomic_write_text

__all__ = ["DEMO_PRESETS", "FULL", "QUICK", "demo", "add_parser"]

#: The two defenses compared: GradDiv's baseline and GradDiv with the DPP regularizer.
DEMO_PRESETS = ("advbnn", "graddiv-dpp")

#: Settings of the full demo. ``train`` overrides the presets' digits recipe; ``evaluate`` are
#: :class:`fastdiv.evaluate.EvalConfig` fields.
FULL = {
    "dataset": "digits",
    # the presets' digits recipe (MNIST CNN, 15 epochs, PGD-10 adversarial training, λ = 1) except for the
    # Bayesian prior and KL factor (see the module docstring) and a larger learning rate
    "train": dict(epochs=15, adv_steps=10, milestones=[10], lr=3e-3, sigma0=0.02, kl_factor=4e-4, stats_limit=64,
                  eval_samples=10),
    "preset_train": {"graddiv-dpp": dict(warmup=3, rampup=3, lam=1.0)},
    "evaluate": dict(protocol="fastdiv-rand", deviations={"square_queries": 100}, eps=(0.1, 0.2),
                     ensemble_samples=20, grad_samples=100, gaas_examples=50, gaas_k=(4, 16, 64),
                     random_samples=10, transfer_models=4, repeats=1, limit=60),
}

#: ``--quick``: synthetic data, one epoch, tiny evaluation (tests and installation checks).
QUICK = {
    "dataset": "synthetic",
    "train": dict(model="lenet5", epochs=1, adv_steps=2, milestones=[], lr=3e-3, sigma0=0.02, kl_factor=4e-4,
                  stats_limit=16, eval_samples=4, limit=96, batch_size=32),
    "preset_train": {"graddiv-dpp": dict(warmup=0, rampup=0, lam=1.0)},
    "evaluate": dict(protocol="fastdiv-rand", deviations={"steps": 3, "eot_samples": 2, "square_queries": 10},
                     eps=(0.1, 0.3), ensemble_samples=4, grad_samples=8, gaas_examples=8, gaas_k=(4, 16),
                     random_samples=4, transfer_models=2, repeats=1, limit=24),
}


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def demo(out: str | Path = "fastdiv-demo", *, quick: bool = False, device: str = "auto", seed: int = 0,
         epochs: int | None = None, quiet: bool = False) -> Path:
    """Trains :data:`DEMO_PRESETS` (settings :data:`FULL`, or :data:`QUICK`), evaluates both and writes
    ``out/report.md`` (side by side), ``out/<preset>/report.md`` + ``results.json`` (each model's full
    evaluation), ``out/runs/<preset>`` (the trained runs) and ``out/demo.json`` (timings and headline
    numbers). Returns the path of the side-by-side report. ``epochs`` overrides the training length."""
    from .data import load_dataset
    from .evaluate import evaluate_model
    from .report import render_comparison
    from .train import load_run, train

    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise BadInputError(f"epochs: must be an int >= 1 (--epochs), got {epochs!r}")
    spec = QUICK if quick else FULL
    out = prepare_output_dir(out, "--out")  # before any training: an existing file or a read-only place is refused
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    runs: dict[str, Path] = {}
    total_steps = 2 * len(DEMO_PRESETS) + 1
    step = 0

    for preset in DEMO_PRESETS:
        step += 1
        overrides = dict(spec["train"], **spec["preset_train"].get(preset, {}),
                         **({"epochs": epochs} if epochs else {}))
        _say(quiet, f"[{step}/{total_steps}] training {preset} on {spec['dataset']} "
                    f"({overrides['epochs']} epochs"
                    f"{', model ' + overrides['model'] if 'model' in overrides else ''}) ...")
        t0 = time.perf_counter()
        runs[preset] = train({"preset": preset, "dataset": spec["dataset"], "out": str(out / "runs" / preset),
                              "device": device, "seed": seed, **overrides}, quiet=True)
        timing[f"train_{preset}_s"] = time.perf_counter() - t0
        last = _last_metrics(runs[preset])
        _say(quiet, f"      done in {timing[f'train_{preset}_s']:.0f} s: validation accuracy "
                    f"{100 * last.get('val_acc', float('nan')):.1f}%, ρ̂ {last.get('rho', float('nan')):.3f}")

    named: dict[str, dict] = {}
    models = {}
    data = None
    for preset in DEMO_PRESETS:
        step += 1
        _say(quiet, f"[{step}/{total_steps}] evaluating {preset}: protocol {spec['evaluate']['protocol']} at ε = "
                    f"{', '.join(f'{e:g}' for e in spec['evaluate']['eps'])}, gradient analysis ...")
        t0 = time.perf_counter()
        model, config = load_run(runs[preset], which="best", device="cpu")
        if data is None:
            data = load_dataset(config["dataset"], config.get("data_dir"), resize=config.get("resize"),
                                seed=config.get("seed", 0))
        models[preset] = model
        named[preset] = evaluate_model(
            model, data, out=out / preset, quiet=True, device=device, seed=seed, name=preset,
            dataset_name=spec["dataset"], run_info={"run_dir": str(runs[preset]), "which": "best", "config": config,
                                                    "transfer_from": None},
            command=f"fastdiv evaluate {runs[preset]}", **spec["evaluate"])
        timing[f"evaluate_{preset}_s"] = time.perf_counter() - t0
        total = named[preset]["table"]["total"]["results"]
        _say(quiet, f"      done in {timing[f'evaluate_{preset}_s']:.0f} s: clean "
                    f"{100 * named[preset]['clean']['ensemble']['mean']:.1f}%, robust (Total) "
                    + ", ".join(f"ε={c['eps']:g}: {100 * c['ensemble']['mean']:.1f}%" for c in total))

    step += 1
    _say(quiet, f"[{step}/{total_steps}] writing the side-by-side report ...")
    t0 = time.perf_counter()
    projection = _joint_projection(models, data, spec["evaluate"]["grad_samples"], seed)
    timing["report_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start
    timing["cpu_s"] = _cpu_seconds()
    intro = _intro(spec, timing, quick)
    text = render_comparison(named, out, title="fastdiv demo: Adv-BNN vs Adv-BNN + GradDiv-DPP", projection=projection,
                             intro=intro, links={p: f"{p}/report.md" for p in DEMO_PRESETS})
    report = out / "report.md"
    atomic_write_text(text, report)
    summary = {"timing": {k: round(v, 1) for k, v in timing.items()}, "quick": quick, "settings": _jsonable(spec),
               "models": {p: {"clean": r["clean"]["ensemble"]["mean"],
                              "total": {str(c["eps"]): c["ensemble"]["mean"] for c in r["table"]["total"]["results"]},
                              "rho_mean": ((r["gradients"] or {}).get("stats") or {}).get("rho", {}).get("mean"),
                              "kappa_mean": ((r["gradients"] or {}).get("stats") or {}).get("kappa", {}).get("mean")}
                          for p, r in named.items()}}
    atomic_write_text(json.dumps(summary, indent=1), out / "demo.json")
    _say(quiet, _summary_text(named, timing, report))
    return report


def _cpu_seconds() -> float:
    """CPU time of this process so far (user + system, all threads): on a shared machine a steadier
    measure of the work than wall time."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _last_metrics(run: Path) -> dict:
    try:
        lines = (run / "metrics.jsonl").read_text().strip().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def _joint_projection(models: dict, data, num_samples: int, seed: int) -> dict:
    """GradDiv Fig. 4: ``num_samples`` gradient samples of each model at the first test image,
    projected on the plane spanned by the two models' sample mean (unit) gradients."""
    x, y = data.test.tensors
    x0, y0 = x[:1], y[:1].long()
    samples = {p: A.gradient_samples_at(m, x0, y0, num_samples, A.derive_seed(seed, 67), members=A.members_of(m))
               for p, m in models.items()}
    basis = A.projection_basis(*[A.unit_mean(s) for s in samples.values()], samples=torch.cat(list(samples.values())))
    out = {}
    for p, s in samples.items():
        pr = A.project(s, basis)
        out[p] = {"points": pr["points"].tolist(), "mean": pr["mean"].tolist(), "rho": pr["rho"],
                  "num_samples": num_samples, "example": 0}
    return out


def _intro(spec: dict, timing: dict, quick: bool) -> str:
    tr, ev = spec["train"], spec["evaluate"]
    lines = [
        f"Two randomized (Bayesian) networks trained on `{spec['dataset']}` by `fastdiv demo`"
        f"{' --quick' if quick else ''}: "
        f"**advbnn** (Adv-BNN, GradDiv's baseline) and **graddiv-dpp** (Adv-BNN + the R_DPP gradient-diversity "
        f"regularizer, n = 3 gradient samples per input). Recipe: {tr['epochs']} epochs, "
        f"{'model `' + tr['model'] + '`' if 'model' in tr else 'the presets’ model'}, "
        f"PGD-{tr['adv_steps']} adversarial "
        f"training, lr {tr['lr']:g}, σ0 {tr['sigma0']:g}, KL factor {tr['kl_factor']:g}"
        + "".join(f"; {p}: " + ", ".join(f"{k} {v}" for k, v in o.items()) for p, o in spec["preset_train"].items())
        + " (see `fastdiv/demo.py`).",
        _protocol_text(ev) + f" Gradient statistics from {ev['grad_samples']} samples per test input.",
        "Time: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s" for k, v in timing.items()
                             if k != "cpu_s")
        + f" (CPU time {timing['cpu_s']:.0f} s, {torch.get_num_threads()} threads).",
    ]
    return "\n\n".join(lines)


def _protocol_text(ev: dict) -> str:
    """The evaluation protocol, its deviations and the test-set size, in words (the report's intro)."""
    from .evaluate.protocols import PROTOCOLS

    protocol = PROTOCOLS[ev["protocol"]]
    fixed = protocol.config
    deviated = "; ".join(f"{k.replace('_', ' ')} {v} instead of the protocol's {fixed[k]}"
                         for k, v in ev.get("deviations", {}).items())
    return (f"Evaluation: protocol `{protocol.name}` ({protocol.description}; {fixed['steps']} iterations, "
            f"{fixed['eot_samples']} draws per step), ensemble inference over {ev['ensemble_samples']} sample "
            f"models, at ε = {', '.join(f'{e:g}' for e in ev['eps'])}"
            + (f", with a declared deviation: {deviated}" if deviated else "")
            + f", on the first {ev.get('limit') or 'all'} test images: the demo's choice of budget and test-set size "
              "to finish within 10 minutes on 2 CPU cores. `fastdiv evaluate RUN --protocol "
              f"{protocol.name}` runs the full protocol on the whole test set.")


def _summary_text(named: dict, timing: dict, report: Path) -> str:
    lines = [f"\nfastdiv demo finished in {timing['total_s']:.0f} s"]
    for p, r in named.items():
        st = ((r.get("gradients") or {}).get("stats") or {})
        total = ", ".join(f"ε={c['eps']:g} {100 * c['ensemble']['mean']:.1f}%" for c in r["table"]["total"]["results"])
        rho = st.get("rho", {}).get("mean")
        lines.append(f"  {p:12s} clean {100 * r['clean']['ensemble']['mean']:.1f}%  robust {total}"
                     + (f"  ρ̂ {rho:.3f}" if rho is not None else ""))
    lines.append(f"report: {report}")
    return "\n".join(lines)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=list))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``fastdiv demo`` to the ``fastdiv`` command line."""
    p = subparsers.add_parser(
        "demo", help="train Adv-BNN and Adv-BNN+GradDiv on digits, evaluate both, write a side-by-side report",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="fastdiv-demo", help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="synthetic data and tiny settings: a smoke test (< 1 minute)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="override the training epochs")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    # a fault raises a fastdiv error, which fastdiv.cli.main reports in one line with its exit code
    demo(args.out, quick=args.quick, device=args.device, seed=args.seed, epochs=args.epochs, quiet=args.quiet)
    return 0
