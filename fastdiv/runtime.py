"""Process plumbing shared by the drivers (``fastdiv train`` and ``fastdiv evaluate``): which device
``'auto'`` means, the ranks of a torchrun launch, atomic file writes and the global RNG state.

One definition each, so the two drivers cannot drift apart (they once picked different GPUs for
``'auto'`` under torchrun).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Ranks", "atomic_save", "atomic_write_bytes", "atomic_write_text", "crash_point", "fsync_dir",
           "resolve_device", "rng_state", "seed_globals", "set_rng_state", "setup_ranks", "temp_path", "write_temp"]


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``'auto'`` (or None): this process's GPU when CUDA is available, else the CPU. ``'cuda'`` without
    an index is this process's GPU too: ``cuda:(LOCAL_RANK mod device count)``, so torchrun ranks on
    one machine get one GPU each (and more ranks than GPUs share them round-robin). ``'cuda:N'`` and
    ``'cpu'`` are taken as given."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available in this PyTorch build / machine")
        if dev.index is None:
            dev = torch.device("cuda", _local_rank() % torch.cuda.device_count())
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


@dataclasses.dataclass
class Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 without one). ``owned``: the default
    process group was initialized here, and :meth:`close` destroys it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, payload: Any) -> list[Any]:
        """Every rank's ``payload`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [payload]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, payload)
        return out

    def close(self) -> None:
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.owned = False


def setup_ranks(device: torch.device) -> Ranks:
    """The ranks of this process: an existing default process group is used as it is; under torchrun
    (WORLD_SIZE > 1) one is initialized here (NCCL on CUDA, else gloo)."""
    import torch.distributed as dist

    if not dist.is_available():
        return Ranks()
    owned = False
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Ranks()
        if device.type == "cuda":  # NCCL (and its object collectives) use the current device: one per rank
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owned = True
    return Ranks(dist.get_rank(), dist.get_world_size(), _local_rank(), owned)


def temp_path(path: Path) -> Path:
    """The temp file a write of ``path`` goes through (in ``path``'s directory, so the rename is atomic;
    a leading dot and ``.tmp``, which a run directory's clean-up removes)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_temp(path: Path, mode: str, write) -> Path:
    """Calls ``write(file)`` on :func:`temp_path` of ``path`` and fsyncs it; returns the temp file, complete
    on disk, for the caller to ``os.replace`` onto ``path``. A failed write leaves no temp file."""
    tmp = temp_path(Path(path))
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def fsync_dir(path: Path) -> None:
    """Makes the renames in directory ``path`` durable (not possible on every OS: then a no-op)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def crash_point(name: str) -> None:
    """Fault injection for the tests: when ``FASTDIV_CRASH_AT`` is ``name`` (or ``name:K``, the K-th time
    this point is reached, counting from 1), the process kills itself with SIGKILL here, as a power cut or
    an OOM kill would. Unset (always, outside the fault-injection tests), this does nothing."""
    spec = os.environ.get("FASTDIV_CRASH_AT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if _CRASH_COUNTS[name] >= int(count or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_CRASH_COUNTS: dict[str, int] = {}


def _write_atomically(path: Path, mode: str, write) -> None:
    """Calls ``write(file)`` on a temp file in ``path``'s directory, fsyncs it, then ``os.replace``s it
    onto ``path``: a reader (or a run killed mid-write) sees the old file or the new one, never a torn
    one. A failed write (a full disk included) leaves the old file and no temp file."""
    path = Path(path)
    tmp = write_temp(path, mode, write)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path``, atomically (see :func:`_write_atomically`)."""
    _write_atomically(path, "wb", lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: Path) -> None:
    """Writes ``text`` to ``path`` in UTF-8, atomically (see :func:`_write_atomically`)."""
    _write_atomically(path, "w", lambda fh: fh.write(text))


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Writes ``data`` to ``path``, atomically (see :func:`_write_atomically`)."""
    _write_atomically(path, "wb", lambda fh: fh.write(data))


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global RNG states (torch, Python, NumPy, and CUDA on a CUDA device) as plain tensors and
    numbers, so a checkpoint holding them loads with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_globals(seed: int) -> None:
    """Seeds torch, Python's ``random`` and NumPy's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
