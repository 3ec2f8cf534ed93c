"""Markdown for the reports: number and accuracy formats (percent, two decimals, as in GradDiv's
Table 1), tables and a small document builder."""
from __future__ import annotations

import math
from collections.abc import Sequence


def fmt_num(v, digits: int = 4) -> str:
    """A number in a short fixed or scientific notation; '–' for None / NaN."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.{max(1, digits - 2)}e}"
    return f"{v:.{digits}g}" if a >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") if v else "0"


def fmt_pct(fraction: float | None, std: float | None = None) -> str:
    """``0.6334, 0.012 -> '63.34 ± 1.20'`` (percent, two decimals); no ± part when ``std`` is None."""
    if fraction is None:
        return "–"
    s = f"{100 * fraction:.2f}"
    return s if std is None else f"{s} ± {100 * std:.2f}"


def fmt_acc(acc: dict | None) -> str:
    """An accuracy record ``{'mean', 'std', 'values'}`` as ``mean ± std`` (no ± with one repeat)."""
    if not acc:
        return "–"
    return fmt_pct(acc["mean"], acc["std"] if len(acc.get("values", [])) > 1 else None)


def md_table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table. ``align``: one of 'l', 'r', 'c' per column (default: first
    column left, the others right)."""
    n = len(headers)
    align = align or ("l" + "r" * (n - 1))
    marks = {"l": ":---", "r": "---:", "c": ":---:"}

    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "| " + " | ".join(marks[a] for a in align) + " |"]
    for r in rows:
        if len(r) != n:
            raise ValueError(f"md_table: a row has {len(r)} cells, the header {n}")
        lines.append("| " + " | ".join(cell(v) for v in r) + " |")
    return "\n".join(lines)


class Markdown:
    """A small markdown builder: headings, paragraphs, tables, images, code blocks."""

    def __init__(self):
        self.parts: list[str] = []

    def heading(self, text: str, level: int = 2) -> "Markdown":
        self.parts.append("#" * level + " " + text)
        return self

    def para(self, text: str) -> "Markdown":
        self.parts.append(text)
        return self

    def table(self, headers, rows, align=None) -> "Markdown":
        self.parts.append(md_table(headers, rows, align))
        return self

    def image(self, path: str, alt: str) -> "Markdown":
        self.parts.append(f"![{alt}]({path})")
        return self

    def code(self, text: str, lang: str = "") -> "Markdown":
        self.parts.append(f"```{lang}\n{text}\n```")
        return self

    def bullets(self, items: Sequence[str]) -> "Markdown":
        self.parts.append("\n".join(f"- {i}" for i in items))
        return self

    def text(self) -> str:
        return "\n\n".join(self.parts) + "\n"
