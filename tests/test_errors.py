"""The one error path of the ``fastdiv`` command line (fastdiv/errors.py, fastdiv/cli.py): one line and a documented
exit code for every fault, ``--debug`` for the traceback, 130 after Ctrl-C; outputs checked before any work (an
--out that is a file or read-only, a missing data directory); a full disk; the settings every driver validates
(ε and α budgets, batch size); integer logits; resuming a run that lost its checkpoint; and the leftovers a
refused command must not leave."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import fastdiv
from fastdiv import errors
from fastdiv.cli import main
from fastdiv.train import resolve_config, train

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = {"preset": "rse", "model": "lenet5", "dataset": "synthetic", "limit": 32, "batch_size": 16,
            "stats_limit": 0, "eval_samples": 2, "device": "cpu"}
TRAIN = ["train", "--preset", "rse", "--model", "lenet5", "--dataset", "synthetic", "--limit", "32", "--batch-size",
         "16", "--stats-limit", "0", "--eval-samples", "2", "--quiet"]

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastdiv {command}: error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "rse"
    train({**TINY_RUN, "epochs": 2, "out": str(out)}, quiet=True)
    return out


@pytest.fixture
def run(tmp_path, finished_run) -> Path:
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------------------------------
# exit codes, --debug, Ctrl-C
# ------------------------------------------------------------------------------------------------


def test_every_exit_code_is_documented():
    text = (REPO / "docs" / "errors.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", section, flags=re.M)}
    assert documented == set(errors.EXIT_CODES)
    for cls in (errors.BadInputError, errors.MissingFileError, errors.CorruptFileError, errors.UnsafeFileError,
                errors.WriteError, fastdiv.train.TrainingDiverged):
        assert cls.exit_code in documented and f"`{cls.__name__}`" in section, cls
    assert "errors.md" in (REPO / "mkdocs.yml").read_text()


def test_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    argv = [*TRAIN, "--eps-train", "2", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "eps_train (--eps-train) must be in [0, 1]" in one_line(capsys, "train")
    with pytest.raises(ValueError, match="eps_train"):
        main([*argv, "--debug"])
    with pytest.raises(ValueError, match="eps_train"):
        main(["--debug", *argv])
    monkeypatch.setenv("FASTDIV_DEBUG", "1")
    with pytest.raises(ValueError, match="eps_train"):
        main(argv)
    assert not (tmp_path / "r").exists()


def test_ctrl_c_and_internal_errors(capsys, monkeypatch):
    import importlib

    info_module = importlib.import_module("fastdiv.info")  # fastdiv.info is also the function's name

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(info_module, "info", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "fastdiv info: interrupted"

    def broken():
        raise RuntimeError("unexpected state")

    monkeypatch.setattr(info_module, "info", broken)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: unexpected state" in err and "--debug" in err
    with pytest.raises(RuntimeError):
        main(["info", "--debug"])


# ------------------------------------------------------------------------------------------------
# outputs checked before any work
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Any dataset loading (the first work of train and evaluate) fails the test."""
    from fastdiv import data

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output directory was checked")

    monkeypatch.setattr(data, "load_dataset", refuse)


def test_out_that_is_a_file(tmp_path, capsys, run, no_work):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for argv in ([*TRAIN, "--out", str(afile)], [*TRAIN, "--out", str(afile / "sub")],
                 ["evaluate", str(run), "--out", str(afile), "--quiet"],
                 ["demo", "--quick", "--out", str(afile)]):
        assert main(argv) == 2, argv
        err = one_line(capsys, argv[0])
        assert str(afile) in err and ("is an existing file" in err or "is a file" in err)
    assert afile.read_text() == "keep me"


@pytest.fixture
def unwritable(tmp_path):
    """A directory path whose parent cannot be written: read-only permissions (not root), else /sys, which
    no process may create files in."""
    if os.geteuid() != 0:
        parent = tmp_path / "readonly"
        parent.mkdir()
        parent.chmod(0o555)
        yield parent / "out"
        parent.chmod(0o755)
        return
    probe = Path("/sys/.fastdiv-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError:
        yield Path("/sys/fastdiv-test-out")
        return
    probe.unlink()
    pytest.skip("no unwritable directory on this machine (root, and /sys accepts files)")


def test_read_only_out(capsys, run, unwritable, no_work):
    for argv in ([*TRAIN, "--out", str(unwritable)], ["evaluate", str(run), "--out", str(unwritable), "--quiet"],
                 ["demo", "--quick", "--out", str(unwritable)]):
        assert main(argv) == 2, argv
        err = one_line(capsys, argv[0])
        assert f"--out {unwritable}: cannot write in" in err
    assert not unwritable.exists()


def test_missing_data_directory(tmp_path, capsys):
    assert main(["train", "--preset", "rse", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "r")]) == 2
    assert "data_dir" in one_line(capsys, "train")
    assert main(["train", "--preset", "rse", "--dataset", "mnist", "--out", str(tmp_path / "r")]) == 2
    assert "data_dir (--data-dir) is required" in one_line(capsys, "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_full_disk_keeps_the_last_checkpoint(run, capsys, monkeypatch):
    """ENOSPC while the epoch-3 checkpoint is written: one line, exit code 4, checkpoint.pt and metrics.jsonl as they
    were, no temp file; once there is space, --resume continues."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell the checkpoint's file from the others")
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    real = os.fsync

    def full(fd):
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--quiet"]) == 4
    assert "no space left on the device" in one_line(capsys, "train")
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(os, "fsync", real)
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--quiet"]) == 0
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# one validation of ε and α; batch size
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--eps-train", "1e9", "eps_train (--eps-train) must be in [0, 1] for the ℓ∞ threat model"),
    ("--eps-train", "-0.1", "eps_train (--eps-train) must be in [0, 1]"),
    ("--adv-alpha", "2", "adv_alpha (--adv-alpha) must be in (0, 1]"),
    ("--adv-alpha", "0", "adv_alpha (--adv-alpha) must be in (0, 1]"),
    ("--offline-eps", "1.5", "offline_eps (--offline-eps) must be in (0, 1]"),
    ("--offline-alpha", "inf", "offline_alpha (--offline-alpha) must be in (0, 1]"),
    ("--noise-eps", "3", "noise_eps (--noise-eps) must be in [0, 1]"),
    ("--batch-size", "10000000000", "batch_size must be an int >= 1 and <= 2147483647 (--batch-size)"),
    ("--batch-size", "0", "batch_size must be an int >= 1"),
])
def test_train_budgets_and_batch_size(tmp_path, capsys, flag, value, message):
    assert main([*TRAIN, flag, value, "--out", str(tmp_path / "r")]) == 2
    assert message in one_line(capsys, "train")
    assert not (tmp_path / "r").exists()


def test_one_budget_check_for_train_and_evaluate():
    from fastdiv._checks import check_budget
    from fastdiv.evaluate import config as eval_config
    from fastdiv.train import config as train_config

    assert train_config.check_budget is eval_config.check_budget is check_budget
    assert resolve_config({"preset": "advbnn", "eps_train": "8/255"}).eps_train == pytest.approx(8 / 255)
    with pytest.raises(ValueError, match=r"eps_train \(--eps-train\) must be in \[0, 1\]"):
        resolve_config({"preset": "advbnn", "eps_train": 1e9})
    with pytest.raises(ValueError, match="eps: every ε must be in \\[0, 1\\]"):
        eval_config.parse_eps("1e9")


# ------------------------------------------------------------------------------------------------
# integer logits: one check for the attacks, training and evaluation
# ------------------------------------------------------------------------------------------------


class IntegerLogits(nn.Module):
    """A classifier that returns rounded int64 scores (e.g. a model that ends in ``.long()``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return (100 * self.fc(x.flatten(1))).long()


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd-ce", "square", "mifgsm"])
def test_attacks_refuse_integer_logits(name):
    attack = fastdiv.attacks.ATTACKS[name](IntegerLogits(), eps=0.1)
    with pytest.raises(ValueError, match=r"must return floating-point logits \[N, C\], got torch.int64"):
        attack(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))


def test_training_and_evaluation_refuse_integer_logits():
    from fastdiv.evaluate.inputs import EvalInputError, check_logits
    from fastdiv.train.trainer import sample_logits_with_graph

    x = torch.rand(2, 1, 4, 4)
    for randomized, batched in ((False, False), (True, True), (True, False)):
        with pytest.raises(ValueError, match="fastdiv train: the model must return floating-point logits"):
            sample_logits_with_graph(IntegerLogits(), x, 2, 0, stacked=False, randomized=randomized, batched=batched)
    with pytest.raises(EvalInputError, match="must return floating-point logits"):
        check_logits(IntegerLogits(), x, torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------------
# no silent restart, no silent fallback
# ------------------------------------------------------------------------------------------------


def test_resume_refuses_a_run_that_lost_its_checkpoints(run, capsys):
    metrics = (run / "metrics.jsonl").read_bytes()
    (run / "checkpoint.pt").unlink()
    (run / "checkpoint.prev.pt").unlink()
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 2
    err = one_line(capsys, "train")
    assert "has no checkpoint.pt" in err and "record 2 completed epoch(s)" in err and "best.pt" in err
    assert (run / "metrics.jsonl").read_bytes() == metrics


def test_resume_starts_a_run_that_recorded_no_epoch(tmp_path, capsys):
    """Killed in epoch 1 before any checkpoint: --resume starts at epoch 1, and says so."""
    out = tmp_path / "r"
    train({**TINY_RUN, "epochs": 1, "out": str(out)}, quiet=True)
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "checkpoint.sha256"):
        (out / name).unlink(missing_ok=True)
    (out / "metrics.jsonl").write_text('{"epoch": 1, "st')  # a line cut off by the kill records nothing
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    assert "no checkpoint and no completed epoch yet: starting at epoch 1" in capsys.readouterr().err
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_evaluate_says_when_it_uses_the_last_checkpoint(run, capsys):
    from fastdiv.evaluate import evaluate

    (run / "best.pt").unlink()
    settings = dict(attacks="fgsm", eps=[0.1], limit=4, analysis=False, checklist=False, transfer_models=0,
                    ensemble_samples=2, eot_samples=2, forms="mean", write=False)
    res = evaluate(run, **settings)
    assert res["run"]["which"] == "last"
    assert f"{run} has no best.pt; evaluating checkpoint.pt (the newest checkpoint) instead" in capsys.readouterr().err
    evaluate(run, quiet=True, **settings)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------
# refused commands leave nothing behind
# ------------------------------------------------------------------------------------------------


def test_refused_config_and_init_from_create_no_run_directory(tmp_path, capsys, finished_run):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"preset": "rse", "model": None}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "a" / "b")]) == 2
    assert "model must be one of" in one_line(capsys, "train")
    assert main([*TRAIN, "--init-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a" / "b")]) == 2
    assert "--init-from" in one_line(capsys, "train")
    # a run of another model: refused once the model is built, still before the run directory exists
    assert main([*TRAIN, "--model", "conv3", "--init-from", str(finished_run), "--out", str(tmp_path / "a")]) == 2
    assert "does not match this run's" in one_line(capsys, "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]
