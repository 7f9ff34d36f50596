"""Slicer glue of the CT-SAM3D extension: geometry, prompts, logic, worker thread, weights, dependencies.

Everything here calls CTSAM3DLib for the network and the session. Importing this package first finds
CTSAM3DLib (``core``: beside the module when built, else in the source checkout); nothing else runs at
import time.
"""

from CTSAM3DSlicerLib.core import CORE_ORIGIN

__all__ = ["CORE_ORIGIN"]
