"""Where a run's checkpoint lives on disk, so that a kill at any moment, a full disk or a damaged file never
costs a completed epoch.

Files in the run directory:

* ``checkpoint.pt``: the newest checkpoint;
* ``checkpoint.prev.pt``: the one before it, kept until the newest is complete on disk;
* ``checkpoint.sha256``: JSON listing the size and SHA-256 of the checkpoint contents known to be complete
  (the newest and the one kept), with their position.

:meth:`CheckpointStore.save` (1) writes the new checkpoint to a temp file and fsyncs it, (2) rewrites
``checkpoint.sha256`` (atomically) to list the new digest beside the current one, (3) renames
``checkpoint.pt`` to ``checkpoint.prev.pt`` and (4) renames the temp file to ``checkpoint.pt``. Whichever
step a kill interrupts, one of the two files holds listed, complete content: before (3) ``checkpoint.pt``
is the current checkpoint, between (3) and (4) ``checkpoint.prev.pt`` is, after (4) both are.

:meth:`CheckpointStore.load_latest` takes ``checkpoint.pt``, else ``checkpoint.prev.pt``: the first whose
size and SHA-256 are listed, that loads with ``weights_only=True`` and that the caller accepts (it fits
the run's model). Each file skipped is reported with the reason; a run directory written before
``checkpoint.sha256`` existed is verified by loading alone.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError
from ..files import file_digest, load_torch_file, read_file_bytes, read_json_file
from ..runtime import atomic_write_text, crash_point, fsync_dir, write_temp

__all__ = ["CheckpointStore", "Loaded"]

CHECKPOINT_NAME = "checkpoint.pt"
PREV_NAME = "checkpoint.prev.pt"
SUMS_NAME = "checkpoint.sha256"
_SUMS_FORMAT = 1


@dataclass
class Loaded:
    """The checkpoint :meth:`CheckpointStore.load_latest` chose: what the caller's ``decode`` made of it,
    the file, and the reasons each newer file was skipped (empty when ``checkpoint.pt`` itself was used)."""

    checkpoint: Any
    path: Path
    skipped: list[str]


def _same(a: dict, b: dict) -> bool:
    return a.get("size") == b.get("size") and a.get("sha256") == b.get("sha256")


class CheckpointStore:
    """The checkpoint files of the run directory ``run_dir`` (see the module docs)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / CHECKPOINT_NAME
        self.prev = self.run_dir / PREV_NAME
        self.sums = self.run_dir / SUMS_NAME
        # the digests of the files at self.path and self.prev that this process knows to be complete (None:
        # no such file, or one that is not trusted, e.g. a damaged checkpoint.pt that a resume skipped)
        self.current: dict | None = None
        self.previous: dict | None = None

    def exists(self) -> bool:
        """Whether the run directory holds a checkpoint file (newest or previous)."""
        return self.path.exists() or self.prev.exists()

    # -- saving -----------------------------------------------------------------------------------
    def save(self, state: dict[str, Any], position: dict[str, int]) -> None:
        """Writes ``state`` (a dict of tensors and builtins) as the new ``checkpoint.pt`` (see the module docs);
        ``position`` (epoch, step) is listed beside its digest."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        digest = {**file_digest(data), **position}
        tmp = write_temp(self.path, "wb", lambda fh: fh.write(data))
        rotate = self.current is not None and self.path.exists()
        try:
            crash_point("checkpoint-written")
            kept = self.current if rotate else self.previous
            listed = [digest] + ([kept] if kept is not None else [])
            atomic_write_text(json.dumps({"format": _SUMS_FORMAT, "complete": listed}, indent=1) + "\n", self.sums)
            crash_point("checkpoint-listed")
            if rotate:
                os.replace(self.path, self.prev)
                crash_point("checkpoint-rotated")
            elif self.path.is_dir():  # where the checkpoint belongs (a resume skipped it): removed if empty
                try:
                    self.path.rmdir()
                except OSError:
                    raise CorruptFileError(f"checkpoint {self.path} is a directory that is not empty, so the new "
                                           "checkpoint cannot take its place; move it away and rerun with --resume",
                                           self.path) from None
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.run_dir)
        if rotate:
            self.previous = self.current
        self.current = digest
        crash_point("checkpoint-saved")

    # -- loading ----------------------------------------------------------------------------------
    def _listed(self) -> tuple[list[dict] | None, str | None]:
        """The digests ``checkpoint.sha256`` lists (None when there is no such file), and a note when it
        could not be read (then the checkpoints are verified by loading alone)."""
        if not self.sums.exists():
            return None, None
        try:
            sums = read_json_file(self.sums, "checkpoint checksums")
            listed = sums["complete"]
            if sums.get("format") != _SUMS_FORMAT or not isinstance(listed, list) or not all(
                    isinstance(e, dict) for e in listed):
                raise CorruptFileError(f"checkpoint checksums {self.sums} is not in the format fastdiv writes")
        except (CorruptFileError, KeyError, TypeError) as exc:
            return None, f"{exc}; the checkpoints are verified by loading them only"
        return listed, None

    def load_latest(self, decode: Callable[[dict, Path], Any], map_location="cpu") -> Loaded | None:
        """The newest usable checkpoint: ``decode(state, path)`` of ``checkpoint.pt``, else of
        ``checkpoint.prev.pt``. A file is skipped when its digest is not listed, it does not load, or
        ``decode`` raises :class:`CorruptFileError` (e.g. it does not fit the model). Returns None when
        there is no checkpoint file; raises :class:`CorruptFileError` naming every file and its fault when
        none is usable."""
        listed, note = self._listed()
        skipped = [note] if note else []
        for path in (self.path, self.prev):
            if not path.exists():
                if path == self.path and self.prev.exists():
                    skipped.append(f"{path} is missing (the run was stopped while replacing it)")
                continue
            try:
                data = read_file_bytes(path, "checkpoint")
                digest = file_digest(data)
                if listed is not None and not any(_same(digest, e) for e in listed):
                    raise CorruptFileError(f"checkpoint {path} ({digest['size']} bytes) does not match the size "
                                           f"and SHA-256 recorded in {self.sums.name}: it was cut off or changed "
                                           "after fastdiv wrote it", path)
                state = load_torch_file(path, "checkpoint", data=data, map_location=map_location)
                checkpoint = decode(state, path)
            except CorruptFileError as exc:
                skipped.append(str(exc))
                continue
            if path == self.path:
                self.current, self.previous = digest, None
            else:  # checkpoint.pt is missing or damaged: it is overwritten, checkpoint.prev.pt kept, at the next save
                self.current, self.previous = None, digest
            return Loaded(checkpoint, path, skipped)
        if not any(p.exists() for p in (self.path, self.prev)):
            return None
        raise CorruptFileError(f"no usable checkpoint in {self.run_dir}: " + "; ".join(skipped) + ". The last "
                               "completed epochs cannot be restored from these files: restore a copy of the run "
                               "directory, or start the run again with another --out", self.path)
