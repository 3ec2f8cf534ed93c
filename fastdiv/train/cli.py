"""The ``fastdiv train`` subcommand: :func:`add_parser` generates one flag per :class:`TrainConfig` field
from the field's metadata (so a new setting is a new flag), and :func:`main` turns the flags given into
a run and the run's outcome into an exit code."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..errors import BadInputError
from ..presets import format_presets
from .config import TrainConfig, config_for_run
from .stopping import TrainingInterrupted
from .trainer import train

__all__ = ["add_parser", "main"]


def _cli_type(f: dataclasses.Field):
    """The kind of flag for a field, read from its annotation (a string: config.py postpones annotations)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t.startswith("bool"):
        return "bool"
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    if t.startswith("list"):
        return "list"
    return str


def _none_or(tp):
    """A flag type that also reads 'none' / 'null' (an optional setting set back to None)."""
    def parse(s: str):
        if s.lower() in ("none", "null"):
            return None
        return tp(s)
    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``train`` subcommand to the ``fastdiv`` CLI (every :class:`TrainConfig` setting is a
    flag; only the flags given override the preset and the --config file)."""
    p = subparsers.add_parser(
        "train", help="train a defense with a paper's recipe (--preset NAME)",
        description=("Train a randomized or ensemble defense with a paper's recipe. Values: the preset's "
                     "defaults for the dataset < --config FILE.json < the flags given. "
                     "Exit codes: 0 done, 2 bad arguments or input files, 3 corrupted or unsafe file or non-finite "
                     "loss, 4 an output could not be written (disk full), 128+N stopped by signal N (checkpoint "
                     "saved; --resume continues)."),
        argument_default=argparse.SUPPRESS, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--list-presets", action="store_true", help="print every preset with its paper and values, exit")
    p.add_argument("--config", metavar="FILE.json", help="JSON object of settings (overridden by flags)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest verified checkpoint (checkpoint.pt, else "
                        "checkpoint.prev.pt)")
    p.add_argument("--quiet", action="store_true", help="no progress bar; one log line per epoch")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        group = groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kind = _cli_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{meta['help']} (default: the preset's value, else {default})"
        help_text = help_text.replace("%", "%%")
        choices = meta.get("choices")
        if kind == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind == "list":
            group.add_argument(flag, dest=f.name, type=int, nargs="*", metavar="EPOCH", help=help_text)
        else:
            tp = kind
            optional = "None" in str(f.type)
            if choices is not None:
                none = None in choices and f.name != "preset"
                choices = [c for c in choices if c is not None] + (["none"] if none else [])
                group.add_argument(flag, dest=f.name, choices=choices, help=help_text)
            else:
                group.add_argument(flag, dest=f.name, type=_none_or(tp) if optional else tp,
                                   metavar=(flag[2:].upper().replace("-", "_")), help=help_text)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """The ``fastdiv train`` command: returns the exit code."""
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    if values.get("dropout") == "none":
        values["dropout"] = None
    if getattr(args, "list_presets", False):
        print(format_presets())
        return 0
    quiet = bool(getattr(args, "quiet", False))
    if getattr(args, "resume", False):
        values["resume"] = True
    try:
        cfg = config_for_run(values, getattr(args, "config", None))
        if cfg.preset is None and not values.get("resume"):
            raise BadInputError("--preset NAME is required (or a --config file that sets it); see --list-presets")
        train(cfg, quiet=quiet)
    except TrainingInterrupted as e:  # not an error: the run stopped where asked, with its checkpoint saved
        print(f"fastdiv train: {e}", file=sys.stderr)
        return 128 + e.signum
    # every other fault (bad settings, unreadable files, a full disk, a non-finite loss) is a fastdiv error
    # that fastdiv.cli.main reports in one line with its exit code
    return 0
