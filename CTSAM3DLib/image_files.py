"""Reading and writing images and masks: every 3D format SimpleITK reads and writes back with its
geometry (``IMAGE_SUFFIXES``), a folder holding one DICOM series, NaN kept where NIfTI float voxels hold it;
files written whole or not at all.

A DICOM series is read with its slices where the scanner put them. SimpleITK stacks a series with one
slice spacing, the average over the series, so a missing slice or uneven gaps move slices (up to 4.5 mm
in a head series with gaps from 1.1 to 7 mm), and a gantry tilt (slices shifted sideways, a sheared grid)
cannot be expressed at all. Here each slice's own position (Image Position Patient) is read first:

- evenly spaced and untilted: the series is read as it is, and its geometry checked against the positions;
- unevenly spaced (missing slices, variable gaps): the slices are interpolated linearly onto an even grid
  with the smallest gap as spacing, and a warning says so (results are then on that grid);
- tilted: refused, with the tilt angle and what to do, since no upright grid holds the slices as they are.
"""

from __future__ import annotations

import contextlib
import gzip
import struct
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .files import PathLike, atomic_output

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl.gz", ".gipl", ".vtk", ".tif", ".tiff")
"""Extensions of the 3D image formats SimpleITK writes and reads back with their geometry."""


def image_suffix(path: PathLike) -> str:
    """The image format's extension of ``path``; ValueError naming the choices when it has none."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise ValueError(
        f"{path}: cannot tell the image format from the file name; end it with one of "
        f"{', '.join(IMAGE_SUFFIXES)}"
    )


@contextlib.contextmanager
def itk_warnings_silenced() -> Iterator[None]:
    """ITK prints its warnings raw (``WARNING: In /tmp/SimpleITK-build/...``); what matters in them is
    checked and said by the caller instead."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def read_image(path: Path) -> sitk.Image:
    """A scan from any file SimpleITK reads, or from a folder holding one DICOM series (with its slices
    where the scanner put them: see the module docstring)."""
    path = Path(path)
    with itk_warnings_silenced():
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise ValueError(f"{path}: the folder holds no DICOM series")
            if len(series) > 1:
                raise ValueError(f"{path}: the folder holds {len(series)} DICOM series ({', '.join(series)}); "
                                 "give a folder with one series")
            return read_dicom_series(path, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])))
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1]
            raise ValueError(f"{path}: SimpleITK cannot read this image: {reason}") from error
    return _with_nifti_nans(path, image)


_NIFTI_FLOATS = {16: np.float32, 64: np.float64}
"""NIfTI datatype codes of the floating-point voxels that can hold NaN."""


def _nifti_nan_mask(path: Path) -> Optional[np.ndarray]:
    """Where a floating-point 3D NIfTI file stores NaN, as a (z, y, x) mask; None for any other file.
    ITK's NIfTI reader turns NaN into 0, so the file's own bytes are read to find them."""
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as stream:
        header = stream.read(540)
        for order in "<>":
            size = struct.unpack(order + "i", header[:4])[0]
            if size in (348, 540):
                break
        else:
            return None
        if size == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype = struct.unpack(order + "h", header[70:72])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
        else:
            datatype = struct.unpack(order + "h", header[12:14])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
        if datatype not in _NIFTI_FLOATS or dims[0] < 3:
            return None
        shape = tuple(int(n) for n in dims[1:4])
        stream.seek(offset)
        dtype = np.dtype(_NIFTI_FLOATS[datatype]).newbyteorder(order)
        voxels = np.frombuffer(stream.read(int(np.prod(shape)) * dtype.itemsize), dtype=dtype)
    if voxels.size != np.prod(shape):
        return None
    return np.isnan(voxels).reshape(shape[::-1])


def _with_nifti_nans(path: Path, image: sitk.Image) -> sitk.Image:
    """``image`` with the NaN voxels its NIfTI file holds put back (they are then reported and treated
    as outside the scan by the session, instead of silently read as 0)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        return image
    mask = _nifti_nan_mask(path)
    if mask is None or not mask.any() or mask.shape != sitk.GetArrayViewFromImage(image).shape:
        return image
    array = sitk.GetArrayFromImage(image)
    array[mask] = np.nan
    restored = sitk.GetImageFromArray(array)
    restored.CopyInformation(image)
    return restored


def write_image_atomically(image: sitk.Image, path: Path) -> None:
    """Writes ``image`` (compressed where the format allows) so that ``path`` appears complete, with the
    usual permissions, or not at all. The format comes from the extension (``IMAGE_SUFFIXES``)."""
    image_suffix(path)
    with atomic_output(path) as temporary:
        try:
            sitk.WriteImage(image, str(temporary), True)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1].replace(str(temporary), str(path))
            raise ValueError(f"{path}: SimpleITK could not write it ({reason})") from error



# ----------------------------------------------------------------------------- DICOM series
POSITION_TOLERANCE_MM = 0.01
"""Slice positions that differ by less than this (plus 0.1% of the gap) count as equal."""


class SeriesGeometryWarning(UserWarning):
    """The series was regularised onto an even grid; results are on that grid."""


def _slice_geometry(files: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(positions (n, 3) LPS mm of each file's first voxel, direction cosines (row, column) (2, 3))."""
    positions, orientation = [], None
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        try:
            positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
            if orientation is None:
                orientation = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
        except RuntimeError as error:
            raise ValueError(f"{name}: no Image Position / Orientation (Patient) tag: not a CT slice") from error
    return np.array(positions), np.array(orientation).reshape(2, 3)


def read_dicom_series(folder: Path, files: List[str]) -> sitk.Image:
    """The series in ``files`` (as GDCM sorted them) as one image with every slice at its own position."""
    image = sitk.ImageSeriesReader()
    image.SetFileNames(files)
    volume = image.Execute()
    if len(files) < 3:
        return volume
    positions, cosines = _slice_geometry(files)
    normal = np.cross(cosines[0], cosines[1])
    along = positions @ normal
    order = np.argsort(along)
    positions, along = positions[order], along[order]
    gaps = np.diff(along)
    if np.any(gaps < POSITION_TOLERANCE_MM):
        raise ValueError(f"{folder}: two slices of the series lie at the same position; is it one series?")
    sideways = positions - positions[0] - np.outer(along - along[0], normal)
    shift = float(np.linalg.norm(sideways[-1]))
    if shift > POSITION_TOLERANCE_MM + 1e-3 * (along[-1] - along[0]):
        tilt = np.degrees(np.arctan2(shift, along[-1] - along[0]))
        raise ValueError(
            f"{folder}: the slices are shifted sideways ({shift:.1f} mm over the series: a gantry tilt of about "
            f"{tilt:.1f} degrees), so no upright grid holds them; correct the tilt first (3D Slicer's DICOM "
            "import with acquisition geometry regularization, or dcm2niix) and segment the corrected volume"
        )
    uneven = gaps.max() - gaps.min() > POSITION_TOLERANCE_MM + 1e-3 * gaps.min()
    if not uneven:
        spacing = float(gaps.mean())
        expected_origin = positions[0] if order[0] == 0 else positions[-1]
        if abs(volume.GetSpacing()[2] - spacing) > POSITION_TOLERANCE_MM or np.linalg.norm(
                np.array(volume.GetOrigin()) - expected_origin) > POSITION_TOLERANCE_MM:
            raise ValueError(f"{folder}: SimpleITK placed the slices elsewhere than their positions say")
        return volume
    return _regularised(folder, volume, order, along, gaps, positions[0], cosines, normal)


def _regularised(folder, volume, order, along, gaps, first_position, cosines, normal) -> sitk.Image:
    """The slices interpolated onto an even grid along ``normal`` (spacing: the smallest gap)."""
    step = float(gaps.min())
    array = sitk.GetArrayFromImage(volume)[order].astype(np.float32)
    count = int(np.floor((along[-1] - along[0]) / step + 1e-6)) + 1
    targets = along[0] + step * np.arange(count)
    upper = np.clip(np.searchsorted(along, targets, side="right"), 1, len(along) - 1)
    weight = ((targets - along[upper - 1]) / (along[upper] - along[upper - 1]))[:, None, None]
    even = (1 - weight) * array[upper - 1] + weight * array[upper]
    pixel = sitk.GetArrayViewFromImage(volume).dtype
    if np.issubdtype(pixel, np.integer):
        even = np.rint(even)
    result = sitk.GetImageFromArray(even.astype(pixel))
    result.SetSpacing((*volume.GetSpacing()[:2], step))
    result.SetOrigin(tuple(float(v) for v in first_position))
    result.SetDirection(tuple(float(v) for v in np.column_stack([cosines[0], cosines[1], normal]).ravel()))
    wide = np.flatnonzero(gaps > step + POSITION_TOLERANCE_MM + 1e-3 * step)
    where = ", ".join(f"{gaps[i]:.2f} mm after slice {i + 1}" for i in wide[:5]) + (" ..." if len(wide) > 5 else "")
    warnings.warn(
        SeriesGeometryWarning(
            f"{folder}: the slices are unevenly spaced (gaps {gaps.min():.2f} to {gaps.max():.2f} mm: {where}); "
            f"they were interpolated onto an even {step:.2f} mm grid ({count} slices instead of {len(along)}), "
            "and results are written on that grid"
        ),
        stacklevel=3,
    )
    return result
