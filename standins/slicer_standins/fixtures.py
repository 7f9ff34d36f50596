"""pytest fixtures for the Slicer tests (imported by each test_slicer_*.py module)."""

import pytest

from . import installModules, newScene, qt, resetEffectFactory


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
