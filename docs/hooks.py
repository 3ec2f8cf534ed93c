"""MkDocs hook: flag tables generated from the ``fastdiv`` argparse parser at build time.

A page that contains the marker ``<!-- flags: SUBCOMMAND -->`` on a line of its own (``train``,
``evaluate``, ``demo``, ``reproduce``, ``info``) gets, in its place, a Markdown table of that subcommand's flags (flag,
default, help), built from the actions of ``fastdiv.cli.build_parser()``; a parser with argument groups
gets one table per group. The tables therefore cannot drift from the CLI:
a flag that is added, renamed or removed changes the docs at the next build. An unknown subcommand in
a marker fails the build.

Registered in ``mkdocs.yml`` under ``hooks:``; it imports fastdiv, so build the docs with the Python
that has fastdiv installed (``.venv/bin/python -m mkdocs build --strict``).

The same file holds :class:`DocstringMarkdown`, a griffe extension registered in ``mkdocs.yml`` for the
mkdocstrings handler (``extensions: [docs/hooks.py:DocstringMarkdown]``). The docstrings are written
for ``help()`` and Sphinx-style roles; for the API reference it fences ``>>>`` doctest blocks as code
(unfenced, Markdown reads ``x["a"][0]`` as a reference link) and turns ``:func:`name``` roles into
optional cross-references (a link when the target is documented, plain code otherwise). The source
docstrings are left as they are.
"""
from __future__ import annotations

import argparse
import copy
import functools
import re

try:  # present wherever mkdocstrings is; the flag tables do not need it
    import griffe
except ImportError:  # pragma: no cover
    griffe = None

# the marker must be a line of its own (so a marker quoted in the text or in a code span stays as it is)
MARKER = re.compile(r"^[ \t]*<!--\s*flags:\s*([A-Za-z0-9_-]+)\s*-->[ \t]*$", re.MULTILINE)
# a trailing "(default: ...)" in a help text, allowing one level of nested parentheses
TRAILING_DEFAULT = re.compile(r"\s*\(default: ((?:[^()]|\([^()]*\))*)\)\s*$")
# train's flags all end in "(default: the preset's value, else X)": the shared part becomes a note
SHARED_PREFIX = re.compile(r"^(.*?, else )")


@functools.lru_cache(maxsize=None)
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from fastdiv.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _escape(text: str) -> str:
    """Escapes Markdown outside `code spans` so help texts render literally inside a table cell."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # a code span: only the table separator needs escaping
            out.append(part.replace("|", r"\|"))
            continue
        part = part.replace("\\", "\\\\")
        for ch in "*_[]|":
            part = part.replace(ch, "\\" + ch)
        out.append(part.replace("<", "&lt;").replace(">", "&gt;"))
    return "".join(out)


def _code(text: str) -> str:
    text = str(text)
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", r"\|")


def _invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The flag column: every option string, with the argument's metavar (choices go to the help)."""
    if not action.option_strings:  # a positional argument
        return _code(action.metavar or action.dest.upper())
    if action.nargs == 0:
        return " / ".join(_code(o) for o in action.option_strings)
    plain = copy.copy(action)
    plain.choices = None  # the choices are listed in the help column
    args = parser._get_formatter()._format_args(plain, action.dest.upper())
    return " / ".join(_code(f"{o} {args}") for o in action.option_strings)


def _row(parser: argparse.ArgumentParser, action: argparse.Action) -> tuple[str, str | None, str]:
    """(flag, default text or None, help) of one action."""
    help_text = parser._get_formatter()._expand_help(action) if action.help else ""
    default = None
    m = TRAILING_DEFAULT.search(help_text)
    if m:
        default = m.group(1)
        help_text = help_text[:m.start()]
    elif not action.option_strings:
        default = "required"
    elif action.nargs != 0 and action.default not in (None, "", argparse.SUPPRESS):
        default = str(action.default)
    if action.choices is not None:
        help_text = help_text.rstrip()
        if help_text and not help_text.endswith("."):
            help_text += "."
        help_text += " One of " + ", ".join(_code(c) for c in action.choices) + "."
    return _invocation(parser, action), default, _escape(help_text.strip())


def flag_table(command: str) -> str:
    """The Markdown for one ``<!-- flags: COMMAND -->`` marker."""
    subparsers = _subparsers()
    if command not in subparsers:
        raise ValueError(f"docs/hooks.py: <!-- flags: {command} -->: no such fastdiv subcommand "
                         f"(known: {', '.join(sorted(subparsers))})")
    parser = subparsers[command]
    # argument groups in order, merged by title, without empty groups and without -h/--help
    groups: dict[str, list[argparse.Action]] = {}
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]
        if actions:
            groups.setdefault(group.title or "", []).extend(actions)
    if set(groups) <= {"positional arguments", "options"}:  # argparse's own groups only: one table
        groups = {"": [a for actions in groups.values() for a in actions]}
    rows = {title: [_row(parser, a) for a in actions] for title, actions in groups.items()}
    # a prefix every extracted default shares ("the preset's value, else ") is said once, above the table
    defaults = [d for rs in rows.values() for _, d, _ in rs if d is not None and d != "required"]
    prefixes = {m.group(1) if m else None for m in (SHARED_PREFIX.match(d) for d in defaults)}
    shared = prefixes.pop() if len(defaults) > 1 and len(prefixes) == 1 else None
    out = []
    if shared:
        out.append(f"Default: {_escape(shared.rstrip())} the value shown.\n")
    for title, rs in rows.items():
        if title:
            out.append(f"**{_escape(title)}**\n")
        out.append("| flag | default | help |\n|---|---|---|")
        for flag, default, help_text in rs:
            if default is None:
                cell = ""
            elif default == "required":
                cell = "required"
            else:
                value = default[len(shared):] if shared and default.startswith(shared) else default
                cell = _code(value)
            out.append(f"| {flag} | {cell} | {help_text} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda m: flag_table(m.group(1)), markdown)


# ------------------------------------------------------------------------------------------------
# griffe extension: docstrings written for help() rendered as Markdown
# ------------------------------------------------------------------------------------------------

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(~?)([^`<>]+?)`")
PROMPT = re.compile(r"^(\s*)>>>(?: |$)")


def _fence_doctests(text: str) -> str:
    """Wraps every run of ``>>>`` lines (with their ``...`` continuations and output, up to a blank
    line) in a ``pycon`` code fence, at the run's indentation."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = PROMPT.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group(1)
        j = i
        while j < len(lines) and lines[j].strip():
            j += 1
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}```pycon")
        out.extend(lines[i:j])
        out.append(f"{indent}```")
        if j < len(lines):
            out.append("")
        i = j
    return "\n".join(out)


def _roles(text: str, obj) -> str:
    """``:func:`fastdiv.eot_step``` -> an optional autoref (``~`` shows the last component only)."""
    def repl(m: re.Match) -> str:
        short, target = m.group(1), m.group(2).strip()
        shown = target.rsplit(".", 1)[-1] if short else target
        ident = target
        try:
            ident = obj.resolve(target.split(".", 1)[0]) + ("." + target.split(".", 1)[1] if "." in target else "")
        except Exception:  # noqa: BLE001  (not in scope: keep the written name)
            pass
        return f'<autoref identifier="{ident}" optional><code>{shown}</code></autoref>'

    # not inside fenced code
    parts = re.split(r"(```.*?```)", text, flags=re.S)
    return "".join(p if i % 2 else ROLE.sub(repl, p) for i, p in enumerate(parts))


if griffe is not None:
    class DocstringMarkdown(griffe.Extension):
        """Fences doctests and turns Sphinx roles into optional cross-references (see the module docs)."""

        def on_object(self, *, obj, loader, **kwargs) -> None:
            if obj.docstring is None and obj.is_attribute:
                text = _comment_docstring(obj)
                if text:
                    obj.docstring = griffe.Docstring(text, lineno=obj.lineno, parent=obj)
            if obj.docstring is not None:
                obj.docstring.value = _roles(_fence_doctests(obj.docstring.value), obj)


def _comment_docstring(obj) -> str | None:
    """The Sphinx ``#:`` doc comment of an attribute: ``#:`` lines just above it, or a trailing ``#:``."""
    try:
        lines = obj.lines_collection[obj.filepath]
    except Exception:  # noqa: BLE001  (no source: nothing to read)
        return None
    if not obj.lineno or obj.lineno > len(lines):
        return None
    above = []
    k = obj.lineno - 2
    while k >= 0 and lines[k].strip().startswith("#:"):
        above.insert(0, lines[k].strip()[2:].strip())
        k -= 1
    if above:
        return "\n".join(above)
    first = lines[obj.lineno - 1]
    if "#:" in first:
        return first.split("#:", 1)[1].strip() or None
    return None
