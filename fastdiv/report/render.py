"""The report of one evaluation (``report.md`` beside ``results.json``) and the side-by-side comparison
of several (``fastdiv demo``)."""
from __future__ import annotations

from pathlib import Path

from ..runtime import atomic_write_text
from .markdown import Markdown, fmt_acc, fmt_num, fmt_pct
from .plots import STAT_LABELS, plot_accuracy_curves, plot_gaas, plot_heatmaps, plot_projection, plot_stat_histograms


def _eps_axis(results: dict) -> str:
    return "ε (ℓ2)" if results["settings"].get("norm") == "l2" else "ε (ℓ∞)"


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
            f"attacks: {_settings_line(results)}; "
            f"{'ℓ2' if results['settings'].get('norm') == 'l2' else 'ℓ∞'}, inputs clipped to [0, 1]"]
    if run.get("run_dir"):
        info.insert(0, f"run: `{run['run_dir']}` ({run.get('which', 'best')} checkpoint)")
    if results.get("command"):
        info.append(f"command: `{results['command']}`")
    if m.get("randomness"):
        info.insert(1, f"randomness: {m['randomness']}")
    if results.get("protocol"):
        p = results["protocol"]
        timing = results.get("timing", {})
        seconds = [(r["label"], timing.get("table_" + r["key"] + "_s")) for r in results["table"]["rows"]]
        times = ", ".join(f"{label} {s:.0f} s" for label, s in seconds if s is not None)
        deviated = "".join(f"; **deviation**: {k} {d['used']} instead of {d['protocol']}"
                           for k, d in (p.get("deviations") or {}).items())
        info.insert(0, f"protocol: **{p['name']}**: {p['description']}{deviated}; each row counts what it and every "
                       f"row above it broke (time per attack: {times})")
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
                                 title=f"{results['curve']['label']} accuracy vs ε", xlabel=_eps_axis(results))
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
    atomic_write_text(text, path)  # the previous report stays whole until the new one is complete
    return path


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
                                 title=f"{first['curve']['label']} accuracy vs ε", xlabel=_eps_axis(first))
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
