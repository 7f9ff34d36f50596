"""World coordinates: the RAS <-> LPS change between 3D Slicer and ITK/SimpleITK (numpy only).

CTSAM3DLib works in LPS; 3D Slicer's world is RAS. The two differ by negating x and y, a change
that is its own inverse.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

RAS_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
"""4x4 homogeneous matrix that changes world coordinates RAS <-> LPS."""


def ras_to_lps(point_ras: Sequence[float]) -> Tuple[float, float, float]:
    """A world point from RAS to LPS (plain floats)."""
    x, y, z = (float(value) for value in np.asarray(point_ras, dtype=np.float64).reshape(3))
    return -x, -y, z


def matrix_ras_to_lps(matrix_to_ras: np.ndarray) -> np.ndarray:
    """A 4x4 matrix that maps into world RAS, changed to map into world LPS."""
    return RAS_LPS_FLIP @ np.asarray(matrix_to_ras, dtype=np.float64)
