"""CT-SAM3D inference core: the network, its checkpoints, and the interactive session.

Pure Python on torch, numpy and SimpleITK. World coordinates here are LPS millimetres, as in
ITK and SimpleITK (3D Slicer's RAS has x and y negated).
"""

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .device import resolve_device
from .model import build_model
from .session import Click, InteractiveSession, SessionInputError

__all__ = [
    "CheckpointError",
    "Click",
    "InteractiveSession",
    "SessionInputError",
    "build_model",
    "load_checkpoint",
    "read_checkpoint",
    "resolve_device",
    "save_checkpoint",
]
