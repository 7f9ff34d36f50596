"""The ``ctsam3d`` command: one subcommand per module, each providing ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMAND_MODULES = [
    "CTSAM3DLib.commands.segment",
    "CTSAM3DLib.commands.reference_weights",
    "CTSAM3DLib.commands.evaluate",
    "CTSAM3DLib.commands.train",
]


class CommandError(Exception):
    """An error the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctsam3d",
        description="CT-SAM3D: promptable 3D segmentation of CT scans from clicks.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CommandError, FileNotFoundError, ValueError) as error:
        print(f"ctsam3d {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
