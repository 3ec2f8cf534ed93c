"""fastdiv.runtime: the device 'auto' means, torchrun ranks, atomic writes and RNG state, shared by
``fastdiv train`` and ``fastdiv evaluate``."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from fastdiv import runtime


def test_resolve_device_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == runtime.resolve_device(None) == torch.device("cpu")
    assert runtime.resolve_device("cpu") == runtime.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        runtime.resolve_device("cuda")
    for bad in ("tpu", "gpu0", "meta"):
        with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
            runtime.resolve_device(bad)


@pytest.mark.parametrize("local_rank, expected", [(None, 0), ("1", 1), ("3", 1)])
def test_resolve_device_one_gpu_per_local_rank(monkeypatch, local_rank, expected):
    """'auto' and 'cuda' both mean cuda:(LOCAL_RANK mod device count); an explicit index is kept."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert runtime.resolve_device("auto") == runtime.resolve_device("cuda") == torch.device("cuda", expected)
    assert runtime.resolve_device("cuda:0") == torch.device("cuda", 0)


def test_both_drivers_use_the_one_device_rule():
    # the modules of the two drivers that pick the device and set up the ranks
    from fastdiv.evaluate import run as evaluate_run
    from fastdiv.train import run_setup as train_setup

    assert train_setup.resolve_device is evaluate_run.resolve_device is runtime.resolve_device
    assert train_setup.setup_ranks is evaluate_run.setup_ranks is runtime.setup_ranks


def test_single_process_ranks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = runtime.setup_ranks(torch.device("cpu"))
    assert (ranks.rank, ranks.world, ranks.enabled, ranks.main, ranks.owned) == (0, 1, False, True, False)
    assert ranks.gather({"a": 1}) == [{"a": 1}]
    ranks.close()  # nothing to destroy
    assert not torch.distributed.is_initialized()


def test_atomic_writes(tmp_path):
    path = tmp_path / "state.pt"
    runtime.atomic_save({"x": torch.arange(3)}, path)
    runtime.atomic_save({"x": torch.arange(4)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(4))
    text = tmp_path / "config.json"
    runtime.atomic_write_text("one\n", text)
    runtime.atomic_write_text("two\n", text)
    assert text.read_text() == "two\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "state.pt"]  # no temp files left


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    runtime.atomic_save({"x": 1}, path)
    with pytest.raises((AttributeError, pickle.PicklingError, TypeError)):
        runtime.atomic_save({"x": lambda: 0}, path)  # not picklable: the write fails midway
    assert torch.load(path, weights_only=True) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_rng_state_round_trip_and_weights_only_load(tmp_path):
    runtime.seed_globals(123)
    state = runtime.rng_state(torch.device("cpu"))
    runtime.atomic_save(state, tmp_path / "rng.pt")
    first = (torch.rand(3), random.random(), np.random.rand())
    runtime.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
