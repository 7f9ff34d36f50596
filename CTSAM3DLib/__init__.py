"""CT-SAM3D inference core: the network, its checkpoints, and the interactive session.

Pure Python on torch, numpy and SimpleITK. World coordinates here are LPS millimetres, as in
ITK and SimpleITK (3D Slicer's RAS has x and y negated).

The names below are imported on first use, so ``CTSAM3DLib.constants`` and ``CTSAM3DLib.world``
load without torch (3D Slicer imports every module at start-up, before torch may be installed).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
"""The one place the version is written (pyproject.toml reads it from here)."""

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "read_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "resolve_device": "device",
    "build_model": "model",
    "Click": "interface",
    "InteractiveSession": "session",
    "MaskUpdate": "interface",
    "RemoteSession": "remote",
    "Runtime": "runtime",
    "SessionInputError": "interface",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
