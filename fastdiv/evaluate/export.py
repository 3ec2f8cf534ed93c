"""results.json in the shape of RobustBench's model-info files, one object per ε.

RobustBench lists a model with its clean and AutoAttack accuracy as percentage strings, ε as a fraction
string and the forward passes one prediction costs. fastdiv's robust accuracy is the per-example worst case
over its own attack rows (the table's Total), not AutoAttack, so it is exported under ``"fastdiv_acc"`` with
the attacks named; ``"autoattack_acc"`` is never written. For a stochastic model the numbers are those of
ensemble inference under the evaluated EOT forms, and the entry says so (``"randomized": true``,
``"eot_samples"``, ``"footnote"``): RobustBench's own protocol judges a single forward of a deterministic
model.
"""
from __future__ import annotations

__all__ = ["robustbench_entries"]


def _eps_string(eps: float) -> str:
    """ε as RobustBench writes it: a short decimal when it is one ('0.3'), else 'k/255' when it is a whole
    number of 8-bit levels ('8/255')."""
    short = f"{eps:.6g}"
    if float(short) == eps:
        return short
    levels = eps * 255
    if abs(levels - round(levels)) < 1e-6:
        return f"{round(levels)}/255"
    return short


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}"


def robustbench_entries(results: dict) -> list[dict]:
    """One RobustBench-shaped model-info dict per ε of ``results`` (a validated results.json)."""
    model, settings = results["model"], results["settings"]
    stochastic = bool(model["stochastic"])
    rows = [r["label"] for r in results["table"]["rows"]]
    passes = model["members"] or (settings["ensemble_samples"] if stochastic else 1)
    entries = []
    for cell in results["table"]["total"]["results"]:
        entry = {
            "name": model["name"],
            "dataset": results["data"]["dataset"],
            "threat_model": "L2" if settings.get("norm") == "l2" else "Linf",
            "eps": _eps_string(float(cell["eps"])),
            "clean_acc": _percent(results["clean"]["ensemble"]["mean"]),
            "fastdiv_acc": _percent(cell["ensemble"]["mean"]),
            "fastdiv_attacks": rows,
            "number_forward_passes": int(passes),
            "randomized": stochastic,
            "additional_data": False,
            "footnote": ("fastdiv_acc: per-example worst case over " + ", ".join(rows) + " (fastdiv evaluate), "
                         "not AutoAttack"),
        }
        if stochastic:
            entry["eot_samples"] = int(settings["eot_samples"])
            entry["footnote"] += (f"; randomized model: ensemble inference over {passes} forward passes, EOT "
                                  f"attacks averaging {settings['eot_samples']} sample gradients per step")
        entries.append(entry)
    return entries
