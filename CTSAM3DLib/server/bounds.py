"""Bounds on what one request may make the server do: a physical geometry, the source voxels one patch
may cover, and how many clicks one request may add.

Every session shares one worker and one memory budget, so a request must be refused before it runs when
its work could be unbounded: a click's cost grows with the source voxels its patches cover (a tiny spacing
makes a 96 mm patch cover millions of them), with the patches it may open (``max_patches``), and with the
clicks a ``set_clicks`` adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..constants import LATTICE_SPACING_MM, PATCH_SIZE

SPACING_RANGE_MM = (1e-3, 1e3)
"""Voxel spacings the server takes: anything a scanner (micro-CT included) makes, nothing that overflows
or makes the index-to-world matrix singular."""

ORIGIN_LIMIT_MM = 1e6
"""Largest origin coordinate (a kilometre): beyond it world coordinates lose their millimetres."""

ORTHONORMAL_TOLERANCE = 1e-3
"""How far a direction matrix's columns may be from unit length and from perpendicular (stored directions
carry float32 rounding, about 1e-7)."""

DEFAULT_MAX_PATCHES = 64
"""Default of ``ctsam3d serve --max-patches``: the most patches a session's client may let one click open."""

DEFAULT_MAX_PATCH_SOURCE_VOXELS = 16 * 2**20
"""Default bound on the source voxels one patch may cover (a 96 mm patch on a 0.38 mm grid). Rendering a
patch into the mask costs about 40 bytes per such voxel on an oblique scan, so this bounds a click's
transient memory to well under 1 GiB."""

CLICKS_ADDED_PER_REQUEST = 8
"""Most clicks one ``PUT .../clicks`` adds; the client sends the rest in further requests, each of which
waits its turn behind other users."""

RENDER_BYTES_PER_SOURCE_VOXEL = 40
"""Transient memory of rendering a patch into the mask, per source voxel it covers (measured: 10 bytes
axis-aligned, 38 oblique)."""


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1000
    """Open connections at most; more are closed as soon as they are accepted."""
    header_timeout_s: float = 10.0
    """A request's line and headers must arrive within this long (from the connection, or the last answer)."""
    body_timeout_s: float = 300.0
    """A request's body must arrive within this long after its headers (a 1 GiB upload at 4 MB/s)."""
    keep_alive_s: float = 5.0
    """An idle connection is closed after this long without a request."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM or Ctrl-C, requests in flight get this long to finish; then the server stops regardless."""


def geometry_problem(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> str:
    """Why an image geometry is refused ("" when it is fine): spacings in ``SPACING_RANGE_MM``, origin
    within ``ORIGIN_LIMIT_MM``, direction orthonormal within ``ORTHONORMAL_TOLERANCE``."""
    low, high = SPACING_RANGE_MM
    if not all(low <= value <= high for value in spacing):
        return f"spacing must lie between {low:g} and {high:g} mm, got {list(spacing)}"
    if not all(abs(value) <= ORIGIN_LIMIT_MM for value in origin):
        return f"origin must lie within {ORIGIN_LIMIT_MM:g} mm of zero, got {list(origin)}"
    matrix = np.reshape(np.asarray(direction, dtype=np.float64), (3, 3))
    deviation = float(np.max(np.abs(matrix.T @ matrix - np.eye(3))))
    if deviation > ORTHONORMAL_TOLERANCE:
        return (f"direction must be an orthonormal 3x3 matrix (a rotation, perhaps with a flip): its columns are "
                f"off by up to {deviation:.3g}")
    return ""


def patch_source_voxels(size_xyz: Sequence[int], spacing: Sequence[float], direction: Sequence[float]) -> int:
    """The most source voxels one patch (a cube of PATCH_SIZE lattice voxels, LATTICE_SPACING_MM apart)
    covers on an image of this size, spacing and direction: the patch's bounding box in source indices,
    at most the whole image."""
    index_to_world = np.reshape(np.asarray(direction, dtype=np.float64), (3, 3)) @ np.diag(spacing)
    world_to_index = np.linalg.inv(index_to_world)
    edge_mm = PATCH_SIZE * LATTICE_SPACING_MM
    extent = edge_mm * np.abs(world_to_index).sum(axis=1) + 2
    return math.prod(int(min(math.ceil(span), n)) for span, n in zip(extent, size_xyz))


def session_state_bytes(array: np.ndarray) -> int:
    """What a session holds besides its patches and its (shared) image: its mask and its initial mask, one
    byte per voxel each, and a float32 copy of voxels of a type the network's sampling cannot read as is."""
    voxels = array.size
    copied = 0 if array.dtype.name in ("int16", "uint8", "float32") else 4 * voxels
    return 2 * voxels + copied


PATCH_BYTES_ESTIMATE = 32 << 20
"""What one open patch is taken to hold until one was measured (``patch_bytes``): CT-SAM3D's encoder features
with the patch's input and probability are about 20 MB."""


def patch_bytes(patch: Any) -> int:
    """The memory one open patch (a ``Patch``) holds: its encoder features, input, probability and initial
    mask."""
    tensors = [*patch.features, patch.image, patch.probability, patch.initial]
    return sum(t.element_size() * t.nelement() for t in tensors if t is not None)
