"""``ctsam3d download-weights``: the authors' checkpoint from ModelScope, verified."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import HelpFormatter
from ..download import DEFAULT_ENDPOINT, MODEL_ID, MODEL_PAGE, default_weights_path, download_weights
from ..files import check_output_path
from ..progress import ProgressBar


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "download-weights",
        help="download the authors' checkpoint from ModelScope, verified against the host's checksum",
        description=f"Download the CT-SAM3D authors' checkpoint (ModelScope model {MODEL_ID}, {MODEL_PAGE}).\n"
        "The file is chosen from the host's file list, streamed with resume after an interruption, checked\n"
        "against the SHA-256 the host publishes and renamed into place only when complete. The default\n"
        "place is the folder the 3D Slicer module uses too (CTSAM3D_CACHE overrides it).\n"
        "The weights carry the authors' own terms, not this project's licence: check the model page.",
        epilog="example:\n  ctsam3d download-weights --output params.pth\n"
        "  ctsam3d segment --image ct.nii.gz --weights params.pth --point -71.1,-25.4,-245.0 --output liver.nii.gz",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--output", type=Path, default=default_weights_path(), help="where to put the checkpoint")
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="ModelScope endpoint (or a mirror)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds without data before a request fails")
    parser.add_argument("--retries", type=int, default=5, help="resumed attempts after an interruption")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_path(args.output)
    bar = None

    def progress(done, total):
        nonlocal bar
        if args.no_progress or not total:
            return
        if bar is None:
            bar = ProgressBar(max(1, round(total / 1e6)), "download (MB)")
        bar.update(min(bar.total, int(done / 1e6)) - bar.done)

    def report(message):
        print(message, file=sys.stderr)

    try:
        result = download_weights(args.output, args.endpoint, progress=progress, report=report,
                                  timeout=args.timeout, retries=args.retries)
    finally:
        if bar is not None:
            bar.close()
    checked = "verified against the host's checksum" if result.verified else "NOT verified: the host gave no checksum"
    print(f"wrote {result.path} ({result.size} bytes) from {result.source}\nSHA-256 {result.sha256} ({checked})")
    return 0
