"""Reading scans and click lists, writing results, as the command line needs them."""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import struct
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .dicom import read_dicom_series
from .files import atomic_output, image_suffix

Point = Tuple[float, float, float]


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
    where the scanner put them: see ``CTSAM3DLib.dicom``)."""
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
    usual permissions, or not at all. The format comes from the extension (``files.IMAGE_SUFFIXES``)."""
    image_suffix(path)
    with atomic_output(path) as temporary:
        try:
            sitk.WriteImage(image, str(temporary), True)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1].replace(str(temporary), str(path))
            raise ValueError(f"{path}: SimpleITK could not write it ({reason})") from error


def parse_numbers(text: str, count: int, form: str) -> Tuple[float, ...]:
    """``count`` comma-separated numbers; ValueError saying the ``form`` (e.g. "a point is X,Y,Z")."""
    parts = text.replace(" ", "").split(",")
    try:
        numbers = tuple(float(part) for part in parts)
    except ValueError:
        numbers = ()
    if len(numbers) != count:
        raise ValueError(f"{form} in millimetres, got {text!r}")
    return numbers


def parse_point(text: str) -> Point:
    return parse_numbers(text, 3, "a point is X,Y,Z")


def read_points_file(path: Path, default_ras: bool) -> List[Tuple[Point, bool, bool]]:
    """(point, is_ras, positive) rows from a CSV (columns x, y, z and optionally label: 1 positive,
    0 negative) or a 3D Slicer markups file (.mrk.json; its coordinate system is honoured, points
    whose label starts with '-' or in a list named like 'negative' are negative)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"points file not found: {path}")
    if path.name.lower().endswith(".json"):
        return _read_markups(path)
    rows = []
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        missing = {"x", "y", "z"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: a points CSV needs columns x, y, z (missing {', '.join(sorted(missing))})")
        for number, row in enumerate(reader, start=2):
            try:
                point = (float(row["x"]), float(row["y"]), float(row["z"]))
                positive = str(row.get("label", "1")).strip().lower() not in ("0", "negative", "false")
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: {error}") from error
            rows.append((point, default_ras, positive))
    return rows


def _read_markups(path: Path) -> List[Tuple[Point, bool, bool]]:
    try:
        content = json.loads(path.read_text())
        markups = content["markups"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a 3D Slicer markups file ({error})") from error
    rows = []
    for markup in markups:
        is_ras = str(markup.get("coordinateSystem", "LPS")).upper() == "RAS"
        negative_list = "negative" in str(markup.get("name", "")).lower()
        for control_point in markup.get("controlPoints", []):
            position = control_point.get("position")
            if position is None or len(position) != 3:
                raise ValueError(f"{path}: control point {control_point.get('id', '?')} has no 3D position")
            negative = negative_list or str(control_point.get("label", "")).startswith("-")
            rows.append((tuple(float(v) for v in position), is_ras, not negative))
    return rows
