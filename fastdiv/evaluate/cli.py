"""``fastdiv evaluate`` on the command line: one flag per :class:`.EvalConfig` field, generated from the
field's type and metadata, plus the flags of the run itself (a run directory, or a model of the user's own
with its weights and test data; where to write, the device, a transfer surrogate, quiet)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

from ..data import DATASETS
from ..errors import BadInputError
from .config import EvalConfig, protocol_clash

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
    if f.default is None:
        return None
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


class _Given(argparse.Action):
    """Stores the value and notes that the flag was typed (``args.given``): a protocol refuses a typed
    flag that contradicts it even when the value is the flag's default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = (*getattr(namespace, "given", ()), self.dest)


class _Flip(_Given):
    """A bool field's ``--no-NAME`` / ``--NAME`` flag: stores ``const``."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, self.const, option_string)


def config_settings(args: argparse.Namespace) -> dict:
    """The :class:`EvalConfig` fields from parsed ``fastdiv evaluate`` arguments (unchecked)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``fastdiv evaluate`` to the ``fastdiv`` command line."""
    p = subparsers.add_parser(
        "evaluate", help="robust accuracy, gradient analysis and obfuscation checks of a trained run or any model",
        description="Evaluate a trained run, or any model (--model FILE.py:FACTORY with --weights and --dataset or "
                    "--data): GradDiv Table 1-style robust accuracy ([Attack], EOT¹-, EOT- forms), accuracy vs ε, "
                    "transferability, gradient concentration, GAAS and the gradient-obfuscation checklist. Writes "
                    "results.json, report.md and PNG plots.")
    p.add_argument("run_dir", nargs="?", default=None,
                   help="run directory written by `fastdiv train` (config.json + best.pt/checkpoint.pt); "
                        "leave it out with --model")
    p.add_argument("--model", default=None, metavar="FILE.py:FACTORY",
                   help="evaluate your own model: FILE.py:FACTORY or package.module:FACTORY, a callable with no "
                        "arguments that returns an nn.Module mapping [0, 1] images to logits")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="with --model: a state dict (.safetensors, or .pt loaded with weights_only=True)")
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help="with --model: the test split of this dataset (fastdiv.data.load_dataset)")
    p.add_argument("--data-dir", default=None, help="with --dataset mnist / cifar10 / stl10: its files")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="with --model: test data as .npz or .safetensors holding x (images in [0, 1], or uint8) "
                        "and y (labels)")
    p.add_argument("--which", choices=("best", "last"), default="best",
                   help="checkpoint to load (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval, or fastdiv-eval with --model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--transfer-from", default=None, metavar="RUN_DIR",
                   help="surrogate run to craft transfer attacks on")
    p.add_argument("--save-adv", default=None, metavar="DIR",
                   help="keep the adversarial examples of every table row, ε and repeat in DIR as .safetensors "
                        "(x_adv, y, index and the per-example flags; fastdiv.evaluate.load_adversarial reads them)")
    p.add_argument("--list-protocols", action="store_true",
                   help="print the named protocols of --protocol (attacks, budgets) and exit")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation into the same --out: the table rows (attack x ε) it "
                        "finished, kept in OUT/rows.partial.json, are not run again; refused when the settings, "
                        "model or data differ")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    flags = config_flags()
    for f in dataclasses.fields(EvalConfig):
        kind, shown = _cli_type(f), _shown_default(f)
        help_text = f.metadata["help"].replace("%", "%%") + (f" (default: {shown})" if shown is not None else "")
        if kind is bool:  # the flag flips the default
            p.add_argument(flags[f.name], dest=f.name, action=_Flip, const=not f.default, default=f.default,
                           help=help_text)
        else:
            p.add_argument(flags[f.name], dest=f.name, action=_Given, type=kind, default=_cli_default(f),
                           help=help_text)
    p.set_defaults(func=_main)
    return p


def _own_model(args: argparse.Namespace, settings: dict, command: str | None) -> tuple[dict, Path]:
    """``fastdiv evaluate --model ...``: the user's model, weights and test data, evaluated."""
    from ..data import load_dataset
    from ..runtime import resolve_device
    from .aggregate import model_name
    from .inputs import EvalInputError, load_data_file, load_factory, load_weights
    from .run import evaluate_model, load_surrogate

    if args.run_dir is not None:
        raise EvalInputError("give either a run directory or --model, not both")
    if (args.dataset is None) == (args.data is None):
        raise EvalInputError("--model needs test data: --dataset NAME (with --data-dir for mnist / cifar10 / "
                             "stl10) or --data FILE (.npz / .safetensors with x and y), one of the two")
    if args.data_dir is not None and args.dataset is None:
        raise EvalInputError("--data-dir goes with --dataset")
    model = load_factory(args.model)
    if args.weights is not None:
        load_weights(model, args.weights)
    if args.data is not None:
        data, dataset_name = load_data_file(args.data), Path(args.data).name
    else:
        data, dataset_name = load_dataset(args.dataset, args.data_dir).test, args.dataset
    surrogate = surrogate_name = None
    if args.transfer_from is not None:
        surrogate, s_config = load_surrogate(args.transfer_from, resolve_device(args.device))
        surrogate_name = model_name(surrogate, s_config)
    out = Path(args.out) if args.out else Path("fastdiv-eval")
    run_info = {"model": args.model, "weights": args.weights, "data": args.data or args.dataset,
                "transfer_from": args.transfer_from}
    results = evaluate_model(model, data, out=out, quiet=args.quiet, device=args.device, name=args.model,
                             surrogate=surrogate, surrogate_name=surrogate_name, dataset_name=dataset_name,
                             run_info=run_info, command=command, save_adv=args.save_adv, resume=args.resume,
                             **settings)
    return results, out


def _check_typed_flags(args: argparse.Namespace, settings: dict) -> None:
    """Refuses a typed flag that contradicts ``--protocol`` (the defaults are the protocol's to set)."""
    from .protocols import PROTOCOLS, conflicts, parse_deviations

    if args.protocol not in PROTOCOLS:
        return  # no protocol, or an unknown one: EvalConfig.check says so
    typed = {field: settings[field] for field in getattr(args, "given", ())}
    clash = conflicts(args.protocol, typed, parse_deviations(args.deviations, args.protocol))
    if clash:
        raise ValueError(protocol_clash(args.protocol, {f: typed[f] for f in clash}, config_flags()))


def _main(args: argparse.Namespace) -> int:
    from .run import evaluate

    if args.list_protocols:
        from .protocols import describe_protocols

        print(describe_protocols())
        return 0
    settings = config_settings(args)
    command = ("fastdiv evaluate " + " ".join(shlex.quote(a) for a in sys.argv[2:])
               if sys.argv[1:2] == ["evaluate"] else None)
    # a fault raises a fastdiv error, which fastdiv.cli.main reports in one line with its exit code
    _check_typed_flags(args, settings)
    if args.model is not None:
        results, out = _own_model(args, settings, command)
    elif args.run_dir is None:
        raise BadInputError("give a run directory (from `fastdiv train`) or --model FILE.py:FACTORY")
    else:
        for flag in ("weights", "dataset", "data_dir", "data"):
            if getattr(args, flag) is not None:
                raise BadInputError(f"--{flag.replace('_', '-')} goes with --model; a run directory has its own")
        results = evaluate(args.run_dir, out=args.out, which=args.which, device=args.device,
                           transfer_from=args.transfer_from, quiet=args.quiet, command=command,
                           save_adv=args.save_adv, resume=args.resume, **settings)
        out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        total = results["table"]["total"]["results"]
        print("total robust accuracy: "
              + ", ".join(f"ε={c['eps']:g}: {100 * c['ensemble']['mean']:.2f}%" for c in total))
        failed = [c["id"] for c in results["obfuscation"]["checks"] if c["status"] == "fail"]
        print(f"obfuscation checklist: {'no warning' if not failed else 'FAILED checks ' + str(failed)}")
        print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return 0
