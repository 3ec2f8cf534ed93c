"""The files of an evaluation: ``results.json``, ``report.md`` and its PNG plots; and the per-example flag
strings results.json stores correctness in."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["decode_flags", "encode_flags", "write_outputs"]


def encode_flags(flags: torch.Tensor) -> str:
    """A bool vector as a string of '0'/'1', one character per example in test-set order."""
    return bytes((flags.to(torch.uint8).cpu() + 48).tolist()).decode("ascii")


def decode_flags(text: str) -> torch.Tensor:
    """The inverse of :func:`encode_flags`."""
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def write_outputs(results: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Writes ``results.json``, ``report.md`` and the PNG plots into ``out``; returns their paths."""
    from .. import report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    # written whole and then renamed, so a reader never sees half a file (UTF-8 whatever the locale: ε, ℓ∞)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)
    rep = report.write_report(results, out)
    return {"results": path, "report": rep, "plots": sorted(out.glob("*.png"))}
