"""pytest fixtures for the Slicer tests (imported by each test_slicer_*.py module)."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from slicer_standins import installModules, newScene, qt, resetEffectFactory  # noqa: E402


@pytest.fixture
def slicerEnv(tmp_path, monkeypatch):
    """A fresh scene, slicer.app with cache/temporary folders under tmp_path, the weights' cache folder
    (CTSAM3D_CACHE) there too, shared logic reset."""
    monkeypatch.setenv("CTSAM3D_CACHE", str(tmp_path / "weights-cache"))
    installModules()
    environment = newScene(str(tmp_path / "cache"), str(tmp_path / "temp"))
    from CTSAM3DSlicerLib.logic import CTSAM3DLogic

    CTSAM3DLogic._shared = None
    resetEffectFactory()
    yield environment
    if CTSAM3DLogic._shared is not None:
        CTSAM3DLogic._shared.worker.shutdown()
        CTSAM3DLogic._shared = None
    qt.stopAllTimers()


def pumpUntil(condition, timeoutSeconds: float = 60.0) -> None:
    """Run Slicer's event loop (timers at their intervals, the GIL held between them, as under
    PythonQt) until ``condition()`` holds."""
    qt.runEventLoop(condition, timeoutSeconds)
