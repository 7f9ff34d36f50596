"""Overlap and surface-distance metrics between a predicted and a reference binary mask.

Masks are numpy bool ``(z, y, x)`` arrays on the same voxel grid; ``spacing_zyx`` is in mm.

Surfaces are voxel based: a mask's surface is its voxels with a face neighbour outside the mask
(outside the array counts as outside). Distances run between surface voxel centres, in mm, with
the grid's spacing (SimpleITK's exact Euclidean distance transform).

Empty masks (a structure missed entirely, or a prediction where there is nothing):
- both empty: Dice 1, surface Dice 1, HD95 0 (perfect agreement);
- one empty: Dice 0, surface Dice 0, HD95 ``inf`` (no surface to measure to); summaries
  therefore quote the median HD95, which an ``inf`` does not break.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

SURFACE_TOLERANCE_MM = 2.0
HAUSDORFF_PERCENTILE = 95.0


class Scores(NamedTuple):
    """The metrics recorded after each click."""

    dice: float
    surface_dice: float
    hd95_mm: float


def _check(prediction: np.ndarray, reference: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    prediction = np.asarray(prediction, dtype=bool)
    reference = np.asarray(reference, dtype=bool)
    if prediction.shape != reference.shape or prediction.ndim != 3:
        raise ValueError(f"masks must be 3D and of one shape, got {prediction.shape} and {reference.shape}")
    return prediction, reference


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """2 |P and R| / (|P| + |R|); 1 when both are empty."""
    prediction, reference = _check(prediction, reference)
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one of their 6 face neighbours outside it (or outside the array)."""
    padded = np.pad(mask, 1, constant_values=False)
    core = (slice(1, -1),) * 3
    interior = mask.copy()
    for axis in range(3):
        for start, stop in ((0, -2), (2, None)):
            neighbour = list(core)
            neighbour[axis] = slice(start, stop)
            interior &= padded[tuple(neighbour)]
    return mask & ~interior


def _distance_to(target: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Distance (mm) from every voxel centre to the nearest ``True`` voxel centre of ``target``."""
    image = sitk.GetImageFromArray(target.astype(np.uint8))
    image.SetSpacing([float(s) for s in reversed(spacing_zyx)])
    distance = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True, backgroundValue=0
    )
    return np.maximum(sitk.GetArrayFromImage(distance), 0.0)


def _crop_to_both(prediction: np.ndarray, reference: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box, which leaves every surface distance unchanged
    (nearest surface voxels lie inside the box) and keeps full-CT grids cheap."""
    either = prediction | reference
    box = []
    for axis in range(3):
        occupied = np.flatnonzero(either.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    # A one-voxel frame of background keeps every surface voxel a surface voxel after the crop.
    framed = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    return prediction[framed], reference[framed]


def surface_scores(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing_zyx: Sequence[float],
    tolerance_mm: float = SURFACE_TOLERANCE_MM,
) -> Tuple[float, float]:
    """(normalised surface Dice at ``tolerance_mm``, HD95 in mm); see the module docstring for empty masks.

    Surface Dice = (surface voxels of P within the tolerance of R's surface + those of R within the
    tolerance of P's) / (all surface voxels of P and R). HD95 = the larger of the two directed 95th
    percentiles (linear interpolation) of the surface distances.
    """
    prediction, reference = _check(prediction, reference)
    has_prediction, has_reference = bool(prediction.any()), bool(reference.any())
    if not has_prediction and not has_reference:
        return 1.0, 0.0
    if not has_prediction or not has_reference:
        return 0.0, float("inf")
    prediction, reference = _crop_to_both(prediction, reference)
    prediction_surface, reference_surface = surface(prediction), surface(reference)
    to_reference = _distance_to(reference_surface, spacing_zyx)[prediction_surface]
    to_prediction = _distance_to(prediction_surface, spacing_zyx)[reference_surface]
    within = int((to_reference <= tolerance_mm).sum()) + int((to_prediction <= tolerance_mm).sum())
    surface_dice = within / (to_reference.size + to_prediction.size)
    hd95 = max(
        float(np.percentile(to_reference, HAUSDORFF_PERCENTILE)),
        float(np.percentile(to_prediction, HAUSDORFF_PERCENTILE)),
    )
    return surface_dice, hd95


def score(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing_zyx: Sequence[float],
    tolerance_mm: float = SURFACE_TOLERANCE_MM,
) -> Scores:
    """Dice, surface Dice (``tolerance_mm``) and HD95 (mm) of ``prediction`` against ``reference``."""
    surface_dice, hd95 = surface_scores(prediction, reference, spacing_zyx, tolerance_mm)
    return Scores(dice(prediction, reference), surface_dice, hd95)
