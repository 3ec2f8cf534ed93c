"""``reproduction.md``: the claims of ``fastdiv reproduce``, paper against measured, with the verdicts."""
from __future__ import annotations

from .markdown import Markdown, fmt_num

__all__ = ["render_reproduction"]

_MARK = {"reproduced": "✅ reproduced", "not reproduced": "❌ not reproduced", "inconclusive": "❔ inconclusive"}


def render_reproduction(report: dict) -> str:
    """The markdown of a ``reproduce`` result (``reproduction.json``)."""
    md = Markdown()
    md.heading(f"fastdiv reproduce: {report['dataset']}, {report['size']} size, {report['seeds']} seed(s)", 1)
    md.para("Each claim trains its defense and its baseline on every seed (same seed for both) and measures both; "
            "the effect is defense − baseline, its ± the seed-to-seed standard deviation. Verdict: *reproduced* "
            "when the mean effect has the paper's sign and exceeds 2 standard errors, *not reproduced* when it "
            "exceeds them with the opposite sign, else *inconclusive* (always with fewer than 3 seeds). "
            f"ε = {', '.join(fmt_num(e) for e in report['eps'])} (0.67, 1 and 1.33 × ε_train). "
            f"Total time {report['total_s']:.0f} s, torch {report['torch_version']}, {report['threads']} threads.")
    rows = []
    for c in report["claims"]:
        spread = "" if c["spread"] != c["spread"] else f" ± {fmt_num(c['spread'])}"
        rows.append([f"`{c['id']}`", f"{c['paper']} {c['source']}", c["paper_numbers"],
                     f"{c['defense']['name']} {fmt_num(c['defense_mean'])} vs {c['baseline']['name']} "
                     f"{fmt_num(c['baseline_mean'])}", f"{fmt_num(c['effect'])}{spread} ({c['better']} expected)",
                     _MARK[c["verdict"]]])
    md.table(["claim", "source", "paper", f"measured ({report['seeds']} seed mean)", "effect", "verdict"], rows,
             align="llllll")
    md.heading("Claims", 2)
    for c in report["claims"]:
        md.heading(f"`{c['id']}`: {c['statement']}", 3)
        items = [f"paper: {c['citation']}, {c['source']}: {c['paper_numbers']}",
                 f"defense `{c['defense']['preset']}`" + _overrides(c["defense"])
                 + f", baseline `{c['baseline']['preset']}`" + _overrides(c["baseline"])
                 + f"; measure `{c['metric']}`, expected {c['better']}",
                 "per seed: defense " + ", ".join(fmt_num(v) for v in c["measured"]["defense"])
                 + "; baseline " + ", ".join(fmt_num(v) for v in c["measured"]["baseline"]),
                 f"verdict: **{c['verdict']}** ({c['reason']})"]
        if c.get("notes"):
            items.insert(1, f"how measured: {c['notes']}")
        md.bullets(items)
    if report.get("diagnostics"):
        md.heading("Trained models", 2)
        md.para("The epoch `best.pt` kept (the best validation accuracy among the epochs at the full λ, "
                "docs/training.md) and, for Bayesian layers, the posterior standard deviation of the weights "
                "(5 %, 50 %, 95 % quantiles) against the prior σ0 it starts from.")
        rows = []
        for key, d in report["diagnostics"].items():
            sig = d.get("posterior_sigma")
            rows.append([key, f"{d['best_epoch']} / {d['epochs']}", fmt_num(d["best_val_acc"]),
                         "" if sig is None else f"{fmt_num(sig['q05'])}, {fmt_num(sig['median'])}, "
                                                f"{fmt_num(sig['q95'])} (σ0 {fmt_num(sig['sigma0'])})"])
        md.table(["run", "best epoch", "val acc", "posterior σ"], rows, align="lrrl")
    return md.text()


def _overrides(arm: dict) -> str:
    changed = dict(arm["overrides"])
    if arm.get("seed_offset"):
        changed["seed"] = f"+{arm['seed_offset']}"
    return (" (" + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")") if changed else ""
