"""The finished rows of an evaluation kept while it runs, so that ``fastdiv evaluate --resume`` does not run
them again.

The robust-accuracy table is the expensive part of an evaluation. Each of its units, one row (an attack in
one form) at one ε over every repeat, is computed from seeds that depend only on the settings, the row and
the ε (:mod:`.stages`), so a unit computed before an interruption is the one an uninterrupted run computes.
After each unit :class:`RowCache` rewrites ``OUT/rows.partial.json`` (``rows.partial.rankK.json`` per rank
under torchrun) atomically with the unit's per-example flags and attack settings, and a *fingerprint* of
everything the numbers depend on: the settings, the model's weights, the test data, the randomness
verdict, the ranks and where adversarial examples go. A resumed evaluation with the same fingerprint takes
the units from the file (a protocol's cascade restores its survivor mask from them); with another it is
refused. The file is removed once ``results.json`` is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError, CorruptFileError
from ..files import read_json_file
from ..runtime import atomic_write_text
from .outputs import decode_flags, encode_flags
from .shard import Predictions

__all__ = ["RowCache", "fingerprint", "partial_path", "tensor_digest"]

_FORMAT = 1


def partial_path(out: Path, rank: int, world: int) -> Path:
    """Where the rank ``rank`` of ``world`` keeps its finished rows in ``out``."""
    return Path(out) / ("rows.partial.json" if world == 1 else f"rows.partial.rank{rank}.json")


def tensor_digest(tensors) -> str:
    """SHA-256 of tensors (dtype, shape and values, in order): identifies weights and data in a fingerprint."""
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(t).encode())
    return h.hexdigest()


def fingerprint(cfg, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, stochastic: bool, world: int,
                save_adv: Path | None, surrogate: torch.nn.Module | None) -> dict[str, Any]:
    """What the numbers of the table depend on (see the module docs), as JSON-ready values."""
    import fastdiv

    state = model.state_dict()
    return {
        "settings": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "model": tensor_digest([k for k in state] + [state[k] for k in state]),
        "surrogate": None if surrogate is None else tensor_digest(list(surrogate.state_dict().values())),
        "data": tensor_digest([x, y]),
        "stochastic": bool(stochastic),
        "world": int(world),
        "save_adv": None if save_adv is None else str(save_adv),
        "fastdiv_version": fastdiv.__version__,
        "torch_version": torch.__version__,
    }


class RowCache:
    """The finished units of this rank's table (see the module docs). ``path`` None: nothing is kept (an
    evaluation without an output directory). ``resume``: take the units of an earlier run from ``path``."""

    def __init__(self, path: Path | None, fp: dict[str, Any] | None, *, resume: bool, quiet: bool) -> None:
        self.path = path
        self.fingerprint = fp
        self.units: dict[str, dict[str, Any]] = {}
        self.reused = 0
        if path is not None and resume and path.exists():
            self.units = self._read(path, fp, quiet)

    @staticmethod
    def _read(path: Path, fp: dict[str, Any] | None, quiet: bool) -> dict[str, dict[str, Any]]:
        try:
            saved = read_json_file(path, "partial results")
            if saved.get("format") != _FORMAT or not isinstance(saved.get("units"), dict):
                raise CorruptFileError(f"partial results {path} are not in the format fastdiv writes", path)
        except CorruptFileError as exc:
            # only a cache: what it held is computed again
            print(f"fastdiv evaluate: warning: {exc}; starting the table again", file=sys.stderr, flush=True)
            return {}
        if saved.get("fingerprint") != fp:
            old = saved.get("fingerprint") if isinstance(saved.get("fingerprint"), dict) else {}
            differ = sorted(k for k in set(old) | set(fp or {}) if old.get(k) != (fp or {}).get(k))
            settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
            changed = sorted(k for k in set(settings) | set((fp or {}).get("settings", {}))
                             if settings.get(k) != (fp or {}).get("settings", {}).get(k))
            what = ", ".join(f"settings ({', '.join(changed)})" if k == "settings" and changed else k for k in differ)
            raise BadInputError(f"--resume: the partial results in {path} were computed with a different {what}; "
                                "rerun with the same settings, model and data to continue them, or without --resume "
                                "to start the evaluation again", path)
        if not quiet:
            print(f"fastdiv evaluate: resuming: {len(saved['units'])} finished table row(s) x ε taken from {path}",
                  file=sys.stderr, flush=True)
        return saved["units"]

    @staticmethod
    def _key(row_key: str, eps_index: int) -> str:
        return f"{row_key}@{eps_index}"

    def get(self, row_key: str, eps_index: int, repeats: int, examples: int
            ) -> tuple[Predictions, dict, float] | None:
        """The flags ``[R, N]``, attack settings and seconds of a finished unit, or None."""
        unit = self.units.get(self._key(row_key, eps_index))
        if unit is None:
            return None
        try:
            ens = torch.stack([decode_flags(s) for s in unit["ensemble"]])
            worst = torch.stack([decode_flags(s) for s in unit["worst"]])
            if ens.shape != (repeats, examples) or worst.shape != ens.shape:
                raise ValueError(f"flags of shape {tuple(ens.shape)}, expected ({repeats}, {examples})")
            result = Predictions(ens, worst), dict(unit["settings"]), float(unit["seconds"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CorruptFileError(f"partial results {self.path}: the unit {row_key} at ε index {eps_index} is "
                                   f"malformed ({exc}); rerun without --resume to start the evaluation again",
                                   self.path) from None
        self.reused += 1
        return result

    def put(self, row_key: str, eps_index: int, flags: Predictions, settings: dict, seconds: float) -> None:
        """Records a finished unit (flags ``[R, N]``) and rewrites the file, atomically."""
        if self.path is None:
            return
        self.units[self._key(row_key, eps_index)] = {
            "ensemble": [encode_flags(f) for f in flags.ensemble], "worst": [encode_flags(f) for f in flags.worst],
            "settings": json.loads(json.dumps(settings, default=str)), "seconds": seconds}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps({"format": _FORMAT, "fingerprint": self.fingerprint, "units": self.units}),
                          self.path)
