"""What a run keeps on disk besides its config: ``checkpoint.pt`` (everything a resumed run needs, with the
metric lines of the epochs it completed), ``best.pt`` (the model of the best validation accuracy) and
``metrics.jsonl`` (one line per epoch).

Every file is written atomically (:func:`fastdiv.runtime.atomic_save`: temp file + ``os.replace``), the
checkpoint with its predecessor kept and its checksum recorded (:mod:`fastdiv.train.store`), so a run killed
at any moment leaves a complete checkpoint; and every ``.pt`` file is a plain dict of tensors and builtins
that ``torch.load(..., weights_only=True)`` reads. ``metrics.jsonl`` is rewritten from the checkpoint a run
resumes from, so it never holds an epoch the checkpoint has not completed, nor misses one it has.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CorruptFileError
from ..files import match_state_dict
from ..runtime import atomic_save, atomic_write_bytes, atomic_write_text, rng_state, set_rng_state

__all__ = ["CHECKPOINT_FORMAT", "TrainingCheckpoint", "append_metrics", "metric_lines", "save_best",
           "truncate_metrics", "write_metrics"]

CHECKPOINT_FORMAT = 1
_REQUIRED = ("epoch", "step_in_epoch", "global_step", "model", "optimizer", "scheduler", "rng", "best")


@dataclasses.dataclass
class TrainingCheckpoint:
    """The content of ``checkpoint.pt``: the position (``epoch`` epochs and ``step_in_epoch`` steps of
    the next one done, ``global_step`` optimizer steps in all), the model, optimizer and scheduler
    states, the RNG states, the best validation accuracy so far (``{'val_acc', 'epoch'}``), the running
    sums of the epoch in progress (``partial``, None at an epoch end), the preset's name and the metric
    records of the ``epoch`` completed epochs (``metrics``; None in checkpoints of older versions)."""

    epoch: int
    step_in_epoch: int
    global_step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    best: dict[str, Any]
    partial: dict[str, Any] | None
    preset: str | None
    metrics: list[dict[str, Any]] | None = None

    @classmethod
    def capture(cls, *, epoch: int, step_in_epoch: int, global_step: int, model: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler, device: torch.device, best: dict[str, Any],
                partial: dict[str, Any] | None, preset: str | None,
                metrics: list[dict[str, Any]] | None = None) -> TrainingCheckpoint:
        """The state of a run now (the RNG states of ``device`` and the CPU included)."""
        return cls(epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step, model=model.state_dict(),
                   optimizer=optimizer.state_dict(), scheduler=scheduler_state(scheduler), rng=rng_state(device),
                   best=dict(best), partial=partial, preset=preset,
                   metrics=None if metrics is None else [dict(r) for r in metrics])

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, device: torch.device,
                path: Path | None = None) -> None:
        """Loads the model, optimizer, scheduler and RNG states into a run (the position is the caller's).
        The RNG states go last, so nothing after them draws before the run continues. A checkpoint that
        does not fit the run (another model, optimizer or schedule) raises :class:`CorruptFileError`."""
        match_state_dict(model, self.model, "checkpoint", path,
                         fix="it belongs to another run, or the run's config.json was changed")
        try:
            optimizer.load_state_dict(self.optimizer)
            load_scheduler_state(scheduler, self.scheduler)
            set_rng_state(self.rng, device)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise CorruptFileError(f"checkpoint {path}: its optimizer, schedule or RNG state does not fit this run "
                                   f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); it "
                                   "belongs to another run, or the run's config.json was changed", path) from None

    def to_dict(self) -> dict[str, Any]:
        """The dict stored in ``checkpoint.pt`` (``format`` first, then the fields in order)."""
        return {"format": CHECKPOINT_FORMAT, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @classmethod
    def from_state(cls, state: Any, path: Path | None = None) -> TrainingCheckpoint:
        """The checkpoint in ``state`` (what ``torch.load`` read from ``path``); raises
        :class:`CorruptFileError` unless it is a fastdiv training checkpoint of a known format."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or any(
                k not in state for k in _REQUIRED):
            found = (f"format {state.get('format')!r}, keys {sorted(map(str, state))[:8]}" if isinstance(state, dict)
                     else f"a {type(state).__name__}")
            raise CorruptFileError(f"checkpoint {path} is not a fastdiv training checkpoint: expected a dict of format "
                                   f"{CHECKPOINT_FORMAT} with {', '.join(_REQUIRED)}; found {found}", path)
        try:
            metrics = state.get("metrics")
            if metrics is not None and (not isinstance(metrics, list) or not all(isinstance(r, dict) for r in metrics)):
                raise TypeError("metrics is not a list of records")
            return cls(epoch=int(state["epoch"]), step_in_epoch=int(state["step_in_epoch"]),
                       global_step=int(state["global_step"]), model=state["model"], optimizer=state["optimizer"],
                       scheduler=state["scheduler"], rng=state["rng"], best=dict(state["best"]),
                       partial=state.get("partial"), preset=state.get("preset"), metrics=metrics)
        except (TypeError, ValueError) as exc:
            raise CorruptFileError(f"checkpoint {path} holds a malformed field ({exc})", path) from None


def save_best(path: Path, *, epoch: int, val_acc: float, model: nn.Module, preset: str | None,
              config: dict[str, Any] | None = None) -> None:
    """Writes ``best.pt``: the model after ``epoch`` epochs, whose validation accuracy was ``val_acc``; and
    beside it ``best.safetensors``, the same weights for tools that load no pickles, with the run's
    ``config`` (JSON), the epoch, the accuracy and the preset as string metadata."""
    atomic_save({"format": CHECKPOINT_FORMAT, "epoch": epoch, "val_acc": val_acc, "model": model.state_dict(),
                 "preset": preset}, path)
    from safetensors.torch import save

    state = model.state_dict()
    # clones: safetensors refuses tensors that share storage (tied weights), and wants them contiguous;
    # a module's extra state (e.g. a Population's dispatch seed and call count) is not a tensor: JSON metadata
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    extra = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    meta = {"format": str(CHECKPOINT_FORMAT), "epoch": str(epoch), "val_acc": repr(float(val_acc)),
            "preset": preset or "", "config": json.dumps(config or {}, default=str),
            "extra_state": json.dumps(extra)}
    atomic_write_bytes(save(tensors, metadata=meta), path.with_suffix(".safetensors"))


# MultiStepLR keeps its milestones in a Counter: stored as a plain dict of ints, so that checkpoint.pt holds
# tensors and builtin containers only
def scheduler_state(sched) -> dict[str, Any]:
    sd = dict(sched.state_dict())
    if isinstance(sd.get("milestones"), Counter):
        sd["milestones"] = {int(k): int(v) for k, v in sd["milestones"].items()}
    return sd


def load_scheduler_state(sched, sd: dict[str, Any]) -> None:
    sd = dict(sd)
    if isinstance(sd.get("milestones"), dict):
        sd["milestones"] = Counter({int(k): int(v) for k, v in sd["milestones"].items()})
    sched.load_state_dict(sd)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Appends one epoch's line to ``metrics.jsonl`` and syncs it to disk."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def metric_lines(path: Path) -> list[dict[str, Any]]:
    """The epoch records of ``metrics.jsonl`` (none when there is no such file). A last line cut off by a
    kill is left out; any other line that is not a JSON record raises :class:`CorruptFileError`."""
    if not path.exists():
        return []
    if path.is_dir():
        raise CorruptFileError(f"metrics {path} is a directory, expected the run's metrics.jsonl file", path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("not an epoch record")
        except ValueError:
            if i == len(lines) - 1:  # a line half-written when the run was killed
                break
            raise CorruptFileError(f"metrics {path}: line {i + 1} is not an epoch record (expected a JSON object "
                                   f"with an integer 'epoch'); found {line[:60]!r}. Repair or remove that line, "
                                   "then rerun", path) from None
        records.append(record)
    return records


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Rewrites ``metrics.jsonl`` to hold exactly ``records`` (atomically); left as it is when it already does."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.is_dir():
        raise CorruptFileError(f"metrics {path} is a directory, expected the run's metrics.jsonl file; remove it "
                               "and rerun", path)
    if path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text:
        return
    atomic_write_text(text, path)


def truncate_metrics(path: Path, completed_epochs: int) -> None:
    """Drop metric lines of epochs after the checkpoint (written before a kill) and a half-written last
    line: for checkpoints of older versions, which do not hold the metric records themselves."""
    if path.exists():
        write_metrics(path, [r for r in metric_lines(path) if r["epoch"] <= completed_epochs])
