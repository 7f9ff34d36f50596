"""Whole sessions at each precision against float32 on every CT, with cross-patch prompting (issue 26).

    python -m bench.bench_session_accuracy [--precisions int8 openvino-int8] [--caps 1 16]

On every CT of ../shared/data: three clicks near the centre (positive, negative, positive) through
``InteractiveSession``, with at most one patch (cross-patch prompting off) and with up to N patches
(``--caps``); each precision's mask on the CT's grid against the float32 session's (Dice), and the patches
each opened. Seconds are printed too, but only ``bench_inference`` times clicks.

With the reference weights the mask reaches 24 to 26 neighbours of the clicked patch, so a cap of 16
chooses 15 of them: faces first, then edges, then corners (``propagation.touched_offsets``), so that the
choice hangs only on whether a contact region is reached, not on how many voxels touch it. Near-equal
heatmap peaks (the reference weights' heatmaps are flat) can still move a neighbour's clicks, and a cap
beyond the first level chooses again in the next.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import SimpleITK as sitk

from bench.bench_inference import CTS, central_points
from bench.common import dice, load_network, log, machine_description, shared_data
from CTSAM3DLib.runtime import Runtime
from CTSAM3DLib.session import InteractiveSession


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared_data())
    parser.add_argument("--precisions", nargs="+", default=["int8", "openvino-int8"])
    parser.add_argument("--caps", nargs="+", type=int, default=[1, 16], help="most patches per click")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    net = load_network()
    runtimes = {precision: Runtime(net, "cpu", precision) for precision in ["float32", *args.precisions]}
    lines = [f"`python -m bench.bench_session_accuracy --precisions {' '.join(args.precisions)} --caps "
             f"{' '.join(map(str, args.caps))}` on {machine_description(runtimes['float32'].device)}", "",
             "| CT | most patches | " + " | ".join(f"{p}: Dice vs float32 (patches)" for p in args.precisions)
             + " | float32 patches | seconds (" + ", ".join(runtimes) + ") |",
             "| --- | --- | " + " | ".join("---" for _ in args.precisions) + " | --- | --- |"]
    for name in CTS:
        path = args.data / name / "ct.nii.gz"
        if not path.exists():
            raise SystemExit(f"missing {path}: the benchmark reads the real CTs of ../shared/data")
        image = sitk.ReadImage(str(path))
        first, second, third = central_points(image)
        for cap in args.caps:
            masks, patches, seconds = {}, {}, {}
            for precision, runtime in runtimes.items():
                log(f"{name}, at most {cap} patches, {precision}")
                session = InteractiveSession(runtime, image, max_patches=cap, cross_patch=cap > 1)
                started = time.perf_counter()
                session.add_click(first)
                session.add_click(second, False)
                session.add_click(third)
                seconds[precision] = time.perf_counter() - started
                masks[precision], patches[precision] = session.mask_array(), session.patch_count
            cells = [f"{dice(masks[p], masks['float32']):.5f} ({patches[p]})" for p in args.precisions]
            lines.append(f"| {name} | {cap} | " + " | ".join(cells) + f" | {patches['float32']} | "
                         + ", ".join(f"{seconds[p]:.1f}" for p in runtimes) + " |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
