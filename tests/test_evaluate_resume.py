"""``fastdiv evaluate --resume`` in-process (fastdiv/evaluate/partial.py): an evaluation interrupted after some table
units (a row at one ε) resumes from OUT/rows.partial.json without running them again and ends with the results of an
uninterrupted evaluation, plain rows and a protocol's cascade (whose survivor mask is restored from the saved rows)
alike; other settings are refused, a damaged partial file is computed again, and the file goes once results.json
is written. Outputs replace their previous versions whole."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fastdiv.errors import BadInputError
from fastdiv.evaluate import evaluate_model, stages
from fastdiv.nn import BayesLinear

pytestmark = pytest.mark.usefixtures("one_thread")

#: small settings; the gradient analysis and the checklist are off (they are not resumed, only the table is)
TINY = dict(steps=2, eot_samples=2, ensemble_samples=2, square_queries=5, analysis=False, checklist=False,
            transfer_models=0, quiet=True)


def _data(n=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(4, 1, 4, 4, generator=gen)
    y = torch.arange(n) % 4
    return (means[y] + 0.1 * torch.randn(n, 1, 4, 4, generator=gen)).clamp(0, 1), y


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.fixture(scope="module")
def bayes():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), BayesLinear(16, 8, sigma0=0.1), nn.ReLU(), BayesLinear(8, 4, sigma0=0.1))


def comparable(results: dict) -> dict:
    """results.json without what differs between two identical evaluations (the time it ran, how long)."""
    return {k: v for k, v in json.loads(json.dumps(results)).items() if k not in ("created", "timing")}


class Interrupt(Exception):
    """Stands for a kill right after a table unit was saved."""


def interrupted_after(monkeypatch, units: int) -> None:
    """The next evaluation stops once ``units`` table units are saved."""
    saved = []

    def stop(name: str) -> None:
        saved.append(name)
        if len(saved) == units:
            raise Interrupt

    monkeypatch.setattr(stages, "crash_point", stop)


def count_units(monkeypatch) -> list:
    """Records the (attack, ε) of every attack the table runs from now on."""
    calls = []
    real = stages.Context.attack

    def attack(self, name, form, eps, seed, sel=None, **kw):
        calls.append((name, eps))
        return real(self, name, form, eps, seed, sel=sel, **kw)

    monkeypatch.setattr(stages.Context, "attack", attack)
    return calls


@pytest.mark.parametrize("case", ["plain rows", "protocol cascade"])
def test_resumed_evaluation_matches_an_uninterrupted_one(tmp_path, monkeypatch, data, plain, bayes, case):
    if case == "plain rows":
        model, settings = plain, dict(attacks="fgsm,pgd,bim", eps=[0.1, 0.2], **TINY)
    else:  # EOT-APGD-CE then EOT-APGD-DLR, each on the survivors of the clean prediction and the row above
        model, settings = bayes, dict(protocol="autoattack-rand", deviations={"steps": 2, "eot_samples": 2,
                                                                               "ensemble_samples": 2},
                                      eps=[0.1, 0.3], quiet=True, analysis=False, checklist=False, transfer_models=0)
    reference = evaluate_model(model, data, out=tmp_path / "ref", **settings)
    units = len(reference["table"]["rows"]) * len(reference["table"]["eps"])

    out = tmp_path / "out"
    interrupted_after(monkeypatch, 3)
    with pytest.raises(Interrupt):
        evaluate_model(model, data, out=out, **settings)
    saved = json.loads((out / "rows.partial.json").read_text())
    assert len(saved["units"]) == 3 and not (out / "results.json").exists()

    monkeypatch.undo()
    calls = count_units(monkeypatch)
    resumed = evaluate_model(model, data, out=out, resume=True, **settings)
    assert len(calls) == units - 3  # the saved units are not run again
    assert comparable(resumed) == comparable(reference)
    assert comparable(json.loads((out / "results.json").read_text())) == comparable(reference)
    assert not (out / "rows.partial.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_other_settings_are_refused_and_a_damaged_file_is_recomputed(tmp_path, monkeypatch, data, plain, capsys):
    settings = dict(attacks="fgsm,pgd", eps=[0.1, 0.2], **TINY)
    out = tmp_path / "out"
    interrupted_after(monkeypatch, 2)
    with pytest.raises(Interrupt):
        evaluate_model(plain, data, out=out, **settings)
    monkeypatch.undo()
    partial = (out / "rows.partial.json").read_bytes()
    with pytest.raises(BadInputError, match=r"different settings \(steps\).*without --resume"):
        evaluate_model(plain, data, out=out, resume=True, **{**settings, "steps": 3})
    with pytest.raises(BadInputError, match="different model"):
        evaluate_model(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), data, out=out, resume=True, **settings)
    assert (out / "rows.partial.json").read_bytes() == partial  # a refusal leaves the saved rows as they were

    (out / "rows.partial.json").write_text('{"format": 1, "units": {"fgsm/pl')  # cut off (not by fastdiv)
    reference = evaluate_model(plain, data, out=tmp_path / "ref", **settings)
    capsys.readouterr()
    calls = count_units(monkeypatch)
    resumed = evaluate_model(plain, data, out=out, resume=True, quiet=False,
                             **{k: v for k, v in settings.items() if k != "quiet"})
    assert "partial results" in capsys.readouterr().err and len(calls) == 4
    assert comparable(resumed) == comparable(reference)


def test_resume_needs_an_output_directory(data, plain):
    with pytest.raises(BadInputError, match="give out"):
        evaluate_model(plain, data, resume=True, attacks="fgsm", eps=[0.1], **TINY)


def test_outputs_are_replaced_whole(tmp_path, monkeypatch, data, plain):
    """A disk that fills up while results.json is written leaves the previous results.json whole, no temp file, and
    the finished rows for --resume."""
    import fastdiv.runtime as runtime

    out = tmp_path / "out"
    evaluate_model(plain, data, out=out, attacks="fgsm", eps=[0.1], **TINY)
    before = (out / "results.json").read_bytes()
    real = runtime.write_temp

    def full_at_results(path, mode, write):
        if path.name != "results.json":
            return real(path, mode, write)

        def cut_off(fh):
            fh.write("{")
            raise OSError(28, "No space left on device")
        return real(path, mode, cut_off)

    monkeypatch.setattr(runtime, "write_temp", full_at_results)
    with pytest.raises(OSError, match="No space left"):
        evaluate_model(plain, data, out=out, attacks="fgsm", eps=[0.2], **TINY)
    assert (out / "results.json").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert (out / "rows.partial.json").exists()
