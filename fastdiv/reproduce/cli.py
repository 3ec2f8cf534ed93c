"""``fastdiv reproduce`` on the command line."""
from __future__ import annotations

import argparse

from .claims import SIZES, describe_claims

__all__ = ["add_parser"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``fastdiv reproduce`` to the ``fastdiv`` command line."""
    p = subparsers.add_parser(
        "reproduce", help="run the papers' central claims as experiments and judge them against the papers",
        description="Train each claim's defense and baseline on every seed, measure both, and write "
                    "reproduction.md / reproduction.json: the paper's numbers beside the measured ones, with a "
                    "verdict (reproduced / not reproduced / inconclusive) from the effect and its seed-to-seed "
                    "spread.")
    p.add_argument("claims", nargs="*", metavar="CLAIM",
                   help="claim ids or paper names (graddiv, gal, clm, lpd, d3); default: every claim")
    p.add_argument("--list", action="store_true", help="print the claims and exit")
    p.add_argument("--quick", action="store_true",
                   help="tiny training and evaluation (every claim in a few minutes; checks the pipeline, the "
                        "verdicts mean little)")
    p.add_argument("--dataset", default="digits", choices=sorted({d for s in SIZES.values() for d in s["datasets"]}),
                   help="digits (embedded) or mnist5k (5,000 real MNIST images, the papers' MNIST recipes at "
                        "native size; standard size only) (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per claim (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--out", default="fastdiv-reproduce", help="output directory (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    from .run import reproduce

    if args.list:
        print(describe_claims())
        return 0
    # a fault raises a fastdiv error (or ValueError for a bad argument), reported by fastdiv.cli.main in one line
    reproduce(args.claims or None, size="quick" if args.quick else "standard", dataset=args.dataset,
              seeds=args.seeds, out=args.out, device=args.device, quiet=args.quiet)
    return 0
