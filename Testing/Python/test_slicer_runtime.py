"""The effect as it runs inside Slicer's process: the event loop of the stand-in holds the GIL between
Python calls as PythonQt does, so these tests see what a user would see in a real Slicer: that a click of
the real network (reference weights, a real CT) runs on the worker while Slicer keeps processing events,
and that quitting never waits for a running job. ``bench/bench_slicer_effect.py`` times the click against
plain Python."""

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import slicer
from conftest import REPO_ROOT, require

from standins.slicer_standins import effects, scenes
from standins.slicer_standins.clicks import timeEffectClicks
from standins.slicer_standins.fixtures import slicerEnv  # noqa: F401  (used by pytestmark)

pytestmark = pytest.mark.usefixtures("slicerEnv")

REPEATS = 5
POINT_IJK = (60, 63, 82)
"""A voxel inside the aorta CT's body (its centre), where the clicks go."""


@pytest.fixture(scope="module")
def referenceNetwork():
    """The authors' CT-SAM3D network with the deterministic reference weights (no file needed)."""
    from CTSAM3DLib.model import build_model
    from CTSAM3DLib.reference_weights import deterministic_state_dict

    network = build_model("tiny")
    network.load_state_dict(deterministic_state_dict(network))
    return network


def test_slicer_keeps_processing_events_while_clicks_run_on_the_worker(referenceNetwork, data_dir):
    """Each click's network runs on the worker while Slicer's loop (GIL held between Python calls) goes on
    passing events, and its result reaches the segment. How fast against plain Python, and how often the
    loop passes, are measured by ``bench/bench_slicer_effect.py`` (timing is not asserted here)."""
    from CTSAM3DSlicerLib.logic import CTSAM3DLogic

    volumeNode = scenes.addVolumeFromFile(require(data_dir / "aorta-ct-1.5mm" / "ct.nii.gz"))
    ijkToRAS = scenes.volumeIjkToWorld(volumeNode)
    # Points a few voxels apart, so every click opens its own patch (encoder and decoder run).
    pointsRAS = [(ijkToRAS @ np.array([*np.add(POINT_IJK, (0, 0, 8 * n)), 1.0]))[:3] for n in range(REPEATS)]

    import CTSAM3D

    CTSAM3D.CTSAM3D(_parent())
    slicer.app.emit("startupCompleted()")
    logic = CTSAM3DLogic.shared()
    logic.device = "cpu"
    logic.setNetwork(referenceNetwork)
    logic.setCrossPatch(False)
    harness = effects.startEditing(volumeNode, "CT-SAM3D")
    effect = harness.activeEffect.self()
    effect.crossPatchCheckBox.click()
    networkThreads = set()
    encode = referenceNetwork.image_encoder.forward

    def encodeNoted(*args, **kwargs):
        networkThreads.add(threading.current_thread().name)
        return encode(*args, **kwargs)

    referenceNetwork.image_encoder.forward = encodeNoted
    try:
        seconds, gaps = timeEffectClicks(effect, pointsRAS)
    finally:
        del referenceNetwork.image_encoder.forward
    assert len(seconds) == REPEATS and networkThreads and threading.main_thread().name not in networkThreads
    # A click of a real network opens a patch for hundreds of milliseconds; the loop passes every POLL_SECONDS
    # (20 ms) meanwhile. Even on a loaded machine every click sees several passes.
    assert len(gaps) >= 2 * REPEATS, len(gaps)
    harness.cleanup()


def _parent():
    from standins.slicer_standins.application import makeModuleParent

    return makeModuleParent()


QUIT_DURING_A_JOB = """
import sys, time
sys.path[:0] = [{standins!r}]
import slicer
import slicer_standins
slicer_standins.installModules()
slicer_standins.newScene({cache!r}, {temp!r})
from slicer_standins.application import makeModuleParent
import CTSAM3D
from CTSAM3DSlicerLib.logic import CTSAM3DLogic
CTSAM3D.CTSAM3D(makeModuleParent())
started = CTSAM3DLogic.shared().worker.submit(time.sleep, 120)
time.sleep(0.5)
assert started.running()
slicer.app.emit("aboutToQuit()")
queued = CTSAM3DLogic.shared().worker.submit(print, "must not run")
print("QUITTING")
"""


def test_quitting_slicer_never_waits_for_a_running_job(tmp_path):
    script = QUIT_DURING_A_JOB.format(
        standins=str(REPO_ROOT / "standins"), cache=str(tmp_path / "cache"), temp=str(tmp_path / "temp")
    )
    started = time.monotonic()
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "QUITTING" in completed.stdout and "must not run" not in completed.stdout
    assert time.monotonic() - started < 60, "the interpreter waited for the 120 s job"
