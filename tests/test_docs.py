"""Every flag the documentation shows parses. The flag tables of the docs are generated from the parsers
(docs/hooks.py), but the prose, the examples and the README are written by hand: each ``fastdiv SUBCOMMAND ...``
command line in README.md and docs/*.md must use flags that SUBCOMMAND's parser knows, and each other ``--flag`` a
page mentions must be a flag of the subcommand(s) the page documents (of any subcommand on the other pages), or of
one of the other tools the pages name."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from fastdiv.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: a flag as written: --name, --name-with-dashes, --name_with_underscores (torchrun's); an uppercase placeholder
#: (--no-NAME, --NAME-WITH-DASHES) is a pattern, not a flag
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*(?![\w-]*[A-Z])")
COMMAND = re.compile(r"\bfastdiv\s+(train|evaluate|demo|info)\b([^`#|;&]*)")
#: the subcommands a page documents: its prose flags are theirs
PAGE_COMMANDS = {"training.md": ("train",), "evaluation.md": ("evaluate", "demo")}
#: flags of other tools the pages name (in install, test and build instructions)
OTHER_TOOLS = {"--no-deps": "pip", "--no-build-isolation": "pip", "--benchmark-only": "pytest-benchmark",
               "--benchmark-json": "pytest-benchmark", "--test-dir": "ctest", "--output-on-failure": "ctest",
               "--build": "cmake", "--strict": "mkdocs", "--nproc_per_node": "torchrun", "--standalone": "torchrun"}


def _known() -> dict[str, set[str]]:
    """The option strings of each subcommand's parser, and under 'fastdiv' those of the top-level parser."""
    parser = build_parser()
    known = {"fastdiv": set(parser._option_string_actions)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                known[name] = set(sub._option_string_actions)
    return known


def _mentions(page: Path) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
    """``(command flags, other flags)`` of a page: ``(line, subcommand, flag)`` for each flag of a ``fastdiv
    SUBCOMMAND`` command line (continuation lines joined), ``(line, flag)`` for every other flag."""
    commands, others = [], []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        start, text = i + 1, lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):  # a shell line continued
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i]
        i += 1
        spans = []
        for m in COMMAND.finditer(text):
            spans.append(m.span(2))
            commands += [(start, m.group(1), f) for f in FLAG.findall(m.group(2))]
        for m in FLAG.finditer(text):
            if not any(a <= m.start() < b for a, b in spans):
                others.append((start, m.group(0)))
    return commands, others


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_flags_parse(page):
    known = _known()
    commands, others = _mentions(page)
    wrong = [f"{page.name}:{line}: fastdiv {sub} {flag}" for line, sub, flag in commands
             if flag not in known[sub] | known["fastdiv"]]
    scope = PAGE_COMMANDS.get(page.name, tuple(k for k in known if k != "fastdiv"))
    allowed = set(OTHER_TOOLS).union(known["fastdiv"], *(known[c] for c in scope))
    wrong += [f"{page.name}:{line}: {flag} (not a flag of fastdiv {'/'.join(scope)})" for line, flag in others
              if flag not in allowed]
    assert not wrong, "documented flags the parsers do not know:\n" + "\n".join(wrong)


def test_the_check_finds_unknown_flags(tmp_path):
    """The extraction itself: a command line's flags, continued lines, prose flags and placeholders."""
    page = tmp_path / "page.md"
    page.write_text("Run `fastdiv train --preset x --no-such-flag` or\n\n```sh\nfastdiv evaluate RUN \\\n"
                    "  --eps 0.1 --bogus  # a comment --not-parsed-as-evaluate\n```\n\n"
                    "`--no-NAME` turns a setting off; `--quiet` and `--resume` are flags.\n")
    commands, others = _mentions(page)
    assert commands == [(1, "train", "--preset"), (1, "train", "--no-such-flag"), (4, "evaluate", "--eps"),
                        (4, "evaluate", "--bogus")]
    assert others == [(4, "--not-parsed-as-evaluate"), (8, "--quiet"), (8, "--resume")]
    known = _known()
    assert "--no-such-flag" not in known["train"] and "--bogus" not in known["evaluate"]
    for flag in ("--resume", "--debug"):  # the flags of the error path are documented and parse
        assert flag in known["evaluate"] and flag in known["train"]
    assert "--debug" in known["fastdiv"] and "--debug" in known["demo"]
