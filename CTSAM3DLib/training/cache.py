"""Preprocessing cache: each scan resampled once onto the 1.5 mm lattice, its structures beside it.

One folder per case, ``<cache_dir>/<case name>-<key>/``, where the key hashes the source files'
paths, sizes and modification times and the cache format, so an edited scan is cached anew:

- ``image.npy``: the lattice's Hounsfield units, (z, y, x), int16 for integer scans (the authors'
  resampling keeps the scan's pixel type) and float32 otherwise; outside the scan -1024;
- ``masks.bin``: every structure's mask on the lattice, cut to its bounding box, uint8 0/1,
  concatenated; ``meta.json`` says where each lies;
- ``meta.json``: lattice origin and size, and per structure its box start, box shape, byte offset
  and voxel count.

Masks are resampled from the scan's grid with linear interpolation and kept where the
interpolated value is at least 0.5. A folder is written under a temporary name and renamed when
complete, so several processes may build the same cache and a killed build leaves no half case.
Reading memory-maps both files, so a data set larger than memory costs only what is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

from ..constants import LATTICE_SPACING_MM, OUTSIDE_HU
from ..datasets import Case
from ..geometry import Lattice

CACHE_FORMAT = 1
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_INTEGER_PIXELS = {
    sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkInt32, sitk.sitkUInt32,
    sitk.sitkInt64, sitk.sitkUInt64,
}


@dataclass(frozen=True)
class StructureEntry:
    """Where one structure's mask lies: box start and shape in lattice (z, y, x) voxels."""

    name: str
    start: Tuple[int, int, int]
    shape: Tuple[int, int, int]
    offset: int
    voxels: int


class CachedCase:
    """One scan on the lattice, memory-mapped: ``image`` (z, y, x) HU and its structures' masks."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self.name: str = meta["name"]
        self.origin_lps: Tuple[float, float, float] = tuple(meta["origin_lps"])
        self.size_zyx: Tuple[int, int, int] = tuple(meta["size_zyx"])
        self.structures: Dict[str, StructureEntry] = {
            item["name"]: StructureEntry(
                item["name"], tuple(item["start"]), tuple(item["shape"]), item["offset"], item["voxels"]
            )
            for item in meta["structures"]
        }
        self._image: Optional[np.ndarray] = None
        self._masks: Optional[np.ndarray] = None

    @property
    def image(self) -> np.ndarray:
        """Lattice HU, (z, y, x), memory-mapped."""
        if self._image is None:
            self._image = np.load(self.folder / "image.npy", mmap_mode="r")
        return self._image

    def structure_box(self, name: str) -> np.ndarray:
        """The structure's mask (uint8 0/1) within its bounding box (``structures[name].shape``)."""
        entry = self.structures[name]
        if self._masks is None:
            path = self.folder / "masks.bin"
            self._masks = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
        count = int(np.prod(entry.shape))
        return np.asarray(self._masks[entry.offset : entry.offset + count]).reshape(entry.shape)

    def structure_window(self, name: str, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
        """The structure's mask over an arbitrary lattice box (zeros where the structure is not)."""
        entry = self.structures[name]
        window = np.zeros(tuple(int(s) for s in shape), np.uint8)
        low = np.maximum(np.asarray(start), entry.start)
        high = np.minimum(np.asarray(start) + np.asarray(shape), np.asarray(entry.start) + entry.shape)
        if np.any(high <= low):
            return window
        box = self.structure_box(name)
        source = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(low, high, entry.start))
        target = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(low, high, start))
        window[target] = box[source]
        return window

    def __getstate__(self) -> dict:
        # Memory maps are reopened in each data-loading process rather than pickled.
        state = dict(self.__dict__)
        state["_image"] = None
        state["_masks"] = None
        return state


def _file_signature(path: Path) -> List:
    status = path.stat()
    return [str(path.resolve()), status.st_size, status.st_mtime_ns]


def cache_key(case: Case) -> str:
    """Hash of everything the cached content depends on."""
    sources = [case.image_path] + sorted(case.mask_paths.values())
    if case.label_map_path is not None:
        sources.append(case.label_map_path)
    description = {
        "format": CACHE_FORMAT,
        "spacing": LATTICE_SPACING_MM,
        "outside": OUTSIDE_HU,
        "files": [_file_signature(Path(path)) for path in sources],
        "structures": sorted(case.structure_names),
    }
    return hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]


def _resample(image: sitk.Image, origin_lps: Sequence[float], size_xyz: Sequence[int], default: float,
              pixel_type: int) -> sitk.Image:
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in size_xyz])
    resampler.SetOutputSpacing([LATTICE_SPACING_MM] * 3)
    resampler.SetOutputOrigin([float(v) for v in origin_lps])
    resampler.SetOutputDirection(_IDENTITY)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(default)
    resampler.SetOutputPixelType(pixel_type)
    return resampler.Execute(image)


def _lattice_image(image: sitk.Image, lattice: Lattice) -> np.ndarray:
    """The scan on the lattice, as the authors resample it (in the scan's own pixel type)."""
    resampled = sitk.GetArrayFromImage(
        _resample(image, lattice.origin_lps, lattice.size, OUTSIDE_HU, image.GetPixelID())
    )
    if image.GetPixelID() in _INTEGER_PIXELS and resampled.min() >= -32768 and resampled.max() <= 32767:
        return resampled.astype(np.int16)
    return resampled.astype(np.float32)


def _lattice_mask(mask: sitk.Image, lattice: Lattice) -> Optional[Tuple[Tuple[int, int, int], np.ndarray]]:
    """(box start (z, y, x), uint8 mask in its tight box) of a binary mask on the lattice, or None if
    nothing of it survives resampling. Only the lattice region around the mask is resampled."""
    array = sitk.GetArrayViewFromImage(mask)
    occupied = [np.flatnonzero(array.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(len(o) == 0 for o in occupied):
        return None
    low_zyx = [int(o[0]) - 1 for o in occupied]
    high_zyx = [int(o[-1]) + 1 for o in occupied]
    corners = [
        mask.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
        for z in (low_zyx[0], high_zyx[0]) for y in (low_zyx[1], high_zyx[1]) for x in (low_zyx[2], high_zyx[2])
    ]
    corners = np.array(corners)
    origin = np.array(lattice.origin_lps)
    start_xyz = np.maximum(np.floor((corners.min(axis=0) - origin) / LATTICE_SPACING_MM).astype(int) - 1, 0)
    stop_xyz = np.minimum(np.ceil((corners.max(axis=0) - origin) / LATTICE_SPACING_MM).astype(int) + 2, lattice.size)
    if np.any(stop_xyz <= start_xyz):
        return None
    region = _resample(
        sitk.Cast(mask, sitk.sitkFloat32), origin + start_xyz * LATTICE_SPACING_MM, stop_xyz - start_xyz, 0.0,
        sitk.sitkFloat32,
    )
    inside = sitk.GetArrayViewFromImage(region) >= 0.5
    if not inside.any():
        return None
    tight = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    slices = tuple(slice(int(t[0]), int(t[-1]) + 1) for t in tight)
    start_zyx = tuple(int(start_xyz[2 - axis] + slices[axis].start) for axis in range(3))
    return start_zyx, inside[slices].astype(np.uint8)


def cached_case_folder(case: Case, cache_dir) -> Path:
    """Where ``case``'s cached copy lives (whether or not it exists yet); reads no image."""
    return Path(cache_dir) / f"{case.name}-{cache_key(case)}"


def build_cached_case(case: Case, cache_dir) -> CachedCase:
    """The cached lattice copy of ``case``, building it first when absent (atomically)."""
    cache_dir = Path(cache_dir)
    folder = cached_case_folder(case, cache_dir)
    if (folder / "meta.json").is_file():
        return CachedCase(folder)
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{case.name}-", suffix=".partial", dir=cache_dir))
    try:
        image = case.load_image()
        lattice = Lattice.of_image(image)
        np.save(temporary / "image.npy", _lattice_image(image, lattice))
        structures = []
        offset = 0
        with open(temporary / "masks.bin", "wb") as stream:
            for name in case.structure_names:
                found = _lattice_mask(case.load_structure(name), lattice)
                if found is None:
                    continue
                start, box = found
                stream.write(np.ascontiguousarray(box).tobytes())
                structures.append(
                    {"name": name, "start": list(start), "shape": list(box.shape), "offset": offset,
                     "voxels": int(box.sum())}
                )
                offset += box.size
        meta = {
            "name": case.name,
            "source": str(case.image_path),
            "origin_lps": list(lattice.origin_lps),
            "size_zyx": list(lattice.size[::-1]),
            "spacing": LATTICE_SPACING_MM,
            "structures": structures,
        }
        (temporary / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.rename(temporary, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            shutil.rmtree(temporary, ignore_errors=True)  # another process finished the same case first
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return CachedCase(folder)
