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
- Cross-patch prompting (on by default): when a patch's mask reaches one of its faces, edges or
  corners, the adjacent patch there is opened and prompted with clicks at the peaks of the
  cross-patch heatmap (see ``CTSAM3DLib.propagation``), breadth-first, until no mask reaches an
  unexplored neighbour or the cap on open patches (or the optional box) stops it. Each
  propagated patch remembers its parent; a click that changes a patch re-propagates into its
  children (and theirs), opens newly reached neighbours and drops children the parent no longer
  reaches (unless a user click lies in them). Undo takes back everything a click did.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .constants import MASK_THRESHOLD, MAX_OPEN_PATCHES, OUTSIDE_HU, PATCH_SIZE
from .device import resolve_device
from .geometry import Lattice, PatchGeometry, SourceGrid, SourceRegion
from .inference import prepare_network, resolve_precision
from .preprocess import normalize_hu
from .propagation import Offset, heatmap_peaks, touched_offsets

_NESTED_STEPS = ("sample", "encode", "decode")
"""Timed steps that cross-patch prompting runs inside its own time."""


class Click(NamedTuple):
    point_lps: Tuple[float, float, float]
    positive: bool


class SessionInputError(ValueError):
    """An image or click that the session cannot use; the session is left unchanged."""


ProgressCallback = Callable[[int, int], None]
"""``progress(patches_decoded, patches_planned)``, called before and after each batch of patches a
click decodes; ``patches_planned`` grows as cross-patch prompting finds neighbours. An exception
raised from it abandons the click (how a GUI cancels), leaving the session as it was before it."""


@dataclass
class Patch:
    """An open patch: its place on the lattice, its input (1,1,64^3), cached encoder features,
    latest probability (1,1,64^3), the session's initial mask on it (1,1,64^3; None without one)
    and, when it was opened by cross-patch prompting, its parent, the step from the parent, and the
    clicks the heatmap gave it (LPS)."""

    geometry: PatchGeometry
    region: SourceRegion
    image: torch.Tensor
    features: List[torch.Tensor]
    probability: Optional[torch.Tensor] = None
    initial: Optional[torch.Tensor] = None
    parent: Optional[int] = None
    offset: Optional[Offset] = None
    propagated_points_lps: Tuple[Tuple[float, float, float], ...] = ()


@dataclass
class _HistoryEntry:
    """What one click changed: each touched patch as it was before (None: opened by the click), and
    for a box's click the box it replaced."""

    click: Click
    before: Dict[int, Optional[Patch]] = field(default_factory=dict)
    box_before: Optional[Tuple[Optional[Box], ...]] = None


Box = Tuple[np.ndarray, np.ndarray]
"""(lowest, highest) LPS corners of an axis-aligned box."""


def as_box(corner_a_lps: Sequence[float], corner_b_lps: Sequence[float]) -> Box:
    """The axis-aligned box spanned by two opposite LPS corners; SessionInputError for bad corners."""
    corners = [np.asarray(corner, dtype=np.float64).reshape(-1) for corner in (corner_a_lps, corner_b_lps)]
    if any(corner.shape != (3,) or not np.all(np.isfinite(corner)) for corner in corners):
        raise SessionInputError("a box needs two corners of 3 finite coordinates (LPS mm)")
    low, high = np.minimum(*corners), np.maximum(*corners)
    if np.any(high - low <= 0):
        raise SessionInputError("the box is flat: its corners must differ in x, y and z")
    return low, high


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


class InteractiveSession:
    """Click-driven segmentation of one CT.

    ``net`` is any object with ``encode(image)`` and ``decode(features, points, labels, mask_prompt)``
    (and ``cross_patch(image, mask, neighbour_image)`` for cross-patch prompting; see
    ``CTSAM3DLib.model.CTSAM3D``); ``image`` a 3D scalar ``SimpleITK.Image`` in Hounsfield units,
    with any size, spacing and direction. Points are LPS world millimetres. ``precision`` chooses
    how the network runs (see ``CTSAM3DLib.inference``); "auto" picks the fastest path for the device.
    ``cross_patch`` switches cross-patch prompting (None: on whenever the network has a
    ``cross_patch`` method, as CT-SAM3D does); ``max_patches`` caps the open patches it may reach,
    and ``cross_patch_box_lps`` ((min x, y, z), (max x, y, z)) optionally limits it to neighbours
    whose centre lies in that box.
    """

    def __init__(
        self,
        net: object,
        image: sitk.Image,
        device: Union[str, torch.device, None] = "auto",
        precision: str = "auto",
        *,
        cross_patch: Optional[bool] = None,
        max_patches: int = MAX_OPEN_PATCHES,
        cross_patch_box_lps: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
        initial_mask: Optional[sitk.Image] = None,
        box_lps: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
    ) -> None:
        validate_image(image)
        image = readable_image(image)
        if max_patches < 1:
            raise ValueError(f"max_patches must be at least 1, got {max_patches}")
        has_cross_patch = callable(getattr(net, "cross_patch", None))
        if cross_patch and not has_cross_patch:
            raise ValueError("cross-patch prompting needs a network with a cross_patch method")
        self.image = image
        self.device = resolve_device(device)
        self.precision = resolve_precision(net, self.device, precision)
        """The precision the network runs at ("auto" resolved; see ``CTSAM3DLib.inference``)."""
        self.net = prepare_network(net, self.device, self.precision)
        self.cross_patch = has_cross_patch if cross_patch is None else cross_patch
        self.max_patches = max_patches
        self.cross_patch_box_lps = None if cross_patch_box_lps is None else as_box(*cross_patch_box_lps)
        self._fixed_box = None if box_lps is None else as_box(*box_lps)
        self.box_lps: Optional[Box] = self._fixed_box
        """The box results are clipped to (``box_lps`` or the last ``add_box``), or None."""
        self.lattice = Lattice.of_image(image)
        self.grid = SourceGrid(image)
        self.last_timing: Dict[str, float] = {}
        self._initial = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
        self._initial_image: Optional[sitk.Image] = None
        self._mask = self._initial.copy()
        self._patches: Dict[int, Patch] = {}
        self._next_patch_id = 0
        self._history: List[_HistoryEntry] = []
        self._progress: Optional[ProgressCallback] = None
        if initial_mask is not None:
            self.reset(initial_mask)

    # ----------------------------------------------------------------- state
    @property
    def clicks(self) -> List[Click]:
        return [entry.click for entry in self._history]

    @property
    def patch_count(self) -> int:
        return len(self._patches)

    @property
    def patches(self) -> List[Patch]:
        """Open patches, in the order they were opened."""
        return [self._patches[pid] for pid in sorted(self._patches)]

    @property
    def mask(self) -> sitk.Image:
        """The current mask: uint8 0/1 with the input's size, origin, spacing and direction."""
        return self._as_image(self._mask)

    def mask_array(self) -> np.ndarray:
        """A copy of the current mask as a (z, y, x) uint8 array."""
        return self._mask.copy()

    def probability(self) -> sitk.Image:
        """The current probability map (float32) on the input's grid; outside every patch, the initial
        mask (0 without one)."""
        volume = self._initial.astype(np.float32)
        regions = [patch.region for patch in self._patches.values()]
        if regions:
            union = regions[0]
            for region in regions[1:]:
                union = union.union(region)
            probability, covered = self._render(union)
            volume[union.slices] = np.where(covered.cpu().numpy(), probability.cpu().numpy(), volume[union.slices])
        return self._as_image(volume)

    # ----------------------------------------------------------------- clicks
    def add_click(
        self, point_lps: Sequence[float], positive: bool = True, progress: Optional[ProgressCallback] = None
    ) -> sitk.Image:
        """Adds a positive or negative click at a world point (LPS mm); returns the new mask.
        ``progress`` (see ``ProgressCallback``) follows the patches it decodes and may cancel it."""
        self._apply_click(Click(self._checked_point(point_lps), bool(positive)), progress)
        return self.mask

    def _apply_click(self, click: Click, progress: Optional[ProgressCallback]) -> None:
        """The work of a click, up to the mask array (the image is built only by the caller who wants it)."""
        timing: Dict[str, float] = {}
        started = time.perf_counter()
        entry = _HistoryEntry(click)
        self._history.append(entry)
        self._progress = progress
        try:
            targets = [pid for pid in sorted(self._patches) if self._patches[pid].geometry.contains(click.point_lps)]
            self._report_progress(timing, pending=max(len(targets), 1))
            if not targets:
                geometry = self.lattice.patch_centred_on(self.lattice.nearest_index(click.point_lps))
                targets = self._open_patches([geometry], self._sample([geometry], timing), entry, timing)
            self._decode(targets, entry, timing)
            self._report_progress(timing, pending=0)
            if self.cross_patch:
                self._propagate(targets, entry, timing)
        except BaseException:
            self._history.pop()
            self._restore(entry)
            raise
        finally:
            self._progress = None
        paste_started = time.perf_counter()
        self._render_into_mask(self._regions_touched(entry))
        timing["paste"] = time.perf_counter() - paste_started
        timing["total"] = time.perf_counter() - started
        timing["patches_decoded"] = float(timing.get("patches_decoded", 0))
        timing["patches_open"] = float(len(self._patches))
        self.last_timing = timing

    def add_box(
        self, corner_a_lps: Sequence[float], corner_b_lps: Sequence[float],
        progress: Optional[ProgressCallback] = None,
    ) -> sitk.Image:
        """Prompts with a box (two opposite LPS corners): a positive click at its centre, cross-patch
        prompting only into patches that reach into the box, and every result clipped to the box (outside
        it the initial mask stays). Undo takes the box back with its click."""
        box = as_box(corner_a_lps, corner_b_lps)
        previous, self.box_lps = self.box_lps, box
        try:
            mask = self.add_click((box[0] + box[1]) / 2, True, progress)
        except BaseException:
            self.box_lps = previous
            raise
        self._history[-1].box_before = (previous,)
        return mask

    def undo(self) -> sitk.Image:
        """Takes back the last click exactly, with everything it opened, changed or dropped (and the box
        it set)."""
        self._take_back()
        return self.mask

    def _take_back(self) -> None:
        if not self._history:
            raise IndexError("nothing to undo: the session has no clicks")
        entry = self._history.pop()
        touched = self._regions_touched(entry)
        self._restore(entry)
        if entry.box_before is not None:
            self.box_lps = entry.box_before[0]
        self._render_into_mask(touched)

    def reset(self, initial_mask: Optional[sitk.Image] = None) -> None:
        """Forgets every click, patch and ``add_box`` box; starts again from ``initial_mask`` (on the
        image's grid; nonzero is inside), or from nothing."""
        if initial_mask is not None:
            if not isinstance(initial_mask, sitk.Image) or initial_mask.GetDimension() != 3:
                raise SessionInputError("the initial mask must be a 3D SimpleITK.Image")
            if not self.grid.same_grid(initial_mask):
                raise SessionInputError(
                    f"the initial mask's grid (size {initial_mask.GetSize()}, origin "
                    f"{tuple(round(v, 2) for v in initial_mask.GetOrigin())}) is not the image's (size "
                    f"{self.grid.size}, origin {tuple(round(float(v), 2) for v in self.grid.origin_lps)}): "
                    "resample it onto the image first"
                )
            self._initial = (sitk.GetArrayFromImage(initial_mask) != 0).astype(np.uint8)
            self._initial_image = None
            if self._initial.any():
                self._initial_image = self._as_image(self._initial.astype(np.float32))
        else:
            self._initial[...] = 0
            self._initial_image = None
        self._patches.clear()
        self._history.clear()
        self._mask = self._initial.copy()
        self.box_lps = self._fixed_box
        self.last_timing = {}

    def set_clicks(
        self, clicks: Sequence[Tuple[Sequence[float], bool]], progress: Optional[ProgressCallback] = None
    ) -> sitk.Image:
        """Makes the click list equal ``clicks`` ((point_lps, positive) pairs), undoing back to the
        longest common prefix and adding the rest: what a GUI calls when a prompt moves. ``progress``
        is handed to each click added; if it cancels one, the clicks before it stay applied."""
        wanted = [Click(self._checked_point(point), bool(positive)) for point, positive in clicks]
        current = self.clicks
        common = 0
        while common < min(len(wanted), len(current)) and wanted[common] == current[common]:
            common += 1
        for _ in range(len(current) - common):
            self._take_back()
        for click in wanted[common:]:
            self._apply_click(click, progress)
        return self.mask

    # ----------------------------------------------------------------- internals
    def _checked_point(self, point_lps: Sequence[float]) -> Tuple[float, float, float]:
        point = np.asarray(point_lps, dtype=np.float64).reshape(-1)
        if point.shape != (3,):
            raise SessionInputError(f"a click needs 3 coordinates (LPS mm), got {point.size}")
        if not np.all(np.isfinite(point)):
            raise SessionInputError(
                f"click coordinates must be finite numbers, got ({', '.join(f'{v:g}' for v in point)})"
            )
        if not self.grid.contains(point):
            low, high = self.grid.bounds_lps()
            spans = ", ".join(f"{axis} {a:.1f} to {b:.1f}" for axis, a, b in zip("xyz", low, high))
            raise SessionInputError(
                f"click at LPS ({', '.join(f'{v:.1f}' for v in point)}) mm lies outside the image, which spans "
                f"LPS {spans} mm"
            )
        return tuple(float(v) for v in point)

    def _report_progress(self, timing: Dict[str, float], pending: int) -> None:
        if self._progress is not None:
            done = int(timing.get("patches_decoded", 0))
            self._progress(done, done + pending)

    def _snapshot(self, entry: _HistoryEntry, pid: int) -> None:
        """Remembers a patch as it was before this click first touched it."""
        if pid not in entry.before:
            entry.before[pid] = replace(self._patches[pid])

    def _sample(self, geometries: List[PatchGeometry], timing: Dict[str, float]) -> torch.Tensor:
        """The network inputs (N,1,64^3) of patches, on the device."""
        started = time.perf_counter()
        images = torch.cat([
            torch.from_numpy(normalize_hu(self.lattice.sample(self.image, geometry)))[None, None]
            for geometry in geometries
        ]).to(self.device)
        timing["sample"] = timing.get("sample", 0.0) + time.perf_counter() - started
        return images

    def _open_patches(self, geometries: List[PatchGeometry], images: torch.Tensor, entry: _HistoryEntry,
                      timing: Dict[str, float]) -> List[int]:
        """Encodes new patches (as one batch) and opens them; returns their ids."""
        started = time.perf_counter()
        with torch.no_grad():
            features = self.net.encode(images)
        self._synchronize()
        timing["encode"] = timing.get("encode", 0.0) + time.perf_counter() - started
        pids = []
        for row, geometry in enumerate(geometries):
            pid = self._next_patch_id
            self._next_patch_id += 1
            initial = self._initial_on(geometry)
            self._patches[pid] = Patch(geometry, self.grid.region_of(geometry), images[row:row + 1],
                                       [level[row:row + 1] for level in features], probability=initial,
                                       initial=initial)
            entry.before[pid] = None
            pids.append(pid)
        return pids

    def _initial_on(self, geometry: PatchGeometry) -> Optional[torch.Tensor]:
        """The initial mask on a patch (1,1,64^3), the patch's first mask prompt; None without one."""
        if self._initial_image is None:
            return None
        return torch.from_numpy(self.lattice.sample_mask(self._initial_image, geometry))[None, None].to(self.device)

    def _patch_prompts(self, pid: int) -> Tuple[np.ndarray, np.ndarray]:
        """(x, y, z) voxel points and labels of a patch: its propagated clicks, then every user click
        inside it in click order (later clicks overwrite earlier ones in the click maps)."""
        patch = self._patches[pid]
        geometry = patch.geometry
        inside = [click for click in self.clicks if geometry.contains(click.point_lps)]
        points_lps = list(patch.propagated_points_lps) + [click.point_lps for click in inside]
        labels = [1] * len(patch.propagated_points_lps) + [1 if click.positive else 0 for click in inside]
        points = np.array([np.round(geometry.to_voxel(point)) for point in points_lps], dtype=np.float32)
        return points.reshape(-1, 3), np.array(labels, dtype=np.int64)

    def _decode(self, pids: List[int], entry: _HistoryEntry, timing: Dict[str, float]) -> None:
        """Runs the decoder once over all ``pids`` as one batch, each with its previous probability
        as the mask prompt."""
        for pid in pids:
            self._snapshot(entry, pid)
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
        timing["decode"] = timing.get("decode", 0.0) + time.perf_counter() - started
        timing["patches_decoded"] = timing.get("patches_decoded", 0) + len(pids)
        for row, patch in enumerate(patches):
            patch.probability = probability[row : row + 1].to(torch.float32)

    def _propagate(self, frontier: List[int], entry: _HistoryEntry, timing: Dict[str, float]) -> None:
        """Cross-patch prompting, breadth-first from the patches a click changed. Its time in ``timing``
        ("cross_patch") leaves out the sampling, encoding and decoding of the neighbours, which are
        added to those steps, so that the steps add up to the click's total."""
        started = time.perf_counter()
        nested_before = sum(timing.get(step, 0.0) for step in _NESTED_STEPS)
        while frontier:
            jobs: List[Tuple[int, Offset, Optional[int], PatchGeometry]] = []
            for pid in frontier:
                patch = self._patches[pid]
                inside = patch.probability[0, 0] > MASK_THRESHOLD
                # On an initial mask, only what a click changed is carried on.
                changed = inside if patch.initial is None else inside != (patch.initial[0, 0] > MASK_THRESHOLD)
                reached = set(touched_offsets(changed))
                children = {child.offset: cid for cid, child in self._patches.items() if child.parent == pid}
                for offset in set(children) - reached:
                    self._drop(children[offset], entry)
                for offset in sorted(reached):
                    if offset in children:
                        jobs.append((pid, offset, children[offset], self._patches[children[offset]].geometry))
                    else:
                        geometry = patch.geometry.shifted(offset)
                        if self._may_open(geometry, len(jobs)):
                            jobs.append((pid, offset, None, geometry))
            if not jobs:
                break
            self._report_progress(timing, pending=len(jobs))
            frontier = self._prompt_neighbours(jobs, entry, timing)
            self._report_progress(timing, pending=0)
        nested = sum(timing.get(step, 0.0) for step in _NESTED_STEPS) - nested_before
        timing["cross_patch"] = time.perf_counter() - started - nested

    def _may_open(self, geometry: PatchGeometry, pending: int) -> bool:
        """Whether cross-patch prompting may open a patch here: under the cap, inside the image and
        the lattice, inside the optional box, and not already covered by an open patch."""
        if len(self._patches) + pending >= self.max_patches:
            return False
        start = np.array(geometry.start_index)
        if np.any(start + geometry.size <= 0) or np.any(start >= np.array(self.lattice.size)):
            return False
        if self.grid.region_of(geometry) is None:
            return False
        centre = geometry.centre_lps
        if self.cross_patch_box_lps is not None:
            low, high = self.cross_patch_box_lps
            if np.any(centre < low) or np.any(centre > high):
                return False
        if self.box_lps is not None:
            start = np.array(geometry.origin_lps) - geometry.spacing / 2
            stop = start + geometry.size * geometry.spacing
            if np.any(stop <= self.box_lps[0]) or np.any(start >= self.box_lps[1]):
                return False
        return not any(patch.geometry.contains(centre) for patch in self._patches.values())

    def _prompt_neighbours(self, jobs: List[Tuple[int, Offset, Optional[int], PatchGeometry]],
                           entry: _HistoryEntry, timing: Dict[str, float]) -> List[int]:
        """Runs the cross-patch U-Net for every (parent, neighbour) pair as one batch, turns each
        heatmap's peaks into clicks, and decodes the neighbours that got any."""
        new_rows = [row for row, (_, _, child, _) in enumerate(jobs) if child is None]
        new_images = self._sample([jobs[row][3] for row in new_rows], timing) if new_rows else None
        sampled = {row: new_images[index:index + 1] for index, row in enumerate(new_rows)}
        parents = [self._patches[pid] for pid, _, _, _ in jobs]
        neighbour_images = torch.cat([
            sampled[row] if child is None else self._patches[child].image for row, (_, _, child, _) in enumerate(jobs)
        ])
        with torch.no_grad():
            heatmaps = self.net.cross_patch(
                torch.cat([parent.image for parent in parents]),
                torch.cat([(parent.probability > MASK_THRESHOLD).to(parent.image.dtype) for parent in parents]),
                neighbour_images,
            )
        prompts: Dict[int, Tuple[Tuple[float, float, float], ...]] = {}
        for row, (_, _, child, geometry) in enumerate(jobs):
            peaks = heatmap_peaks(heatmaps[row, 0]).cpu().numpy()
            prompts[row] = tuple(
                tuple(float(v) for v in geometry.to_world(peak)) for peak in peaks
            )
            if not prompts[row] and child is not None:
                self._drop(child, entry)
        opening = [row for row in new_rows if prompts[row]]
        opened_ids: Dict[int, int] = {}
        if opening:
            opened = self._open_patches([jobs[row][3] for row in opening],
                                        torch.cat([sampled[row] for row in opening]), entry, timing)
            opened_ids = dict(zip(opening, opened))
        decoded = []
        for row, (pid, offset, child, _) in enumerate(jobs):
            target = opened_ids.get(row, child)
            # A child dropped above (with its descendants) gets no prompt.
            if not prompts[row] or target not in self._patches:
                continue
            self._snapshot(entry, target)
            patch = self._patches[target]
            patch.parent, patch.offset, patch.propagated_points_lps = pid, offset, prompts[row]
            decoded.append(target)
        if decoded:
            self._decode(decoded, entry, timing)
        return decoded

    def _drop(self, pid: int, entry: _HistoryEntry) -> None:
        """Closes a propagated patch and its descendants, except those holding a user click, which
        stay open as patches of their own."""
        for cid in [cid for cid, child in self._patches.items() if child.parent == pid]:
            self._drop(cid, entry)
        self._snapshot(entry, pid)
        patch = self._patches[pid]
        if any(patch.geometry.contains(click.point_lps) for click in self.clicks):
            patch.parent, patch.offset, patch.propagated_points_lps = None, None, ()
        else:
            del self._patches[pid]

    def _restore(self, entry: _HistoryEntry) -> None:
        for pid, before in entry.before.items():
            if before is None:
                self._patches.pop(pid, None)
            else:
                self._patches[pid] = before

    def _regions_touched(self, entry: _HistoryEntry) -> List[SourceRegion]:
        regions = []
        for pid, before in entry.before.items():
            patch = self._patches.get(pid, before)
            if patch is not None:
                regions.append(patch.region)
        return regions

    def _render_into_mask(self, regions: List[SourceRegion]) -> None:
        """The mask over ``regions`` from the patches; where no patch reaches, or outside the box, the
        initial mask."""
        for region in regions:
            probability, covered = self._render(region)
            decided = covered.cpu().numpy()
            if self.box_lps is not None:
                points = self.grid.world_points(region)
                decided &= np.all((points >= self.box_lps[0]) & (points <= self.box_lps[1]), axis=-1)
            rendered = (probability > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
            self._mask[region.slices] = np.where(decided, rendered, self._initial[region.slices])

    def _render(self, region: SourceRegion) -> Tuple[torch.Tensor, torch.Tensor]:
        """The assembled probability (nz, ny, nx) over a source region, by the overlap rule, and where a
        patch decided it (bool, same shape)."""
        shape = tuple(region.size[::-1])
        probability = torch.zeros(shape, device=self.device)
        best = torch.full(shape, float("inf"), device=self.device)
        for pid in sorted(self._patches):
            patch = self._patches[pid]
            common = patch.region.intersection(region)
            if patch.probability is None or common is None:
                continue
            # Only the patch's own footprint: adjacent patches touch a region along a thin slab.
            window = common.slices_within(region)
            sampled, distance = self.grid.patch_samples(common, patch.geometry, patch.probability)
            take = (distance <= PATCH_SIZE / 2) & (distance < best[window])
            probability[window] = torch.where(take, sampled, probability[window])
            best[window] = torch.where(take, distance, best[window])
        return probability, torch.isfinite(best)

    def _as_image(self, array: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(self.image)
        return image

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
