"""The ``fastdiv`` command line (also ``python -m fastdiv``): info, train, evaluate, demo, reproduce.

Every fault a command meets (a bad flag value, a file that is missing, corrupted or unsafe, a full disk)
ends in one line, ``fastdiv COMMAND: error: MESSAGE``, and the exit code of its kind (see
:mod:`fastdiv.errors` and docs/errors.md); ``--debug`` or ``FASTDIV_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import debug_enabled, to_fastdiv_error

#: the exit code after Ctrl-C (KeyboardInterrupt), 128 + SIGINT as a shell reports it
INTERRUPTED = 130
#: how an interrupted command continues where it stopped
_CONTINUE = {"train": "; --resume continues from the last checkpoint",
             "evaluate": "; the same command with --resume continues from the table rows already done"}
_DEBUG_HELP = "show the full traceback of an error instead of its one-line message (also FASTDIV_DEBUG=1)"


def _info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_info = sub.add_parser("info", help="print versions, the built backends and what backend='auto' picks")
    p_info.add_argument("--json", action="store_true", help="print the same facts as JSON")
    p_info.set_defaults(func=_info)
    # each subcommand module adds its parser and sets func on it
    from . import demo, evaluate, train
    from .reproduce import cli as reproduce

    for module in (train, evaluate, demo, reproduce):
        module.add_parser(sub)
    # --debug after the subcommand too (where users type it); SUPPRESS: it does not reset a --debug given before
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one ``fastdiv`` command and returns its exit code: the command's own (0 when done), the
    :attr:`~fastdiv.errors.FastdivError.exit_code` of the fault it met (its message printed on stderr in one
    line), 130 after Ctrl-C, or 1 for an unexpected error (a bug). argparse's own usage errors exit with 2."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or debug_enabled()
    command = f"fastdiv {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{command}: interrupted" + _CONTINUE.get(args.command, ""), file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every error ends in one line; --debug shows the traceback
        if debug:
            raise
        err = to_fastdiv_error(exc)
        if err is None:
            print(f"{command}: internal error: {type(exc).__name__}: {_one_line(str(exc))} (a bug in fastdiv: "
                  "rerun with --debug for the traceback and report it)", file=sys.stderr)
            return 1
        print(f"{command}: error: {_one_line(str(err))}", file=sys.stderr)
        return err.exit_code


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
