"""``fastdiv demo --quick`` end to end: trains both presets on synthetic data, evaluates them and writes
the side-by-side report (tiny settings; the full demo is measured in benchmarks/RESULTS.md)."""
from __future__ import annotations

import json

import pytest

from fastdiv.cli import main
from fastdiv.demo import DEMO_PRESETS
from fastdiv.evaluate import validate_results


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "[1/5] training advbnn" in printed and "report:" in printed
    report = (out / "report.md").read_text()
    assert report.startswith("# fastdiv demo")
    assert "protocol `fastdiv-rand`" in report and "square queries 10 instead of the protocol's 5000" in report
    for preset in DEMO_PRESETS:
        assert f"| {preset} |" in report or f" {preset} |" in report
        res = json.loads((out / preset / "results.json").read_text())
        validate_results(res)
        assert res["model"]["name"] == preset and res["model"]["stochastic"]
        assert [r["label"] for r in res["table"]["rows"]] == ["EOT-APGD-CE", "EOT-APGD-DLR", "EOT-Square"]
        assert res["protocol"]["name"] == "fastdiv-rand" and res["protocol"]["deviations"]["square_queries"] == {
            "protocol": 5000, "used": 10}
        assert (out / preset / "report.md").is_file()
        assert (out / "runs" / preset / "best.pt").is_file()
    for png in ("compare_accuracy_vs_eps.png", "compare_gradient_stats.png", "compare_projection.png",
                "compare_cosine_heatmaps.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report
    summary = json.loads((out / "demo.json").read_text())
    assert summary["quick"] is True and set(summary["models"]) == set(DEMO_PRESETS)
    assert summary["timing"]["total_s"] > 0


def test_demo_rejects_bad_epochs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--epochs", "0", "--out", str(out)]) == 2
    assert "epochs: must be an int >= 1" in capsys.readouterr().err
    assert not out.exists()
