"""What a session accepts: a CT image (checked, with NaN or infinite voxels set outside the scan) and
boxes given by two corners, which prompt with a click at their centre. Each bad input is refused with a
``SessionInputError`` that names it. numpy and SimpleITK only: a client of a server uses it too."""

from __future__ import annotations

import warnings
from typing import Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .constants import OUTSIDE_HU
from .interface import Box, SessionInputError


def as_box(corner_a_lps: Sequence[float], corner_b_lps: Sequence[float]) -> Box:
    """The axis-aligned box spanned by two opposite LPS corners; SessionInputError for bad corners."""
    corners = [np.asarray(corner, dtype=np.float64).reshape(-1) for corner in (corner_a_lps, corner_b_lps)]
    if any(corner.shape != (3,) or not np.all(np.isfinite(corner)) for corner in corners):
        raise SessionInputError("a box needs two corners of 3 finite coordinates (LPS mm)")
    low, high = np.minimum(*corners), np.maximum(*corners)
    if np.any(high - low <= 0):
        raise SessionInputError("the box is flat: its corners must differ in x, y and z")
    return low, high


def box_centre(box: Box) -> Tuple[float, float, float]:
    """The LPS point a box prompts with: its centre."""
    return tuple(float(v) for v in (box[0] + box[1]) / 2)


def validate_image(image: sitk.Image) -> None:
    """Refuses images the session cannot segment; warns when the intensities do not look like CT.

    NaN or infinite voxels are allowed where some voxels are finite: the session treats them as outside
    the scan (``readable_image`` says how many)."""
    if not isinstance(image, sitk.Image):
        raise SessionInputError(f"expected a SimpleITK.Image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise SessionInputError(f"expected a 3D image, got a {image.GetDimension()}D image")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SessionInputError(
            f"expected a scalar CT image, got {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(vector or RGB image)"
        )
    if min(image.GetSize()) < 1:
        raise SessionInputError(f"the image is empty (size {image.GetSize()})")
    values = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(values)
    if not finite.any():
        raise SessionInputError("every voxel of the image is NaN or infinite: nothing to segment")
    finite_values = values if finite.all() else values[finite]
    low, high = float(finite_values.min()), float(finite_values.max())
    if low == high:
        raise SessionInputError(f"the image is constant (every voxel is {low:g}): nothing to segment")
    if low > -500:
        warnings.warn(
            f"the image's lowest value is {low:g}, with no air near -1000 HU: it may not be a CT in Hounsfield "
            "units (e.g. MR), and CT-SAM3D's results will likely be poor",
            stacklevel=3,
        )


def readable_image(image: sitk.Image) -> sitk.Image:
    """``image`` itself, or, when it holds NaN or infinite voxels, a copy in which they are set to the
    value of the space outside the scan (-1024 HU), with a warning that names how many there are."""
    values = sitk.GetArrayViewFromImage(image)
    bad = ~np.isfinite(values)
    count = int(np.count_nonzero(bad))
    if count == 0:
        return image
    slices = np.flatnonzero(bad.any(axis=(1, 2)))
    warnings.warn(
        f"the image holds {count} NaN or infinite voxels ({100 * count / bad.size:.2g}% of it, in "
        f"{len(slices)} of its {bad.shape[0]} slices, z index {slices[0]} to {slices[-1]}): they are treated "
        f"as outside the scan ({OUTSIDE_HU:g} HU)",
        stacklevel=3,
    )
    filled = sitk.GetImageFromArray(np.where(bad, OUTSIDE_HU, values).astype(values.dtype))
    filled.CopyInformation(image)
    return filled
