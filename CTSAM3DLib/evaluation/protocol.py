"""The simulated-click protocol: one loop, the same for the network and for the baseline.

Any *click segmenter* works: an object with ``add_click(point_lps, positive)``, ``add_box``, ``reset()``
and ``mask`` (the whole mask after the click, on the scan's grid). ``InteractiveSession`` is one;
`RegionGrowingSession` (the classical baseline) is another.

For one structure the simulated user (`CTSAM3DLib.simulated_annotator`) places the first, positive click at the
structure's most interior voxel, then each next click at the most interior voxel of the largest
error region of the current mask (positive in a missed region, negative in an extra one). After
each click the loop records Dice, surface Dice, HD95 and the wall time of ``add_click``. When the
mask matches the reference exactly the user stops; summaries carry the last scores forward.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence, Tuple

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

from ..constants import LATTICE_SPACING_MM, PATCH_SIZE
from ..interface import MaskUpdate
from ..simulated_annotator import SimulatedClick, first_click, index_to_lps, next_click
from .metrics import SURFACE_TOLERANCE_MM, score

PATCH_EXTENT_MM = PATCH_SIZE * LATTICE_SPACING_MM
MIN_LATTICE_VOXELS = 8
"""Structures smaller than this many 1.5 mm lattice voxels (27 mm^3; a 2x2x2 block) are too small
for a 64^3 patch at the network's resolution and are reported as skipped."""


class ClickSegmenter(Protocol):
    """What the protocol drives: the click interface of ``InteractiveSession``."""

    @property
    def mask(self) -> sitk.Image: ...

    def add_click(self, point_lps: Sequence[float], positive: bool = True) -> MaskUpdate: ...

    def add_box(self, corner_a_lps: Sequence[float], corner_b_lps: Sequence[float]) -> MaskUpdate: ...

    def reset(self, initial_mask: Optional[sitk.Image] = None) -> None: ...


START_KINDS = ("eroded", "dilated", "leak")
"""Degraded references a run can start from (``degraded_start``); a folder of masks is the other start."""


def degraded_start(reference: sitk.Image, kind: str, millimetres: float = 3.0) -> sitk.Image:
    """A start mask made from the reference, to be corrected: ``eroded`` or ``dilated`` by ``millimetres``,
    or with a ``leak``: a copy of the structure moved by its own width along x, joined to it."""
    binary = sitk.Cast(reference != 0, sitk.sitkUInt8)
    radius = [max(1, int(round(millimetres / spacing))) for spacing in reference.GetSpacing()]
    if kind == "eroded":
        return sitk.BinaryErode(binary, radius)
    if kind == "dilated":
        return sitk.BinaryDilate(binary, radius)
    if kind == "leak":
        array = sitk.GetArrayFromImage(binary).astype(bool)
        columns = np.flatnonzero(array.any(axis=(0, 1)))
        width = int(columns[-1] - columns[0] + 1) if columns.size else 0
        moved = np.zeros_like(array)
        moved[:, :, width:] = array[:, :, : array.shape[2] - width]
        leaked = sitk.GetImageFromArray((array | moved).astype(np.uint8))
        leaked.CopyInformation(reference)
        return leaked
    raise ValueError(f"unknown start {kind!r}; choose one of {', '.join(START_KINDS)} or a folder of masks")


def jittered_box(reference: sitk.Image, jitter_mm: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """The reference's bounding box in LPS (voxel edges included), each face moved by up to ``jitter_mm``
    (uniform, seeded), as a user draws it: two opposite corners."""
    occupied = np.argwhere(sitk.GetArrayViewFromImage(reference) != 0)[:, ::-1]
    low, high = occupied.min(axis=0) - 0.5, occupied.max(axis=0) + 0.5
    corners = np.array([np.where(bits, high, low) for bits in np.ndindex(2, 2, 2)])
    world = np.array([reference.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    jitter = np.random.default_rng(seed).uniform(-jitter_mm, jitter_mm, size=(2, 3))
    return world.min(axis=0) + jitter[0], world.max(axis=0) + jitter[1]


@dataclass
class ClickRecord:
    """The state after one click of the protocol."""

    click: int
    """1-based click number."""
    positive: bool
    index_zyx: Tuple[int, int, int]
    point_lps: Tuple[float, float, float]
    dice: float
    surface_dice: float
    hd95_mm: float
    seconds: float
    """Wall time of ``add_click`` (the metrics are not included)."""


@dataclass
class StructureSize:
    """How big a structure is, against what one network patch covers."""

    voxels: int
    volume_mm3: float
    extent_mm: Tuple[float, float, float]
    """Physical size (x, y, z) of the structure's bounding box, voxel edges included."""
    patches: int
    """64^3 patches of 1.5 mm needed to tile the bounding box without overlap."""

    @property
    def lattice_voxels(self) -> float:
        return self.volume_mm3 / LATTICE_SPACING_MM**3


def measure_structure(reference: sitk.Image) -> StructureSize:
    """Size of the binary mask ``reference`` (any nonzero voxel belongs to it)."""
    array = sitk.GetArrayViewFromImage(reference) != 0
    spacing = np.asarray(reference.GetSpacing(), dtype=np.float64)
    voxels = int(array.sum())
    if voxels == 0:
        return StructureSize(0, 0.0, (0.0, 0.0, 0.0), 0)
    occupied = np.argwhere(array)
    low_xyz, high_xyz = occupied.min(axis=0)[::-1], occupied.max(axis=0)[::-1]
    # Map the box's corners to LPS and measure the axis-aligned box there (the lattice is axis aligned).
    direction = np.asarray(reference.GetDirection(), dtype=np.float64).reshape(3, 3)
    corners = np.array(
        [
            [(high if bit else low) for low, high, bit in zip(low_xyz - 0.5, high_xyz + 0.5, bits)]
            for bits in np.ndindex(2, 2, 2)
        ]
    )
    world = corners * spacing @ direction.T
    extent = tuple(float(e) for e in world.max(axis=0) - world.min(axis=0))
    patches = int(np.prod([max(1, math.ceil(e / PATCH_EXTENT_MM - 1e-9)) for e in extent]))
    return StructureSize(voxels, voxels * float(np.prod(spacing)), extent, patches)


def size_problem(size: StructureSize, max_patches: Optional[int]) -> Optional[str]:
    """Why a structure is left out of the protocol, or ``None`` when it is evaluated.

    ``max_patches``: the most patches the model may use (1 without cross-patch prompting, the
    session's cap with it), ``None`` for no cap.
    """
    if size.voxels == 0:
        return "empty: no voxel of this structure in the scan"
    if size.lattice_voxels < MIN_LATTICE_VOXELS:
        return (
            f"too small for a {PATCH_SIZE}^3 patch: {size.volume_mm3:.0f} mm^3 is "
            f"{size.lattice_voxels:.1f} lattice voxels of {LATTICE_SPACING_MM} mm (< {MIN_LATTICE_VOXELS})"
        )
    if max_patches is not None and size.patches > max_patches:
        extent = " x ".join(f"{e:.0f}" for e in size.extent_mm)
        return (
            f"too large: its {extent} mm box needs {size.patches} patches of {PATCH_EXTENT_MM:.0f} mm, "
            f"more than the cap of {max_patches}"
        )
    return None


def check_on_grid(mask: sitk.Image, reference: sitk.Image) -> None:
    """The segmenter must answer on the reference's (the scan's) voxel grid."""
    if mask.GetSize() != reference.GetSize() or not np.allclose(mask.GetOrigin(), reference.GetOrigin()):
        raise ValueError(
            f"the segmenter returned a mask of size {mask.GetSize()} at {mask.GetOrigin()}, "
            f"not on the scan's grid ({reference.GetSize()} at {reference.GetOrigin()})"
        )


def run_clicks(
    segmenter: ClickSegmenter,
    reference: sitk.Image,
    clicks: int,
    tolerance_mm: float = SURFACE_TOLERANCE_MM,
    start: Optional[sitk.Image] = None,
    box: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
) -> List[ClickRecord]:
    """Drive ``segmenter`` with up to ``clicks`` simulated clicks on ``reference`` (a non-empty mask on
    the scan's grid); the segmenter is reset first, to ``start`` when given (then every click corrects
    its largest error). With ``box`` the first interaction is that box (recorded as click 1, positive, at
    its centre). Returns one record per interaction."""
    if clicks < 1:
        raise ValueError(f"the protocol needs at least one click, got {clicks}")
    target = sitk.GetArrayFromImage(reference) != 0
    if not target.any():
        raise ValueError("the reference mask is empty: there is nothing to click on")
    spacing_zyx = tuple(reversed(reference.GetSpacing()))
    if start is None:
        segmenter.reset()
    else:
        segmenter.reset(start)
    records: List[ClickRecord] = []
    if box is not None:
        click = None
    elif start is not None:
        click = next_click(sitk.GetArrayViewFromImage(segmenter.mask) != 0, target, spacing_zyx)
        if click is None:
            return records
    else:
        click = first_click(target, spacing_zyx)
    for number in range(1, clicks + 1):
        began = time.perf_counter()
        if click is None:
            segmenter.add_box(*box)
            point_lps = tuple(float(v) for v in (np.asarray(box[0]) + np.asarray(box[1])) / 2)
            index = reference.TransformPhysicalPointToIndex(point_lps)
            click = SimulatedClick(tuple(int(v) for v in index[::-1]), True)
        else:
            point_lps = index_to_lps(reference, click.index_zyx)
            segmenter.add_click(point_lps, click.positive)
        seconds = time.perf_counter() - began
        mask = segmenter.mask
        check_on_grid(mask, reference)
        prediction = sitk.GetArrayViewFromImage(mask) != 0
        scores = score(prediction, target, spacing_zyx, tolerance_mm)
        records.append(
            ClickRecord(number, click.positive, click.index_zyx, point_lps, *scores, seconds=seconds)
        )
        if number == clicks:
            break
        click = next_click(prediction, target, spacing_zyx)
        if click is None:
            break
    return records
