"""What a run keeps on disk besides its config: ``checkpoint.pt`` (everything a resumed run needs),
``best.pt`` (the model of the best validation accuracy) and ``metrics.jsonl`` (one line per epoch).

Every file is written atomically (:func:`fastdiv.runtime.atomic_save`: temp file + ``os.replace``), so a
run killed at any moment leaves the previous version intact, and every ``.pt`` file is a plain dict of
tensors and builtins that ``torch.load(..., weights_only=True)`` reads.
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

from ..runtime import atomic_save, atomic_write_bytes, atomic_write_text, rng_state, set_rng_state

__all__ = ["CHECKPOINT_FORMAT", "TrainingCheckpoint", "append_metrics", "save_best", "truncate_metrics"]

CHECKPOINT_FORMAT = 1


@dataclasses.dataclass
class TrainingCheckpoint:
    """The content of ``checkpoint.pt``: the position (``epoch`` epochs and ``step_in_epoch`` steps of
    the next one done, ``global_step`` optimizer steps in all), the model, optimizer and scheduler
    states, the RNG states, the best validation accuracy so far (``{'val_acc', 'epoch'}``), the running
    sums of the epoch in progress (``partial``, None at an epoch end) and the preset's name."""

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

    @classmethod
    def capture(cls, *, epoch: int, step_in_epoch: int, global_step: int, model: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler, device: torch.device, best: dict[str, Any],
                partial: dict[str, Any] | None, preset: str | None) -> TrainingCheckpoint:
        """The state of a run now (the RNG states of ``device`` and the CPU included)."""
        return cls(epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step, model=model.state_dict(),
                   optimizer=optimizer.state_dict(), scheduler=scheduler_state(scheduler), rng=rng_state(device),
                   best=dict(best), partial=partial, preset=preset)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, device: torch.device) -> None:
        """Loads the model, optimizer, scheduler and RNG states into a run (the position is the caller's).
        The RNG states go last, so nothing after them draws before the run continues."""
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        load_scheduler_state(scheduler, self.scheduler)
        set_rng_state(self.rng, device)

    def to_dict(self) -> dict[str, Any]:
        """The dict stored in ``checkpoint.pt`` (``format`` first, then the fields in order)."""
        return {"format": CHECKPOINT_FORMAT, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def save(self, path: Path) -> None:
        atomic_save(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path, device: torch.device) -> TrainingCheckpoint:
        state = torch.load(path, map_location=device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: unknown checkpoint format {state.get('format')!r}")
        return cls(epoch=int(state["epoch"]), step_in_epoch=int(state["step_in_epoch"]),
                   global_step=int(state["global_step"]), model=state["model"], optimizer=state["optimizer"],
                   scheduler=state["scheduler"], rng=state["rng"], best=dict(state["best"]),
                   partial=state.get("partial"), preset=state.get("preset"))


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


def truncate_metrics(path: Path, completed_epochs: int) -> None:
    """Drop metric lines of epochs after the checkpoint (written before a kill)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if int(json.loads(ln)["epoch"]) <= completed_epochs:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):
            continue
    if len(keep) != len(lines):
        atomic_write_text("".join(k + "\n" for k in keep), path)
