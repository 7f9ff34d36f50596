"""The ``ctsam3d`` command: one subcommand per module, each providing ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
import warnings
from typing import Iterator, List, Optional

from .torch_warnings import hide_torch_internal_warnings

SUBCOMMAND_MODULES = [
    "CTSAM3DLib.commands.segment",
    "CTSAM3DLib.commands.download_weights",
    "CTSAM3DLib.commands.reference_weights",
    "CTSAM3DLib.commands.evaluate",
    "CTSAM3DLib.commands.train",
    "CTSAM3DLib.commands.serve",
]


class CommandError(Exception):
    """An error the user can fix; printed without a traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (where it has one) and keeps the line breaks of
    descriptions and examples."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help or ""
        if isinstance(action.default, (list, tuple)):
            return f"{action.help} (default: {' '.join(str(value) for value in action.default)})"
        return super()._get_help_string(action)


_NUMBERS = re.compile(r"^-(\d|\.\d)[\d.eE+\-]*(,\s*[+\-]?(\d|\.\d)[\d.eE+\-]*)*$")
"""A value such as -103.0,-183.6,-784.5: argparse would take it for an option (no option starts so)."""


def attach_negative_values(argv: List[str]) -> List[str]:
    """``--point -1,-2,-3`` as ``--point=-1,-2,-3``, so that negative coordinates can be typed as any
    other value (argparse itself accepts only a single negative number after an option)."""
    joined: List[str] = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if _NUMBERS.match(token) and previous.startswith("--") and "=" not in previous and "--" not in joined:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ctsam3d",
        description="CT-SAM3D: promptable 3D segmentation of CT scans from clicks.",
        epilog="Run 'ctsam3d COMMAND --help' for a command's options and an example.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


@contextlib.contextmanager
def warnings_in_our_words(command: str) -> Iterator[None]:
    """Print each warning at once as one line naming the command, not as Python's source-line form;
    warnings from torch's internals not at all (``torch_warnings``)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"ctsam3d {command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        hide_torch_internal_warnings()
        warnings.showwarning = show
        yield


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(attach_negative_values(list(sys.argv[1:] if argv is None else argv)))
    try:
        with warnings_in_our_words(args.command):
            return int(args.func(args) or 0)
    except (CommandError, FileNotFoundError, ValueError) as error:
        print(f"ctsam3d {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
