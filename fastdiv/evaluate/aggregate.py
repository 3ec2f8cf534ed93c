"""The results dictionary (``results.json``, schema :data:`.RESULTS_SCHEMA`) from the merged stage results:
accuracies as mean ± std over repeats, the Total row, the curve, the checklist's verdicts, transferability
and the gradient statistics."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math

import torch
from torch import nn

from .. import analysis as A
from .config import EvalConfig, attack_label
from .outputs import encode_flags
from .protocols import PROTOCOLS
from .schema import SCHEMA_NAME, SCHEMA_VERSION
from .shard import GradientResult, Predictions, ShardResult


def model_name(model: nn.Module, run_config: dict | None) -> str:
    """The name results.json gives the model: the run's preset or model name, else its class name."""
    if run_config:
        for key in ("preset", "model"):
            if isinstance(run_config.get(key), str):
                return run_config[key]
    return type(model).__name__


def _acc(flags: torch.Tensor) -> dict:
    """``[R, N]`` bool -> ``{'mean', 'std', 'values'}`` over repeats (std: sample std, 0 for one repeat)."""
    vals = flags.float().mean(-1) if flags.shape[-1] else torch.zeros(flags.shape[0])
    vals = vals.double().cpu()
    return {"mean": float(vals.mean()), "std": float(vals.std(unbiased=True)) if vals.numel() > 1 else 0.0,
            "values": [float(v) for v in vals]}


def _accuracies(flags: Predictions, keep: bool) -> dict:
    """``ensemble`` / ``worst_case`` accuracy records of ``[R, N]`` flags, and the flags when ``keep``."""
    rec = {"ensemble": _acc(flags.ensemble), "worst_case": _acc(flags.worst)}
    if keep:
        rec["correct"] = [encode_flags(f) for f in flags.ensemble]
        rec["worst_correct"] = [encode_flags(f) for f in flags.worst]
    return rec


def _at(flags: Predictions, i: int) -> Predictions:
    return Predictions(flags.ensemble[i], flags.worst[i])


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


def _table(res: ShardResult, cfg: EvalConfig) -> tuple[dict, dict[str, dict]]:
    """The robust-accuracy table with its Total row (the per-example worst case over None and every row),
    and the rows as the checklist takes them."""
    keep, E = cfg.per_example, len(cfg.eps)
    total = Predictions(res.clean.ensemble.unsqueeze(0).expand(E, -1, -1).clone(),
                        res.clean.worst.unsqueeze(0).expand(E, -1, -1).clone())
    rows, check_rows = [], {}
    for row in res.rows:
        spec = row.spec
        total.ensemble &= row.flags.ensemble
        total.worst &= row.flags.worst
        cells = [{"eps": eps, "settings": dict(row.settings[ei]), **_accuracies(_at(row.flags, ei), keep)}
                 for ei, eps in enumerate(cfg.eps)]
        for ei, eps in enumerate(cfg.eps):
            check_rows[f"{spec.key}@{eps:g}"] = {"attack": spec.attack, "eps": eps,
                                                 "correct": row.flags.ensemble[ei], "label": spec.label}
        rows.append({"key": spec.key, "label": spec.label, "attack": spec.attack, "form": spec.form,
                     "results": cells})
    total_cells = [{"eps": eps, **_accuracies(_at(total, ei), keep)} for ei, eps in enumerate(cfg.eps)]
    table = {"eps": list(cfg.eps), "rows": rows,
             "total": {"key": "total", "label": "Total", "attack": None, "form": None, "results": total_cells}}
    return table, check_rows


def _curve_points(res: ShardResult, cfg: EvalConfig) -> dict[float, Predictions]:
    """ε -> flags of the accuracy-vs-ε curve: clean, the table's ε of the curve attack, the extra points."""
    points = {0.0: res.clean}
    key = f"{cfg.curve_attack}/{res.strongest or 'plain'}"
    # under a protocol the rows are a cascade: the last one is the Total, the protocol's accuracy at each ε
    row = res.rows[-1] if cfg.protocol is not None and res.rows else next(
        (r for r in res.rows if r.spec.key == key), None)
    if row is not None:
        for ei, eps in enumerate(cfg.eps):
            points[eps] = _at(row.flags, ei)
    for p in res.curve:
        points[p.eps] = p.flags
    return points


def _curve(points: dict[float, Predictions], res: ShardResult, cfg: EvalConfig) -> dict | None:
    if len(points) <= 1:
        return None
    if cfg.protocol is not None:
        attack, label = cfg.protocol, f"{cfg.protocol} (Total)"
    else:
        attack, label = cfg.curve_attack, attack_label(cfg.curve_attack, res.strongest)
    return {"attack": attack, "form": res.strongest, "label": label,
            "points": [{"eps": e, "ensemble": _acc(points[e].ensemble), "worst_case": _acc(points[e].worst)}
                       for e in sorted(points)]}


def _obfuscation(res: ShardResult, cfg: EvalConfig, check_rows: dict, points: dict[float, Predictions]) -> dict:
    obf = {"checks": [], "passed": None, "settings": {"min_margin": cfg.min_margin, "min_unbounded_success": 0.99,
                                                      "random_samples": cfg.random_samples}}
    c = res.checklist
    if c is None:
        return obf
    unbounded = None
    if c.unbounded_attack:
        unbounded = {"label": c.unbounded_attack["label"], "eps": c.unbounded_attack["settings"]["eps"],
                     "correct": c.unbounded}
        obf["settings"]["unbounded"] = c.unbounded_attack
    random = None
    if c.random_found is not None:
        random = {"label": "every white-box attack", "samples": cfg.random_samples,
                  "per_eps": [(eps, c.random_survived[ei], c.random_found[ei]) for ei, eps in enumerate(cfg.eps)]}
    curve = [(e, points[e].ensemble) for e in sorted(points) if e > 0]
    # a protocol's rows are cumulative (each row counts what every row before it broke): comparing one attack
    # family with another (checks 1 and 2) would compare prefixes of the cascade, so those two are not judged
    cascade = cfg.protocol is not None
    obf["checks"] = A.obfuscation_checklist(rows={} if cascade else check_rows, clean=res.clean.ensemble,
                                            curve=curve or None, unbounded=unbounded, random=random,
                                            min_margin=cfg.min_margin)
    if cascade:
        for check in obf["checks"]:
            if check["id"] in (1, 2):
                check["detail"] = (f"not judged under protocol {cfg.protocol}: its rows are a cascade, each "
                                   "counting what every earlier attack broke")
    obf["passed"] = all(check["status"] != "fail" for check in obf["checks"])
    return obf


def _transfer(res: ShardResult, cfg: EvalConfig, surrogate_name: str | None, run_info: dict | None) -> dict:
    transfer: dict = {"sample_models": None, "mra": None, "surrogate": None}
    if res.transfer is not None:
        transfer["sample_models"] = {**res.transfer.info, **A.transfer_summary(res.transfer.correct)}
    if res.mra is not None:
        results = []
        for ei, eps in enumerate(cfg.eps):
            c = res.mra.correct[ei]  # [K, N]: mean over members of each member's accuracy = MRA
            results.append({"eps": eps, "label": attack_label(cfg.transfer_attack, None),
                            "settings": res.mra.settings[ei],
                            "mra": {"mean": float(c.float().mean()), "std": 0.0, "values": [float(c.float().mean())]},
                            "per_member": [float(v) for v in c.float().mean(-1)]})
        transfer["mra"] = {"benign": float(res.mra.benign.float().mean()), "members": res.members, "results": results}
    if res.surrogate is not None:
        rows = [{"attack": row.attack, "label": attack_label(row.attack, None),
                 "results": [{"eps": eps, "settings": row.settings[ei], "ensemble": _acc(row.ensemble[ei])}
                             for ei, eps in enumerate(cfg.eps)]} for row in res.surrogate]
        transfer["surrogate"] = {"name": surrogate_name, "run_dir": (run_info or {}).get("transfer_from"),
                                 "eps": list(cfg.eps), "rows": rows}
    return transfer


def _gradients(g: GradientResult, res: ShardResult, cfg: EvalConfig) -> dict:
    out = {"num_samples": None, "num_examples": 0, "dimension": g.dimension, "loss": "ce", "stats": None,
           "projection": None, "cosine": None, "diversity": None, "gaas": None}
    if g.stats is not None:
        out["num_samples"] = res.members or cfg.grad_samples
        out["num_examples"] = int(g.stats["rho"].numel())
        out["stats"] = {k: _stat_record(g.stats[k], cfg.per_example) for k in A.STAT_NAMES if k in g.stats}
    else:
        out["skipped"] = "the model is deterministic: every gradient sample is the same"
    if g.projection:
        pr = g.projection
        out["projection"] = {"example": 0, "num_samples": pr["num_samples"], "rho": pr["rho"],
                             "points": [[round(float(a), 5), round(float(b), 5)] for a, b in pr["points"]],
                             "mean": [float(v) for v in pr["mean"]]}
        c = g.cosine
        off = c[~torch.eye(c.shape[0], dtype=torch.bool)]
        out["cosine"] = {"example": 0, "num_samples": c.shape[0],
                         "off_diagonal_mean": float(off.mean()) if off.numel() else None,
                         "matrix": [[round(float(v), 4) for v in r] for r in c]}
    if g.diversity is not None:
        dv = g.diversity
        out["diversity"] = {
            "k": int(dv["correct"].shape[0]), "source": "members" if res.members else "sample_models",
            "num_examples": int(dv["l_d"].numel()),
            "ambiguity_entropy": A.ambiguity_entropy(dv["correct"]),
            "member_accuracy": [float(v) for v in dv["correct"].float().mean(-1)],
            "l_d": {**A.quantiles(dv["l_d"]), "mean": float(dv["l_d"].double().mean())},
            "l_s": {**A.quantiles(dv["l_s"]), "mean": float(dv["l_s"].double().mean())}}
    if g.gaas is not None:
        counts = g.gaas.double()  # [E, K, M]
        kt = torch.tensor(g.gaas_ks, dtype=torch.float64)[None, :, None]
        out["gaas"] = {
            "ks": g.gaas_ks, "eps": list(cfg.eps), "num_examples": int(counts.shape[-1]),
            "grad_samples": cfg.eot_samples, "fraction": (counts / kt).mean(-1).tolist(),
            "all_k": (counts == kt).double().mean(-1).tolist(), "mean_count": counts.mean(-1).tolist()}
    return out


def aggregate(res: ShardResult, cfg: EvalConfig, *, model: nn.Module, in_shape: list[int], name: str | None,
              dataset_name: str, run_info: dict | None, surrogate_name: str | None, timing: dict[str, float],
              device, world: int, command: str | None) -> dict:
    """The results dictionary of the merged result ``res`` (``surrogate_name``: None without surrogate)."""
    import fastdiv

    table, check_rows = _table(res, cfg)
    points = _curve_points(res, cfg)
    members = A.members_of(model)
    results = {
        "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fastdiv_version": fastdiv.__version__, "torch_version": torch.__version__,
        "device": str(device), "world_size": world, "command": command,
        "run": run_info,
        "model": {"name": name or model_name(model, (run_info or {}).get("config")), "class": type(model).__name__,
                  "stochastic": res.stochastic, "randomness": res.randomness,
                  "members": len(members) if members else None,
                  "parameters": int(sum(t.numel() for t in model.parameters()))},
        "data": {"dataset": dataset_name, "split": "test", "num_examples": int(res.index.numel()),
                 "in_shape": list(in_shape), "num_classes": res.num_classes},
        "settings": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in dataclasses.asdict(cfg).items()},
        "protocol": PROTOCOLS[cfg.protocol].record(cfg.deviations) if cfg.protocol is not None else None,
        "clean": _accuracies(res.clean, cfg.per_example),
        "table": table,
        "curve": _curve(points, res, cfg),
        "transfer": _transfer(res, cfg, surrogate_name, run_info),
        "gradients": _gradients(res.gradients, res, cfg) if res.gradients is not None else None,
        "obfuscation": _obfuscation(res, cfg, check_rows, points),
        # each row's own time beside the stages' (here, not in the table: the table repeats, timings do not)
        "timing": {k: round(v, 3) for k, v in {**timing, **{f"table_{r.spec.key}_s": r.seconds for r in res.rows}
                                               }.items()},
    }
    return _finite(results)
