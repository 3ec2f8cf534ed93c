"""fastdiv.train / fastdiv.presets: configuration, CLI, lambda schedule, run directory, checkpoints,
NaN stop. Tiny runs on the synthetic dataset (in-process)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import fastdiv
from fastdiv import cli
from fastdiv.presets import DATASET_NAMES, PRESETS, Preset, format_presets
from fastdiv.train import (
    TrainConfig,
    TrainingDiverged,
    best_from_epoch,
    build_model_from_config,
    lambda_at,
    load_run,
    parse_reg,
    resolve_config,
    train,
)

#: settings that make any preset a one-step run on the synthetic data
TINY = dict(dataset="synthetic", limit=16, batch_size=16, epochs=1, eval_samples=2, stats_limit=8,
            stats_samples=3, adv_steps=1, offline_steps=1, source_epochs=1)

pytestmark = pytest.mark.usefixtures("one_thread")


REQUIRED_CONFIG_KEYS = ("preset", "dataset", "data_dir", "resize", "seed", "model", "kind", "eps_train", "samples",
                        "num_classes", "in_shape")


# ------------------------------------------------------------------------------------------------
# presets and configuration
# ------------------------------------------------------------------------------------------------


def test_every_preset_resolves_to_a_valid_config_for_every_dataset():
    expected = {"advbnn", "graddiv-kappa", "graddiv-mean", "graddiv-dpp", "rse", "adv-train", "ensemble", "gal",
                "ens-adv", "gal-ens-adv", "ulm", "clm", "ulm-adv", "clm-adv", "pdd", "lpd", "d3-m", "d3-mv", "d3-ms",
                "d3-mvs", "d3-m-off", "d3-mv-off", "d3-ms-off", "d3-mvs-off"}
    assert expected == set(PRESETS)
    fields = set(TrainConfig.field_names())
    for name, preset in PRESETS.items():
        assert isinstance(preset, Preset) and preset.name == name
        assert preset.paper and preset.description
        assert set(preset.datasets) == set(DATASET_NAMES), name
        for ds in DATASET_NAMES:
            values = preset.resolve(ds)
            assert set(values) <= fields, (name, ds, set(values) - fields)
            cfg = resolve_config({"preset": name, "dataset": ds})
            assert cfg.model in fastdiv.nn.MODELS, (name, ds, cfg.model)
            for term, _ in parse_reg(cfg.reg):
                assert term in fastdiv.DIVERSITY_LOSSES


def test_preset_values_follow_the_papers():
    c = resolve_config({"preset": "graddiv-dpp", "dataset": "cifar10"})
    assert (c.reg, c.lam, c.samples, c.epochs, c.milestones, c.warmup, c.rampup) == ("dpp", 1.0, 3, 200,
                                                                                       [80, 140, 180], 6, 90)
    assert c.kind == "bayes" and c.adv and c.kl_factor == 0.02 and c.sigma0 == 0.1
    assert math.isclose(c.eps_train, 8 / 255) and c.adv_steps == 10 and c.adv_alpha is None  # eps/4
    c = resolve_config({"preset": "graddiv-kappa", "dataset": "mnist"})
    assert (c.reg, c.epochs, c.milestones, c.warmup, c.rampup, c.sigma0, c.eps_train) == ("kappa", 60, [30], 3, 20,
                                                                                          0.05, 0.3)
    c = resolve_config({"preset": "graddiv-mean", "dataset": "stl10"})
    assert (c.lam, c.epochs, c.milestones, c.sigma0, c.eps_train) == (0.7, 120, [60, 100], 0.15, 0.03)
    c = resolve_config({"preset": "graddiv-kappa", "dataset": "cifar10", "base": "rse"})
    assert c.kind == "noise" and c.kl_factor == 0 and (c.sigma_init, c.sigma_inner) == (0.2, 0.1)
    c = resolve_config({"preset": "gal", "dataset": "mnist"})
    assert (c.wrapper, c.members, c.reg, c.lam, c.model, c.epochs, c.noise_aug, c.noise_eps) == (
        "ensemble", 5, "gal", 0.5, "conv3", 10, True, 0.3)
    c = resolve_config({"preset": "clm", "dataset": "cifar10"})
    assert (c.wrapper, c.members, c.model, c.clm_alpha, c.clm_delta, c.prse_every, c.lr, c.epochs) == (
        "population", 10, "resnet18", 0.5, 0.1, 10, 1e-2, 150)
    c = resolve_config({"preset": "clm-adv", "dataset": "mnist"})
    assert (c.clm_alpha, c.clm_delta, c.adv, c.eps_train, c.adv_alpha, c.adv_steps) == (0.01, 5e-3, True, 0.3, 0.01,
                                                                                         100)
    c = resolve_config({"preset": "lpd", "dataset": "cifar10"})
    assert (c.members, c.dropout, c.dropout_s, c.dropout_lambda, c.dropout_alpha, c.dropout_beta) == (
        3, "lpd", 0.1, 0.5, 0.85, 0.127)
    c = resolve_config({"preset": "d3-mvs", "dataset": "mnist"})
    assert parse_reg(c.reg) == [("d3-mean", 20.0), ("d3-var", 40.0), ("d3-sparse", 40.0)]
    assert (c.samples, c.grad_loss, c.kind, c.offline) == (10, "logit", "bayes", "none")
    c = resolve_config({"preset": "d3-ms-off", "dataset": "cifar10"})
    assert parse_reg(c.reg) == [("d3-mean", 10.0), ("d3-sparse", 20.0)]
    assert (c.offline, c.offline_steps) == ("pgd", 40)
    # baselines have no regularizer (and so log lambda 0)
    for name in ("advbnn", "rse", "adv-train", "ensemble", "ulm", "lpd", "pdd"):
        assert resolve_config({"preset": name, "dataset": "mnist"}).reg is None


def test_parse_reg():
    assert parse_reg(None) == [] and parse_reg("none") == []
    assert parse_reg("kappa") == [("kappa", 1.0)]
    assert parse_reg("d3-mean:20+d3-sparse:0.5") == [("d3-mean", 20.0), ("d3-sparse", 0.5)]
    with pytest.raises(ValueError, match="'kapa' is not a regularizer"):
        parse_reg("kapa")
    with pytest.raises(ValueError, match="weight of 'dpp'"):
        parse_reg("dpp:x")


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="unknown setting"):
        resolve_config({"preset": "gal", "lernrate": 1})
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        resolve_config({"preset": "gal", "epochs": 0})
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        resolve_config({"preset": "gal", "lr": -1.0})
    with pytest.raises(ValueError, match="kind must be one of"):
        resolve_config({"preset": "rse", "kind": "magic"})
    with pytest.raises(ValueError, match="needs samples >= 2"):
        resolve_config({"preset": "graddiv-kappa", "samples": 1})
    with pytest.raises(ValueError, match="preset must be one of"):
        resolve_config({"preset": "nope"})
    with pytest.raises(ValueError, match="base must be one of"):
        resolve_config({"preset": "gal", "base": "rse"})


def test_config_file_and_cli_precedence(tmp_path):
    """preset < --config file < flags, and only the flags given override."""
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"preset": "graddiv-kappa", "epochs": 7, "lr": 0.01, "lambda": 0.3}))
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--config", str(cfg_file), "--lr", "0.02", "--milestones", "2", "4"])
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    assert set(values) == {"lr", "milestones"}  # nothing else is set by the parser
    cfg = resolve_config(values, config_file=cfg_file)
    assert (cfg.preset, cfg.epochs, cfg.lr, cfg.lam, cfg.milestones) == ("graddiv-kappa", 7, 0.02, 0.3, [2, 4])
    assert cfg.batch_size == 64 and cfg.reg == "kappa"  # digits preset values where nobody overrides
    # a flag beats the file's preset/dataset choice too
    args = parser.parse_args(["train", "--config", str(cfg_file), "--dataset", "mnist", "--lambda", "2"])
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    cfg = resolve_config(values, config_file=cfg_file)
    assert (cfg.dataset, cfg.batch_size, cfg.milestones, cfg.epochs, cfg.lam) == ("mnist", 128, [30], 7, 2.0)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        resolve_config({}, config_file=bad)


def test_list_presets_and_help(capsys):
    assert cli.main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert f"\n{name}\n" in "\n" + out
        assert preset.paper in out
    assert "milestones=[80, 140, 180]" in out and "reg=d3-mean:20+d3-var:40+d3-sparse:40" in out
    assert out.strip() == format_presets().strip()
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = capsys.readouterr().out
    for f in TrainConfig.__dataclass_fields__.values():
        if f.metadata.get("cli", True):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            assert flag in help_text, flag
    for flag in ("--resume", "--config", "--quiet", "--list-presets", "--no-adv", "--lambda"):
        assert flag in help_text


def test_cli_requires_a_preset(capsys, tmp_path):
    assert cli.main(["train", "--dataset", "synthetic"]) == 2
    assert "--preset" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "no run to continue" in capsys.readouterr().err
    assert cli.main(["train", "--resume"]) == 2
    assert "--out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# lambda schedule
# ------------------------------------------------------------------------------------------------


def test_lambda_schedule():
    # GradDiv MNIST: warm-up 3 epochs, ramp-up 20 epochs to 1
    assert lambda_at(0.0, 1.0, 3, 20) == 0.0
    assert lambda_at(2.999, 1.0, 3, 20) == 0.0
    assert lambda_at(3.0, 1.0, 3, 20) == 0.0
    assert lambda_at(13.0, 1.0, 3, 20) == pytest.approx(0.5)
    assert lambda_at(8.0, 0.7, 3, 20) == pytest.approx(0.7 * 5 / 20)
    assert lambda_at(23.0, 1.0, 3, 20) == 1.0
    assert lambda_at(100.0, 1.0, 3, 20) == 1.0
    assert lambda_at(0.0, 0.5, 0, 0) == 0.5  # no schedule: the target from the start
    assert lambda_at(1.0, 0.5, 1, 0) == 0.5


def test_best_pt_is_chosen_after_the_lambda_schedule():
    def first(**kw):
        return best_from_epoch(TrainConfig(**{"epochs": 20, **kw}))

    assert first() == 1  # no regularizer
    assert first(reg="kappa", lam=1.0, warmup=4, rampup=8) == 12
    assert first(reg="kappa", lam=1.0, warmup=1, rampup=1.5) == 3  # the first epoch that ends at the full lambda
    assert first(reg="kappa", lam=1.0) == 1  # no schedule
    assert first(reg="kappa", lam=0.0, warmup=4) == 1  # lambda 0: the regularizer never acts
    assert first(reg="kappa", lam=1.0, warmup=30, rampup=8) == 20  # never past the last epoch
    assert first(reg="kappa", lam=1.0, warmup=4, rampup=8, best_from=2) == 2  # --best-from wins
    with pytest.raises(ValueError, match="best_from"):
        TrainConfig(best_from=0).validate()


def test_sigma_lr_puts_the_posterior_log_sigma_in_its_own_group():
    from fastdiv.train.run_setup import parameter_groups

    model = build_model_from_config(resolve_config({"preset": "advbnn", "dataset": "synthetic"}), (1, 8, 8), 10)
    names = [n for n, _ in model.named_parameters()]
    sigma = {n for n in names if n.endswith("_log_sigma")}
    assert sigma and len(sigma) < len(names)
    assert len(parameter_groups(model, None)) == 1
    groups = parameter_groups(model, 0.05)
    assert [len(g["params"]) for g in groups] == [len(names) - len(sigma), len(sigma)]
    assert "lr" not in groups[0] and groups[1]["lr"] == 0.05
    assert {id(p) for p in groups[1]["params"]} == {id(p) for n, p in model.named_parameters() if n in sigma}
    # a deterministic model has no log sigma: one group whatever sigma_lr says
    plain = build_model_from_config(resolve_config({"preset": "ensemble", "dataset": "synthetic"}), (1, 8, 8), 10)
    assert len(parameter_groups(plain, 0.05)) == 1
    with pytest.raises(ValueError, match="sigma_lr"):
        TrainConfig(sigma_lr=0.0).validate()


def test_dropout_rescale_reaches_the_priority_dropout():
    for rescale in (False, True):
        cfg = resolve_config({"preset": "lpd", "dataset": "synthetic", "dropout_rescale": rescale})
        assert build_model_from_config(cfg, (1, 8, 8), 10).dropout.rescale is rescale


def test_sigma_lr_lets_the_posterior_std_move(tmp_path):
    """The same steps with sigma_lr = 100 x lr move log sigma (which starts at log sigma0) much further."""
    base = {"preset": "advbnn", **TINY, "epochs": 1, "adv_steps": 1, "lr": 1e-4}
    slow = train({**base, "out": str(tmp_path / "slow")}, quiet=True)
    fast = train({**base, "sigma_lr": 1e-2, "out": str(tmp_path / "fast")}, quiet=True)

    def moved(run):
        model, config = load_run(run, which="last")
        start = math.log(config["sigma0"])
        return max((p - start).abs().max().item() for n, p in model.named_parameters() if n.endswith("_log_sigma"))

    assert 0 < 30 * moved(slow) < moved(fast)


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kappa_run(tmp_path_factory):
    """graddiv-kappa with --base rse (noise layers), 3 tiny epochs with a lambda warm-up and ramp-up."""
    out = tmp_path_factory.mktemp("run") / "kappa"
    train({"preset": "graddiv-kappa", "base": "rse", **TINY, "limit": 32, "epochs": 3, "warmup": 1,
           "rampup": 1.5, "lam": 2.0, "out": str(out)}, quiet=True)
    return out


def test_run_directory_layout(kappa_run):
    assert {p.name for p in kappa_run.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt", "best.pt"}
    assert not [p for p in kappa_run.iterdir() if p.name.endswith(".tmp")]
    config = json.loads((kappa_run / "config.json").read_text())
    for key in REQUIRED_CONFIG_KEYS:
        assert key in config
    assert (config["preset"], config["dataset"], config["in_shape"], config["num_classes"]) == (
        "graddiv-kappa", "synthetic", [1, 8, 8], 10)
    assert config["kind"] == "noise" and config["samples"] == 3 and config["n_train"] == 32
    # config.json is a valid --config file that reproduces the settings
    assert resolve_config({}, config_file=kappa_run / "config.json").to_dict() == {
        **TrainConfig.from_dict({k: v for k, v in config.items() if k in TrainConfig.field_names()}).to_dict()}


def test_metrics_follow_the_lambda_schedule(kappa_run):
    lines = [json.loads(x) for x in (kappa_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    steps = 2  # 32 examples / batch 16
    for r in lines:
        assert r["lambda"] == pytest.approx(lambda_at(r["epoch"] - 1 + (steps - 1) / steps, 2.0, 1, 1.5))
        for key in ("train_loss", "train_acc", "val_acc", "rho", "kappa_p", "mean_cos", "dpp", "coherence", "lr"):
            assert math.isfinite(r[key]), key
        assert 0 <= r["val_acc"] <= 1 and 0 <= r["rho"] <= 1
    assert lines[0]["train_reg"] == 0.0 and lines[0]["train_kappa_p"] is None  # warm-up: no regularizer
    assert lines[1]["train_reg"] > 0 and lines[2]["train_reg"] > 0
    # the logged regularizer is kappa_hat / p of the training gradients (GradDiv's R_kappa)
    assert lines[2]["train_reg"] == pytest.approx(lines[2]["train_kappa_p"], rel=1e-5)
    assert all(r["kappa_p"] > 0 and -1 <= r["mean_cos"] <= r["coherence"] <= 1 for r in lines)


def test_checkpoints_load_with_weights_only(kappa_run):
    ckpt = torch.load(kappa_run / "checkpoint.pt", weights_only=True)
    best = torch.load(kappa_run / "best.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step_in_epoch"] == 0 and ckpt["global_step"] == 6
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "rng", "best"}
    lines = [json.loads(x) for x in (kappa_run / "metrics.jsonl").read_text().splitlines()]
    # warm-up 1 + ramp-up 1.5 epochs: only epoch 3 ends at the full lambda, so it is best.pt whatever its accuracy
    best_line = max((r for r in lines if r["epoch"] >= 3), key=lambda r: r["val_acc"])
    assert best["epoch"] == ckpt["best"]["epoch"] == best_line["epoch"] == 3
    assert [r["best"] for r in lines] == [False, False, True]
    assert best["val_acc"] == pytest.approx(best_line["val_acc"])
    model, config = load_run(kappa_run, which="last")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt["model"][k], rtol=0, atol=0, msg=k)
    model_best, _ = load_run(kappa_run, which="best")
    assert not model_best.training
    for k, v in model_best.state_dict().items():
        torch.testing.assert_close(v, best["model"][k], rtol=0, atol=0, msg=k)
    x = torch.rand(5, *config["in_shape"])
    assert model(x).shape == (5, config["num_classes"])
    with pytest.raises(ValueError, match="which"):
        load_run(kappa_run, which="first")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run(kappa_run / "nope")


def test_best_weights_also_as_safetensors(kappa_run):
    """best.safetensors: the weights of best.pt without pickles, the run's config as metadata; loadable into
    the model fastdiv evaluate --model would build."""
    from safetensors import safe_open

    best = torch.load(kappa_run / "best.pt", weights_only=True)
    with safe_open(str(kappa_run / "best.safetensors"), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    assert set(tensors) == set(best["model"])
    for k, v in best["model"].items():
        assert torch.equal(tensors[k], v), k
    assert int(meta["epoch"]) == best["epoch"] and float(meta["val_acc"]) == pytest.approx(best["val_acc"])
    config = json.loads(meta["config"])
    assert config == json.loads((kappa_run / "config.json").read_text())
    model, _ = load_run(kappa_run)
    from fastdiv.evaluate.inputs import load_weights

    load_weights(model, kappa_run / "best.safetensors")


def test_refuses_to_overwrite_and_to_change_a_resumed_run(kappa_run, capsys):
    with pytest.raises(FileExistsError, match="--resume"):
        train({"preset": "graddiv-kappa", "base": "rse", **TINY, "out": str(kappa_run)}, quiet=True)
    with pytest.raises(ValueError, match=r"cannot change .*\['lr'\]"):
        train({"out": str(kappa_run), "resume": True, "lr": 0.5}, quiet=True)
    # resuming a finished run with the same number of epochs does nothing and keeps the checkpoint
    before = (kappa_run / "checkpoint.pt").read_bytes()
    assert cli.main(["train", "--resume", "--out", str(kappa_run), "--quiet"]) == 0
    assert (kappa_run / "checkpoint.pt").read_bytes() == before
    assert len((kappa_run / "metrics.jsonl").read_text().splitlines()) == 3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A loss that turns NaN in epoch 2 stops the run naming epoch and step; checkpoint.pt stays the one
    written after epoch 1 and the CLI exits with code 3."""
    from fastdiv import data

    out = tmp_path / "nan"
    base = ["train", "--preset", "rse", "--dataset", "synthetic", "--limit", "32", "--batch-size", "16",
            "--eval-samples", "2", "--stats-limit", "4", "--out", str(out), "--quiet"]
    assert cli.main(base + ["--epochs", "1"]) == 0
    good = (out / "checkpoint.pt").read_bytes()
    real = data.load_dataset

    def poisoned(*args, **kwargs):
        splits = real(*args, **kwargs)
        x, _ = splits.train.tensors
        x[:] = float("nan")
        return splits

    monkeypatch.setattr(data, "load_dataset", poisoned)
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(out), "--epochs", "2", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "epoch 2, step 1" in err and "checkpoint" in err
    assert (out / "checkpoint.pt").read_bytes() == good
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(TrainingDiverged, match="epoch 2, step 1"):
        train({"out": str(out), "resume": True, "epochs": 2}, quiet=True)


def test_graddiv_lowers_held_out_concentration(tmp_path):
    """GradDiv-kappa (on the RSE baseline, the GradDiv supplement's second baseline) against the same run
    at lambda = 0 on digits: identical warm-up epoch, then a much lower kappa_hat/p (and MRL) of the
    held-out gradients once lambda ramps up."""
    common = {"preset": "graddiv-kappa", "base": "rse", "dataset": "digits", "limit": 640, "epochs": 4,
              "warmup": 1, "rampup": 2, "stats_limit": 100, "stats_samples": 10, "eval_samples": 5}
    plain = train({**common, "lam": 0.0, "out": str(tmp_path / "lam0")}, quiet=True)
    reg = train({**common, "lam": 1.0, "out": str(tmp_path / "lam1")}, quiet=True)
    m0 = [json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines()]
    m1 = [json.loads(x) for x in (reg / "metrics.jsonl").read_text().splitlines()]
    drop = ("time_s", "train_time_s", "best")  # best.pt: any epoch of the lambda 0 run, epochs 3-4 of the other
    assert {k: v for k, v in m0[0].items() if k not in drop} == {k: v for k, v in m1[0].items() if k not in drop}
    assert m0[-1]["val_acc"] > 0.5  # the baseline learns in this setting
    assert m0[-1]["lambda"] == 0 and m1[-1]["lambda"] == 1.0
    assert m1[-1]["kappa_p"] < 0.5 * m0[-1]["kappa_p"]
    assert m1[-1]["rho"] < m0[-1]["rho"] - 0.2
    assert m1[-1]["mean_cos"] < m0[-1]["mean_cos"]
