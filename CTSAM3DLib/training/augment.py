"""Random affine augmentation and the cutting of (possibly transformed) patches from the lattice.

A patch is 64^3 lattice voxels; its voxel (32, 32, 32) sits on the chosen centre. With an affine
``A`` (rotation about a random axis times an isotropic scale) and a shift ``t`` (voxels), patch
voxel ``p`` takes its value from lattice position ``pivot + A (centre + p - 32 - pivot) + t``; the
two patches of a cross-patch pair share ``A``, ``t`` and the pivot (their midpoint), so the pair
moves rigidly and the geometry between neighbours stays that of the scan. Image values are
interpolated trilinearly (-1024 HU outside the scan); masks trilinearly and kept at >= 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import LATTICE_SPACING_MM, OUTSIDE_HU, PATCH_SIZE
from .cache import CachedCase
from .config import AugmentationConfig

PATCH_CENTRE = PATCH_SIZE // 2


@dataclass(frozen=True)
class Affine:
    """matrix (3x3, acting on (z, y, x) offsets) and shift (z, y, x lattice voxels)."""

    matrix: Tuple[Tuple[float, float, float], ...]
    shift: Tuple[float, float, float]


def rotation_matrix(axis: Sequence[float], angle: float) -> np.ndarray:
    """Rotation by ``angle`` radians about the unit vector ``axis`` (Rodrigues' formula)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def random_affine(rng: np.random.Generator, config: AugmentationConfig) -> Optional[Affine]:
    """With probability ``config.probability``, a random rotation (uniform angle within
    +-rotation_degrees about a uniformly random axis), isotropic scale and per-axis shift
    (uniform within +-shift_mm); otherwise None (the patch is cut unchanged)."""
    if rng.random() >= config.probability:
        return None
    axis = rng.normal(size=3)
    while np.linalg.norm(axis) < 1e-6:
        axis = rng.normal(size=3)
    angle = math.radians(rng.uniform(-config.rotation_degrees, config.rotation_degrees))
    scale = rng.uniform(config.scale[0], config.scale[1])
    shift = rng.uniform(-config.shift_mm, config.shift_mm, size=3) / LATTICE_SPACING_MM
    matrix = rotation_matrix(axis, angle) * scale
    return Affine(tuple(tuple(float(v) for v in row) for row in matrix), tuple(float(v) for v in shift))


def crop(array: np.ndarray, start: Sequence[int], shape: Sequence[int], fill: float) -> np.ndarray:
    """``array[start : start + shape]`` (3D), padded with ``fill`` where the box leaves the array."""
    out = np.full(tuple(int(s) for s in shape), fill, dtype=array.dtype)
    low = np.maximum(np.asarray(start), 0)
    high = np.minimum(np.asarray(start) + np.asarray(shape), array.shape)
    if np.any(high <= low):
        return out
    source = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    target = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(low, high, start))
    out[target] = array[source]
    return out


def _sampling_positions(
    centre: Sequence[int], affine: Affine, pivot: Sequence[float], corners_only: bool = False
) -> torch.Tensor:
    """Lattice (z, y, x) positions of every patch voxel, (64, 64, 64, 3) float64, or of its
    8 corner voxels only, (2, 2, 2, 3)."""
    if corners_only:
        axis = torch.tensor([0.0, PATCH_SIZE - 1], dtype=torch.float64) - PATCH_CENTRE
    else:
        axis = torch.arange(PATCH_SIZE, dtype=torch.float64) - PATCH_CENTRE
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
    pivot_t = torch.tensor(pivot, dtype=torch.float64)
    relative = grid + (torch.tensor(centre, dtype=torch.float64) - pivot_t)
    matrix = torch.tensor(affine.matrix, dtype=torch.float64)
    return relative @ matrix.T + pivot_t + torch.tensor(affine.shift, dtype=torch.float64)


def _interpolate(region: np.ndarray, positions: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``region`` (z, y, x) at (..., 3) (z, y, x) positions relative to it;
    outside the region the nearest border value (regions are cut with a margin of fill)."""
    volume = torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32))[None, None]
    extent = torch.tensor([max(s - 1, 1) for s in region.shape], dtype=torch.float64)
    normalised = (positions / extent * 2 - 1).flip(-1).to(torch.float32)  # grid_sample wants (x, y, z)
    sampled = F.grid_sample(
        volume, normalised.reshape(1, *positions.shape), mode="bilinear", padding_mode="border", align_corners=True
    )
    return sampled[0, 0]


def cut_patch(
    case: CachedCase, structure: str, centre: Sequence[int], affine: Optional[Affine] = None,
    pivot: Optional[Sequence[float]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(HU (64,64,64) float32, mask (64,64,64) bool) of the patch centred on lattice voxel
    ``centre`` (z, y, x), transformed by ``affine`` about ``pivot`` when given."""
    start = np.asarray(centre, dtype=np.int64) - PATCH_CENTRE
    shape = (PATCH_SIZE,) * 3
    if affine is None:
        image = crop(case.image, start, shape, OUTSIDE_HU).astype(np.float32)
        mask = case.structure_window(structure, start, shape) != 0
        return torch.from_numpy(image), torch.from_numpy(mask)
    pivot = pivot if pivot is not None else centre
    corners = _sampling_positions(centre, affine, pivot, corners_only=True).reshape(-1, 3)
    low = torch.floor(corners.amin(0)).long().numpy() - 1
    high = torch.ceil(corners.amax(0)).long().numpy() + 2
    positions = _sampling_positions(centre, affine, pivot)
    region_shape = high - low
    image_region = crop(case.image, low, region_shape, OUTSIDE_HU)
    mask_region = case.structure_window(structure, low, region_shape)
    relative = positions - torch.from_numpy(low).to(torch.float64)
    image = _interpolate(image_region, relative)
    mask = _interpolate(mask_region, relative) >= 0.5
    return image, mask
