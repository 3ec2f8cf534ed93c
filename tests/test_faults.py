"""Fault injection: ``python -m fastdiv train`` and ``fastdiv evaluate`` killed with SIGKILL again and again, at
random steps, at random times and inside every step of a checkpoint write, then resumed each time with ``--resume``.
The end is the result of an uninterrupted run: the same metrics, no epoch lost or written twice in metrics.jsonl
(a line cut off by a kill included), the same weights; the same results.json.

Kills inside the checkpoint write use ``FASTDIV_CRASH_AT=POINT:K`` (fastdiv.runtime.crash_point: the process
SIGKILLs itself the K-th time it reaches POINT), so that each window of the write sequence is hit for certain; the
random kills pick the step (``train-step:K``) or the moment at random from a seeded generator."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TIME_KEYS = ("time_s", "train_time_s")

# RSE (noise layers: every step draws) on LeNet-5, a milestone: 6 steps per epoch, 12 epochs: more than the kills
# below can complete (each at most 1 or 2), so that every planned kill finds the run still going
EPOCHS = 12
TRAIN = ["train", "--preset", "rse", "--model", "lenet5", "--dataset", "synthetic", "--limit", "96", "--batch-size",
         "16", "--epochs", str(EPOCHS), "--milestones", "6", "--lr", "0.003", "--stats-limit", "8", "--stats-samples",
         "2", "--eval-samples", "2", "--quiet"]
#: every window of a checkpoint write (store.py), the K-th save of the process: after the temp file is written, after
#: the checksums are listed, between moving checkpoint.pt to checkpoint.prev.pt and putting the new one in place, and
#: after the save (before metrics.jsonl gets its line)
CHECKPOINT_POINTS = ["checkpoint-written:1", "checkpoint-listed:1", "checkpoint-rotated:1", "checkpoint-saved:1",
                     "checkpoint-rotated:2", "checkpoint-written:2", "checkpoint-saved:2"]


def _env(crash_at: str | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # identical numerics in every process, no OpenMP spinning on a busy machine
    env.pop("FASTDIV_CRASH_AT", None)
    env.pop("FASTDIV_DEBUG", None)
    if crash_at:
        env["FASTDIV_CRASH_AT"] = crash_at
    return env


def _fastdiv(*args: str, crash_at: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastdiv", *args], env=_env(crash_at), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def _metrics(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in lines]


def _consistent(run: Path) -> None:
    """metrics.jsonl holds epochs 1..m once each (a last line cut off by a kill aside), and no epoch beyond the
    newest complete checkpoint: no completed epoch is written twice or ahead of what a resume restores."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    epochs = []
    for i, line in enumerate(lines):
        try:
            epochs.append(json.loads(line)["epoch"])
        except ValueError:
            assert i == len(lines) - 1, f"line {i + 1} of metrics.jsonl is broken"
    assert epochs == list(range(1, len(epochs) + 1)), epochs
    saved = [torch.load(p, weights_only=True)["epoch"] for p in (run / "checkpoint.pt", run / "checkpoint.prev.pt")
             if p.is_file()]
    assert len(epochs) <= max(saved, default=0), (epochs, saved)


@pytest.mark.slow
def test_train_killed_again_and_again_ends_as_an_uninterrupted_run(tmp_path):
    rng = random.Random(20240607)
    ref = tmp_path / "ref"
    code, log = _finish(_fastdiv(*TRAIN, "--out", str(ref)))
    assert code == 0, log

    run = tmp_path / "run"
    plan = (["time"] + [f"train-step:{rng.randint(1, 8)}" for _ in range(2)] + CHECKPOINT_POINTS[:4]
            + [f"train-step:{rng.randint(1, 8)}"] + ["time"] + CHECKPOINT_POINTS[4:])
    kills, started = 0, False
    for i, point in enumerate(plan):
        args = (*TRAIN, "--out", str(run)) + (("--resume",) if started else ())
        if point == "time":
            # a random moment once training runs (the header line is printed when it starts); within the first
            # 6 steps whatever the machine's speed (the crash point is the backstop), so the run is never done early
            proc = _fastdiv(*args, crash_at="train-step:6")
            assert proc.stdout.readline().startswith("fastdiv train:")
            time.sleep(rng.uniform(0.0, 0.2))
            proc.send_signal(signal.SIGKILL)
        else:
            proc = _fastdiv(*args, crash_at=point)
        code, log = _finish(proc)
        assert code in (-signal.SIGKILL, 0), (point, log)
        kills += code == -signal.SIGKILL
        started = True
        assert "Traceback" not in log and "error" not in log, (point, log)
        if i == 4:  # a kill in the middle of appending a line: the last line of metrics.jsonl is cut off
            with open(run / "metrics.jsonl", "a") as fh:
                fh.write('{"epoch": 99, "step": 9, "train_lo')
        _consistent(run)
    assert kills >= 10, kills

    code, log = _finish(_fastdiv(*TRAIN, "--out", str(run), "--resume"))
    assert code == 0, log
    assert [r["epoch"] for r in _metrics(run)] == list(range(1, EPOCHS + 1))
    assert _metrics(run) == _metrics(ref)
    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6 * EPOCHS
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["scheduler"] == b["scheduler"]
    best_a, best_b = (torch.load(r / "best.pt", weights_only=True) for r in (ref, run))
    assert (best_a["epoch"], best_a["val_acc"]) == (best_b["epoch"], best_b["val_acc"])
    for k, v in best_a["model"].items():
        assert torch.equal(v, best_b["model"][k]), k
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


MODEL = '''import torch


def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
'''
# 3 rows x 3 eps = 9 table units
EVALUATE = ["--attacks", "fgsm,pgd,bim", "--eps", "0.05,0.1,0.2", "--steps", "3", "--no-analysis", "--no-checklist",
            "--transfer-models", "0", "--quiet"]


@pytest.mark.slow
def test_evaluate_killed_and_resumed_ends_as_an_uninterrupted_run(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    gen = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", x=gen.random((24, 1, 4, 4), dtype=np.float32), y=np.arange(24) % 4)
    args = ["evaluate", "--model", f"{tmp_path / 'model.py'}:make", "--data", str(tmp_path / "test.npz"), *EVALUATE]
    code, log = _finish(_fastdiv(*args, "--out", str(tmp_path / "ref")))
    assert code == 0, log

    out = tmp_path / "out"
    done = []
    for i, point in enumerate(["evaluate-unit-saved:2", "evaluate-unit-saved:1", "evaluate-unit-saved:3"]):
        code, log = _finish(_fastdiv(*args, "--out", str(out), *(["--resume"] if i else []), crash_at=point))
        assert code == -signal.SIGKILL, log
        done.append(len(json.loads((out / "rows.partial.json").read_text())["units"]))
        assert not (out / "results.json").exists()
    assert done == [2, 3, 6]  # each resumed run added to what was kept
    code, log = _finish(_fastdiv(*args, "--out", str(out), "--resume"))
    assert code == 0, log

    def comparable(path: Path) -> dict:
        return {k: v for k, v in json.loads(path.read_text()).items() if k not in ("created", "timing", "command")}

    assert comparable(out / "results.json") == comparable(tmp_path / "ref" / "results.json")
    assert not (out / "rows.partial.json").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
