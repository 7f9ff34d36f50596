"""``ctsam3d segment``: clicks on a scan in, a mask in the scan's geometry out."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..cli import HelpFormatter
from ..constants import MAX_OPEN_PATCHES
from ..files import check_output_path
from ..image_files import image_suffix, read_image, write_image_atomically
from ..inference import PRECISIONS
from ..interface import Segmenter
from ..world import ras_to_lps
from .prompt_files import parse_numbers, parse_point, read_points_file
from .remote_options import add_server_arguments, check_server_arguments, server_errors

Click = Tuple[Tuple[float, float, float], bool, bool]
Point = Tuple[float, float, float]


class _AppendClicks(argparse.Action):
    """Collects clicks and points files in command-line order (the order of clicks matters)."""

    def __call__(self, parser, namespace, values, option_string=None):
        entries = list(getattr(namespace, "click_sources", None) or [])
        entries.append((self.dest, values))
        namespace.click_sources = entries


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment a structure from clicks",
        description="Segment one structure of a CT from positive and negative clicks. Points are LPS\n"
        "millimetres (as ITK and SimpleITK) unless --ras is given (as 3D Slicer shows them).",
        epilog="example (a liver from one click; negative coordinates are typed as they are):\n"
        "  ctsam3d segment --image ct.nii.gz --weights params.pth --point -71.1,-25.4,-245.0 \\\n"
        "      --negative -30.0,-20.0,-250.0 --output liver.nii.gz\n"
        "the same on a ctsam3d serve server (no weights or GPU needed here):\n"
        "  ctsam3d segment --image ct.nii.gz --server http://gpu-host:8000 --token-file token.txt \\\n"
        "      --point -71.1,-25.4,-245.0 --output liver.nii.gz",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--image", required=True, type=Path, help="CT file (any format SimpleITK reads) or "
                        "a folder with one DICOM series")
    parser.add_argument("--weights", type=Path, help="checkpoint (.pth); needed unless --server")
    add_server_arguments(parser)
    parser.add_argument("--output", required=True, type=Path, help="mask file, in the image's geometry")
    parser.add_argument("--point", dest="positive", action=_AppendClicks, metavar="X,Y,Z",
                        help="a positive click (repeatable)")
    parser.add_argument("--negative", dest="negative", action=_AppendClicks, metavar="X,Y,Z",
                        help="a negative click (repeatable)")
    parser.add_argument("--points-file", dest="positive_file", action=_AppendClicks, metavar="FILE",
                        help="clicks from a CSV (x,y,z[,label]) or a 3D Slicer .mrk.json (repeatable)")
    parser.add_argument("--negative-points-file", dest="negative_file", action=_AppendClicks, metavar="FILE",
                        help="negative clicks from a CSV or .mrk.json (repeatable)")
    parser.add_argument("--ras", action="store_true", help="points given on the command line and in CSV "
                        "files are RAS (3D Slicer), not LPS")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="how the network runs: auto (fastest measured path for the device), float32 "
                        "(the reference path), int8, bfloat16, float16")
    parser.add_argument("--cross-patch", choices=("on", "off"), default="on",
                        help="carry the segmentation into neighbouring patches")
    parser.add_argument("--max-patches", type=int, default=MAX_OPEN_PATCHES,
                        help="most patches cross-patch prompting may open")
    parser.add_argument("--probability", type=Path, help="also write the probability map (float32)")
    parser.add_argument("--initial-mask", type=Path, metavar="MASK",
                        help="start from this mask (on the image's grid; nonzero is inside) and correct it with "
                        "the clicks: outside the patches they touch it stays exactly as it is")
    parser.add_argument("--box", metavar="X1,Y1,Z1,X2,Y2,Z2",
                        help="two opposite corners of a box around the structure (LPS, or RAS with --ras): a "
                        "positive click at its centre, before the clicks, and the result clipped to it")
    parser.set_defaults(func=run, click_sources=[])


def collect_clicks(args: argparse.Namespace) -> List[Tuple[Tuple[float, float, float], bool]]:
    """(point_lps, positive) in command-line order."""
    clicks = []
    for kind, value in args.click_sources:
        if kind in ("positive", "negative"):
            rows = [(parse_point(value), args.ras, kind == "positive")]
        else:
            rows = read_points_file(Path(value), args.ras)
            if kind == "negative_file":
                rows = [(point, is_ras, False) for point, is_ras, _ in rows]
        clicks.extend((ras_to_lps(point) if is_ras else point, positive) for point, is_ras, positive in rows)
    if not clicks and getattr(args, "box", None) is None:
        raise ValueError("give at least one click: --point X,Y,Z (or --points-file, or a --box)")
    return clicks


def parse_box(args: argparse.Namespace):
    """The --box corners as two LPS points, or None."""
    if args.box is None:
        return None
    numbers = parse_numbers(args.box, 6, "a box is X1,Y1,Z1,X2,Y2,Z2")
    corners = (tuple(numbers[:3]), tuple(numbers[3:]))
    return tuple(ras_to_lps(corner) for corner in corners) if args.ras else corners


def run(args: argparse.Namespace) -> int:
    from ..session import validate_image

    # Everything the user can get wrong is checked before the ~300 MB of weights load.
    for output in (args.output, args.probability):
        if output is not None:
            image_suffix(output)
            check_output_path(output)
    if args.max_patches < 1:
        raise ValueError(f"--max-patches must be at least 1, got {args.max_patches}")
    clicks = collect_clicks(args)
    box = parse_box(args)
    token = check_server_arguments(args, local_only=("probability",))
    if args.server is None and args.weights is None:
        raise ValueError("give --weights FILE, or --server URL to segment on a ctsam3d serve server")
    if args.weights is not None and not Path(args.weights).is_file():
        raise FileNotFoundError(f"weights not found: {args.weights}")
    started = time.perf_counter()
    image = read_image(args.image)
    validate_image(image)
    initial_mask = read_image(args.initial_mask) if args.initial_mask is not None else None
    print(f"read {args.image} {image.GetSize()} in {time.perf_counter() - started:.2f} s")
    options = {"cross_patch": args.cross_patch == "on", "max_patches": args.max_patches, "initial_mask": initial_mask}
    with server_errors():
        session = _local_session(args, image, options) if args.server is None else \
            _remote_session(args.server, token, image, options)
        try:
            _prompt(session, box, clicks, args.initial_mask)
            started = time.perf_counter()
            write_image_atomically(session.mask, args.output)
            if args.probability:
                write_image_atomically(session.probability(), args.probability)
        finally:
            if args.server is not None:
                session.close()
    voxels = int(session.mask_array().sum())
    print(f"wrote {args.output} ({voxels} voxels in the mask) in {time.perf_counter() - started:.2f} s")
    return 0


def _prompt(session: Segmenter, box: Optional[Tuple[Point, Point]], clicks: List[Tuple[Point, bool]],
            initial_mask_path: Optional[Path]) -> None:
    """Gives the session (local or remote) the box, first, and the clicks, printing what each took and the
    box of voxels it changed (the whole mask is built once, for the file)."""
    if initial_mask_path is not None:
        print(f"starting from {initial_mask_path} ({int(session.mask_array().sum())} voxels)")
    prompts = ([("box", box)] if box is not None else []) + [("click", click) for click in clicks]
    for number, (kind, prompt) in enumerate(prompts, start=1):
        progress = patch_progress("box" if kind == "box" else f"click {number}")
        if kind == "box":
            update = session.add_box(*prompt, progress=progress)
            point_lps, positive = session.clicks[-1]
        else:
            point_lps, positive = prompt
            update = session.add_click(point_lps, positive, progress=progress)
        steps = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in session.last_timing.items()
                          if not name.startswith("patches_") and name != "total")
        steps += f"; total {session.last_timing['total'] * 1000:.0f} ms"
        sign = "+" if positive else "-"
        coordinates = ", ".join(f"{v:.1f}" for v in point_lps)
        decoded = int(session.last_timing["patches_decoded"])
        what = "box, centre" if kind == "box" else f"click {number} ({sign})"
        changed = "nothing" if update.empty else (
            f"{'x'.join(str(n) for n in update.size)} voxels from index ({', '.join(str(i) for i in update.start)})")
        print(f"{what} at LPS ({coordinates}): {steps}; patches decoded: {decoded}, open: {session.patch_count}; "
              f"changed: {changed}")


def patch_progress(what: str) -> Callable[[int, int], None]:
    """A session's progress callback that prints a line each time a click finds more patches to decode
    (cross-patch prompting carrying it into neighbours): a large organ takes seconds on a CPU. The click's
    own line follows when it is done."""
    started = time.perf_counter()
    known = 1

    def show(done: int, planned: int) -> None:
        nonlocal known
        if planned > known:
            known = planned
            print(f"  {what}: {done} of {planned} patches decoded so far ({time.perf_counter() - started:.2f} s)",
                  flush=True)

    return show


def _local_session(args: argparse.Namespace, image: Any, options: Dict[str, Any]) -> Segmenter:
    from .. import InteractiveSession, load_checkpoint
    from ..runtime import Runtime

    started = time.perf_counter()
    net = load_checkpoint(args.weights, device=args.device)
    print(f"loaded {args.weights} in {time.perf_counter() - started:.2f} s")
    # The first use of new weights at openvino-int8 builds their decoder (about 20 s): say why it waits.
    print("preparing the network...", flush=True)
    started = time.perf_counter()
    runtime = Runtime(net, args.device, args.precision)
    print(f"prepared it in {time.perf_counter() - started:.2f} s")
    session = InteractiveSession(runtime, image, **options)
    chosen = " (auto)" if args.precision == "auto" else ""
    print(f"device: {session.device}, precision: {session.precision}{chosen}")
    return session


def _remote_session(url: str, token: Optional[str], image: Any, options: Dict[str, Any]) -> Segmenter:
    from ..remote import RemoteSession

    started = time.perf_counter()
    session = RemoteSession(url, image, token, **options)
    print(f"opened a session on {url} in {time.perf_counter() - started:.2f} s (device: {session.device}, "
          f"precision: {session.precision})")
    return session
