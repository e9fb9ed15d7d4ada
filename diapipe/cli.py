"""The ``diapipe`` command line: one sub-command per stage plus tools.

Each stage module registers itself by defining ``add_cli(subparsers)``; the
module list below is the only place a new stage has to be named.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .fileio import DiapipeError

# Modules that provide a sub-command (each defines add_cli(subparsers)).
STAGE_MODULES = [
    "diapipe.simulate",
    "diapipe.inputs",
    "diapipe.calib",
    "diapipe.isr",
    "diapipe.characterize",
    "diapipe.skymap",
    "diapipe.warp",
    "diapipe.coadd",
    "diapipe.align",
    "diapipe.subtract",
    "diapipe.detect",
    "diapipe.measure",
    "diapipe.fakes",
    "diapipe.completeness",
    "diapipe.realbogus",
    "diapipe.associate",
    "diapipe.report",
    "diapipe.ds9",
    "diapipe.aligned",
    "diapipe.docs",
    "diapipe.summary",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diapipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # stage not built yet
                continue
            raise
        module.add_cli(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DiapipeError as exc:
        print(f"diapipe {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
