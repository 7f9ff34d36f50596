"""The interactive session: clicks in world coordinates in, a mask in the CT's own geometry out.

One ``InteractiveSession`` owns all interaction state for one image: the open patches (each with
its cached encoder features and latest probability), the clicks, and the undo history.

Rules:
- The first click opens a 64^3 patch centred on the lattice voxel nearest to it. A click inside
  one or more open patches refines each of them, with the patch's previous probability as the
  mask prompt; a click outside every open patch opens a new one centred on it.
- Every click that falls inside a patch is given to that patch, in its own voxel coordinates
  (rounded to the nearest voxel, as the network was trained on voxel positions), in click order.
- Where patches overlap, a source voxel takes the probability of the patch whose centre is nearest
  to it (Chebyshev distance in patch voxels; the earlier-opened patch on a tie), so the result does
  not depend on the order of later clicks and the assembled mask has no seams.
- A refining click runs only the decoder; the encoder runs once per patch.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .constants import MASK_THRESHOLD, PATCH_SIZE
from .device import resolve_device
from .geometry import Lattice, PatchGeometry, SourceGrid, SourceRegion, sample_patch_volume
from .inference import prepare_network
from .preprocess import normalize_hu


class Click(NamedTuple):
    point_lps: Tuple[float, float, float]
    positive: bool


class SessionInputError(ValueError):
    """An image or click that the session cannot use; the session is left unchanged."""


@dataclass
class Patch:
    """An open patch: its place on the lattice, its input, cached features and latest output."""

    geometry: PatchGeometry
    region: SourceRegion
    image: torch.Tensor
    features: List[torch.Tensor]
    probability: Optional[torch.Tensor] = None


@dataclass
class _HistoryEntry:
    click: Click
    opened: List[int] = field(default_factory=list)
    previous_probability: Dict[int, Optional[torch.Tensor]] = field(default_factory=dict)


def validate_image(image: sitk.Image) -> None:
    """Refuses images the session cannot segment; warns when the intensities do not look like CT."""
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
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise SessionInputError("the image holds NaN or infinite values")
    if low == high:
        raise SessionInputError(f"the image is constant (every voxel is {low:g}): nothing to segment")
    if low > -500:
        warnings.warn(
            f"the image's lowest value is {low:g}, with no air near -1000 HU: it may not be a CT in Hounsfield "
            "units (e.g. MR), and CT-SAM3D's results will likely be poor",
            stacklevel=3,
        )


class InteractiveSession:
    """Click-driven segmentation of one CT.

    ``net`` is any object with ``encode(image)`` and ``decode(features, points, labels, mask_prompt)``
    (see ``CTSAM3DLib.model.CTSAM3D``); ``image`` a 3D scalar ``SimpleITK.Image`` in Hounsfield units,
    with any size, spacing and direction. Points are LPS world millimetres. ``precision`` chooses
    how the network runs (see ``CTSAM3DLib.inference``); "auto" picks the fastest path for the device.
    """

    def __init__(
        self,
        net: object,
        image: sitk.Image,
        device: Union[str, torch.device, None] = "auto",
        precision: str = "auto",
    ) -> None:
        validate_image(image)
        self.image = image
        self.device = resolve_device(device)
        self.net = prepare_network(net, self.device, precision)
        self.lattice = Lattice.of_image(image)
        self.grid = SourceGrid(image)
        self.last_timing: Dict[str, float] = {}
        self._mask = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
        self._patches: Dict[int, Patch] = {}
        self._next_patch_id = 0
        self._history: List[_HistoryEntry] = []

    # ----------------------------------------------------------------- state
    @property
    def clicks(self) -> List[Click]:
        return [entry.click for entry in self._history]

    @property
    def patch_count(self) -> int:
        return len(self._patches)

    @property
    def patches(self) -> List[Patch]:
        return list(self._patches.values())

    @property
    def mask(self) -> sitk.Image:
        """The current mask: uint8 0/1 with the input's size, origin, spacing and direction."""
        return self._as_image(self._mask)

    def mask_array(self) -> np.ndarray:
        """A copy of the current mask as a (z, y, x) uint8 array."""
        return self._mask.copy()

    def probability(self) -> sitk.Image:
        """The current probability map (float32) on the input's grid; 0 outside every patch."""
        volume = np.zeros(self._mask.shape, dtype=np.float32)
        for region in self._merged_regions(self._patches):
            volume[region.slices] = self._render(region).cpu().numpy()
        return self._as_image(volume)

    # ----------------------------------------------------------------- clicks
    def add_click(self, point_lps: Sequence[float], positive: bool = True) -> sitk.Image:
        """Adds a positive or negative click at a world point (LPS mm); returns the new mask."""
        click = Click(self._checked_point(point_lps), bool(positive))
        timing: Dict[str, float] = {}
        started = time.perf_counter()
        entry = _HistoryEntry(click)
        targets = [pid for pid, patch in self._patches.items() if patch.geometry.contains(click.point_lps)]
        if not targets:
            targets = [self._open_patch(click.point_lps, timing)]
            entry.opened = list(targets)
        self._history.append(entry)
        try:
            for pid in targets:
                entry.previous_probability[pid] = self._patches[pid].probability
            self._decode(targets, timing)
        except BaseException:
            self._history.pop()
            self._restore(entry)
            raise
        self._refresh(targets, timing)
        timing["total"] = time.perf_counter() - started
        timing["patches_decoded"] = float(len(targets))
        self.last_timing = timing
        return self.mask

    def undo(self) -> sitk.Image:
        """Takes back the last click exactly (its patches and probabilities as before it)."""
        if not self._history:
            raise IndexError("nothing to undo: the session has no clicks")
        entry = self._history.pop()
        touched = self._regions_of(list(entry.previous_probability) + entry.opened)
        self._restore(entry)
        self._render_into_mask(touched)
        return self.mask

    def reset(self) -> None:
        """Forgets every click and patch."""
        self._patches.clear()
        self._history.clear()
        self._mask[...] = 0
        self.last_timing = {}

    def set_clicks(self, clicks: Sequence[Tuple[Sequence[float], bool]]) -> sitk.Image:
        """Makes the click list equal ``clicks`` ((point_lps, positive) pairs), undoing back to the
        longest common prefix and adding the rest: what a GUI calls when a prompt moves."""
        wanted = [Click(self._checked_point(point), bool(positive)) for point, positive in clicks]
        current = self.clicks
        common = 0
        while common < min(len(wanted), len(current)) and wanted[common] == current[common]:
            common += 1
        for _ in range(len(current) - common):
            self.undo()
        for click in wanted[common:]:
            self.add_click(click.point_lps, click.positive)
        return self.mask

    # ----------------------------------------------------------------- internals
    def _checked_point(self, point_lps: Sequence[float]) -> Tuple[float, float, float]:
        point = np.asarray(point_lps, dtype=np.float64).reshape(-1)
        if point.shape != (3,):
            raise SessionInputError(f"a click needs 3 coordinates (LPS mm), got {point.size}")
        if not np.all(np.isfinite(point)):
            raise SessionInputError(f"click coordinates must be finite numbers, got {tuple(point)}")
        if not self.grid.contains(point):
            raise SessionInputError(f"click at LPS {tuple(np.round(point, 2))} mm lies outside the image")
        return tuple(float(v) for v in point)

    def _open_patch(self, point_lps: Tuple[float, float, float], timing: Dict[str, float]) -> int:
        started = time.perf_counter()
        geometry = self.lattice.patch_centred_on(self.lattice.nearest_index(point_lps))
        image = torch.from_numpy(normalize_hu(self.lattice.sample(self.image, geometry)))[None, None].to(self.device)
        timing["sample"] = time.perf_counter() - started
        started = time.perf_counter()
        with torch.no_grad():
            features = self.net.encode(image)
        self._synchronize()
        timing["encode"] = time.perf_counter() - started
        pid = self._next_patch_id
        self._next_patch_id += 1
        self._patches[pid] = Patch(geometry, self.grid.region_of(geometry), image, features)
        return pid

    def _patch_prompts(self, pid: int) -> Tuple[np.ndarray, np.ndarray]:
        """(x, y, z) voxel points and labels of every click inside the patch, in click order."""
        geometry = self._patches[pid].geometry
        inside = [click for click in self.clicks if geometry.contains(click.point_lps)]
        points = np.array([np.round(geometry.to_voxel(c.point_lps)) for c in inside], dtype=np.float32)
        labels = np.array([1 if c.positive else 0 for c in inside], dtype=np.int64)
        return points.reshape(-1, 3), labels

    def _decode(self, pids: List[int], timing: Dict[str, float]) -> None:
        """Runs the decoder once over all ``pids`` as one batch."""
        prompts = [self._patch_prompts(pid) for pid in pids]
        count = max(len(labels) for _, labels in prompts)
        points = np.zeros((len(pids), count, 3), dtype=np.float32)
        labels = np.full((len(pids), count), -1, dtype=np.int64)
        for row, (patch_points, patch_labels) in enumerate(prompts):
            points[row, : len(patch_labels)] = patch_points
            labels[row, : len(patch_labels)] = patch_labels
        patches = [self._patches[pid] for pid in pids]
        features = [torch.cat(level, dim=0) for level in zip(*(patch.features for patch in patches))]
        previous = [patch.probability for patch in patches]
        mask_prompt = None
        if any(p is not None for p in previous):
            zeros = torch.zeros(1, 1, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE, device=self.device)
            mask_prompt = torch.cat([zeros if p is None else p for p in previous], dim=0)
        started = time.perf_counter()
        with torch.no_grad():
            probability, _ = self.net.decode(
                features,
                torch.from_numpy(points).to(self.device),
                torch.from_numpy(labels).to(self.device),
                mask_prompt,
            )
        self._synchronize()
        timing["decode"] = time.perf_counter() - started
        for row, patch in enumerate(patches):
            patch.probability = probability[row : row + 1].to(torch.float32)

    def _restore(self, entry: _HistoryEntry) -> None:
        for pid, previous in entry.previous_probability.items():
            if pid in self._patches:
                self._patches[pid].probability = previous
        for pid in entry.opened:
            self._patches.pop(pid, None)

    def _refresh(self, pids: List[int], timing: Dict[str, float]) -> None:
        started = time.perf_counter()
        self._render_into_mask(self._regions_of(pids))
        timing["paste"] = time.perf_counter() - started

    def _regions_of(self, pids: List[int]) -> List[SourceRegion]:
        return [self._patches[pid].region for pid in pids if pid in self._patches]

    def _merged_regions(self, patches: Dict[int, Patch]) -> List[SourceRegion]:
        regions = [patch.region for patch in patches.values()]
        if not regions:
            return []
        merged = regions[0]
        for region in regions[1:]:
            merged = merged.union(region)
        return [merged]

    def _render_into_mask(self, regions: List[SourceRegion]) -> None:
        for region in regions:
            self._mask[region.slices] = (self._render(region) > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)

    def _render(self, region: SourceRegion) -> torch.Tensor:
        """The assembled probability (nz, ny, nx) over a source region, by the overlap rule."""
        shape = tuple(region.size[::-1])
        probability = torch.zeros(shape, device=self.device)
        best = torch.full(shape, float("inf"), device=self.device)
        centre = (PATCH_SIZE - 1) / 2
        for patch in self._patches.values():
            if patch.probability is None or not patch.region.intersects(region):
                continue
            coordinates = self.grid.patch_coordinates(region, patch.geometry, self.device)
            distance = (coordinates - centre).abs().amax(dim=-1)
            take = (distance <= PATCH_SIZE / 2) & (distance < best)
            sampled = sample_patch_volume(patch.probability, coordinates)
            probability = torch.where(take, sampled, probability)
            best = torch.where(take, distance, best)
        return probability

    def _as_image(self, array: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(self.image)
        return image

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
