"""The ``fastdiv`` command line (also ``python -m fastdiv``): info, train, evaluate, demo, reproduce."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_info = sub.add_parser("info", help="print versions, the built backends and what backend='auto' picks")
    p_info.add_argument("--json", action="store_true", help="print the same facts as JSON")
    p_info.set_defaults(func=_info)
    # each subcommand module adds its parser and sets func on it
    from . import demo, evaluate, train
    from .reproduce import cli as reproduce

    for module in (train, evaluate, demo, reproduce):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
