"""Tests of fastdiv/report/: markdown helpers against literal expectations, every plot written as a
non-empty PNG, a report re-rendered from a saved results.json, and the side-by-side comparison."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fastdiv import report as R
from fastdiv.evaluate import evaluate_model
from fastdiv.nn import BayesLinear

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    blob = path.read_bytes()
    return blob.startswith(PNG_MAGIC) and len(blob) > 1000


def test_md_table_and_formats():
    assert R.md_table(["a", "b"], [[1, "x|y"], ["z", 2.5]]) == (
        "| a | b |\n| :--- | ---: |\n| 1 | x\\|y |\n| z | 2.5 |")
    with pytest.raises(ValueError, match="a row has 1 cells, the header 2"):
        R.md_table(["a", "b"], [[1]])
    assert R.fmt_pct(0.6334, 0.012) == "63.34 ± 1.20"
    assert R.fmt_pct(None) == "–"
    assert R.fmt_acc({"mean": 0.5, "std": 0.0, "values": [0.5]}) == "50.00"
    assert R.fmt_acc({"mean": 0.5, "std": 0.1, "values": [0.4, 0.6]}) == "50.00 ± 10.00"
    assert R.fmt_num(None) == "–" and R.fmt_num(3) == "3" and R.fmt_num(1e-5) == "1.00e-05"
    md = R.Markdown().heading("T", 1).para("p").bullets(["x"]).image("a.png", "alt").code("c")
    assert md.text() == "# T\n\np\n\n- x\n\n![alt](a.png)\n\n```\nc\n```\n"


def test_plots_are_written(tmp_path):
    gen = torch.Generator().manual_seed(0)
    paths = [
        R.plot_accuracy_curves([{"label": "a", "eps": [0, 0.1, 0.2], "mean": [0.9, 0.5, 0.1], "std": [0, 0.05, 0.01]},
                                {"label": "b", "eps": [0, 0.1], "mean": [0.8, 0.6], "std": [0, 0]}],
                               tmp_path / "curve.png"),
        R.plot_stat_histograms({"a": {"kappa": (torch.rand(50, generator=gen) * 1e4 + 1).tolist(),
                                      "rho": torch.rand(50, generator=gen).tolist()},
                                "b": {"kappa": [5.0] * 10, "rho": [0.5] * 10}}, tmp_path / "hist.png"),
        R.plot_projection([{"label": "a", "points": torch.randn(20, 2, generator=gen).tolist(), "mean": [0.3, 0.1],
                            "rho": 0.32}], tmp_path / "proj.png"),
        R.plot_heatmaps([{"title": "x", "matrix": torch.eye(4).tolist()},
                         {"title": "y", "matrix": torch.ones(4, 4).tolist()}],
                        tmp_path / "heat.png"),
        R.plot_gaas([{"label": "a", "ks": [4, 16], "eps": [0.1, 0.2], "all_k": [[0.5, 0.1], [0.9, 0.4]]}],
                    tmp_path / "gaas.png"),
    ]
    for p in paths:
        assert _is_png(p), p


@pytest.fixture(scope="module")
def two_results():
    gen = torch.Generator().manual_seed(2)
    means = torch.rand(3, 1, 4, 4, generator=gen)
    y = torch.arange(18) % 3
    x = (means[y] + 0.1 * torch.randn(18, 1, 4, 4, generator=gen)).clamp(0, 1)
    out = {}
    for i, name in enumerate(("first", "second")):
        torch.manual_seed(i)
        model = nn.Sequential(nn.Flatten(), BayesLinear(16, 8), nn.ReLU(), BayesLinear(8, 3))
        out[name] = evaluate_model(model, (x, y), attacks="fgsm,pgd", eps=[0.1, 0.2], forms="mean", steps=2,
                                   eot_samples=2, ensemble_samples=3, grad_samples=4, gaas_examples=4, gaas_k=(4,),
                                   random_samples=2, transfer_models=2, quiet=True)
    return out


def test_report_rerendered_from_json(two_results, tmp_path):
    res = json.loads(json.dumps(two_results["first"]))
    path = R.write_report(res, tmp_path)
    text = path.read_text()
    assert text.startswith("# fastdiv evaluation: Sequential")
    assert "| EOT-PGD |" in text and "| **Total** |" in text
    # the robust-accuracy cell of EOT-PGD at the first ε, formatted from the numbers
    pgd = next(r for r in res["table"]["rows"] if r["label"] == "EOT-PGD")
    assert f"| EOT-PGD | {R.fmt_acc(pgd['results'][0]['ensemble'])} |" in text
    for png in tmp_path.glob("*.png"):
        assert _is_png(png) and f"]({png.name})" in text
    assert len(list(tmp_path.glob("*.png"))) == 6


def test_render_comparison(two_results, tmp_path):
    proj = {n: {"points": [[0.5, 0.1], [0.4, -0.2]], "mean": [0.45, -0.05], "rho": 0.45, "num_samples": 2, "example": 0}
            for n in two_results}
    text = R.render_comparison(two_results, tmp_path, title="cmp", projection=proj, intro="hello",
                               links={"first": "first/report.md"})
    assert text.startswith("# cmp\n\nhello")
    assert "| attack | ε | first | second |" in text
    assert "[first](first/report.md)" in text
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["compare_accuracy_vs_eps.png", "compare_cosine_heatmaps.png", "compare_gaas.png",
                     "compare_gradient_stats.png", "compare_projection.png", "compare_transfer.png"]
    for n in names:
        assert _is_png(tmp_path / n) and f"]({n})" in text
