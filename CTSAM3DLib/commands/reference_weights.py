"""``ctsam3d reference-weights``: a full-size checkpoint made by the reference rule."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import HelpFormatter


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reference-weights",
        help="write untrained deterministic weights (for trying the tools without the authors' file)",
        description="Writes a checkpoint in the authors' layout whose values follow the deterministic rule of "
        "the parity fixture. The network runs and is exact, but these weights are NOT trained: masks made with "
        "them are meaningless. Use the authors' params.pth for real segmentations.",
        epilog="example:\n  ctsam3d reference-weights --output weights.pth",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--output", required=True, type=Path, help="checkpoint file to write (.pth)")
    parser.add_argument("--variant", default="tiny", help="encoder size: tiny (the authors' checkpoint), small, "
                        "base or large")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import save_checkpoint
    from ..model import build_model
    from ..reference_weights import deterministic_state_dict

    net = build_model(args.variant)
    save_checkpoint(args.output, deterministic_state_dict(net))
    print(f"wrote {args.output}: CT-SAM3D {args.variant}, deterministic reference weights (untrained)")
    return 0
