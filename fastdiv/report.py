"""Markdown tables and PNG plots for ``fastdiv evaluate`` and ``fastdiv demo``.

Every figure and table is drawn from a results dictionary (the content of ``results.json``, see
:mod:`fastdiv.evaluate`), so a report can be re-rendered from a saved file:

    >>> import json, fastdiv.report as R
    >>> results = json.load(open("run/eval/results.json"))
    >>> R.write_report(results, "run/eval")          # report.md + PNGs

Plots use matplotlib's Agg backend (no display needed). Accuracies are stored as fractions and shown
as percentages with two decimals, as in GradDiv's Table 1.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "Markdown", "md_table", "fmt_pct", "fmt_acc", "fmt_num", "plot_accuracy_curves", "plot_stat_histograms",
    "plot_projection", "plot_heatmaps", "plot_gaas", "render_evaluation", "write_report", "render_comparison",
    "STAT_LABELS",
]

#: Display names of the concentration statistics.
STAT_LABELS = {
    "kappa": "κ̂ (concentration)", "rho": "ρ̂ (MRL)", "mean_cos": "mean cosine", "dpp": "DPP loss −log det",
    "coherence": "coherence (max cos)", "rho_q": "ℓ1-MRL", "grad_norm": "‖g‖₂",
}
_HIST_STATS = ("kappa", "rho", "mean_cos", "dpp", "coherence")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------

def fmt_num(v, digits: int = 4) -> str:
    """A number in a short fixed or scientific notation; '–' for None / NaN."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.{max(1, digits - 2)}e}"
    return f"{v:.{digits}g}" if a >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") if v else "0"


def fmt_pct(fraction: float | None, std: float | None = None) -> str:
    """``0.6334, 0.012 -> '63.34 ± 1.20'`` (percent, two decimals); no ± part when ``std`` is None."""
    if fraction is None:
        return "–"
    s = f"{100 * fraction:.2f}"
    return s if std is None else f"{s} ± {100 * std:.2f}"


def fmt_acc(acc: dict | None) -> str:
    """An accuracy record ``{'mean', 'std', 'values'}`` as ``mean ± std`` (no ± with one repeat)."""
    if not acc:
        return "–"
    return fmt_pct(acc["mean"], acc["std"] if len(acc.get("values", [])) > 1 else None)


def md_table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table. ``align``: one of 'l', 'r', 'c' per column (default: first
    column left, the others right)."""
    n = len(headers)
    align = align or ("l" + "r" * (n - 1))
    marks = {"l": ":---", "r": "---:", "c": ":---:"}

    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "| " + " | ".join(marks[a] for a in align) + " |"]
    for r in rows:
        if len(r) != n:
            raise ValueError(f"md_table: a row has {len(r)} cells, the header {n}")
        lines.append("| " + " | ".join(cell(v) for v in r) + " |")
    return "\n".join(lines)


class Markdown:
    """A small markdown builder: headings, paragraphs, tables, images, code blocks."""

    def __init__(self):
        self.parts: list[str] = []

    def heading(self, text: str, level: int = 2) -> "Markdown":
        self.parts.append("#" * level + " " + text)
        return self

    def para(self, text: str) -> "Markdown":
        self.parts.append(text)
        return self

    def table(self, headers, rows, align=None) -> "Markdown":
        self.parts.append(md_table(headers, rows, align))
        return self

    def image(self, path: str, alt: str) -> "Markdown":
        self.parts.append(f"![{alt}]({path})")
        return self

    def code(self, text: str, lang: str = "") -> "Markdown":
        self.parts.append(f"```{lang}\n{text}\n```")
        return self

    def bullets(self, items: Sequence[str]) -> "Markdown":
        self.parts.append("\n".join(f"- {i}" for i in items))
        return self

    def text(self) -> str:
        return "\n\n".join(self.parts) + "\n"


# ------------------------------------------------------------------------------------------------
# Plots (each returns the path it wrote)
# ------------------------------------------------------------------------------------------------

def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_accuracy_curves(curves: Sequence[dict], path, *, title: str = "Accuracy vs ε") -> Path:
    """Accuracy (%) against ε, one line per curve ``{'label', 'eps': [...], 'mean': [...], 'std': [...]}``
    (GradDiv Fig. 6); a shaded band of ±std when given."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for c in curves:
        eps, mean = list(c["eps"]), [100 * m for m in c["mean"]]
        line, = ax.plot(eps, mean, marker="o", ms=4, label=c["label"])
        std = c.get("std")
        if std and any(s > 0 for s in std):
            lo = [m - 100 * s for m, s in zip(mean, std)]
            hi = [m + 100 * s for m, s in zip(mean, std)]
            ax.fill_between(eps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("ε (ℓ∞)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_stat_histograms(series: dict[str, dict[str, Sequence[float]]], path, *,
                         stats: Sequence[str] = _HIST_STATS, bins: int = 30) -> Path:
    """Per-example distributions of the concentration statistics, one panel per statistic and one
    overlaid density histogram per model: ``series = {model_label: {stat: values}}`` (GradDiv Fig. 5
    for κ̂, GAL Fig. 4 for coherence). κ̂ is drawn on a log axis when it spans > 2 decades."""
    import numpy as np

    plt = _plt()
    stats = [s for s in stats if any(s in v and len(v[s]) for v in series.values())]
    fig, axes = plt.subplots(1, max(1, len(stats)), figsize=(3.1 * max(1, len(stats)), 2.8), squeeze=False)
    for ax, stat in zip(axes[0], stats):
        arrays = {lbl: np.asarray(v[stat], dtype=float) for lbl, v in series.items() if stat in v}
        arrays = {k: a[np.isfinite(a)] for k, a in arrays.items()}
        allv = np.concatenate([a for a in arrays.values() if a.size] or [np.zeros(1)])
        lo, hi = float(allv.min()), float(allv.max())
        log = stat == "kappa" and lo > 0 and hi / lo > 100
        if log:  # edges slightly outside [lo, hi]: float rounding of 10**log10(v) must not drop the extremes
            edges = np.logspace(math.log10(lo) - 1e-6, math.log10(hi) + 1e-6, bins + 1)
            ax.set_xscale("log")
        else:
            if hi - lo < 1e-9:
                lo, hi = lo - 0.5, hi + 0.5
            pad = 1e-9 * max(1.0, abs(hi), abs(lo))
            edges = np.linspace(lo - pad, hi + pad, bins + 1)
        for lbl, a in arrays.items():
            if a.size:
                ax.hist(a, bins=edges, density=True, histtype="stepfilled", alpha=0.35, label=lbl)
                ax.hist(a, bins=edges, density=True, histtype="step", lw=1.2, color=ax.patches[-1].get_facecolor()[:3])
        ax.set_title(STAT_LABELS.get(stat, stat), fontsize=9)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
    if len(series) > 1 and stats:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_projection(sets: Sequence[dict], path, *, title: str = "gradient samples (2-D projection)") -> Path:
    """Projected unit gradient samples on the unit circle with their sample mean vectors (GradDiv
    Fig. 4, top): ``sets = [{'label', 'points': [[x, y], ...], 'mean': [x, y], 'rho': float}]``."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    t = np.linspace(0, 2 * np.pi, 256)
    ax.plot(np.cos(t), np.sin(t), color="0.7", lw=0.8)
    for s in sets:
        p = np.asarray(s["points"], dtype=float).reshape(-1, 2)
        sc = ax.scatter(p[:, 0], p[:, 1], s=9, alpha=0.6, label=f"{s['label']} (ρ̂={s['rho']:.2f})")
        m = np.asarray(s["mean"], dtype=float)
        ax.plot([0, m[0]], [0, m[1]], color=sc.get_facecolor()[0][:3], lw=2.2)
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(-1.1, 1.1)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.85", lw=0.5)
    ax.axvline(0, color="0.85", lw=0.5)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_heatmaps(panels: Sequence[dict], path, *, vmin: float = -1.0, vmax: float = 1.0, cmap: str = "viridis",
                  annotate: bool | None = None, xlabel: str = "", ylabel: str = "") -> Path:
    """One heatmap per panel ``{'title', 'matrix'}`` side by side with a shared colour scale
    (cosine matrices: GradDiv Fig. 8; transferability matrices: Fig. 7)."""
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels) + 0.6, 3.5), squeeze=False)
    im = None
    for ax, p in zip(axes[0], panels):
        m = np.asarray(p["matrix"], dtype=float)
        im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
        ax.set_title(p["title"], fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if m.shape[0] <= 20:
            ax.set_xticks(range(m.shape[1]))
            ax.set_yticks(range(m.shape[0]))
        if annotate if annotate is not None else m.shape[0] <= 10:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, f"{100 * v:.0f}" if vmax == 1 and vmin == 0 else f"{v:.2f}", ha="center",
                        va="center", fontsize=6, color="w" if v < (vmin + vmax) / 2 else "k")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.85)
    return _save(fig, path)


def plot_gaas(series: Sequence[dict], path) -> Path:
    """GAAS (GAL Fig. 5): probability that all k Hadamard directions are adversarial, per ε, against
    k; ``series = [{'label', 'ks', 'eps', 'all_k': [[...per k] per ε]}]``."""
    plt = _plt()
    eps_all = sorted({e for s in series for e in s["eps"]})
    fig, axes = plt.subplots(1, len(eps_all), figsize=(3.2 * len(eps_all), 2.9), squeeze=False)
    for ax, e in zip(axes[0], eps_all):
        for s in series:
            if e in s["eps"]:
                row = s["all_k"][s["eps"].index(e)]
                ax.plot(s["ks"], [100 * v for v in row], marker="o", label=s["label"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(series[0]["ks"])
        ax.set_xticklabels([str(k) for k in series[0]["ks"]])
        ax.set_ylim(-2, 102)
        ax.set_title(f"ε = {e:g}", fontsize=9)
        ax.set_xlabel("k orthogonal directions", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("P(all k adversarial) %", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------
# Report of one evaluation
# ------------------------------------------------------------------------------------------------

def _table_block(results: dict, md: Markdown, *, worst: bool = True) -> None:
    table = results["table"]
    eps = table["eps"]
    headers = ["attack"]
    for e in eps:
        headers.append(f"ε={e:g}")
        if worst:
            headers.append(f"ε={e:g} worst")
    rows = []
    clean = results["clean"]
    r = ["None"]
    for _ in eps:
        r.append(fmt_acc(clean["ensemble"]))
        if worst:
            r.append(fmt_acc(clean["worst_case"]))
    rows.append(r)
    for row in table["rows"] + [table["total"]]:
        r = [f"**{row['label']}**" if row is table["total"] else row["label"]]
        for cell in row["results"]:
            r.append(fmt_acc(cell["ensemble"]))
            if worst:
                r.append(fmt_acc(cell["worst_case"]))
        rows.append(r)
    md.table(headers, rows)


def _settings_line(results: dict) -> str:
    s = results["settings"]
    parts = [f"{s['steps']} steps", f"α = {s['alpha_factor']:g}·ε", f"EOT n = {s['eot_samples']}",
             f"ensemble of {s['ensemble_samples']} samples", f"{s['repeats']} repeat(s)", f"seed {s['seed']}"]
    return ", ".join(parts)


def _curve_entries(results: dict, label: str | None = None) -> list[dict]:
    curve = results.get("curve")
    if not curve:
        return []
    pts = curve["points"]
    return [{"label": label or curve["label"], "eps": [p["eps"] for p in pts],
             "mean": [p["ensemble"]["mean"] for p in pts], "std": [p["ensemble"]["std"] for p in pts]}]


def _check_rows(results: dict) -> list[list[str]]:
    marks = {"pass": "✅ pass", "fail": "❌ FAIL", "skipped": "– skipped"}
    return [[str(c["id"]), c["name"], marks[c["status"]], c["detail"]] for c in results["obfuscation"]["checks"]]


def render_evaluation(results: dict, out_dir, *, prefix: str = "", heading_level: int = 1) -> str:
    """The markdown report of one evaluation; writes its PNGs into ``out_dir`` (names start with
    ``prefix``) and links them relative to ``out_dir``."""
    out_dir = Path(out_dir)
    h = heading_level
    md = Markdown()
    m, d = results["model"], results["data"]
    md.heading(f"fastdiv evaluation: {m['name']}", h)
    run = results.get("run") or {}
    info = [f"model: `{m['name']}` ({m['class']}, {m['parameters']:,} parameters, "
            f"{'stochastic' if m['stochastic'] else 'deterministic'}"
            f"{', %d members' % m['members'] if m.get('members') else ''})",
            f"data: `{d['dataset']}` {d['split']} split, {d['num_examples']} examples, input {tuple(d['in_shape'])}",
            f"attacks: {_settings_line(results)}; ℓ∞, inputs clipped to [0, 1]"]
    if run.get("run_dir"):
        info.insert(0, f"run: `{run['run_dir']}` ({run.get('which', 'best')} checkpoint)")
    if results.get("command"):
        info.append(f"command: `{results['command']}`")
    md.bullets(info)

    md.heading("Robust accuracy (%)", h + 1)
    md.para("Ensemble inference over the sample models (mean softmax); *worst* = the stricter per-example worst "
            "case: correct only if every sample model is correct. Mean ± std over repeats. [Attack] attacks one "
            "fixed sample model, EOT¹-[Attack] a fresh sample each iteration, EOT-[Attack] the mean gradient of n "
            "samples. **Total** = per-example worst case over None and every attack row.")
    _table_block(results, md)

    curves = _curve_entries(results)
    if curves:
        p = plot_accuracy_curves(curves, out_dir / f"{prefix}accuracy_vs_eps.png",
                                 title=f"{results['curve']['label']} accuracy vs ε")
        md.image(p.name, "accuracy vs eps")

    md.heading("Gradient-obfuscation checklist (GradDiv §5)", h + 1)
    if results["obfuscation"]["checks"]:
        md.para("Each check looks for a behaviour of obfuscated gradients (Athalye et al. 2018); **fail** means the "
                "behaviour was observed. Differences must exceed max(1 pp, 2 standard errors, paired over examples).")
        md.table(["#", "check", "result", "numbers"], _check_rows(results), "llll")
    else:
        md.para("Not run (`--no-checklist`).")

    tr = results.get("transfer") or {}
    if tr.get("sample_models"):
        t = tr["sample_models"]
        md.heading("Transferability between sample models", h + 1)
        md.para(f"{t['label']} at ε = {t['eps']:g} crafted on the source (rows), accuracy of the target (columns) "
                f"over {t['k']} {t['source'].replace('_', ' ')}. Off-diagonal mean {fmt_pct(t['off_diagonal_mean'])}% "
                f"(min {fmt_pct(t['off_diagonal_min'])}%, max {fmt_pct(t['off_diagonal_max'])}%); diagonal (white-box) "
                f"mean {fmt_pct(t['diagonal_mean'])}%.")
        p = plot_heatmaps([{"title": f"{m['name']}: transfer accuracy", "matrix": t["matrix"]}],
                          out_dir / f"{prefix}transfer_matrix.png", vmin=0.0, vmax=1.0, xlabel="target",
                          ylabel="source")
        md.image(p.name, "transferability matrix")
    if tr.get("mra"):
        t = tr["mra"]
        md.heading("Model robustness average (CLM eq. 6)", h + 1)
        md.table(["attack", "ε", "MRA (%)"],
                 [["benign", "–", fmt_pct(t["benign"])]] + [[e["label"], f"{e['eps']:g}", fmt_acc(e["mra"])]
                                                             for e in t["results"]])
    if tr.get("surrogate"):
        t = tr["surrogate"]
        md.heading("Transfer attacks from a surrogate", h + 1)
        md.para(f"Adversarial examples crafted on `{t['name']}`"
                f"{' (' + t['run_dir'] + ')' if t.get('run_dir') else ''}, "
                f"evaluated on this model (GAL Table 2).")
        headers = ["attack"] + [f"ε={e:g}" for e in t["eps"]]
        md.table(headers, [[r["label"]] + [fmt_acc(c["ensemble"]) for c in r["results"]] for r in t["rows"]])

    g = results.get("gradients")
    if g:
        md.heading("Gradient analysis", h + 1)
        if g.get("stats"):
            md.para(f"Concentration of {g['num_samples']} input-gradient samples per test example "
                    f"({g['num_examples']} examples; κ̂ with p = {g['dimension']}).")
            rows = []
            for name, st in g["stats"].items():
                q = st["quantiles"]
                rows.append([STAT_LABELS.get(name, name), fmt_num(st["mean"]), fmt_num(q["25%"]), fmt_num(q["50%"]),
                             fmt_num(q["75%"])])
            md.table(["statistic", "mean", "25%", "50%", "75%"], rows)
            p = plot_stat_histograms({m["name"]: {k: v["values"] for k, v in g["stats"].items() if "values" in v}},
                                     out_dir / f"{prefix}gradient_stats.png")
            md.image(p.name, "concentration statistics")
        elif g.get("skipped"):
            md.para(f"Concentration statistics skipped: {g['skipped']}.")
        if g.get("projection"):
            pr = g["projection"]
            p = plot_projection([{"label": m["name"], **pr}], out_dir / f"{prefix}projection.png",
                                title=f"{pr['num_samples']} gradient samples at test example {pr['example']}")
            md.image(p.name, "gradient projection")
        if g.get("cosine"):
            c = g["cosine"]
            p = plot_heatmaps([{"title": f"cosine of {c['num_samples']} gradient samples", "matrix": c["matrix"]}],
                              out_dir / f"{prefix}cosine_heatmap.png")
            md.para(f"Mean off-diagonal cosine at example {c['example']}: {fmt_num(c['off_diagonal_mean'])}.")
            md.image(p.name, "cosine heatmap")
        if g.get("diversity"):
            dv = g["diversity"]
            md.heading(f"Ensemble diversity (LPD §4, K = {dv['k']} {dv['source'].replace('_', ' ')})", h + 2)
            md.table(["measure", "25%", "50%", "75%"],
                     [["L_d = Σ cos(g_i, g_j)"] + [fmt_num(dv["l_d"][q]) for q in ("25%", "50%", "75%")],
                      ["L_s = Σ ‖g_k‖₂"] + [fmt_num(dv["l_s"][q]) for q in ("25%", "50%", "75%")]])
            md.para(f"Ambiguity entropy E (eq. 7) on clean test data: {fmt_num(dv['ambiguity_entropy'])}.")
        if g.get("gaas"):
            ga = g["gaas"]
            md.heading("GAAS with regular Hadamard directions (GAL §4.4)", h + 2)
            headers = ["ε"] + [f"k={k}: all / mean" for k in ga["ks"]]
            md.table(headers, [[f"{e:g}"] + [f"{fmt_pct(a)} / {fmt_pct(f)}"
                                             for a, f in zip(ga["all_k"][i], ga["fraction"][i])]
                               for i, e in enumerate(ga["eps"])])
            md.para(f"all = % of {ga['num_examples']} examples where all k orthogonal directions are adversarial; "
                    f"mean = % of directions adversarial.")
            p = plot_gaas([{"label": m["name"], **ga}], out_dir / f"{prefix}gaas.png")
            md.image(p.name, "GAAS")

    t = results.get("timing") or {}
    if t:
        md.heading("Timing", h + 1)
        md.para(", ".join(f"{k.removesuffix('_s')}: {v:.1f} s" for k, v in t.items()) +
                f" (device {results['device']}, {results['world_size']} rank(s), fastdiv {results['fastdiv_version']}, "
                f"torch {results['torch_version']}).")
    return md.text()


def write_report(results: dict, out_dir) -> Path:
    """Writes ``report.md`` and its PNGs into ``out_dir``; returns the report path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = render_evaluation(results, out_dir)
    path = out_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------
# Side-by-side comparison (the demo)
# ------------------------------------------------------------------------------------------------

def render_comparison(named: dict[str, dict], out_dir, *, title: str = "fastdiv comparison",
                      projection: dict | None = None, intro: str = "", links: dict[str, str] | None = None) -> str:
    """A side-by-side markdown report of several evaluations ``{name: results}`` with overlaid plots
    (accuracy vs ε, concentration histograms, GAAS) and side-by-side cosine heatmaps. ``projection``:
    ``{name: {'points', 'mean', 'rho', 'num_samples', 'example'}}`` on a common plane (GradDiv Fig. 4).
    ``links``: ``{name: relative path of that model's own report}``."""
    out_dir = Path(out_dir)
    md = Markdown()
    md.heading(title, 1)
    if intro:
        md.para(intro)
    names = list(named)

    # headline table: clean and per-row accuracy at every ε, one column per model
    first = named[names[0]]
    eps = first["table"]["eps"]
    headers = ["attack", "ε"] + names
    rows = [["None", "–"] + [fmt_acc(named[n]["clean"]["ensemble"]) for n in names]]
    labels = [r["label"] for r in first["table"]["rows"]] + ["Total"]
    for lbl in labels:
        for i, e in enumerate(eps):
            cells = []
            for n in names:
                t = named[n]["table"]
                row = t["total"] if lbl == "Total" else next((r for r in t["rows"] if r["label"] == lbl), None)
                cells.append(fmt_acc(row["results"][i]["ensemble"]) if row and i < len(row["results"]) else "–")
            rows.append([f"**{lbl}**" if lbl == "Total" else lbl, f"{e:g}"] + cells)
    md.heading("Robust accuracy (%), ensemble inference", 2)
    md.table(headers, rows)

    curves = [c for n in names for c in _curve_entries(named[n], label=n)]
    if curves:
        p = plot_accuracy_curves(curves, out_dir / "compare_accuracy_vs_eps.png",
                                 title=f"{first['curve']['label']} accuracy vs ε")
        md.image(p.name, "accuracy vs eps")

    md.heading("Gradient concentration", 2)
    stat_rows = []
    series = {}
    for n in names:
        g = named[n].get("gradients") or {}
        if g.get("stats"):
            series[n] = {k: v["values"] for k, v in g["stats"].items() if "values" in v}
    if series:
        for stat in ("kappa", "rho", "mean_cos", "dpp", "coherence"):
            stat_rows.append([STAT_LABELS[stat]] + [
                f"{fmt_num(named[n]['gradients']['stats'][stat]['mean'])} "
                f"(median {fmt_num(named[n]['gradients']['stats'][stat]['quantiles']['50%'])})"
                if n in series else "–" for n in names])
        md.para("Mean (median) over test examples; lower = more diverse gradients, which GradDiv is designed to get.")
        md.table(["statistic"] + names, stat_rows)
        p = plot_stat_histograms(series, out_dir / "compare_gradient_stats.png")
        md.image(p.name, "concentration statistics")
    if projection:
        sets = [{"label": n, **v} for n, v in projection.items()]
        ex = next(iter(projection.values()))
        p = plot_projection(sets, out_dir / "compare_projection.png",
                            title=f"{ex['num_samples']} gradient samples at test example {ex['example']}, "
                                  f"plane of the mean vectors")
        md.image(p.name, "gradient projection")
    panels = [{"title": n, "matrix": named[n]["gradients"]["cosine"]["matrix"]} for n in names
              if (named[n].get("gradients") or {}).get("cosine")]
    if panels:
        p = plot_heatmaps(panels, out_dir / "compare_cosine_heatmaps.png")
        md.image(p.name, "cosine heatmaps")
    gaas_series = [{"label": n, **named[n]["gradients"]["gaas"]} for n in names
                   if (named[n].get("gradients") or {}).get("gaas")]
    if gaas_series:
        p = plot_gaas(gaas_series, out_dir / "compare_gaas.png")
        md.image(p.name, "GAAS")

    tm = [{"title": n, "matrix": named[n]["transfer"]["sample_models"]["matrix"]} for n in names
          if ((named[n].get("transfer") or {}).get("sample_models"))]
    if tm:
        md.heading("Transferability between sample models", 2)
        md.table(["model", "off-diagonal mean", "min", "max"],
                 [[n, fmt_pct(named[n]["transfer"]["sample_models"]["off_diagonal_mean"]),
                   fmt_pct(named[n]["transfer"]["sample_models"]["off_diagonal_min"]),
                   fmt_pct(named[n]["transfer"]["sample_models"]["off_diagonal_max"])] for n in names
                  if (named[n].get("transfer") or {}).get("sample_models")])
        p = plot_heatmaps(tm, out_dir / "compare_transfer.png", vmin=0.0, vmax=1.0, xlabel="target", ylabel="source")
        md.image(p.name, "transferability")

    ids = [c["id"] for c in first["obfuscation"]["checks"]]
    if ids:
        md.heading("Gradient-obfuscation checklist", 2)
    rows = []
    for cid in ids:
        name = next(c["name"] for c in first["obfuscation"]["checks"] if c["id"] == cid)
        cells = []
        for n in names:
            c = next((c for c in named[n]["obfuscation"]["checks"] if c["id"] == cid), None)
            cells.append({"pass": "✅", "fail": "❌", "skipped": "–"}[c["status"]] if c else "–")
        rows.append([str(cid), name] + cells)
    if rows:
        md.table(["#", "check"] + names, rows, "ll" + "c" * len(names))
    if links:
        md.para("Full reports: " + ", ".join(f"[{n}]({p})" for n, p in links.items()) + ".")
    return md.text()
