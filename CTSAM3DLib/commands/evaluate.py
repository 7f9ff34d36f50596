"""``ctsam3d evaluate``: the simulated-click protocol over a folder of labelled scans.

Runs the network (through ``InteractiveSession``) and the classical baseline (region growing) with
the same simulated clicks on every scan and structure, and writes into ``--output``: ``clicks.csv``
(every click), ``structures.csv`` (status of every structure), ``report.md`` (tables), ``summary.csv``
(per structure), ``dice_vs_clicks.png`` and ``gallery.png``, plus each final mask under ``masks/``.
A rerun with the same ``--output`` skips what is finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ..cli import CommandError, HelpFormatter
from ..constants import MAX_OPEN_PATCHES
from ..datasets import find_cases
from ..evaluation.baseline import RegionGrowingSession
from ..evaluation.metrics import SURFACE_TOLERANCE_MM
from ..evaluation.protocol import START_KINDS
from ..evaluation.runner import Method, evaluate
from ..files import sha256_of
from .remote_options import add_server_arguments, check_server_arguments, server_errors

MODEL, BASELINE = "model", "baseline"
BASELINE_SETTINGS = {
    "method": "sitk.ConfidenceConnected per positive click",
    "multiplier": 2.5,
    "iterations": 5,
    "radius": 2,
    "carving": "voronoi",
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure a model and a region-growing baseline with simulated clicks",
        description="Run the network and a classical baseline (region growing) with the same simulated clicks\n"
        "on every scan and structure of --data. Written into --output: clicks.csv (every click),\n"
        "structures.csv (status of every structure), report.md (tables), summary.csv (per structure),\n"
        "dice_vs_clicks.png and gallery.png (with matplotlib), and each final mask under masks/.\n"
        "A rerun with the same --output skips what is finished.",
        epilog="examples:\n  ctsam3d evaluate --weights params.pth --data ../shared/data --clicks 5 --output eval\n"
        "  ctsam3d evaluate --server http://gpu-host:8000 --token-file token.txt --data ../shared/data --output eval",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--weights", type=Path, help="CT-SAM3D checkpoint (needed unless --server or --methods "
                        "baseline)")
    add_server_arguments(parser)
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="a case folder or a folder of cases (TotalSegmentator, label map + labels.csv, "
        "or <structure>.nii.gz masks beside ct.nii.gz)",
    )
    parser.add_argument("--clicks", type=int, default=10, help="simulated clicks per structure")
    parser.add_argument("--structures", nargs="+", metavar="NAME", help="only these structures (default: all)")
    parser.add_argument("--cases", nargs="+", metavar="NAME", help="only these scans (folder names)")
    parser.add_argument(
        "--cross-patch",
        choices=("on", "off"),
        default="on",
        help="let the model open more patches for structures larger than one",
    )
    parser.add_argument(
        "--max-patches", type=int, default=MAX_OPEN_PATCHES,
        help="patch cap with --cross-patch on"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=(MODEL, BASELINE),
        default=[MODEL, BASELINE],
        help="what to evaluate",
    )
    parser.add_argument(
        "--tolerance-mm",
        type=float,
        default=SURFACE_TOLERANCE_MM,
        help="surface Dice tolerance (mm)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("ctsam3d-evaluation"),
        help="results folder; rerunning into it resumes",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--gallery",
        type=int,
        default=3,
        metavar="N",
        help="best and worst N structures in gallery.png",
    )
    parser.add_argument("--start-from", metavar="KIND_OR_FOLDER",
                        help="correct an existing mask instead of segmenting from nothing: eroded, dilated (the "
                        "reference by 3 mm), leak (the reference with a structure-sized leak), or a folder of "
                        "<case>/<structure>.nii.gz masks, such as another run's masks/<method>")
    parser.add_argument("--box-jitter-mm", type=float, metavar="MM",
                        help="box protocol: the first interaction is the reference's bounding box with each face "
                        "moved by up to MM (then clicks)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def _model_method(weights: Path, device_spec: str, options: Dict[str, object]) -> Method:
    from .. import load_checkpoint, resolve_device
    from ..runtime import Runtime
    from ..session import InteractiveSession

    device = resolve_device(device_spec)
    runtime = Runtime(load_checkpoint(weights, device=device), device)

    def make_session(image):
        return InteractiveSession(runtime, image, **options)

    return Method(MODEL, make_session)


def _remote_method(url: str, token: Optional[str], options: Dict[str, object]) -> Method:
    from ..remote import RemoteSession

    return Method(MODEL, lambda image: RemoteSession(url, image, token, **options))


def _baseline_method() -> Method:
    parameters = {k: BASELINE_SETTINGS[k] for k in ("multiplier", "iterations", "radius")}
    return Method(BASELINE, lambda image: RegionGrowingSession(image, **parameters))


def run(args: argparse.Namespace) -> int:
    from ..evaluation.results import ResultStore
    from ..evaluation.runner import select_structures

    if args.clicks < 1:
        raise CommandError(f"--clicks must be at least 1, got {args.clicks}")
    methods: List[str] = list(dict.fromkeys(args.methods))
    token = check_server_arguments(args)
    if MODEL in methods and args.weights is None and args.server is None:
        raise CommandError("--weights (or --server) is needed to evaluate the model (or use --methods baseline)")
    if args.weights is not None and not args.weights.is_file():
        raise CommandError(f"weights file {args.weights} does not exist")
    cases = find_cases(args.data)
    if args.cases:
        unknown = sorted(set(args.cases) - {case.name for case in cases})
        if unknown:
            raise CommandError(f"scan(s) {unknown} not in {args.data}; found {[c.name for c in cases]}")
        cases = [case for case in cases if case.name in args.cases]
    selection = select_structures(cases, args.structures)
    if not any(selection.values()):
        raise CommandError(f"no labelled structures in {args.data}: nothing to evaluate")
    cross_patch = args.cross_patch == "on"
    cap = args.max_patches if cross_patch else 1
    if args.start_from is not None and args.start_from not in START_KINDS and not Path(args.start_from).is_dir():
        raise CommandError(f"--start-from takes {', '.join(START_KINDS)} or a folder, got {args.start_from!r}")
    if args.box_jitter_mm is not None and args.box_jitter_mm < 0:
        raise CommandError(f"--box-jitter-mm must be 0 or more, got {args.box_jitter_mm}")
    protocol = {"clicks": args.clicks, "tolerance_mm": args.tolerance_mm, "patch_cap": cap}
    if args.start_from is not None:
        known = args.start_from in START_KINDS
        protocol["start_from"] = args.start_from if known else str(Path(args.start_from).resolve())
    if args.box_jitter_mm is not None:
        protocol["box_jitter_mm"] = args.box_jitter_mm
    settings: Dict[str, object] = {"protocol": protocol}
    chosen: List[Method] = []
    if MODEL in methods:
        options = {"cross_patch": cross_patch, "max_patches": args.max_patches}
        if args.server is None:
            settings[MODEL] = {"weights": str(args.weights.resolve()), "sha256": sha256_of(args.weights),
                               "session": options}
            chosen.append(_model_method(args.weights, args.device, options))
        else:
            from ..remote import server_health

            with server_errors():
                model = server_health(args.server, token).get("model", {})
            settings[MODEL] = {"server": args.server, "sha256": model.get("sha256"), "session": options}
            chosen.append(_remote_method(args.server, token, options))
    if BASELINE in methods:
        settings[BASELINE] = BASELINE_SETTINGS
        chosen.append(_baseline_method())
    store = ResultStore(args.output, settings)
    try:
        with server_errors():
            counts = evaluate(
                cases,
                chosen,
                store,
                args.clicks,
                cap,
                args.structures,
                args.tolerance_mm,
                show_progress=not args.no_progress,
                start=args.start_from,
                box_jitter_mm=args.box_jitter_mm,
            )
        print(
            f"(structure, method) pairs: evaluated {counts['done']}, skipped {counts['skipped']} (size), "
            f"errors {counts['error']}, already done {counts['already']}; results in {args.output}"
        )
        write_outputs(store, cases, methods, args.clicks, args.gallery)
    finally:
        store.close()
    return 1 if counts["error"] else 0


def write_outputs(store, cases, methods: List[str], clicks: int, gallery: int) -> None:
    """Report, summary CSV and plots of everything in ``store``; prints the overall table."""
    from ..evaluation.plots import PlotsUnavailableError, plot_dice_vs_clicks, plot_gallery
    from ..evaluation.report import build_curves, write_report

    written = write_report(store, methods, clicks)
    overall = written[0].read_text(encoding="utf-8").split("## Per scan")[0]
    print(overall.strip())
    curves = {k: c for k, c in build_curves(store.click_rows(), clicks).items() if k[0] in methods}
    try:
        written.append(plot_dice_vs_clicks(curves, methods, clicks, store.folder / "dice_vs_clicks.png"))
        if gallery > 0:
            written.append(plot_gallery(store, cases, curves, methods, store.folder / "gallery.png", gallery))
    except (PlotsUnavailableError, ValueError) as error:
        print(f"plots not written: {error}", file=sys.stderr)
    print("wrote " + ", ".join(str(path) for path in written))
