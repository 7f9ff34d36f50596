"""The simulated user: where a careful annotator would click next, given the reference mask.

Shared by evaluation (the click protocol) and training (iterative click simulation on patches).
All arrays are numpy ``(z, y, x)``; spacings are ``(z, y, x)`` in mm; indices returned are
``(z, y, x)`` Python ints. Distances use SimpleITK's exact Euclidean distance transform, with
everything outside the array counted as background (a structure cut by the array's edge is
"interior" only away from that edge).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

IndexZYX = Tuple[int, int, int]


class SimulatedClick(NamedTuple):
    """A click chosen by the simulated user; unpacks as ``(index_zyx, positive)``."""

    index_zyx: IndexZYX
    positive: bool


def _bounding_box(mask: np.ndarray) -> Tuple[slice, slice, slice]:
    """Tight (z, y, x) slices around the nonzero voxels of a non-empty mask."""
    slices = []
    for axis in range(3):
        other_axes = tuple(a for a in range(3) if a != axis)
        occupied = np.flatnonzero(mask.any(axis=other_axes))
        slices.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(slices)


def squared_distance_to_background(mask: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Squared Euclidean distance (mm^2) from each voxel of ``mask`` (z, y, x) to the nearest voxel
    centre outside it (the array's surroundings count as outside); 0 outside the mask."""
    padded = np.pad(mask.astype(bool), 1, constant_values=False)
    background = sitk.GetImageFromArray((~padded).astype(np.uint8))
    background.SetSpacing([float(s) for s in reversed(spacing_zyx)])
    distance = sitk.SignedMaurerDistanceMap(
        background, insideIsPositive=False, squaredDistance=True, useImageSpacing=True, backgroundValue=0
    )
    squared = sitk.GetArrayFromImage(distance)[1:-1, 1:-1, 1:-1]
    return np.where(mask, np.maximum(squared, 0.0), 0.0)


def interior_point(mask: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> IndexZYX:
    """The most interior voxel of ``mask`` (bool (z, y, x)): the one farthest from the background.

    Ties (a plateau of equal distance, e.g. the middle of an even-sized box) go to the tied voxel
    nearest the tied voxels' centroid, then to the lowest (z, y, x) index, so the choice is
    deterministic and central.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"interior_point needs a 3D (z, y, x) mask, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("interior_point of an empty mask: there is nothing to click on")
    box = _bounding_box(mask)
    squared = squared_distance_to_background(mask[box], spacing_zyx)
    best = squared.max()
    # Squared distances are sums of squared spacings, so equal distances agree to rounding only.
    tied = np.argwhere(squared >= best * (1.0 - 1e-6))
    if len(tied) > 1:
        physical = tied * np.asarray(spacing_zyx, dtype=np.float64)
        offset = ((physical - physical.mean(axis=0)) ** 2).sum(axis=1)
        # argwhere lists indices in C order, so the first minimum is the lowest (z, y, x) index.
        tied = tied[[int(np.argmin(offset))]]
    return tuple(int(tied[0][axis] + box[axis].start) for axis in range(3))


def _largest_component(error: np.ndarray) -> Tuple[np.ndarray, int]:
    """The largest face-connected component of ``error`` (bool (z, y, x)) and its voxel count."""
    if not error.any():
        return error, 0
    box = _bounding_box(error)
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(error[box].astype(np.uint8)))
    labels = sitk.GetArrayFromImage(components)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    largest = int(np.argmax(counts))  # lowest label among equally large components
    component = np.zeros_like(error)
    component[box] = labels == largest
    return component, int(counts[largest])


def next_click(
    prediction: np.ndarray, reference: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)
) -> Optional[SimulatedClick]:
    """The next click of the simulated user, or ``None`` when ``prediction`` equals ``reference``.

    The click goes to the most interior voxel (`interior_point`) of the largest connected error
    region: positive in a missed region (reference and not prediction), negative in an extra one
    (prediction and not reference). When the largest missed and extra regions are equally large,
    the positive click wins.
    """
    prediction = np.asarray(prediction, dtype=bool)
    reference = np.asarray(reference, dtype=bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
    missed, missed_count = _largest_component(reference & ~prediction)
    extra, extra_count = _largest_component(prediction & ~reference)
    if missed_count == 0 and extra_count == 0:
        return None
    if missed_count >= extra_count:
        return SimulatedClick(interior_point(missed, spacing_zyx), True)
    return SimulatedClick(interior_point(extra, spacing_zyx), False)


def first_click(reference: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> SimulatedClick:
    """The first click of the protocol: positive, at the reference's most interior voxel."""
    return SimulatedClick(interior_point(reference, spacing_zyx), True)


def index_to_lps(image: sitk.Image, index_zyx: Sequence[int]) -> Tuple[float, float, float]:
    """World (LPS, mm) position of the voxel centre at numpy index (z, y, x) of ``image``."""
    z, y, x = (int(i) for i in index_zyx)
    return tuple(image.TransformIndexToPhysicalPoint((x, y, z)))
