"""``fastdiv reproduce``: the verdict rule, the claim registry, the command line and the quick pipeline end to
end (tiny training on digits: it checks the machinery, its verdicts mean nothing)."""
from __future__ import annotations

import json
import math

import pytest

from fastdiv.cli import main
from fastdiv.presets import PRESETS
from fastdiv.reproduce import CLAIMS, MEASURES, MIN_SEEDS, SIZES, judge, resolve_claims
from fastdiv.reproduce.verdict import MIN_SEEDS as _MIN


def test_min_seeds_is_exported():
    assert MIN_SEEDS == _MIN == 3


@pytest.mark.parametrize("defense, baseline, better, verdict", [
    ([0.2, 0.25, 0.22], [0.6, 0.62, 0.65], "lower", "reproduced"),
    ([0.2, 0.25, 0.22], [0.6, 0.62, 0.65], "higher", "not reproduced"),
    ([0.5, 0.7, 0.3], [0.5, 0.5, 0.5], "higher", "inconclusive"),  # the spread covers zero
    ([0.9, 0.9], [0.1, 0.1], "higher", "inconclusive"),  # two seeds: no verdict, however large the effect
    ([0.9], [0.1], "higher", "inconclusive"),
])
def test_verdicts(defense, baseline, better, verdict):
    out = judge(defense, baseline, better)
    assert out["verdict"] == verdict and out["seeds"] == len(defense)
    assert out["effect"] == pytest.approx(sum(defense) / len(defense) - sum(baseline) / len(baseline))
    if len(defense) >= 2:
        effects = [a - b for a, b in zip(defense, baseline)]
        mean = sum(effects) / len(effects)
        sd = math.sqrt(sum((e - mean) ** 2 for e in effects) / (len(effects) - 1))
        assert out["spread"] == pytest.approx(sd) and out["standard_error"] == pytest.approx(sd / len(effects) ** .5)


def test_verdict_bad_input_and_non_finite():
    assert judge([float("nan"), 1, 1], [0, 0, 0], "higher")["verdict"] == "inconclusive"
    with pytest.raises(ValueError, match="better must be"):
        judge([1], [0], "up")
    with pytest.raises(ValueError, match="one defense and one baseline number per seed"):
        judge([1, 2], [0], "higher")


def test_registry_is_consistent():
    assert len({c.id for c in CLAIMS}) == len(CLAIMS)
    papers = {c.paper for c in CLAIMS}
    assert papers == {"graddiv", "gal", "clm", "lpd", "d3"}
    for c in CLAIMS:
        assert c.metric in MEASURES and c.better in ("higher", "lower")
        for arm in (c.defense, c.baseline, *c.defense.needs, *c.baseline.needs):
            assert arm.preset in PRESETS, (c.id, arm.preset)
    assert [c.id for c in resolve_claims(["clm"])] == ["clm-mra", "clm-member-transfer"]
    assert [c.id for c in resolve_claims(["gal-coherence", "gal"])][0] == "gal-coherence"
    with pytest.raises(ValueError, match="unknown claim 'nope'"):
        resolve_claims(["nope"])
    assert set(SIZES) == {"quick", "standard"}


def test_cli_list_and_bad_input(capsys, tmp_path):
    assert main(["reproduce", "--list"]) == 0
    printed = capsys.readouterr().out
    assert all(c.id in printed for c in CLAIMS)
    assert main(["reproduce", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "unknown claim 'nope'" in capsys.readouterr().err
    assert main(["reproduce", "--quick", "--dataset", "mnist5k", "--out", str(tmp_path / "r")]) == 2
    assert "quick size runs on ['digits']" in capsys.readouterr().err
    assert main(["reproduce", "--quick", "--seeds", "0", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_quick_reproduction_end_to_end(tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["reproduce", "--quick", "--seeds", "1", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "reproduction.json").read_text())
    assert [c["id"] for c in report["claims"]] == [c.id for c in CLAIMS]
    for c in report["claims"]:
        assert c["verdict"] == "inconclusive" and "1 seed" in c["reason"]  # one seed never gives a verdict
        assert all(math.isfinite(v) for v in c["measured"]["defense"] + c["measured"]["baseline"]), c["id"]
    text = (out / "reproduction.md").read_text()
    assert text.startswith("# fastdiv reproduce") and all(f"`{c.id}`" in text for c in CLAIMS)
    # every trained run is described: best.pt's epoch, and the posterior sigma of the Bayesian ones
    diag = report["diagnostics"]
    assert set(diag) == set(report["timing"])
    for d in diag.values():
        assert 1 <= d["best_epoch"] <= d["epochs"] and 0 <= d["best_val_acc"] <= 1
    sig = diag["advbnn-s0"]["posterior_sigma"]
    assert 0 < sig["min"] <= sig["q05"] <= sig["median"] <= sig["q95"] <= sig["max"] and sig["sigma0"] > 0
    assert "posterior_sigma" not in diag["ensemble-s0"]  # deterministic members
    assert "## Trained models" in text and "advbnn-s0" in text
    # a second call reuses the trained runs and the evaluations
    best = out / "runs" / "digits-quick" / "advbnn-s0" / "best.pt"
    stamp = best.stat().st_mtime_ns
    assert not any(t["run_reused"] for t in report["timing"].values())
    assert main(["reproduce", "graddiv-mrl", "--quick", "--seeds", "1", "--quiet", "--out", str(out)]) == 0
    assert best.stat().st_mtime_ns == stamp
    assert all(t["run_reused"] for t in json.loads((out / "reproduction.json").read_text())["timing"].values())
    assert [c["id"] for c in json.loads((out / "reproduction.json").read_text())["claims"]] == ["graddiv-mrl"]
