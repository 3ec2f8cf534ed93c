"""The files of an evaluation: ``results.json``, ``report.md`` and its PNG plots; the per-example flag
strings results.json stores correctness in; and the adversarial examples of each attack (``--save-adv``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["decode_flags", "encode_flags", "load_adversarial", "save_adversarial", "write_outputs"]


def encode_flags(flags: torch.Tensor) -> str:
    """A bool vector as a string of '0'/'1', one character per example in test-set order."""
    return bytes((flags.to(torch.uint8).cpu() + 48).tolist()).decode("ascii")


def decode_flags(text: str) -> torch.Tensor:
    """The inverse of :func:`encode_flags`."""
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def save_adversarial(path: str | os.PathLike, *, x_adv: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                     ensemble_correct: torch.Tensor, worst_correct: torch.Tensor, info: dict) -> Path:
    """Writes one attack's adversarial examples as ``.safetensors``, atomically: ``x_adv``, ``y``, ``index``
    (test-set positions), the per-example ``ensemble_correct`` / ``worst_correct`` flags the evaluation
    counted, and ``info`` (attack, form, ε, repeat, the prediction seed and sample count that reproduce
    the flags with :func:`fastdiv.analysis.predict_correct`) as JSON metadata."""
    from safetensors.torch import save

    from ..runtime import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"x_adv": x_adv, "y": y, "index": index, "ensemble_correct": ensemble_correct,
               "worst_correct": worst_correct}
    # clones: safetensors refuses tensors that share storage (e.g. the same flags passed twice)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(save(tensors, metadata={"info": json.dumps(info, default=str)}), path)
    return path


def load_adversarial(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, info)`` of a file written by :func:`save_adversarial`. A missing file raises
    :class:`~fastdiv.errors.MissingFileError`, a truncated, damaged or foreign one
    :class:`~fastdiv.errors.CorruptFileError`, each naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from ..errors import CorruptFileError, MissingFileError
    from ..files import read_file_bytes

    path = Path(path)
    expected = "a .safetensors file written by fastdiv evaluate --save-adv (x_adv, y, index and the flags)"
    data = read_file_bytes(path, "adversarial examples", error=MissingFileError if not path.exists()
                           else CorruptFileError)
    try:
        tensors = load(data)
        length = int.from_bytes(data[:8], "little")
        info = json.loads((json.loads(data[8:8 + length]).get("__metadata__") or {}).get("info", "{}"))
    except (SafetensorError, ValueError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"adversarial examples {path} are not a readable .safetensors file ({len(data)} bytes: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); expected "
                               f"{expected}", path) from None
    missing = [k for k in ("x_adv", "y", "index", "ensemble_correct", "worst_correct") if k not in tensors]
    if missing or not isinstance(info, dict):
        raise CorruptFileError(f"adversarial examples {path} lack {missing or ['the info metadata']}; expected "
                               f"{expected}", path)
    return tensors, info


def write_outputs(results: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Writes ``results.json``, ``report.md``, the PNG plots and ``robustbench.json`` (one RobustBench-shaped
    entry per ε, :func:`~fastdiv.evaluate.export.robustbench_entries`) into ``out``; returns their paths."""
    from .. import report
    from ..runtime import atomic_write_text
    from .export import robustbench_entries

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the report and its plots first, results.json last: results.json is the one a reader (and a resumed
    # evaluation) trusts, and each file replaces its previous version whole (written, then renamed)
    rep = report.write_report(results, out)
    robustbench = out / "robustbench.json"
    atomic_write_text(json.dumps(robustbench_entries(results), indent=1, ensure_ascii=False) + "\n", robustbench)
    path = out / "results.json"
    # UTF-8 whatever the locale: ε, ℓ∞
    atomic_write_text(json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False), path)
    return {"results": path, "report": rep, "plots": sorted(out.glob("*.png")), "robustbench": robustbench}
