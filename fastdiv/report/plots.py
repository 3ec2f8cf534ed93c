"""The PNG plots of the reports, each drawn from plain lists (as stored in ``results.json``) with
matplotlib's Agg backend (no display needed); each function returns the path it wrote."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

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


def _save(fig, path) -> Path:
    """Writes ``fig`` as a PNG to ``path`` atomically (rendered in memory, then written and renamed), so a
    kill leaves the previous plot or the new one, never half of one."""
    import io

    from ..runtime import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        _plt().close(fig)
    atomic_write_bytes(buffer.getvalue(), path)
    return path


def plot_accuracy_curves(curves: Sequence[dict], path, *, title: str = "Accuracy vs ε", xlabel: str = "ε (ℓ∞)"
                         ) -> Path:
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
    ax.set_xlabel(xlabel)
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
