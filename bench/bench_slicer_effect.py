"""A click through the CT-SAM3D Segment Editor effect inside Slicer's event loop, against plain Python.

Slicer runs Python through PythonQt without thread support, so its main thread holds the GIL whenever
Qt's event loop runs C++ code. This bench plays that loop with the test stand-ins (the GIL held between
Python calls, standins/slicer_standins/qt.py) over the real MRML libraries of slicer-core, and times
the same clicks three ways, medians over ``--repeats`` (each a click on a fresh segment, opening a patch):

- plain: ``InteractiveSession.set_clicks`` called directly (what the click costs in plain Python);
- effect: the effect's click to its result written in the segment, the loop running meanwhile;
- polled: the earlier design, the job on a worker thread polled from a 30 ms QTimer while the loop runs.

Also the gaps between event-loop passes while the effect waits (Slicer's responsiveness). Real network
(CT-SAM3D with the deterministic reference weights), the aorta CT of ../shared/data, cross-patch off.

    python -m bench.bench_slicer_effect --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import slicer
import torch

from bench.common import load_network, machine_description, shared_data
from CTSAM3DLib.runtime import Runtime
from CTSAM3DLib.session import InteractiveSession
from CTSAM3DLib.world import ras_to_lps
from standins import slicer_standins
from standins.slicer_standins import effects, qt, scenes
from standins.slicer_standins.application import makeModuleParent
from standins.slicer_standins.clicks import timeClicksInTurns, timeEffectClicks

CT = shared_data() / "aorta-ct-1.5mm" / "ct.nii.gz"
MAX_RATIO = 1.5
"""The effect's click against the same click in plain Python, median over the repeats (issue 16)."""
MAX_GAP_SECONDS = 0.050
"""Slicer's event loop runs at least this often while the effect waits (95th percentile)."""
POINT_IJK = (60, 63, 82)
POLL_MSEC = 30


def polledSeconds(worker, session, pointsRAS) -> list:
    """The earlier design: the click runs on the worker, and a 30 ms QTimer polls it from the event loop."""
    seconds = []
    poll = qt.QTimer()
    poll.interval = POLL_MSEC
    poll.connect("timeout()", lambda: None)
    for pointRAS in pointsRAS:
        started = time.perf_counter()
        job = worker.submit(session.set_clicks, [(ras_to_lps(pointRAS), True)])
        poll.start()
        qt.runEventLoop(job.done, timeoutSeconds=600)
        poll.stop()
        job.result()
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-polled", action="store_true", help="leave out the slow earlier design")
    arguments = parser.parse_args()
    if not CT.is_file():
        sys.exit(f"missing {CT} (the CTs of ../shared/data)")

    with tempfile.TemporaryDirectory() as temporary:
        slicer_standins.installModules()
        slicer_standins.newScene(temporary + "/cache", temporary + "/temp")
        from CTSAM3DSlicerLib import coordinates
        from CTSAM3DSlicerLib.logic import CTSAM3DLogic
        from CTSAM3DSlicerLib.worker import InferenceWorker

        import CTSAM3D

        network = load_network()
        CTSAM3D.CTSAM3D(makeModuleParent())
        slicer.app.emit("startupCompleted()")
        logic = CTSAM3DLogic.shared()
        logic.device = "cpu"
        logic.setNetwork(network)
        volumeNode = scenes.addVolumeFromFile(CT)
        ijkToRAS = scenes.volumeIjkToWorld(volumeNode)
        pointsRAS = [
            (ijkToRAS @ np.array([*np.add(POINT_IJK, (0, 0, 8 * (n % 3))), 1.0]))[:3]
            for n in range(arguments.repeats + 1)
        ]
        harness = effects.startEditing(volumeNode, "CT-SAM3D")
        effect = harness.activeEffect.self()
        effect.crossPatchCheckBox.click()

        image = coordinates.volumeToImage(volumeNode)
        runtime = Runtime(network, "cpu")
        session = InteractiveSession(runtime, image, cross_patch=False)
        polledSession = InteractiveSession(runtime, image, cross_patch=False)
        worker = InferenceWorker("bench")
        polled = []
        session.set_clicks([(ras_to_lps(pointsRAS[0]), True)])
        polledSession.set_clicks([(ras_to_lps(pointsRAS[0]), True)])
        timeEffectClicks(effect, pointsRAS[:1])  # warm-up: builds the effect's session

        def polledToo(pointRAS):
            if not arguments.skip_polled:
                polled.extend(polledSeconds(worker, polledSession, [pointRAS]))

        plain, inEffect, gaps = timeClicksInTurns(session, effect, pointsRAS[1:], polledToo)
        harness.cleanup()
        worker.shutdown()

    base = statistics.median(plain)
    print(f"machine: {machine_description('cpu')}, torch {torch.__version__}, "
          f"Python {platform.python_version()}; {arguments.repeats} clicks, medians")
    print("| path | click (s) | ratio to plain |")
    print("| --- | --- | --- |")
    print(f"| plain Python (`InteractiveSession.set_clicks`) | {base:.3f} | 1.00 |")
    print(f"| effect in Slicer's event loop (GIL held between Python calls) | {statistics.median(inEffect):.3f} | "
          f"{statistics.median(inEffect) / base:.2f} |")
    if polled:
        print(f"| earlier design: worker polled from a 30 ms QTimer | {statistics.median(polled):.3f} | "
              f"{statistics.median(polled) / base:.2f} |")
    print(f"event-loop gaps while the effect waits: median {1000 * statistics.median(gaps):.0f} ms, "
          f"p95 {1000 * np.percentile(gaps, 95):.0f} ms, max {1000 * max(gaps):.0f} ms ({len(gaps)} gaps)")
    for target, met in (
        (f"effect at most {MAX_RATIO}x plain Python", statistics.median(inEffect) / base <= MAX_RATIO),
        (f"events at least every {1000 * MAX_GAP_SECONDS:.0f} ms (p95)", np.percentile(gaps, 95) <= MAX_GAP_SECONDS),
    ):
        print(f"target: {target}: {'met' if met else 'NOT MET'}")


if __name__ == "__main__":
    main()
