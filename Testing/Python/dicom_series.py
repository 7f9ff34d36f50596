"""DICOM CT series written for tests: a bright sphere in air, slices at chosen positions (missing slices,
uneven gaps) and optionally shifted sideways slice by slice (a gantry tilt)."""

import locale
import os
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import SimpleITK as sitk

ROW_SIZE = 48
PIXEL_MM = 1.5


def write_ct_series(folder: Path, positions_z: Sequence[float], centre_lps: Tuple[float, float, float] = (0, 0, 0),
                    radius_mm: float = 15.0, tilt_degrees: float = 0.0) -> Path:
    """One axial series (rows along +x, columns along +y, LPS) with one slice file per z position: 200 HU
    inside the sphere, -1000 HU outside, computed at each slice's own position. (GDCM's writer switches the
    whole process to the C locale; the caller's locale is put back afterwards.)"""
    previous = locale.setlocale(locale.LC_ALL)
    try:
        return _write(folder, positions_z, centre_lps, radius_mm, tilt_degrees)
    finally:
        locale.setlocale(locale.LC_ALL, previous)


def _write(folder, positions_z, centre_lps, radius_mm, tilt_degrees) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.7." + str(abs(hash(str(folder))) % 10**9)
    shift_per_mm = np.tan(np.radians(tilt_degrees))
    rows, columns = np.mgrid[0:ROW_SIZE, 0:ROW_SIZE]
    for number, z in enumerate(positions_z, start=1):
        origin = np.array([-ROW_SIZE * PIXEL_MM / 2, -ROW_SIZE * PIXEL_MM / 2 + shift_per_mm * z, z])
        x, y = origin[0] + columns * PIXEL_MM, origin[1] + rows * PIXEL_MM
        inside = (x - centre_lps[0]) ** 2 + (y - centre_lps[1]) ** 2 + (z - centre_lps[2]) ** 2 <= radius_mm**2
        image = sitk.GetImageFromArray(np.where(inside, 200, -1000).astype(np.int16)[None])
        image.SetSpacing((PIXEL_MM, PIXEL_MM, 1.0))
        image.SetOrigin(tuple(float(v) for v in origin))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series}.{number}",
            "0020|000d": f"{series}.0",
            "0020|000e": series,
            "0020|0013": str(number),
            "0020|0032": "\\".join(f"{v:.4f}" for v in origin),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"slice{number:03d}.dcm"))
        writer.Execute(image)
    return folder


def write_volume_series(image: sitk.Image, folder: Path) -> Path:
    """``image`` (3D, int16 Hounsfield units, any orientation: oblique, left-handed) as a CT series with one
    file per slice, each carrying its own Image Position and Orientation (Patient) from the image's geometry.
    (The caller's locale is put back afterwards, as in ``write_ct_series``.)"""
    previous = locale.setlocale(locale.LC_ALL)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        series = "1.2.826.0.1.3680043.2.1125.8." + str(abs(hash(str(folder))) % 10**9)
        direction = np.array(image.GetDirection()).reshape(3, 3)
        orientation = "\\".join(f"{v:.6f}" for v in [*direction[:, 0], *direction[:, 1]])
        for number in range(image.GetSize()[2]):
            slice_image = image[:, :, number:number + 1]
            position = image.TransformIndexToPhysicalPoint([0, 0, number])
            tags = {
                "0008|0060": "CT",
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": f"{series}.{number + 1}",
                "0020|000d": f"{series}.0",
                "0020|000e": series,
                "0020|0013": str(number + 1),
                "0020|0032": "\\".join(f"{v:.4f}" for v in position),
                "0020|0037": orientation,
                "0020|0052": f"{series}.9",
                "0028|1052": "0",
                "0028|1053": "1",
                # What one acquisition shares, as a scanner writes it (dcm2niix splits a series whose study
                # time varies; GDCM would stamp each file with its own time).
                "0008|0020": "20260101",
                "0008|0030": "120000",
                "0008|0021": "20260101",
                "0008|0031": "120000",
                "0008|0070": "CT-SAM3D tests",
                "0018|1030": "oblique series",
                "0018|5100": "HFS",
            }
            for tag, value in tags.items():
                slice_image.SetMetaData(tag, value)
            writer.SetFileName(os.path.join(folder, f"slice{number + 1:03d}.dcm"))
            writer.Execute(slice_image)
        return folder
    finally:
        locale.setlocale(locale.LC_ALL, previous)
