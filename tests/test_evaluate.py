"""Tests of ``fastdiv evaluate`` (fastdiv/evaluate/, fastdiv/analysis/): the pipeline end to end on
tiny models, the results schema, the Total row, the gradient-obfuscation checklist on a gradient-masking
model and on a plain one, the plots, bad input, the flags generated from EvalConfig, sharding across
ranks and the merge of the ranks' results, and the analysis primitives against hand computations."""
from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
from torch import nn

import fastdiv
from fastdiv import analysis as A
from fastdiv.evaluate import (
    RESULTS_SCHEMA,
    EvalConfig,
    decode_flags,
    evaluate,
    evaluate_model,
    parse_eps,
    validate_results,
)
from fastdiv.evaluate.protocols import PROTOCOLS
from fastdiv.nn import BayesLinear, Ensemble

#: settings small enough for a 2-core machine: a few steps, few samples, few examples
TINY = dict(steps=3, eot_samples=2, ensemble_samples=4, square_queries=10, grad_samples=6, gaas_examples=8,
            gaas_k=(4, 16), random_samples=4, transfer_models=2, quiet=True)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _data(n=32, classes=4, seed=1, noise=0.1):
    """Four well-separated classes of 1x8x8 images in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(classes, 1, 8, 8, generator=gen)
    y = torch.arange(n) % classes
    x = (means[y] + noise * torch.randn(n, 1, 8, 8, generator=gen)).clamp(0, 1)
    return x, y


def _fit(model, x, y, steps=150):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


class Quantize(nn.Module):
    """A non-differentiable front end: round to 4 levels. Its gradient is zero almost everywhere, so
    every gradient attack is blind: the textbook case of gradient masking."""

    def forward(self, x):
        return torch.round(x * 4) / 4


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def plain(data):
    torch.manual_seed(0)
    return _fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)), *data)


@pytest.fixture(scope="module")
def bayes(data):
    torch.manual_seed(0)
    return _fit(nn.Sequential(nn.Flatten(), BayesLinear(64, 16, sigma0=0.1), nn.ReLU(), BayesLinear(16, 4, sigma0=0.1)),
                *data)


@pytest.fixture(scope="module")
def bayes_results(bayes, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    res = evaluate_model(bayes, data, attacks="fgsm,pgd,square", eps=[0.1, 0.3], repeats=2, curve_eps="0.2", out=out,
                         **TINY)
    return res, out


def _flags(cell, key="correct"):
    return torch.stack([decode_flags(s) for s in cell[key]])


# ------------------------------------------------------------------------------------------------
# The pipeline end to end
# ------------------------------------------------------------------------------------------------


def test_pipeline_randomized_model(bayes_results, data):
    res, out = bayes_results
    validate_results(res)
    n = data[0].shape[0]
    assert res["model"]["stochastic"] is True and res["data"]["num_examples"] == n
    labels = [r["label"] for r in res["table"]["rows"]]
    assert labels == ["FGSM", "EOT¹-FGSM", "EOT-FGSM", "PGD", "EOT¹-PGD", "EOT-PGD", "Square", "EOT¹-Square",
                      "EOT-Square"]
    pgd = next(r for r in res["table"]["rows"] if r["label"] == "EOT-PGD")
    # every number comes with the attack settings that produced it
    assert pgd["results"][1]["settings"] == {"eps": 0.3, "eot": "mean", "eot_samples": 2, "steps": 3,
                                             "alpha": pytest.approx(0.075)}
    for row in res["table"]["rows"] + [res["table"]["total"]]:
        for cell in row["results"]:
            ens, worst = _flags(cell), _flags(cell, "worst_correct")
            assert ens.shape == (2, n)
            # each reported accuracy is the mean of its per-example flags (per repeat), mean ± std over repeats
            per_rep = ens.float().mean(1).double()
            assert cell["ensemble"]["values"] == pytest.approx(per_rep.tolist(), abs=1e-6)
            assert cell["ensemble"]["mean"] == pytest.approx(float(per_rep.mean()), abs=1e-6)
            assert cell["ensemble"]["std"] == pytest.approx(float(per_rep.std()), abs=1e-6)
            # all sample models right implies the mean softmax is right: worst case ⊆ ensemble
            assert not (worst & ~ens).any()
    # the curve starts at the clean accuracy and contains the table's EOT-PGD points
    pts = res["curve"]["points"]
    assert [p["eps"] for p in pts] == [0.0, 0.1, 0.2, 0.3]  # the table's ε plus the extra --curve-eps point
    assert pts[0]["ensemble"] == res["clean"]["ensemble"]
    assert pts[3]["ensemble"] == pgd["results"][1]["ensemble"]
    assert len(pts[2]["ensemble"]["values"]) == 2
    g = res["gradients"]
    assert g["num_samples"] == 6 and g["num_examples"] == n and g["dimension"] == 64
    assert set(g["stats"]) == set(A.STAT_NAMES)
    assert all(0 <= v <= 1 + 1e-6 for v in g["stats"]["rho"]["values"])
    assert len(g["projection"]["points"]) == 6 and len(g["cosine"]["matrix"]) == 6
    assert g["diversity"]["k"] == 3 and 0 <= g["diversity"]["ambiguity_entropy"] <= 1
    assert g["gaas"]["ks"] == [4, 16] and g["gaas"]["num_examples"] == 8
    tm = res["transfer"]["sample_models"]
    assert tm["k"] == 2 and tm["source"] == "sample_models" and len(tm["matrix"]) == 2
    assert [c["id"] for c in res["obfuscation"]["checks"]] == [1, 2, 3, 4, 5]


def test_total_row_is_per_example_minimum(bayes_results):
    res, _ = bayes_results
    clean = _flags(res["clean"])
    clean_worst = _flags(res["clean"], "worst_correct")
    for ei, eps in enumerate(res["table"]["eps"]):
        expect, expect_worst = clean.clone(), clean_worst.clone()
        for row in res["table"]["rows"]:
            expect &= _flags(row["results"][ei])
            expect_worst &= _flags(row["results"][ei], "worst_correct")
        total = res["table"]["total"]["results"][ei]
        assert torch.equal(_flags(total), expect), eps
        assert torch.equal(_flags(total, "worst_correct"), expect_worst), eps
        assert total["ensemble"]["mean"] <= min(r["results"][ei]["ensemble"]["mean"] for r in res["table"]["rows"])
    # the strongest attack at the large ε actually does something on this model
    assert res["table"]["total"]["results"][1]["ensemble"]["mean"] < res["clean"]["ensemble"]["mean"]


def test_outputs_written(bayes_results):
    res, out = bayes_results
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    validate_results(saved)
    report = (out / "report.md").read_text()
    assert "| **Total** |" in report and "EOT¹-PGD" in report and "obfuscation" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["accuracy_vs_eps.png", "cosine_heatmap.png", "gaas.png", "gradient_stats.png", "projection.png",
                    "transfer_matrix.png"]
    for name in pngs:
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 2000, name
        assert f"]({name})" in report, f"{name} not embedded in report.md"


def test_deterministic_model_has_plain_rows_only(plain, data):
    res = evaluate_model(plain, data, attacks="fgsm,pgd", eps=[0.1], forms="fixed,mean", per_example=False, **TINY)
    validate_results(res)
    assert [r["label"] for r in res["table"]["rows"]] == ["FGSM", "PGD"]
    assert "correct" not in res["clean"] and "correct" not in res["table"]["rows"][0]["results"][0]
    assert res["model"]["stochastic"] is False
    assert res["gradients"]["stats"] is None and "deterministic" in res["gradients"]["skipped"]
    assert res["transfer"]["sample_models"] is None
    # one sample model: the worst case equals the ensemble prediction
    for row in res["table"]["rows"]:
        assert row["results"][0]["ensemble"] == row["results"][0]["worst_case"]


def test_schema_rejects_broken_results(bayes_results):
    res, _ = bayes_results
    assert RESULTS_SCHEMA["properties"]["schema_version"]["enum"] == [1]

    def broken(edit):
        r = json.loads(json.dumps(res))
        edit(r)
        return r

    cases = {
        "missing required key 'table'": lambda r: r.pop("table"),
        "> maximum 1": lambda r: r["clean"]["ensemble"].__setitem__("mean", 1.5),
        "expected 2 strings of 32 flags": lambda r: r["table"]["rows"][0]["results"][0]["correct"].__setitem__(0, "01"),
        "one cell per ε": lambda r: r["table"]["rows"][0]["results"].pop(),
        "is not one of ['pass', 'fail', 'skipped']":
            lambda r: r["obfuscation"]["checks"][0].__setitem__("status", "ok"),
        "expected boolean": lambda r: r["model"].__setitem__("stochastic", "yes"),
        "does not match": lambda r: r["clean"]["correct"].__setitem__(0, "2" * 32),
    }
    for message, edit in cases.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            validate_results(broken(edit))


# ------------------------------------------------------------------------------------------------
# The gradient-obfuscation checklist
# ------------------------------------------------------------------------------------------------


CHECK_SETTINGS = dict(attacks="fgsm,pgd,square", eps=[0.1, 0.3], steps=10, square_queries=100, random_samples=20,
                      analysis=False, transfer_models=0, quiet=True)


def test_checklist_quiet_on_plain_model(plain, data):
    res = evaluate_model(plain, data, **CHECK_SETTINGS)
    status = {c["id"]: c["status"] for c in res["obfuscation"]["checks"]}
    assert status == {1: "pass", 2: "pass", 3: "pass", 4: "pass", 5: "pass"}, res["obfuscation"]["checks"]
    assert res["obfuscation"]["passed"] is True


def test_checklist_fires_on_gradient_masking(plain, data):
    masked = nn.Sequential(Quantize(), plain)
    res = evaluate_model(masked, data, **CHECK_SETTINGS)
    checks = {c["id"]: c for c in res["obfuscation"]["checks"]}
    assert res["clean"]["ensemble"]["mean"] > 0.9
    # the black-box Square attack beats every (blind) white-box attack
    assert checks[2]["status"] == "fail" and "Square" in checks[2]["detail"]
    # an unbounded I-FGSM cannot leave the clean point
    assert checks[3]["status"] == "fail" and checks[3]["numbers"]["success"] < 0.1
    # nor does accuracy fall with ε
    assert checks[5]["status"] == "fail"
    assert res["obfuscation"]["passed"] is False


def _flags_of(*accs, n=100):
    """[1, n] bool rows with the given accuracies (first k examples correct)."""
    return [torch.arange(n).lt(round(a * n)).unsqueeze(0) for a in accs]


def test_checklist_logic_hand_made():
    clean, fgsm, pgd, square = _flags_of(0.9, 0.3, 0.5, 0.6)
    rows = {"f": {"attack": "fgsm", "eps": 0.1, "correct": fgsm, "label": "FGSM"},
            "p": {"attack": "pgd", "eps": 0.1, "correct": pgd, "label": "PGD"},
            "s": {"attack": "square", "eps": 0.1, "correct": square, "label": "Square"}}
    unb = {"label": "I-FGSM", "eps": 1.0, "correct": torch.zeros(100, dtype=torch.bool)}
    found = torch.zeros(100, dtype=torch.bool)
    found[:5] = True  # random search breaks 5 of the examples every gradient attack missed
    rnd = {"label": "all", "samples": 10, "per_eps": [(0.1, fgsm[0], found)]}
    checks = {c["id"]: c for c in A.obfuscation_checklist(rows=rows, clean=clean, curve=[(0.1, fgsm)], unbounded=unb,
                                                          random=rnd)}
    # FGSM (30%) beats PGD (50%) by 20 pp: one-step stronger than iterative
    assert checks[1]["status"] == "fail"
    assert checks[1]["numbers"][0]["difference"] == pytest.approx(0.2)
    assert checks[2]["status"] == "pass"  # Square 60% ≥ best white-box 30%
    assert checks[3]["status"] == "pass" and checks[3]["numbers"]["success"] == 1.0
    assert checks[4]["status"] == "fail" and checks[4]["numbers"][0]["found_by_random"] == 5
    assert checks[5]["status"] == "pass"
    # within the margin: a 0.5 pp difference on 100 examples is noise
    _, pgd2 = _flags_of(0.3, 0.305, n=1000)
    fgsm2, _ = _flags_of(0.3, 0.305, n=1000)
    rows2 = {"f": {"attack": "fgsm", "eps": 0.1, "correct": fgsm2}, "p": {"attack": "pgd", "eps": 0.1, "correct": pgd2}}
    c2 = A.obfuscation_checklist(rows=rows2, clean=torch.ones(1, 1000, dtype=torch.bool), curve=None, unbounded=None,
                                 random=None)
    assert [c["status"] for c in c2] == ["pass", "skipped", "skipped", "skipped", "skipped"]
    # accuracy rising with ε is flagged; so is an unbounded attack that stays below ~100% success
    up = A.obfuscation_checklist(rows={}, clean=clean, curve=[(0.1, pgd), (0.2, square)],
                                 unbounded={"label": "I-FGSM", "eps": 1.0, "correct": square[0]}, random=None)
    assert up[4]["status"] == "fail" and "rises" in up[4]["detail"]
    assert up[2]["status"] == "fail"


def test_paired_difference():
    a = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 0, 1]], dtype=torch.bool)
    diff, se = A.paired_difference(a, b)
    d = torch.tensor([0.0, 1.0, 0.0, -1.0])
    assert diff == 0.0 and se == pytest.approx(float(d.std() / 2))


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    (dict(eps=[0.1, 1.5]), "eps: every ε must be in \\[0, 1\\]"),
    (dict(eps="-0.1"), "eps: every ε must be in \\[0, 1\\]"),
    (dict(eps="abc"), "eps: 'abc' is not a number"),
    (dict(attacks="pgd,nope"), "attacks: unknown attack\\(s\\) \\['nope'\\]"),
    (dict(forms="fixed,twice"), "forms: each must be one of"),
    (dict(steps=0), "steps: must be an int >= 1"),
    (dict(gaas_k=(4, 8)), "gaas_k"),
])
def test_bad_settings_raise_and_write_nothing(plain, data, tmp_path, settings, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        evaluate_model(plain, data, out=out, **{**TINY, **settings})
    assert not out.exists()


def test_bad_run_dir_raises_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        evaluate(run, eps=[0.1])
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        evaluate(tmp_path / "missing")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_cli_bad_input_exit_code(tmp_path, capsys):
    from fastdiv.cli import main

    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "out"
    assert main(["evaluate", str(run), "--out", str(out), "--quiet"]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--eps", "0.1,2", "--out", str(out)]) == 2
    assert "every ε must be in [0, 1]" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--attacks", "pgd,foo", "--out", str(out)]) == 2
    assert "unknown attack" in capsys.readouterr().err
    assert not out.exists() and list(run.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real run directory from fastdiv train: Bayesian LeNet-5, one short epoch on synthetic data."""
    from fastdiv.train import train

    out = tmp_path_factory.mktemp("runs") / "advbnn"
    return train({"preset": "advbnn", "dataset": "synthetic", "model": "lenet5", "epochs": 1, "limit": 48,
                  "batch_size": 16, "adv_steps": 1, "stats_limit": 8, "eval_samples": 2, "out": str(out),
                  "device": "cpu"}, quiet=True)


def test_cli_on_a_trained_run(tiny_run, capsys):
    from fastdiv.cli import main

    code = main(["evaluate", str(tiny_run), "--attacks", "fgsm,pgd", "--forms", "mean", "--eps", "0.1,8/255",
                 "--steps", "2", "--eot-samples", "2", "--ensemble-samples", "3", "--limit", "12", "--grad-samples",
                 "4", "--gaas-k", "4", "--gaas-examples", "4", "--random-samples", "2", "--transfer-models", "2",
                 "--transfer-from", str(tiny_run), "--transfer-attacks", "fgsm,bim", "--no-checklist"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "total robust accuracy: ε=0.1:" in printed and "wrote" in printed
    out = tiny_run / "eval"
    res = validate_results(json.loads((out / "results.json").read_text()))
    assert res["run"]["run_dir"] == str(tiny_run) and res["run"]["config"]["preset"] == "advbnn"
    assert res["model"]["name"] == "advbnn" and res["data"]["dataset"] == "synthetic"
    assert res["data"]["num_examples"] == 12 and res["table"]["eps"] == [0.1, pytest.approx(8 / 255)]
    assert res["command"].startswith("fastdiv evaluate ") if res["command"] else True
    sur = res["transfer"]["surrogate"]
    assert [r["label"] for r in sur["rows"]] == ["FGSM", "I-FGSM"] and sur["run_dir"] == str(tiny_run)
    # GAL's settings: the attacks' own defaults (I-FGSM: 10 steps of ε/10)
    assert sur["rows"][1]["results"][0]["settings"] == {"eps": 0.1, "eot": "mean", "eot_samples": 2}
    assert (out / "report.md").read_text().count("Transfer attacks from a surrogate") == 1
    assert res["obfuscation"] == {"checks": [], "passed": None, "settings": res["obfuscation"]["settings"]}


#: a flag value per EvalConfig field that is not a plain int (those get default + 2) or a bool (--no-NAME)
FLAG_SAMPLES = {"attacks": ("fgsm,PGD", ["fgsm", "pgd"]), "eps": ("0.1,8/255", [0.1, 8 / 255]),
                "forms": ("one", ["one"]), "curve_eps": ("0.05", [0.05]), "transfer_attacks": ("bim", ["bim"]),
                "gaas_k": ("16", [16]), "curve_attack": ("fgsm", "fgsm"), "transfer_attack": ("fgsm", "fgsm"),
                "limit": ("7", 7), "grad_examples": ("7", 7), "alpha_factor": ("0.5", 0.5),
                "min_margin": ("0.05", 0.05), "stochastic": ("no", False), "model_mode": ("mc-dropout", "mc-dropout"),
                "norm": ("Linf", "linf"), "protocol": ("autoattack-rand", "autoattack-rand"),
                "deviations": ("steps=7", {"steps": 7})}
#: flags a sample needs beside its own (a deviation is from a protocol)
FLAG_COMPANIONS = {"deviations": ["--protocol", "autoattack-rand"]}


def test_every_config_field_is_a_flag():
    """Each EvalConfig field has a flag (generated from the dataclass), which sets that field and only it."""
    import dataclasses

    from fastdiv.cli import build_parser
    from fastdiv.evaluate.cli import config_flags, config_settings

    fields = dataclasses.fields(EvalConfig)
    flags = config_flags()
    assert list(flags) == [f.name for f in fields]
    defaults = EvalConfig().check(fastdiv.attacks.ATTACKS)
    parse = build_parser().parse_args
    assert config_settings(parse(["evaluate", "run", "--square-queries", "5"]))["square_queries"] == 5
    for f in fields:
        if f.name in FLAG_SAMPLES:
            text, expected = FLAG_SAMPLES[f.name]
            argv = [flags[f.name], text, *FLAG_COMPANIONS.get(f.name, [])]
        elif f.type == "bool":
            argv, expected = [flags[f.name]], not f.default
            assert flags[f.name] == "--no-" + f.name.replace("_", "-")
        else:
            assert f.type == "int", f"add a sample value for the new field {f.name} to FLAG_SAMPLES"
            argv, expected = [flags[f.name], str(f.default + 2)], f.default + 2
        args = parse(["evaluate", "run", *argv])
        cfg = EvalConfig(**config_settings(args)).check(fastdiv.attacks.ATTACKS)
        assert getattr(cfg, f.name) == pytest.approx(expected), f.name
        # a protocol sets the fields it names, by design; every other field stays at its default
        protocol = expected if f.name == "protocol" else "autoattack-rand" if f.name in FLAG_COMPANIONS else None
        also = {"protocol", *PROTOCOLS[protocol].config} if protocol else set()
        assert {k: v for k, v in vars(cfg).items() if k != f.name and k not in also} == {
            k: v for k, v in vars(defaults).items() if k != f.name and k not in also}, f.name
    # no flags: exactly EvalConfig's defaults
    assert vars(EvalConfig(**config_settings(parse(["evaluate", "run"]))).check(fastdiv.attacks.ATTACKS)) == vars(
        defaults)


def test_parse_eps():
    assert parse_eps("0.1, 8/255,0") == [0.1, 8 / 255, 0.0]
    assert parse_eps([0.3, "1/10"]) == [0.3, 0.1]
    cfg = EvalConfig(attacks="PGD,fgsm,pgd", gaas_k="4,16").check(fastdiv.attacks.ATTACKS)
    assert cfg.attacks == ["pgd", "fgsm"] and cfg.gaas_k == [4, 16]


# ------------------------------------------------------------------------------------------------
# Analysis primitives against hand computations
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 16, 64])
def test_regular_hadamard(k):
    h = A.regular_hadamard(k)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, k * torch.eye(k))
    torch.testing.assert_close(h.sum(1), torch.full((k,), math.sqrt(k)))


def test_regular_hadamard_rejects_other_orders():
    for k in (2, 8, 25, 36):
        with pytest.raises(ValueError, match="power of 4"):
            A.regular_hadamard(k)


def test_ambiguity_entropy_by_hand():
    # K = 3 members; correct votes per example l = 0, 1, 2, 3 -> min(l, 3 - l) = 0, 1, 1, 0; K - ceil(K/2) = 1
    correct = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert A.ambiguity_entropy(correct) == pytest.approx(0.5)
    # K = 4: l = 2 -> 2 / (4 - 2) = 1 (maximal disagreement); l = 4 -> 0
    c4 = torch.tensor([[1, 1], [1, 1], [0, 1], [0, 1]], dtype=torch.bool)
    assert A.ambiguity_entropy(c4) == pytest.approx(0.5)


def test_member_diversity_matches_direct_gradients(data):
    x, y = data[0][:6], data[1][:6]
    torch.manual_seed(3)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(64, 4)) for _ in range(3)]
    ens = Ensemble(members)
    dv = A.member_diversity(ens, x, y, 3, seed=0)
    grads = []
    for m in members:
        xi = x.clone().requires_grad_(True)
        nn.functional.cross_entropy(m(xi), y, reduction="sum").backward()
        grads.append(xi.grad.flatten(1))
    g = torch.stack(grads)  # [K, B, D]
    u = g / g.norm(dim=-1, keepdim=True)
    l_d = sum((u[i] * u[j]).sum(-1) for i in range(3) for j in range(i + 1, 3))
    torch.testing.assert_close(dv["l_d"], l_d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dv["l_s"], g.norm(dim=-1).sum(0), atol=1e-6, rtol=1e-5)
    expect = torch.stack([m(x).argmax(1) == y for m in members])
    assert torch.equal(dv["correct"], expect)
    # the members= path (used for populations) gives the same numbers
    dv2 = A.member_diversity(ens, x, y, 3, seed=0, members=members)
    torch.testing.assert_close(dv2["l_d"], dv["l_d"])


def test_mra_by_hand(data):
    x, y = data
    torch.manual_seed(4)
    members = [_fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), x, y, steps=30) for _ in range(3)]

    def make(m):
        return fastdiv.attacks.FGSM(m, eps=0.3)

    correct, source = A.mra_correct(members, x, y, make, seed=5)
    x_adv = x.clone()
    for i, m in enumerate(members):
        sel = source == i
        x_adv[sel] = make(m)(x[sel], y[sel])
    accs = [float((m(x_adv).argmax(1) == y).float().mean()) for m in members]
    assert float(correct.float().mean()) == pytest.approx(sum(accs) / 3)
    assert set(source.tolist()) <= {0, 1, 2}
    benign, _ = A.mra_correct(members, x, y, None, seed=5)
    assert torch.equal(benign, torch.stack([m(x).argmax(1) == y for m in members]))


def test_gaas_by_hand(plain, data):
    x, y = data[0][:5], data[1][:5]
    ks, eps = [4, 16], [0.1, 0.4]
    got = A.gaas(plain, x, y, ks=ks, eps=eps, grad_samples=1, pred_samples=1, seed=0)
    xi = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(plain(xi), y, reduction="sum").backward()
    sign = xi.grad.sign().flatten(1)
    for ei, e in enumerate(eps):
        for ki, k in enumerate(ks):
            h = A.regular_hadamard(k)
            for b in range(5):
                count = 0
                for i in range(k):
                    r = e * sign[b] * h[i].repeat_interleave(64 // k)
                    xa = (x[b].flatten() + r).clamp(0, 1).view(1, 1, 8, 8)
                    count += int(plain(xa).argmax(1).item() != y[b].item())
                assert got[ei, ki, b].item() == count


def test_projection_and_cosine():
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(20, 10, generator=gen) + 3 * torch.ones(10)
    basis = A.projection_basis(A.unit_mean(samples), samples=samples)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-5, rtol=0)
    pr = A.project(samples, basis)
    u = samples / samples.norm(dim=1, keepdim=True)
    assert pr["rho"] == pytest.approx(float(u.mean(0).norm()), rel=1e-5)
    # the mean vector lies on the first axis with length rho
    assert pr["mean"][0].item() == pytest.approx(pr["rho"], rel=1e-5) and abs(pr["mean"][1].item()) < 1e-5
    c = A.cosine_matrix(samples)
    torch.testing.assert_close(c, u @ u.T, atol=1e-5, rtol=0)
    # identical gradients: rho = 1, all points at (1, 0); a zero mean direction falls back on the principal axes
    same = torch.ones(5, 4)
    pr = A.project(same, A.projection_basis(A.unit_mean(same), samples=same))
    assert pr["rho"] == pytest.approx(1.0)
    torch.testing.assert_close(pr["points"], torch.tensor([[1.0, 0.0]] * 5), atol=1e-5, rtol=0)
    opposite = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])
    b = A.projection_basis(A.unit_mean(opposite), samples=opposite)
    torch.testing.assert_close(b @ b.T, torch.eye(2), atol=1e-5, rtol=0)


def test_gradient_stats_match_concentration_stats(bayes, data):
    x, y = data[0][:5], data[1][:5]
    st = A.gradient_stats(bayes, x, y, 8, seed=7, batch_size=2)
    grads, _ = fastdiv.sample_input_grads(bayes, x, y, 8, generator=7)
    ref = fastdiv.concentration_stats(grads, sample_dim=0, backend="torch")
    for name in ref._fields:
        torch.testing.assert_close(st[name], getattr(ref, name).float(), atol=1e-4, rtol=1e-4)


def test_predict_correct_worst_case(bayes, data):
    x, y = data
    ens, worst = A.predict_correct(bayes, x, y, 6, seed=3, batch_size=7)
    logits = A.sample_logits(bayes, x, 6, 3)
    assert logits.shape == (6, 32, 4)
    assert torch.equal(ens, logits.softmax(-1).mean(0).argmax(-1) == y)
    assert torch.equal(worst, (logits.argmax(-1) == y).all(0))
    # same seed, same sample models whatever the batching
    ens2, worst2 = A.predict_correct(bayes, x, y, 6, seed=3, batch_size=32)
    assert torch.equal(ens, ens2) and torch.equal(worst, worst2)


def test_ensemble_prediction_matches_nn_predict(bayes, data):
    x, y = data
    ens, _ = A.predict_correct(bayes, x, y, 5, seed=11, batch_size=8)
    assert torch.equal(ens, fastdiv.nn.predict(bayes, x, num_samples=5, seed=11).argmax(1) == y)
    torch.manual_seed(2)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(64, 4)) for _ in range(3)]
    ensemble = Ensemble(members)
    ens, worst = A.predict_correct(ensemble, x, y, 20, seed=0)
    assert torch.equal(ens, fastdiv.nn.predict(ensemble, x).argmax(1) == y)
    assert torch.equal(worst, torch.stack([m(x).argmax(1) == y for m in members]).all(0))


def test_transfer_matrix_members(data):
    x, y = data
    torch.manual_seed(5)
    members = [_fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), x, y, steps=30) for _ in range(3)]
    ens = Ensemble(members)
    res = evaluate_model(ens, (x, y), attacks="fgsm", eps=[0.2], forms="mean", transfer_attack="fgsm",
                         **{**TINY, "gaas_examples": 0})
    tm = res["transfer"]["sample_models"]
    assert tm["source"] == "members" and tm["k"] == 3
    for i in range(3):
        x_adv = fastdiv.attacks.FGSM(members[i], eps=0.2)(x, y)
        for j in range(3):
            assert tm["matrix"][i][j] == pytest.approx(float((members[j](x_adv).argmax(1) == y).float().mean()))
    assert res["transfer"]["mra"]["members"] == 3
    assert res["gradients"]["num_samples"] == 3  # one gradient per member


def test_population_end_to_end(data):
    """A random-dispatch population (CLM): member-wise transferability, MRA and member gradients."""
    from fastdiv.nn import Population

    x, y = data
    torch.manual_seed(6)
    members = [_fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), x, y, steps=20) for _ in range(3)]
    pop = Population(members, seed=0)
    res = evaluate_model(pop, (x, y), attacks="fgsm", eps=[0.1, 0.2], forms="fixed,mean", transfer_attack="fgsm",
                         **{**TINY, "gaas_examples": 4})
    validate_results(res)
    assert res["model"]["members"] == 3 and [r["label"] for r in res["table"]["rows"]] == ["FGSM", "EOT-FGSM"]
    mra = res["transfer"]["mra"]
    assert [e["eps"] for e in mra["results"]] == [0.1, 0.2] and len(mra["results"][0]["per_member"]) == 3
    # benign MRA = the mean of the members' clean accuracies (CLM Table 1)
    assert mra["benign"] == pytest.approx(sum(float((m(x).argmax(1) == y).float().mean()) for m in members) / 3,
                                          abs=1e-6)
    assert res["gradients"]["diversity"]["source"] == "members"
    assert res["gradients"]["diversity"]["member_accuracy"] == pytest.approx(
        [float((m(x).argmax(1) == y).float().mean()) for m in members], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Sharding across ranks (torchrun-style environment, gloo)
# ------------------------------------------------------------------------------------------------

SHARD_SETTINGS = dict(attacks="fgsm", eps=[0.1, 0.3], eot_samples=2, ensemble_samples=3, grad_samples=4,
                      gaas_examples=10, gaas_k=(4,), random_samples=0, transfer_models=0, batch_size=4, quiet=True)


def test_merge_orders_every_example_index():
    """Two ranks' shards (every other example; gradient and GAAS subsets of different sizes) merge into
    test-set order, each field along its own index."""
    from fastdiv.evaluate.shard import GradientResult, Predictions, RowResult, RowSpec, ShardResult, merge

    def shard(rank, n=7, grad=5, gaas=3):
        index = torch.arange(n)[rank::2]
        gi, ai = index[index < grad], index[index < gaas]
        flags = Predictions(index.repeat(2, 1) % 3 == 0, index.repeat(2, 1) % 2 == 0)  # [R=2, N]
        row = RowResult(RowSpec("fgsm", None, "FGSM", "fgsm/plain"), flags, [{"eps": 0.1}])
        grads = GradientResult(dimension=4, grad_index=gi, stats={"rho": gi.float() / 10},
                               gaas_ks=[4], gaas_index=ai, gaas=ai.view(1, 1, -1) * 100,
                               projection={"rank": rank} if rank == 0 else None)
        return ShardResult(index, 4, True, None, "mean", clean=flags, rows=[row], gradients=grads)

    merged = merge([shard(0), shard(1)])
    assert merged.index.tolist() == list(range(7))
    assert torch.equal(merged.clean.ensemble, torch.arange(7).repeat(2, 1) % 3 == 0)
    assert torch.equal(merged.rows[0].flags.worst, torch.arange(7).repeat(2, 1) % 2 == 0)
    assert merged.rows[0].spec.label == "FGSM" and merged.rows[0].settings == [{"eps": 0.1}]
    g = merged.gradients
    assert g.grad_index.tolist() == [0, 1, 2, 3, 4] and g.stats["rho"].tolist() == pytest.approx([0, .1, .2, .3, .4])
    assert g.gaas_index.tolist() == [0, 1, 2] and g.gaas.flatten().tolist() == [0, 100, 200]
    assert g.projection == {"rank": 0}  # computed on rank 0 only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_worker(rank, world, port, model, data, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    evaluate_model(model, data, out=out, device="cpu", **SHARD_SETTINGS)


def test_sharded_evaluation_matches_single_process(bayes, data, tmp_path):
    """Each rank evaluates every other example; rank 0 gathers and writes. With weight noise and
    deterministic attacks (FGSM), every per-example result equals the single-process one."""
    import torch.multiprocessing as mp

    single = evaluate_model(bayes, data, **SHARD_SETTINGS)
    out = tmp_path / "sharded"
    mp.start_processes(_shard_worker, args=(2, _free_port(), bayes, data, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    sharded = json.loads((out / "results.json").read_text())
    assert sharded["world_size"] == 2 and sharded["data"]["num_examples"] == 32
    assert sharded["clean"] == single["clean"]
    assert sharded["table"] == single["table"]
    for name in ("rho", "kappa", "dpp"):
        assert sharded["gradients"]["stats"][name]["values"] == pytest.approx(
            single["gradients"]["stats"][name]["values"], abs=1e-5)
    assert sharded["gradients"]["gaas"]["mean_count"] == single["gradients"]["gaas"]["mean_count"]
    assert ([c["status"] for c in sharded["obfuscation"]["checks"]]
            == [c["status"] for c in single["obfuscation"]["checks"]])
