"""``fastdiv evaluate`` on the command line: one flag per :class:`.EvalConfig` field, generated from the
field's type and metadata, plus the flags of the run itself (which checkpoint, where to write, the
device, a transfer surrogate, quiet)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

from .config import EvalConfig

__all__ = ["add_parser", "config_flags", "config_settings"]


def _cli_type(f: dataclasses.Field):
    """The argparse type of a field from its annotation: a sequence is taken as a comma-separated
    string (:meth:`EvalConfig.check` splits and validates it), ``int | None`` as an int."""
    t = str(f.type)
    if t.startswith("Sequence"):
        return str
    for name, tp in (("bool", bool), ("int", int), ("float", float)):
        if t.startswith(name):
            return tp
    return str


def _cli_default(f: dataclasses.Field):
    """The flag's default: the field's, a sequence comma-joined (as it would be typed)."""
    return ",".join(map(str, f.default)) if str(f.type).startswith("Sequence") else f.default


def _shown_default(f: dataclasses.Field) -> str | None:
    """The default as the help prints it (metadata ``shown``: True = :func:`_cli_default`, None = none;
    never for a bool field, whose flag says what it changes)."""
    shown = f.metadata["shown"]
    if _cli_type(f) is bool:
        return None
    return str(_cli_default(f)) if shown is True else shown


def config_flags() -> dict[str, str]:
    """``{field name: flag}`` of every :class:`EvalConfig` field (``--no-NAME`` for a bool field that is
    on by default)."""
    return {f.name: ("--no-" if _cli_type(f) is bool and f.default else "--") + f.name.replace("_", "-")
            for f in dataclasses.fields(EvalConfig)}


def config_settings(args: argparse.Namespace) -> dict:
    """The :class:`EvalConfig` fields from parsed ``fastdiv evaluate`` arguments (unchecked)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``fastdiv evaluate`` to the ``fastdiv`` command line."""
    p = subparsers.add_parser(
        "evaluate", help="robust accuracy, gradient analysis and obfuscation checks of a trained run",
        description="Evaluate a trained run: GradDiv Table 1-style robust accuracy ([Attack], EOT¹-, EOT- forms), "
                    "accuracy vs ε, transferability, gradient concentration, GAAS and the gradient-obfuscation "
                    "checklist. Writes results.json, report.md and PNG plots.")
    p.add_argument("run_dir", help="run directory written by `fastdiv train` (config.json + best.pt/checkpoint.pt)")
    p.add_argument("--which", choices=("best", "last"), default="best",
                   help="checkpoint to load (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--transfer-from", default=None, metavar="RUN_DIR",
                   help="surrogate run to craft transfer attacks on")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    flags = config_flags()
    for f in dataclasses.fields(EvalConfig):
        kind, shown = _cli_type(f), _shown_default(f)
        help_text = f.metadata["help"].replace("%", "%%") + (f" (default: {shown})" if shown is not None else "")
        if kind is bool:  # the flag flips the default
            p.add_argument(flags[f.name], dest=f.name, action="store_false" if f.default else "store_true",
                           help=help_text)
        else:
            p.add_argument(flags[f.name], dest=f.name, type=kind, default=_cli_default(f), help=help_text)
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    from .run import evaluate

    settings = config_settings(args)
    command = ("fastdiv evaluate " + " ".join(shlex.quote(a) for a in sys.argv[2:])
               if sys.argv[1:2] == ["evaluate"] else None)
    try:
        results = evaluate(args.run_dir, out=args.out, which=args.which, device=args.device,
                           transfer_from=args.transfer_from, quiet=args.quiet, command=command, **settings)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastdiv evaluate: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
        total = results["table"]["total"]["results"]
        print("total robust accuracy: "
              + ", ".join(f"ε={c['eps']:g}: {100 * c['ensemble']['mean']:.2f}%" for c in total))
        failed = [c["id"] for c in results["obfuscation"]["checks"] if c["status"] == "fail"]
        print(f"obfuscation checklist: {'no warning' if not failed else 'FAILED checks ' + str(failed)}")
        print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return 0
