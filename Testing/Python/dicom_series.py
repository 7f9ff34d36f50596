"""DICOM CT series written for tests: a bright sphere in air, slices at chosen positions (missing slices,
uneven gaps) and optionally shifted sideways slice by slice (a gantry tilt); or any 3D image (an oblique,
left-handed CT) written slice by slice."""

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
    inside the sphere, -1000 HU outside, computed at each slice's own position."""
    series = _SeriesWriter(folder, "1.2.826.0.1.3680043.2.1125.7.")
    shift_per_mm = np.tan(np.radians(tilt_degrees))
    rows, columns = np.mgrid[0:ROW_SIZE, 0:ROW_SIZE]
    with series:
        for number, z in enumerate(positions_z, start=1):
            origin = np.array([-ROW_SIZE * PIXEL_MM / 2, -ROW_SIZE * PIXEL_MM / 2 + shift_per_mm * z, z])
            x, y = origin[0] + columns * PIXEL_MM, origin[1] + rows * PIXEL_MM
            inside = (x - centre_lps[0]) ** 2 + (y - centre_lps[1]) ** 2 + (z - centre_lps[2]) ** 2 <= radius_mm**2
            image = sitk.GetImageFromArray(np.where(inside, 200, -1000).astype(np.int16)[None])
            image.SetSpacing((PIXEL_MM, PIXEL_MM, 1.0))
            image.SetOrigin(tuple(float(v) for v in origin))
            series.write(image, number, origin, (1, 0, 0, 0, 1, 0))
    return folder


def write_volume_series(image: sitk.Image, folder: Path) -> Path:
    """``image`` (3D, int16 Hounsfield units, any orientation: oblique, left-handed) as a CT series with one
    file per slice, each carrying its own Image Position and Orientation (Patient) from the image's geometry."""
    series = _SeriesWriter(folder, "1.2.826.0.1.3680043.2.1125.8.")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    with series:
        for number in range(1, image.GetSize()[2] + 1):
            series.write(image[:, :, number - 1:number], number,
                         image.TransformIndexToPhysicalPoint([0, 0, number - 1]),
                         (*direction[:, 0], *direction[:, 1]))
    return folder


class _SeriesWriter:
    """Writes the slices of one CT series into ``folder``, each a one-slice image with the tags a scanner
    gives it. Used as a context: GDCM's writer switches the whole process to the C locale, and the caller's
    locale is put back afterwards."""

    def __init__(self, folder: Path, uid_root: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.uid = uid_root + str(abs(hash(str(folder))) % 10**9)
        self.writer = sitk.ImageFileWriter()
        self.writer.KeepOriginalImageUIDOn()

    def __enter__(self) -> "_SeriesWriter":
        self.locale = locale.setlocale(locale.LC_ALL)
        return self

    def __exit__(self, *exc_info) -> None:
        locale.setlocale(locale.LC_ALL, self.locale)

    def write(self, image: sitk.Image, number: int, position: Sequence[float], orientation: Sequence[float]) -> None:
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{self.uid}.{number}",
            "0020|000d": f"{self.uid}.0",
            "0020|000e": self.uid,
            "0020|0052": f"{self.uid}.9",
            "0020|0013": str(number),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in orientation),
            "0028|1052": "0",
            "0028|1053": "1",
            # What one acquisition shares, as a scanner writes it (dcm2niix splits a series whose study time
            # varies; GDCM would stamp each file with its own time).
            "0008|0020": "20260101",
            "0008|0030": "120000",
            "0008|0021": "20260101",
            "0008|0031": "120000",
            "0008|0070": "CT-SAM3D tests",
            "0018|1030": "CT-SAM3D test series",
            "0018|5100": "HFS",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        self.writer.SetFileName(os.path.join(self.folder, f"slice{number:03d}.dcm"))
        self.writer.Execute(image)
