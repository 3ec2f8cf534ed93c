"""Markdown tables and PNG plots for ``fastdiv evaluate`` and ``fastdiv demo``.

Every figure and table is drawn from a results dictionary (the content of ``results.json``, see
:mod:`fastdiv.evaluate`), so a report can be re-rendered from a saved file:

    >>> import json, fastdiv.report as R
    >>> results = json.load(open("run/eval/results.json"))
    >>> R.write_report(results, "run/eval")          # report.md + PNGs

Plots use matplotlib's Agg backend (no display needed). Accuracies are stored as fractions and shown
as percentages with two decimals, as in GradDiv's Table 1.

The modules: :mod:`.markdown` (formats, tables, the document builder), :mod:`.plots` (the PNGs) and
:mod:`.render` (one evaluation's report, the side-by-side comparison). Every name is importable from
``fastdiv.report``.
"""
from .markdown import Markdown, fmt_acc, fmt_num, fmt_pct, md_table
from .plots import (
    STAT_LABELS,
    plot_accuracy_curves,
    plot_gaas,
    plot_heatmaps,
    plot_projection,
    plot_stat_histograms,
)
from .render import render_comparison, render_evaluation, write_report

__all__ = [
    "Markdown", "md_table", "fmt_pct", "fmt_acc", "fmt_num", "plot_accuracy_curves", "plot_stat_histograms",
    "plot_projection", "plot_heatmaps", "plot_gaas", "render_evaluation", "write_report", "render_comparison",
    "STAT_LABELS",
]
