"""Every kind of bad file fastdiv reads (truncated, wrong magic, foreign pickle, wrong shapes, empty, a directory)
in every place it reads one: a run's checkpoint.pt (``train --resume``), best.pt and config.json
(``evaluate RUN``), ``--weights``, ``--config``, ``--data`` and saved adversarial examples. Each ends in one line
``fastdiv CMD: error: ...`` naming the file, with the exit code of docs/errors.md (3: corrupted or unsafe,
2: a user's file that does not fit), and creates no file anywhere (the --out directory included)."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiv.cli import main
from fastdiv.errors import CorruptFileError, MissingFileError, UnsafeFileError
from fastdiv.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("truncated", "wrong magic", "foreign pickle", "wrong shapes", "empty", "directory")
#: what each kind's message says about a .pt file (without a checksum to compare)
SAYS = {"truncated": "not a readable PyTorch file", "wrong magic": "a file of another format",
        "foreign pickle": "refused as unsafe or foreign", "wrong shapes": "shapes differ",
        "empty": "is empty (0 bytes)", "directory": "is a directory"}
#: evaluate settings that stop at once (the errors come before any attack)
EVAL = ["--attacks", "fgsm", "--eps", "0.1", "--limit", "4", "--no-analysis", "--no-checklist", "--transfer-models",
        "0", "--ensemble-samples", "2", "--eot-samples", "2", "--quiet"]


class Foreign:
    """A class a pickle names: torch.load(weights_only=True) must refuse it without importing it."""


def corrupt_pt(path: Path, kind: str) -> None:
    """Turns the .pt file ``path`` into a bad file of ``kind``."""
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:min(100_000, len(data) // 2)])
    elif kind == "wrong magic":
        path.write_bytes(b"GARBAGE!" + data[8:])
    elif kind == "foreign pickle":
        state = torch.load(io.BytesIO(data), weights_only=True)
        state["model"]["extra"] = Foreign()
        torch.save(state, path)
    elif kind == "wrong shapes":
        state = torch.load(io.BytesIO(data), weights_only=True)
        model = state["model"]
        key = next(k for k, v in model.items() if isinstance(v, torch.Tensor) and v.dim() >= 1)
        model[key] = torch.zeros(model[key].shape[0] + 1, *model[key].shape[1:])
        torch.save(state, path)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
        path.mkdir()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def refused(capsys, argv: list[str], code: int, root: Path, *fragments: str) -> str:
    """Runs ``fastdiv ARGV``: exit ``code``, one line on stderr holding every fragment, nothing changed under
    ``root`` (no file created, none modified)."""
    before = snapshot(root)
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastdiv {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err and "weights_only=False" not in err
    assert snapshot(root) == before
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 2-epoch run (RSE noise layers on LeNet-5, synthetic data): checkpoint.pt, checkpoint.prev.pt,
    checkpoint.sha256, best.pt, config.json, metrics.jsonl."""
    out = tmp_path_factory.mktemp("runs") / "rse"
    train({"preset": "rse", "model": "lenet5", "dataset": "synthetic", "limit": 32, "batch_size": 16, "epochs": 2,
           "stats_limit": 0, "eval_samples": 2, "out": str(out), "device": "cpu"}, quiet=True)
    return out


@pytest.fixture
def work(tmp_path, run_dir, monkeypatch) -> Path:
    """A copy of the run under tmp_path/run, with tmp_path/cwd as the working directory."""
    shutil.copytree(run_dir, tmp_path / "run")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_a_bad_checkpoint_without_a_previous_one(work, capsys, kind):
    run = work / "run"
    (run / "checkpoint.prev.pt").unlink()
    (run / "checkpoint.sha256").unlink()  # a run of an older version: each kind is found by loading it
    corrupt_pt(run / "checkpoint.pt", kind)
    refused(capsys, ["train", "--resume", "--out", str(run), "--epochs", "3", "--quiet"], 3, work,
            str(run / "checkpoint.pt"), SAYS[kind], "no usable checkpoint", "another --out")


@pytest.mark.parametrize("kind", KINDS)
def test_a_changed_checkpoint_fails_its_checksum_and_the_previous_one_is_used(work, capsys, kind):
    """checkpoint.pt altered in any way: skipped with a warning naming it and why; the run resumes from
    checkpoint.prev.pt (after epoch 1), re-runs epoch 2 and ends with the metrics it had."""
    run = work / "run"
    before = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    corrupt_pt(run / "checkpoint.pt", kind)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    why = "is a directory" if kind == "directory" else "does not match the size and SHA-256"
    assert f"skipped checkpoint {run / 'checkpoint.pt'}" in err and why in err
    assert "resuming from" in err and "checkpoint.prev.pt (epoch 2, step 1)" in err
    after = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    drop = ("time_s", "train_time_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in after] == [
        {k: v for k, v in r.items() if k not in drop} for r in before]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_a_run_with_bad_best_weights(work, capsys, kind):
    run = work / "run"
    corrupt_pt(run / "best.pt", kind)
    refused(capsys, ["evaluate", str(run), "--out", str(work / "out"), *EVAL], 3, work, str(run / "best.pt"),
            SAYS[kind])


@pytest.mark.parametrize("kind", ["truncated", "wrong magic", "empty", "directory", "wrong shapes"])
def test_evaluate_a_run_with_a_bad_config(work, capsys, kind):
    path = work / "run" / "config.json"
    text = path.read_text()
    says = {"truncated": "invalid JSON", "wrong magic": "not a text file", "empty": "an empty file",
            "directory": "is a directory", "wrong shapes": "in_shape"}[kind]
    if kind == "truncated":
        path.write_text(text[:len(text) // 2])
    elif kind == "wrong magic":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    elif kind == "empty":
        path.write_text("")
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_text(json.dumps({**json.loads(text), "in_shape": "8x8"}))
    refused(capsys, ["evaluate", str(work / "run"), "--out", str(work / "out"), *EVAL], 3, work, str(path), says)


@pytest.mark.parametrize("kind, code", [("truncated", 3), ("wrong magic", 3), ("foreign pickle", 3),
                                        ("wrong shapes", 2), ("empty", 3), ("directory", 2)])
def test_bad_weights_file(work, capsys, kind, code):
    """--weights is the user's file: one that does not fit the model (or is a directory) is bad input (2), a
    damaged or unsafe one is corrupted (3)."""
    weights = work / "w.pt"
    shutil.copy(work / "run" / "best.pt", weights)
    corrupt_pt(weights, kind)
    factory = work / "factory.py"
    factory.write_text("from fastdiv.train import load_run\n\n\ndef make():\n"
                       f"    return load_run({str(work / 'run')!r})[0]\n")
    data = work / "test.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
    refused(capsys, ["evaluate", "--model", f"{factory}:make", "--weights", str(weights), "--data", str(data),
                     "--out", str(work / "out"), *EVAL], code, work, str(weights), SAYS[kind])


@pytest.mark.parametrize("kind, says", [("truncated", "invalid JSON"), ("wrong magic", "not a text file"),
                                        ("empty", "an empty file"), ("directory", "is a directory"),
                                        ("wrong shapes", "JSON array")])
def test_bad_config_file(work, capsys, kind, says):
    """--config is the user's file: every fault in it is bad input (2), and no run directory is created."""
    path = work / "c.json"
    if kind == "truncated":
        path.write_text('{"preset": "rse", "epo')
    elif kind == "wrong magic":
        path.write_bytes(b"\x80\x04\x95\xff\xfe")
    elif kind == "empty":
        path.write_text("")
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_text('["rse"]')
    refused(capsys, ["train", "--config", str(path), "--out", str(work / "new")], 2, work, str(path), says)


@pytest.mark.parametrize("kind, code, says", [
    ("truncated", 3, "not a readable .npz file"), ("wrong magic", 3, "not a readable .npz file"),
    ("foreign pickle", 3, "refused as unsafe or foreign"), ("wrong shapes", 2, "labels must have shape [4]"),
    ("empty", 3, "is empty (0 bytes)"), ("directory", 2, "is a directory")])
def test_bad_data_file(work, capsys, kind, code, says):
    path = work / "test.npz"
    x = np.zeros((4, 1, 8, 8), np.float32)
    if kind == "foreign pickle":
        np.savez(path, x=x, y=np.array([Foreign()] * 4, dtype=object))
    elif kind == "wrong shapes":
        np.savez(path, x=x, y=np.zeros(3, np.int64))
    elif kind == "directory":
        path.mkdir()
    else:
        np.savez(path, x=x, y=np.zeros(4, np.int64))
        data = path.read_bytes()
        path.write_bytes({"truncated": data[:len(data) // 2], "wrong magic": b"GARBAGE!" + data[8:],
                          "empty": b""}[kind])
    factory = work / "factory.py"
    factory.write_text("import torch\n\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Flatten(), "
                       "torch.nn.Linear(64, 10))\n")
    refused(capsys, ["evaluate", "--model", f"{factory}:make", "--data", str(path), "--out", str(work / "out"),
                     *EVAL], code, work, str(path), says)


def test_bad_dataset_file_exits_3_and_creates_no_run_directory(work, capsys):
    """A truncated MNIST file (corrupted: 3), and a data directory that does not exist (bad input: 2)."""
    data = work / "mnist"
    data.mkdir()
    header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (10, 28, 28))
    (data / "train-images-idx3-ubyte").write_bytes(header + bytes(100))
    for name, magic, dims in (("train-labels-idx1-ubyte", 2049, (10,)), ("t10k-images-idx3-ubyte", 2051, (2, 28, 28)),
                              ("t10k-labels-idx1-ubyte", 2049, (2,))):
        size = int(np.prod(dims))
        (data / name).write_bytes(magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + bytes(size))
    argv = ["train", "--preset", "rse", "--dataset", "mnist", "--out", str(work / "new"), "--quiet"]
    refused(capsys, [*argv, "--data-dir", str(data)], 3, work, "train-images-idx3-ubyte", "truncated")
    refused(capsys, [*argv, "--data-dir", str(work / "nowhere")], 2, work, str(work / "nowhere"), "does not exist")


def test_saved_adversarial_examples(tmp_path):
    from fastdiv.evaluate import load_adversarial, save_adversarial

    flags = torch.ones(2, dtype=torch.bool)
    path = save_adversarial(tmp_path / "a.safetensors", x_adv=torch.zeros(2, 1, 4, 4), y=torch.zeros(2).long(),
                            index=torch.arange(2), ensemble_correct=flags, worst_correct=flags, info={"attack": "pgd"})
    assert load_adversarial(path)[1] == {"attack": "pgd"}
    data = path.read_bytes()
    for kind, content in (("truncated", data[:len(data) // 2]), ("wrong magic", b"GARBAGE!" + data[8:]),
                          ("empty", b"")):
        path.write_bytes(content)
        with pytest.raises(CorruptFileError, match="adversarial examples .*a.safetensors") as e:
            load_adversarial(path)
        assert e.value.exit_code == 3, kind
    path.unlink()
    path.mkdir()
    with pytest.raises(CorruptFileError, match="is a directory"):
        load_adversarial(path)
    with pytest.raises(MissingFileError, match="does not exist"):
        load_adversarial(tmp_path / "missing.safetensors")


def test_load_run_names_the_file_and_refuses_foreign_pickles(work):
    """The Python API raises the same errors (also ValueError / FileNotFoundError for older callers)."""
    from fastdiv.train import load_run

    run = work / "run"
    corrupt_pt(run / "best.pt", "foreign pickle")
    with pytest.raises(UnsafeFileError, match=r"best weights .*best.pt was refused as unsafe or foreign: it holds "
                                              r"the Python object test_bad_files.Foreign"):
        load_run(run)
    with pytest.raises(ValueError):
        load_run(run)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run(work / "nowhere")


def test_a_checkpoint_of_an_older_version_resumes_and_repairs_metrics(work, capsys):
    """A run written before checkpoint.sha256 and the records in the checkpoint: metrics.jsonl is cut to the
    checkpoint's epoch, a line cut off by a kill is dropped, and the run continues."""
    run = work / "run"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["metrics"]
    torch.save(state, run / "checkpoint.pt")
    for name in ("checkpoint.prev.pt", "checkpoint.sha256"):
        (run / name).unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    epoch_3 = json.loads(lines[-1]) | {"epoch": 3}  # written before a kill that the checkpoint never saw
    (run / "metrics.jsonl").write_text("\n".join([*lines, json.dumps(epoch_3), '{"epoch": 4, "train_lo']))
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--quiet"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[:2] == [json.loads(x) for x in lines]
    assert records[2] != epoch_3
