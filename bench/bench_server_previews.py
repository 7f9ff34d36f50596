"""A multi-patch click through ``ctsam3d serve`` with streamed previews: when its user sees the first one.

On one server (uvicorn on loopback, in this process) and the abdomen CT, a click that cross-patch prompting
carries into ``--max-patches`` patches over several levels is sent ``--rounds`` times with previews
(``RemoteSession.add_click(..., preview=)``) and as many times without, and a click that stays in one patch
(cross-patch prompting off) as many times again, each on a fresh session: the seconds until the first
preview, the last preview and the answer, against the one-patch click. The stand-in network
(``SlowNet``) costs ``--decode-s`` per decoder call, about what CT-SAM3D's int8 decoder takes per batch on
a laptop CPU; ``--network real`` runs CT-SAM3D on reference weights (untrained: timings real, masks
meaningless, and such weights may stop at one level).

    python -m bench.bench_server_previews
    python -m bench.bench_server_previews --network real --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import SimpleITK as sitk

from bench.common import load_network, log, machine_description, shared_data
from CTSAM3DLib.remote import RemoteSession
from CTSAM3DLib.server.app import BackgroundServer, create_app
from standins.networks import SlowNet


def one_click(url: str, image: sitk.Image, point: Sequence[float], options: Dict, previews: bool) -> Dict[str, float]:
    """Seconds from sending the click to each preview and to its answer, on a fresh session."""
    with RemoteSession(url, image, **options) as session:
        seen: List[float] = []
        started = time.perf_counter()
        session.add_click(point, preview=(lambda update: seen.append(time.perf_counter() - started))
                          if previews else None)
        answered = time.perf_counter() - started
        return {"answer": answered, "first": seen[0] if seen else answered, "last": seen[-1] if seen else answered,
                "previews": len(seen), "patches": session.patch_count}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", choices=("stand-in", "real"), default="stand-in")
    parser.add_argument("--decode-s", type=float, default=0.3, help="the stand-in's seconds per decoder call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-patches", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image", default="abdomen-ct-3mm", help="a CT folder of ../shared/data")
    parser.add_argument("--data", type=Path, default=shared_data())
    args = parser.parse_args(argv)
    image = sitk.ReadImage(str(args.data / args.image / "ct.nii.gz"))
    point = image.TransformContinuousIndexToPhysicalPoint([60.0, 50.0, 15.0])
    network = load_network() if args.network == "real" else SlowNet(args.decode_s)
    app = create_app(network, device=args.device)
    cases = [("one patch", {"cross_patch": False}, False), ("multi-patch, no previews", {}, False),
             ("multi-patch, previews", {}, True)]
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name, _, _ in cases}
    with BackgroundServer(app) as server:
        one_click(server.url, image, point, {"max_patches": args.max_patches}, True)  # upload, warm up
        for round_number in range(args.rounds):
            log(f"round {round_number + 1} of {args.rounds}")
            for name, options, previews in cases:
                results[name].append(one_click(server.url, image, point, {"max_patches": args.max_patches, **options},
                                               previews))
    print(f"{machine_description(app.state.server.device)}; {args.network} network"
          + (f" ({args.decode_s:g} s per decode)" if args.network == "stand-in" else "")
          + f"; {args.image}; medians of {args.rounds} rounds")
    print("| click | patches | previews | first preview (s) | last preview (s) | answer (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rows in results.items():
        median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        shown = "-" if not median["previews"] else f"{median['first']:.2f}"
        last = "-" if not median["previews"] else f"{median['last']:.2f}"
        print(f"| {name} | {median['patches']:.0f} | {median['previews']:.0f} | {shown} | {last} | "
              f"{median['answer']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
