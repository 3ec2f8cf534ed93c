"""Named evaluation protocols (fastdiv/evaluate/protocols.py): what each fixes, the cascade (each attack only on
the points every earlier one left correct, rows cumulative), what results.json and the report say, bad names,
and the totals of autoattack-standard / autoattack-rand against AutoAttack's own (pyautoattack 0.2.0)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fastdiv.cli import main
from fastdiv.evaluate import EvalConfig, evaluate_model, validate_results
from fastdiv.evaluate.protocols import PROTOCOLS

from test_attacks import noisy_mlp, test_batch, trained_mlp

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

QUIET = dict(quiet=True, transfer_models=0, analysis=False)


def _test_set(n: int):
    return test_batch(n)


def test_list_protocols(capsys):
    assert main(["evaluate", "--list-protocols"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in PROTOCOLS)


def test_a_protocol_fixes_attacks_and_budgets():
    cfg = EvalConfig(protocol="autoattack-standard").check()
    assert cfg.attacks == ["apgd-ce", "apgd-t", "fab-t", "square"] and cfg.steps == 100
    assert cfg.square_queries == 5000 and cfg.ensemble_samples == 1 and cfg.forms == ["one"]
    rand = EvalConfig(protocol="autoattack-rand").check()
    assert rand.attacks == ["apgd-ce", "apgd-dlr"] and rand.eot_samples == 20 and rand.forms == ["mean"]
    assert EvalConfig(protocol="autoattack-standard", norm="l2", eps=[0.5]).check().attacks == [
        "apgd-ce", "apgd-t", "fab-t"]  # fastdiv's Square is l_inf only
    with pytest.raises(ValueError, match="unknown protocol 'autoattack'"):
        EvalConfig(protocol="autoattack").check()


@pytest.mark.parametrize("given, named", [({"steps": 3}, "steps 3 (the protocol's: 100)"),
                                          ({"attacks": "fgsm"}, "attacks fgsm"),
                                          ({"forms": "fixed,mean"}, "forms fixed,mean (the protocol's: one)"),
                                          ({"square_queries": 50, "steps": 7}, "steps 7")])
def test_a_setting_that_contradicts_the_protocol_is_refused(given, named):
    with pytest.raises(ValueError, match="protocol autoattack-standard fixes") as err:
        EvalConfig(protocol="autoattack-standard", **given).check()
    assert named in str(err.value) and "--deviations" in str(err.value)
    # the protocol's own value is not a contradiction
    assert EvalConfig(protocol="autoattack-standard", steps=100, attacks="apgd-ce,apgd-t,fab-t,square").check()


def test_a_declared_deviation_is_applied_and_recorded(tmp_path):
    cfg = EvalConfig(protocol="fastdiv-rand", deviations="square-queries=300, steps=4").check()
    assert (cfg.square_queries, cfg.steps, cfg.eot_samples) == (300, 4, 20)
    assert cfg.check().deviations == {"square_queries": 300, "steps": 4}  # checking twice changes nothing
    assert EvalConfig(protocol="fastdiv-rand", deviations={"steps": 4}, steps=4).check().steps == 4
    x, y = _test_set(12)
    res = evaluate_model(trained_mlp(), (x, y), protocol="autoattack-rand", eps=[0.1], out=tmp_path,
                         deviations={"steps": 2, "eot_samples": 3}, **QUIET)
    validate_results(json.loads((tmp_path / "results.json").read_text()))
    assert res["protocol"]["deviations"] == {"steps": {"protocol": 100, "used": 2},
                                             "eot_samples": {"protocol": 20, "used": 3}}
    assert res["table"]["rows"][0]["results"][0]["settings"]["steps"] == 2
    assert "**deviation**: steps 2 instead of 100" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("deviations, message", [
    ({"attacks": 2}, "'attacks' cannot deviate"), ("steps", "FIELD=VALUE pairs"), ("steps=x", "is not an int"),
    ({"steps": 0}, "steps must be an int >= 1"), ({"ensemble_samples": 5}, "does not fix ensemble_samples"),
    (["steps"], "must be a dict")])
def test_bad_deviations(deviations, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(protocol="fastdiv-rand", deviations=deviations).check()
    with pytest.raises(ValueError, match="only with a protocol"):
        EvalConfig(deviations={"steps": 3}).check()


def test_cli_refuses_a_typed_flag_against_the_protocol(tmp_path, capsys):
    """A typed flag is refused even when it repeats the flag's default (20 steps): the CLI knows it was typed."""
    code = main(["evaluate", str(tmp_path), "--protocol", "autoattack-rand", "--steps", "20", "--no-analysis"])
    err = capsys.readouterr().err
    assert code == 2 and "--steps 20 (the protocol's: 100)" in err and "Traceback" not in err
    assert main(["evaluate", str(tmp_path), "--protocol", "autoattack-rand", "--deviations", "steps=20",
                 "--steps", "20"]) == 2  # passes the protocol check, then: no run in tmp_path
    assert "fixes" not in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_standard_protocol_runs_as_a_cascade(tmp_path):
    x, y = _test_set(40)
    res = evaluate_model(trained_mlp(), (x, y), protocol="autoattack-standard", eps=[0.1], out=tmp_path, **QUIET)
    validate_results(json.loads((tmp_path / "results.json").read_text()))
    assert res["protocol"]["name"] == "autoattack-standard" and res["protocol"]["cascade"]
    rows = res["table"]["rows"]
    assert [r["label"] for r in rows] == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    assert rows[1]["results"][0]["settings"]["n_target_classes"] == 9 and rows[0]["results"][0]["settings"][
        "steps"] == 100
    assert rows[3]["results"][0]["settings"]["n_queries"] == 5000
    accs = [r["results"][0]["ensemble"]["mean"] for r in rows]
    clean = res["clean"]["ensemble"]["mean"]
    # cumulative: never above the row before (or the clean accuracy), the last row is the Total
    assert all(b <= a for a, b in zip([clean, *accs], accs)) and accs[-1] == res["table"]["total"]["results"][0][
        "ensemble"]["mean"]
    assert accs[-1] < clean - 0.3 and all(f"table_{r['key']}_s" in res["timing"] for r in rows)
    checks = {c["id"]: c for c in res["obfuscation"]["checks"]}
    assert "not judged under protocol" in checks[1]["detail"] and "not judged" in checks[2]["detail"]
    assert "protocol: **autoattack-standard**" in (tmp_path / "report.md").read_text()


def test_the_cascade_attacks_only_the_survivors(monkeypatch):
    """Each row's attack sees only the examples still correct after the rows above it."""
    from fastdiv.evaluate import stages

    seen = []
    real = stages.Context.attack

    def spy(self, name, form, eps, seed, sel=None, **kw):
        seen.append((name, None if sel is None else sel.numel()))
        return real(self, name, form, eps, seed, sel=sel, **kw)

    monkeypatch.setattr(stages.Context, "attack", spy)
    x, y = _test_set(30)
    res = evaluate_model(trained_mlp(), (x, y), protocol="autoattack-rand", eps=[0.1], deviations={"steps": 5},
                         **QUIET)
    clean_correct = round(res["clean"]["ensemble"]["mean"] * 30)
    after_ce = round(res["table"]["rows"][0]["results"][0]["ensemble"]["mean"] * 30)
    table = [s for s in seen if s[0] in ("apgd-ce", "apgd-dlr")][:2]
    assert table == [("apgd-ce", clean_correct), ("apgd-dlr", after_ce)]


def test_rand_protocol_on_a_noise_model_uses_eot():
    x, y = _test_set(30)
    res = evaluate_model(noisy_mlp(0.3), (x, y), protocol="fastdiv-rand", eps=[0.1], **QUIET)
    assert res["model"]["stochastic"]
    assert [r["label"] for r in res["table"]["rows"]] == ["EOT-APGD-CE", "EOT-APGD-DLR", "EOT-Square"]
    assert res["table"]["rows"][0]["results"][0]["settings"]["eot_samples"] == 20
    assert res["settings"]["ensemble_samples"] == EvalConfig().ensemble_samples  # fastdiv-rand keeps the ensemble


def _binomial_slack(p: float, n: int) -> float:
    return 2 * math.sqrt(max(p * (1 - p), 0.01) / n)


@pytest.mark.parametrize("protocol, version, model", [("autoattack-standard", "standard", "plain"),
                                                      ("autoattack-rand", "rand", "noisy")])
def test_totals_at_most_autoattacks(protocol, version, model):
    """fastdiv's protocol total is within sampling noise of AutoAttack's version, or below (never clearly
    weaker), on the digits MLP (deterministic for 'standard', with input and hidden noise for 'rand')."""
    aa = pytest.importorskip("pyautoattack", reason="AutoAttack's package: pip install --no-deps pyautoattack==0.2.0")
    x, y = _test_set(100)
    net = trained_mlp() if model == "plain" else noisy_mlp(0.3)
    net.eval()
    with torch.random.fork_rng():  # AutoAttack seeds the global RNG
        adversary = aa.AutoAttack(net, eps=0.1, norm="Linf", version=version, seed=0)
        adversary.verbose = False
        x_adv = adversary.run_standard_evaluation(x, y, batch_size=100)
        if isinstance(x_adv, tuple):  # this version returns (x_adv, y_adv)
            x_adv = x_adv[0]
        with torch.no_grad():
            theirs = (net(x_adv).argmax(1) == y).float().mean().item()
    res = evaluate_model(net, (x, y), protocol=protocol, eps=[0.1], **QUIET)
    ours = res["table"]["total"]["results"][0]["ensemble"]["mean"]
    assert ours <= theirs + _binomial_slack(theirs, 100) + 1 / 100, (protocol, ours, theirs)
