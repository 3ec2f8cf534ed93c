"""``fastdiv evaluate`` on models that are not fastdiv's: a model factory in the user's own file or package,
its weights (.safetensors / .pt), test data from files, Datasets and DataLoaders, randomness the model
draws itself (judged stochastic, sampled by real forwards), MC dropout, Normalize, and every bad input
refused with a message before anything is written."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastdiv
from fastdiv.cli import main
from fastdiv.evaluate import evaluate_model, load_adversarial, validate_results
from fastdiv.evaluate.inputs import EvalInputError, load_data_file, load_factory, load_weights

#: the smallest evaluation that still runs every section
TINY = ["--attacks", "fgsm,pgd", "--eps", "0.1", "--steps", "2", "--eot-samples", "2", "--ensemble-samples", "3",
        "--grad-samples", "3", "--gaas-k", "4", "--gaas-examples", "4", "--random-samples", "2",
        "--transfer-models", "2", "--quiet"]

MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class NoisyNet(nn.Module):
        """Input noise drawn from the global RNG at every forward (a defense of the user's own)."""

        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))

        def forward(self, x):
            return self.f(x + 0.2 * torch.randn_like(x))


    def make():
        torch.manual_seed(0)
        return NoisyNet()


    def mc_dropout():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Dropout(0.5), nn.Linear(256, 4))


    def broken():
        raise RuntimeError("no such checkpoint")


    def not_a_module():
        return 3


    def three_dim_output():
        return nn.Sequential(nn.Flatten(1), nn.Unflatten(1, (4, 16)))


    def integer_logits():
        class IntNet(nn.Module):
            def forward(self, x):
                return (x.flatten(1)[:, :4] * 10).long()
        return IntNet()
''')


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / "mydefense.py").write_text(MODEL_FILE)
    gen = torch.Generator().manual_seed(1)
    y = torch.arange(12) % 4
    x = (torch.rand(4, 1, 8, 8, generator=gen)[y] + 0.05 * torch.randn(12, 1, 8, 8, generator=gen)).clamp(0, 1)
    np.savez(d / "test.npz", x=x.numpy(), y=y.numpy())
    save_file({"x": x, "y": y}, str(d / "test.safetensors"))
    torch.manual_seed(0)
    save_file(load_factory(f"{d / 'mydefense.py'}:make").state_dict(), str(d / "noisy.safetensors"))
    return d


def _results(out):
    return validate_results(json.loads((out / "results.json").read_text()))


def test_cli_evaluates_a_model_from_the_users_file(user_dir, tmp_path):
    out = tmp_path / "out"
    code = main(["evaluate", "--model", f"{user_dir / 'mydefense.py'}:make", "--weights",
                 str(user_dir / "noisy.safetensors"), "--data", str(user_dir / "test.npz"), "--out", str(out),
                 "--save-adv", str(tmp_path / "adv"), *TINY])
    assert code == 0
    res = _results(out)
    # its randomness is its own: found by the probe, sampled by real forwards, every section present
    assert res["model"]["stochastic"] and "differ" in res["model"]["randomness"]
    assert [r["label"] for r in res["table"]["rows"]] == ["FGSM", "EOT¹-FGSM", "EOT-FGSM", "PGD", "EOT¹-PGD",
                                                         "EOT-PGD"]
    assert res["gradients"]["stats"] is not None and res["transfer"]["sample_models"] is not None
    assert res["run"]["model"].endswith("mydefense.py:make") and res["data"]["dataset"] == "test.npz"
    assert "randomness: two forwards of the same input differ" in (out / "report.md").read_text()
    # RobustBench's model-info shape, labelled as fastdiv's EOT numbers, never as AutoAttack's
    (entry,) = json.loads((out / "robustbench.json").read_text())
    assert "autoattack_acc" not in entry and entry["randomized"] and entry["eps"] == "0.1"
    assert entry["number_forward_passes"] == 3 and entry["eot_samples"] == 2 and "not AutoAttack" in entry["footnote"]
    assert float(entry["fastdiv_acc"]) == pytest.approx(100 * res["table"]["total"]["results"][0]["ensemble"]["mean"],
                                                        abs=0.006)
    # the saved adversarial examples reproduce the flags the table counted, without re-running the attack
    saved = sorted((tmp_path / "adv").iterdir())
    names = [f"{r['key'].replace('/', '-')}_eps0_r0.safetensors" for r in res["table"]["rows"]]
    assert [p.name for p in saved] == sorted(names)
    model = load_weights(load_factory(f"{user_dir / 'mydefense.py'}:make"), user_dir / "noisy.safetensors").eval()
    x, y = load_data_file(user_dir / "test.npz")
    for path in saved:
        tensors, info = load_adversarial(path)
        assert torch.equal(tensors["y"], y) and tensors["index"].tolist() == list(range(12))
        assert (tensors["x_adv"] - x).abs().max() <= info["eps"] + 1e-6
        ens, worst = fastdiv.analysis.predict_correct(model, tensors["x_adv"], y, info["ensemble_samples"],
                                                      info["prediction_seed"])
        assert torch.equal(ens, tensors["ensemble_correct"]) and torch.equal(worst, tensors["worst_correct"])
        row = next(r for r in res["table"]["rows"] if path.name.startswith(r["key"].replace("/", "-") + "_"))
        assert float(ens.float().mean()) == pytest.approx(row["results"][0]["ensemble"]["mean"])
    # the same result again: the global RNG is seeded per sample from --seed
    again = tmp_path / "again"
    assert main(["evaluate", "--model", f"{user_dir / 'mydefense.py'}:make", "--weights",
                 str(user_dir / "noisy.safetensors"), "--data", str(user_dir / "test.safetensors"), "--out",
                 str(again), *TINY]) == 0
    assert _results(again)["table"] == res["table"]


def test_declared_deterministic_and_mc_dropout(user_dir, tmp_path):
    out = tmp_path / "det"
    assert main(["evaluate", "--model", f"{user_dir / 'mydefense.py'}:make", "--data", str(user_dir / "test.npz"),
                 "--out", str(out), "--stochastic", "no", *TINY]) == 0
    res = _results(out)
    assert not res["model"]["stochastic"] and "declared" in res["model"]["randomness"]
    assert [r["label"] for r in res["table"]["rows"]] == ["FGSM", "PGD"]
    (entry,) = json.loads((out / "robustbench.json").read_text())
    assert entry["number_forward_passes"] == 1 and not entry["randomized"] and "eot_samples" not in entry
    mc = tmp_path / "mc"
    assert main(["evaluate", "--model", f"{user_dir / 'mydefense.py'}:mc_dropout", "--data",
                 str(user_dir / "test.npz"), "--out", str(mc), "--model-mode", "mc-dropout", *TINY]) == 0
    res = _results(mc)
    assert res["model"]["stochastic"] and "dropout" in res["model"]["randomness"]
    assert res["settings"]["model_mode"] == "mc-dropout"
    assert res["table"]["rows"][2]["results"][0]["settings"]["model_mode"] == "mc-dropout"
    eval_mode = tmp_path / "eval"  # in eval mode the same model is deterministic
    assert main(["evaluate", "--model", f"{user_dir / 'mydefense.py'}:mc_dropout", "--data",
                 str(user_dir / "test.npz"), "--out", str(eval_mode), *TINY]) == 0
    assert not _results(eval_mode)["model"]["stochastic"]


def test_factory_from_a_package_module(user_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(user_dir))
    model = load_factory("mydefense:make")
    assert type(model).__name__ == "NoisyNet"
    out = tmp_path / "pkg"
    assert main(["evaluate", "--model", "mydefense:make", "--dataset", "synthetic", "--out", str(out),
                 "--limit", "8", *TINY]) == 2  # synthetic data is 1x8x8 with 10 classes: labels beyond 4
    assert not out.exists()


@pytest.mark.parametrize("spec, message", [
    ("mydefense.py:broken", "raised RuntimeError: no such checkpoint"),
    ("mydefense.py:not_a_module", "must return a torch.nn.Module, it returned a int"),
    ("mydefense.py:missing", "has no callable 'missing'"),
    ("nowhere.py:make", "does not exist"),
    ("no_such_package_xyz:make", "cannot import the module"),
    ("mydefense.py", "expected FILE.py:FACTORY"),
    ("mydefense.py:three_dim_output", "must return logits [N, C]"),
    ("mydefense.py:integer_logits", "must return floating-point logits"),
])
def test_bad_models_are_refused_before_anything_is_written(user_dir, tmp_path, capsys, monkeypatch, spec, message):
    monkeypatch.chdir(user_dir)
    out = tmp_path / "out"
    assert main(["evaluate", "--model", spec, "--data", "test.npz", "--out", str(out), *TINY]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_weights_and_data(user_dir, tmp_path, capsys):
    model_spec = f"{user_dir / 'mydefense.py'}:make"
    out = tmp_path / "out"

    def refused(*argv, code: int = 2) -> str:
        """Exit code 2 for input that does not fit, 3 for a corrupted or unsafe file (docs/errors.md)."""
        assert main(["evaluate", "--model", model_spec, "--out", str(out), *argv, *TINY]) == code
        assert not out.exists()
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
        return err

    wrong = tmp_path / "wrong.safetensors"
    save_file({"f.1.weight": torch.zeros(3, 3)}, str(wrong))
    err = refused("--weights", str(wrong), "--data", str(user_dir / "test.npz"))
    assert "does not match the model" in err and "missing in the file" in err and "shapes differ" in err
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": load_factory(model_spec).state_dict(), "extra": Exception("foreign")}, unsafe)
    err = refused("--weights", str(unsafe), "--data", str(user_dir / "test.npz"), code=3)
    assert "refused as unsafe or foreign" in err and str(unsafe) in err and "weights_only=False" not in err
    truncated = tmp_path / "truncated.pt"
    torch.save(load_factory(model_spec).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert "not a readable PyTorch file" in refused("--weights", str(truncated), "--data", str(user_dir / "test.npz"),
                                                    code=3)
    outside = tmp_path / "outside.npz"
    np.savez(outside, x=np.full((4, 1, 8, 8), 2.0, np.float32), y=np.zeros(4, np.int64))
    assert "must lie in [0, 1]" in refused("--data", str(outside))
    no_y = tmp_path / "no_y.npz"
    np.savez(no_y, x=np.zeros((4, 1, 8, 8), np.float32))
    assert "arrays named 'x' (images) and 'y'" in refused("--data", str(no_y))
    assert "needs test data" in refused()
    assert "not both" in refused("--data", str(user_dir / "test.npz"), str(user_dir))


def test_pt_weights_plain_and_under_model(user_dir, tmp_path):
    model_spec = f"{user_dir / 'mydefense.py'}:make"
    src = load_factory(model_spec)
    with torch.no_grad():
        src.f[1].weight.add_(1.0)
    for payload in (src.state_dict(), {"model": src.state_dict(), "epoch": 3}):
        path = tmp_path / "w.pt"
        torch.save(payload, path)
        model = load_weights(load_factory(model_spec), path)
        assert torch.equal(model.f[1].weight, src.f[1].weight)


def test_data_files_scale_uint8(tmp_path):
    path = tmp_path / "u8.npz"
    np.savez(path, x=np.full((2, 1, 2, 2), 255, np.uint8), y=np.array([0, 1]))
    x, y = load_data_file(path)
    assert x.dtype == torch.float32 and float(x.max()) == 1.0 and y.tolist() == [0, 1]
    with pytest.raises(EvalInputError, match="expected a .npz or .safetensors"):
        load_data_file(tmp_path / "u8.csv") if (tmp_path / "u8.csv").write_text("1") else None


def test_evaluate_model_takes_datasets_and_dataloaders(user_dir):
    x, y = load_data_file(user_dir / "test.npz")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    settings = dict(attacks="fgsm", eps=[0.1], transfer_models=0, analysis=False, checklist=False, quiet=True)
    ref = evaluate_model(model, (x, y), **settings)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return x[i], int(y[i])

    for data in (Pairs(), torch.utils.data.DataLoader(Pairs(), batch_size=5)):
        res = evaluate_model(model, data, **settings)
        assert res["table"] == ref["table"] and res["clean"] == ref["clean"]


def test_normalize():
    norm = fastdiv.nn.Normalize((0.5, 0.25), (0.5, 2.0))
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    expected = (x - torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)) / torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.float()).dtype == torch.float32
    torch.autograd.gradcheck(norm, (x.requires_grad_(),))
    assert set(norm.state_dict()) == {"mean", "std"}
    torch.testing.assert_close(fastdiv.nn.Normalize(0.5, 0.5)(x), (x - 0.5) / 0.5)
    with pytest.raises(ValueError, match="std must be > 0"):
        fastdiv.nn.Normalize((0.5,), (0.0,))
    with pytest.raises(ValueError, match="2 channel constants for an input with 3 channels"):
        norm(torch.rand(1, 3, 2, 2))
    with pytest.raises(ValueError, match="one per channel"):
        fastdiv.nn.Normalize((0.1, 0.2), (0.1, 0.2, 0.3))


def test_norm_names_and_per_example_shapes_as_torchattacks_writes_them():
    torch.manual_seed(0)
    x, x0 = torch.rand(4, 1, 3, 3), torch.rand(4, 1, 3, 3)
    g = torch.randn(2, 4, 1, 3, 3)
    eps = torch.tensor([0.1, 0.2, 0.0, 0.3])
    ref = fastdiv.eot_step(x, x0, g, alpha=0.05, eps=eps, norm="linf")
    torch.testing.assert_close(fastdiv.eot_step(x, x0, g, alpha=0.05, eps=eps.view(4, 1, 1, 1), norm="Linf"), ref)
    torch.testing.assert_close(fastdiv.eot_step(x, x0, g, alpha=torch.full((4, 1, 1, 1), 0.05), eps=eps, norm="linf"),
                               ref)
    with pytest.raises(ValueError, match=r"\[4, 1, \.\.\., 1\]"):
        fastdiv.eot_step(x, x0, g, alpha=0.05, eps=torch.zeros(4, 3), norm="linf")
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 3))
    y = torch.tensor([0, 1, 2, 0])
    a = fastdiv.attacks.PGD(model, eps=0.1, steps=2, seed=0)(x, y)
    assert torch.equal(fastdiv.attacks.PGD(model, eps=0.1, steps=2, seed=0, norm="Linf")(x, y), a)
    assert fastdiv.attacks.APGD(model, eps=0.5, norm="L2").norm == "l2"


def test_robustbench_eps_strings():
    from fastdiv.evaluate.export import _eps_string

    assert _eps_string(8 / 255) == "8/255" and _eps_string(0.3) == "0.3" and _eps_string(0.0314) == "0.0314"
    assert _eps_string(1.0) == "1"


def test_best_safetensors_keeps_extra_state(tmp_path):
    """A Population's dispatch seed and call count are not tensors: best.safetensors keeps them as metadata and
    --weights restores them."""
    from fastdiv.train.checkpoint import save_best

    def population(seed):
        torch.manual_seed(seed)
        return fastdiv.nn.Population([nn.Linear(4, 3) for _ in range(3)], seed=seed)

    src = population(1)
    src(torch.rand(5, 4))  # advances the call count
    save_best(tmp_path / "best.pt", epoch=2, val_acc=0.5, model=src, preset="clm", config={"preset": "clm"})
    dst = load_weights(population(2), tmp_path / "best.safetensors")
    assert dst.get_extra_state() == src.get_extra_state()
    for k, v in src.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(dst.state_dict()[k], v), k


def test_l2_threat_model(user_dir):
    x, y = load_data_file(user_dir / "test.npz")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    res = evaluate_model(model, (x, y), norm="L2", eps=[0.5, 2.0], steps=2, square_queries=5, random_samples=3,
                         transfer_models=0, grad_samples=3, quiet=True)
    assert res["settings"]["norm"] == "l2" and res["table"]["eps"] == [0.5, 2.0]
    assert [r["label"] for r in res["table"]["rows"]] == ["FGM", "PGD-ℓ2", "APGD-CE", "APGD-DLR"]
    assert res["table"]["rows"][2]["results"][0]["settings"]["norm"] == "l2"
    unbounded = res["obfuscation"]["settings"]["unbounded"]
    assert unbounded["attack"] == "pgd-l2" and unbounded["settings"]["eps"] == pytest.approx(8.0)  # √64
    assert res["gradients"]["gaas"] is None or not res["gradients"]["gaas"]
    assert json.loads(json.dumps(res))["settings"]["curve_attack"] == "pgd-l2"
    from fastdiv.evaluate.export import robustbench_entries

    assert [e["threat_model"] for e in robustbench_entries(res)] == ["L2", "L2"]
    with pytest.raises(ValueError, match=r"\['fgsm'\] have no l2 version"):
        evaluate_model(model, (x, y), norm="l2", attacks="fgsm,pgd", eps=[0.5], quiet=True)
    with pytest.raises(ValueError, match="every ε must be in \\[0, 1\\]"):
        evaluate_model(model, (x, y), eps=[2.0], quiet=True)


def test_random_search_l2_samples_the_sphere():
    seen = []

    class Spy(nn.Module):
        def forward(self, z):
            seen.append(z.detach().clone())
            return torch.zeros(z.shape[0], 3)

    x = torch.full((2, 1, 4, 4), 0.5)
    fastdiv.analysis.random_search(Spy(), x, torch.tensor([0, 1]), eps=0.3, samples=5, pred_samples=1, seed=0,
                                   norm="l2")
    points = torch.cat([s for s in seen if s.shape[0] == 10]).view(-1, 2, 16)
    torch.testing.assert_close((points - 0.5).norm(dim=-1), torch.full(points.shape[:2], 0.3))
