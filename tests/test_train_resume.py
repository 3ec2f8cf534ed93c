"""Runs in subprocesses: a run killed with SIGKILL mid-epoch (and another stopped by SIGTERM) and
resumed ends with exactly the metrics and weights of an uninterrupted run; 2-process DDP (gloo, CPU)
trains the same model as one process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TIME_KEYS = ("time_s", "train_time_s")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # one thread per process: identical numerics in every run, and no OpenMP spinning on a busy machine
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "fastdiv", "train", "--out", str(out), "--quiet", *args]


def _metrics(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in lines]


def _wait_for_lines(proc: subprocess.Popen, run: Path, count: int, timeout: float = 300.0) -> None:
    path = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len([x for x in path.read_text().splitlines() if x.strip()]) >= count:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (rc {proc.returncode}) before epoch {count}:\n{out}\n{err}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no epoch {count} within {timeout} s")


# graddiv-kappa: Bayesian layers (weight draws), KL, on-the-fly PGD, a lambda ramp-up across epochs and a
# learning-rate milestone; 6 steps per epoch
RUN = ["--preset", "graddiv-kappa", "--dataset", "synthetic", "--limit", "96", "--batch-size", "16", "--epochs", "3",
       "--milestones", "2", "--warmup", "0.5", "--rampup", "1", "--adv-steps", "2", "--eval-samples", "2",
       "--stats-limit", "8", "--stats-samples", "3"]


@pytest.mark.slow
def test_killed_and_interrupted_runs_resume_to_the_same_result(tmp_path):
    env = _env()
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(ref, *RUN), env=env, check=True, capture_output=True, text=True)

    run = tmp_path / "run"
    # 1) SIGTERM in epoch 2: the run saves a checkpoint after the current step and exits with 128 + 15
    proc = subprocess.Popen(_train_cmd(run, *RUN), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(proc, run, 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert "SIGTERM" in err and "--resume" in err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) >= (1, 0)

    # 2) resumed, then SIGKILL (no chance to save) in epoch 3
    proc = subprocess.Popen(_train_cmd(run, "--resume"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_lines(proc, run, 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL

    # 3) resumed to the end
    done = subprocess.run(_train_cmd(run, "--resume"), env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "resumed at epoch" in done.stdout

    assert _metrics(run) == _metrics(ref)
    assert [r["epoch"] for r in _metrics(run)] == [1, 2, 3]
    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 18
    for k, v in a["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["scheduler"] == b["scheduler"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU) with GAL's double backward through DDP: each process gets
    half of every global batch, gradients are averaged, so the weights equal a one-process run's. (SGD:
    Adam's normalized steps turn rounding-level gradient differences of near-zero gradients into
    lr-sized ones.)"""
    env = _env()
    args = ["--preset", "gal", "--dataset", "synthetic", "--limit", "64", "--batch-size", "16", "--epochs", "2",
            "--augment", "none", "--no-noise-aug", "--stats-limit", "8", "--optimizer", "sgd", "--lr", "0.05"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run(_train_cmd(single, *args), env=env, check=True, capture_output=True, text=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdiv",
           "train", "--out", str(ddp), "--quiet", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x 2 processes" in res.stdout
    config = json.loads((ddp / "config.json").read_text())
    assert config["world_size"] == 2
    m1, m2 = _metrics(single), _metrics(ddp)
    assert [r["epoch"] for r in m2] == [1, 2]  # rank 0 alone writes
    for r1, r2 in zip(m1, m2):
        for key in ("train_loss", "train_ce", "train_reg", "train_acc", "val_acc"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-5), key
        # cosines of nearly orthogonal gradients amplify float rounding differences
        assert r2["mean_cos"] == pytest.approx(r1["mean_cos"], abs=2e-3)
    a = torch.load(single / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(ddp / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not [p for p in ddp.iterdir() if p.name.endswith(".tmp")]
