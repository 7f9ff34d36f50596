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
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .constants import MASK_THRESHOLD, MAX_OPEN_PATCHES, PATCH_SIZE
from .device import resolve_device
from .geometry import DeviceVolume, Lattice, PatchGeometry, SourceRegion
from .inference import prepare_network, resolve_precision
from .inputs import as_box, box_centre, readable_image, validate_image
from .interface import (
    Box,
    Click,
    CrossPatchNetwork,
    MaskUpdate,
    ProgressCallback,
    PromptableNetwork,
    SessionInputError,
    checked_point,
)
from .patch import Patch
from .preprocess import normalize_hu
from .propagation import (
    NeighbourJob,
    PropagationLimits,
    heatmap_peaks,
    heatmap_prompts,
    plan_level,
    touched_offsets,
)
from .rendering import PatchResult, SessionMask, enclosing_region

__all__ = ["Click", "InteractiveSession", "MaskUpdate", "PreviewCallback", "ProgressCallback", "SessionInputError",
           "as_box", "readable_image", "validate_image"]

_NESTED_STEPS = ("sample", "encode", "decode", "preview")
"""Timed steps that cross-patch prompting runs inside its own time."""

PreviewCallback = Callable[[MaskUpdate], None]
"""``preview(update)``: during a click that cross-patch prompting carries on, called before each further
level of neighbours with the mask as it stands over what the click has changed so far (the box grows;
``update`` has the meaning of a ``MaskUpdate`` against the mask before the click). The click's own
result is still the call's return value, and the session's mask changes only then. An exception raised
from it abandons the click, as from a ``ProgressCallback``."""

SAMPLING = ("auto", "exact", "device")
"""How patches are cut from the CT: "exact" through SimpleITK on the CPU (bit-exact with the authors'
pipeline), "device" with torch where the network runs (``geometry.DeviceVolume``: on a GPU the volume
stays there; on a CPU it takes about half the time). "auto" is device on CUDA and for the optimised
precisions on a CPU; exact for the float32 network on a CPU (the path the parity tests check) and on
Apple MPS (where torch's 3D grid_sample, which oblique scans need, is not implemented everywhere)."""


@dataclass
class _HistoryEntry:
    """What one click changed: each touched patch as it was before (None: opened by the click), and
    for a box's click the box it replaced."""

    click: Click
    before: Dict[int, Optional[Patch]] = field(default_factory=dict)
    box_before: Optional[Tuple[Optional[Box], ...]] = None


class InteractiveSession:
    """Click-driven segmentation of one CT.

    ``net`` is a ``PromptableNetwork`` (a ``CrossPatchNetwork`` for cross-patch prompting; see
    ``CTSAM3DLib.model.CTSAM3D``); ``image`` a 3D scalar ``SimpleITK.Image`` in Hounsfield units,
    with any size, spacing and direction. Points are LPS world millimetres. ``precision`` chooses
    how the network runs (see ``CTSAM3DLib.inference``); "auto" picks the fastest path for the device.
    ``sampling`` chooses where patches are cut from the CT (see ``SAMPLING``).
    ``cross_patch`` switches cross-patch prompting (None: on whenever the network has a
    ``cross_patch`` method, as CT-SAM3D does); ``max_patches`` caps the open patches it may reach,
    and ``cross_patch_box_lps`` ((min x, y, z), (max x, y, z)) optionally limits it to neighbours
    whose centre lies in that box.

    Every call that changes the mask (``add_click``, ``add_box``, ``undo``, ``set_clicks``) returns a
    ``MaskUpdate``: the box of source voxels it changed and the mask there, the cheap answer for a
    viewer or a network client. The whole mask is built only when asked for: ``mask`` (an image) or
    ``mask_array()``; the probability likewise (``probability()``, ``probability_in(update)``).
    """

    def __init__(
        self,
        net: PromptableNetwork,
        image: sitk.Image,
        device: Union[str, torch.device, None] = "auto",
        precision: str = "auto",
        *,
        cross_patch: Optional[bool] = None,
        max_patches: int = MAX_OPEN_PATCHES,
        cross_patch_box_lps: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
        initial_mask: Optional[sitk.Image] = None,
        box_lps: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
        sampling: str = "auto",
    ) -> None:
        validate_image(image)
        image = readable_image(image)
        if max_patches < 1:
            raise ValueError(f"max_patches must be at least 1, got {max_patches}")
        if sampling not in SAMPLING:
            raise ValueError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLING)}")
        has_cross_patch = isinstance(net, CrossPatchNetwork)
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
        if sampling == "auto":
            on_device = self.device.type == "cuda" or (self.device.type == "cpu" and self.precision != "float32")
            sampling = "device" if on_device else "exact"
        self.sampling = sampling
        self._device_volume = DeviceVolume(image, self.lattice, self.device) if sampling == "device" else None
        self._canvas = SessionMask(image, self.lattice, self.device, sample_on_device=sampling == "device")
        self.grid = self._canvas.grid
        self._limits = PropagationLimits(self.lattice, self.grid, max_patches, self.cross_patch_box_lps)
        self.last_timing: Dict[str, float] = {}
        self._patches: Dict[int, Patch] = {}
        self._next_patch_id = 0
        self._history: List[_HistoryEntry] = []
        self._progress: Optional[ProgressCallback] = None
        self._preview: Optional[PreviewCallback] = None
        if initial_mask is not None:
            self.reset(initial_mask)
        if self.device.type == "cuda":
            self._warm_up_device_paths()

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
        return self._canvas.as_image(self._canvas.array)

    def mask_array(self) -> np.ndarray:
        """A copy of the current mask as a (z, y, x) uint8 array."""
        return self._canvas.array.copy()

    def probability(self) -> sitk.Image:
        """The current probability map (float32) on the input's grid; outside every patch, the initial
        mask (0 without one)."""
        return self._canvas.as_image(self._canvas.probability(self._patch_results()))

    def probability_in(self, update: MaskUpdate) -> np.ndarray:
        """The current probability (float32, (z, y, x)) over an update's box, as ``probability()`` has it."""
        if update.empty:
            return np.zeros((0, 0, 0), dtype=np.float32)
        return self._canvas.probability_over(SourceRegion(update.start, update.size), self._patch_results())

    # ----------------------------------------------------------------- clicks
    def add_click(
        self, point_lps: Sequence[float], positive: bool = True, progress: Optional[ProgressCallback] = None,
        preview: Optional[PreviewCallback] = None,
    ) -> MaskUpdate:
        """Adds a positive or negative click at a world point (LPS mm); returns what it changed.
        ``progress`` (see ``ProgressCallback``) follows the patches it decodes and may cancel it;
        ``preview`` (see ``PreviewCallback``) is shown the mask as it grows."""
        click = Click(self._checked_point(point_lps), bool(positive))
        return self._update(self._apply_click(click, progress, preview))

    def add_box(
        self, corner_a_lps: Sequence[float], corner_b_lps: Sequence[float],
        progress: Optional[ProgressCallback] = None, preview: Optional[PreviewCallback] = None,
    ) -> MaskUpdate:
        """Prompts with a box (two opposite LPS corners): a positive click at its centre, cross-patch
        prompting only into patches that reach into the box, and every result clipped to the box (outside
        it the initial mask stays). Undo takes the box back with its click."""
        box = as_box(corner_a_lps, corner_b_lps)
        previous, self.box_lps = self.box_lps, box
        try:
            update = self.add_click(box_centre(box), True, progress, preview)
        except BaseException:
            self.box_lps = previous
            raise
        self._history[-1].box_before = (previous,)
        return update

    def undo(self) -> MaskUpdate:
        """Takes back the last click exactly, with everything it opened, changed or dropped (and the box
        it set); returns what that changed."""
        return self._update(self._take_back())

    def reset(self, initial_mask: Optional[sitk.Image] = None) -> None:
        """Forgets every click, patch and ``add_box`` box; starts again from ``initial_mask`` (on the
        image's grid; nonzero is inside), or from nothing."""
        self._canvas.start_from(initial_mask)
        self._patches.clear()
        self._history.clear()
        self.box_lps = self._fixed_box
        self.last_timing = {}

    def set_clicks(
        self, clicks: Sequence[Tuple[Sequence[float], bool]], progress: Optional[ProgressCallback] = None,
        preview: Optional[PreviewCallback] = None,
    ) -> MaskUpdate:
        """Makes the click list equal ``clicks`` ((point_lps, positive) pairs), undoing back to the
        longest common prefix and adding the rest: what a GUI calls when a prompt moves. Returns what
        all of it changed. ``progress`` and ``preview`` are handed to each click added; if one cancels a
        click, the clicks before it stay applied."""
        wanted = [Click(self._checked_point(point), bool(positive)) for point, positive in clicks]
        current = self.clicks
        common = 0
        while common < min(len(wanted), len(current)) and wanted[common] == current[common]:
            common += 1
        changed = [self._take_back() for _ in range(len(current) - common)]
        changed += [self._apply_click(click, progress, preview) for click in wanted[common:]]
        return self._update(enclosing_region(changed))

    # ----------------------------------------------------------------- internals
    def _apply_click(self, click: Click, progress: Optional[ProgressCallback],
                     preview: Optional[PreviewCallback] = None) -> Optional[SourceRegion]:
        """The work of a click, up to the mask array; returns the source box it re-rendered."""
        timing: Dict[str, float] = {}
        started = time.perf_counter()
        entry = _HistoryEntry(click)
        self._history.append(entry)
        self._progress = progress
        self._preview = preview
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
            self._preview = None
        paste_started = time.perf_counter()
        changed = self._render_into_mask(self._regions_touched(entry))
        timing["paste"] = time.perf_counter() - paste_started
        timing["total"] = time.perf_counter() - started
        timing["patches_decoded"] = float(timing.get("patches_decoded", 0))
        timing["patches_open"] = float(len(self._patches))
        self.last_timing = timing
        return changed

    def _take_back(self) -> Optional[SourceRegion]:
        """Undoes the last click; returns the source box it re-rendered."""
        if not self._history:
            raise IndexError("nothing to undo: the session has no clicks")
        entry = self._history.pop()
        touched = self._regions_touched(entry)
        self._restore(entry)
        if entry.box_before is not None:
            self.box_lps = entry.box_before[0]
        return self._render_into_mask(touched)

    def _update(self, region: Optional[SourceRegion]) -> MaskUpdate:
        return self._canvas.update(region)

    def _checked_point(self, point_lps: Sequence[float]) -> Tuple[float, float, float]:
        point = checked_point(point_lps)
        if not self.grid.contains(point):
            low, high = self.grid.bounds_lps()
            spans = ", ".join(f"{axis} {a:.1f} to {b:.1f}" for axis, a, b in zip("xyz", low, high))
            raise SessionInputError(
                f"click at LPS ({', '.join(f'{v:.1f}' for v in point)}) mm lies outside the image, which spans "
                f"LPS {spans} mm"
            )
        return point

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
        if self._device_volume is not None:
            images = normalize_hu(self._device_volume.sample(geometries))[:, None]
        else:
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
            initial = self._canvas.initial_on(geometry)
            self._patches[pid] = Patch(geometry, self.grid.region_of(geometry), images[row:row + 1],
                                       [level[row:row + 1] for level in features], probability=initial,
                                       initial=initial)
            entry.before[pid] = None
            pids.append(pid)
        return pids

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
        """Cross-patch prompting, breadth-first from the patches a click changed (the policy is
        ``propagation.plan_level``). Its time in ``timing`` ("cross_patch") leaves out the sampling,
        encoding and decoding of the neighbours, which are added to those steps, so that the steps
        add up to the click's total."""
        started = time.perf_counter()
        nested_before = sum(timing.get(step, 0.0) for step in _NESTED_STEPS)
        while frontier:
            jobs = plan_level(frontier, self._patches, self._limits, self.box_lps,
                              lambda pid: self._drop(pid, entry))
            if not jobs:
                break
            self._show_preview(entry, timing)
            self._report_progress(timing, pending=len(jobs))
            frontier = self._prompt_neighbours(jobs, entry, timing)
            self._report_progress(timing, pending=0)
        nested = sum(timing.get(step, 0.0) for step in _NESTED_STEPS) - nested_before
        timing["cross_patch"] = time.perf_counter() - started - nested

    def _prompt_neighbours(self, jobs: List[NeighbourJob], entry: _HistoryEntry, timing: Dict[str, float]) -> List[int]:
        """Runs the cross-patch U-Net for every (parent, neighbour) pair as one batch, turns each
        heatmap's peaks into clicks, and decodes the neighbours that got any."""
        new_rows = [row for row, job in enumerate(jobs) if job.child is None]
        new_images = self._sample([jobs[row].geometry for row in new_rows], timing) if new_rows else None
        sampled = {row: new_images[index:index + 1] for index, row in enumerate(new_rows)}
        parents = [self._patches[job.parent] for job in jobs]
        neighbour_images = torch.cat([
            sampled[row] if job.child is None else self._patches[job.child].image for row, job in enumerate(jobs)
        ])
        with torch.no_grad():
            heatmaps = self.net.cross_patch(
                torch.cat([parent.image for parent in parents]),
                torch.cat([(parent.probability > MASK_THRESHOLD).to(parent.image.dtype) for parent in parents]),
                neighbour_images,
            )
        prompts = heatmap_prompts(heatmaps, jobs)
        for job, points in zip(jobs, prompts):
            if not points and job.child is not None:
                self._drop(job.child, entry)
        opening = [row for row in new_rows if prompts[row]]
        opened_ids: Dict[int, int] = {}
        if opening:
            opened = self._open_patches([jobs[row].geometry for row in opening],
                                        torch.cat([sampled[row] for row in opening]), entry, timing)
            opened_ids = dict(zip(opening, opened))
        decoded = []
        for row, job in enumerate(jobs):
            target = opened_ids.get(row, job.child)
            # A child dropped above (with its descendants) gets no prompt.
            if not prompts[row] or target not in self._patches:
                continue
            self._snapshot(entry, target)
            patch = self._patches[target]
            patch.parent, patch.offset, patch.propagated_points_lps = job.parent, job.offset, prompts[row]
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

    def _render_into_mask(self, regions: List[SourceRegion]) -> Optional[SourceRegion]:
        """The mask over ``regions`` from the patches (see ``CTSAM3DLib.rendering``); returns the box
        holding them all (None for none)."""
        return self._canvas.render(regions, self._patch_results(), self.box_lps)

    def _show_preview(self, entry: _HistoryEntry, timing: Dict[str, float]) -> None:
        """Shows ``self._preview`` the mask as it stands over what the click has changed so far (the
        session's own mask changes only when the click is done)."""
        if self._preview is None:
            return
        started = time.perf_counter()
        update = self._canvas.preview(self._regions_touched(entry), self._patch_results(), self.box_lps)
        if update is not None:
            self._preview(update)
        timing["preview"] = timing.get("preview", 0.0) + time.perf_counter() - started

    def _patch_results(self) -> List[PatchResult]:
        return [(patch.geometry, patch.region, patch.probability)
                for _, patch in sorted(self._patches.items()) if patch.probability is not None]

    def _warm_up_device_paths(self) -> None:
        """Samples, renders and searches for cross-patch peaks one patch at the image's centre, and throws
        the results away: on CUDA every kernel's first use loads it (tens of milliseconds in all, on
        this image's sampling path), which the user's first click would otherwise pay."""
        low, high = self.grid.bounds_lps()
        geometry = self.lattice.patch_centred_on(self.lattice.nearest_index((low + high) / 2))
        images = self._sample([geometry], {})
        inside = images > MASK_THRESHOLD
        with torch.no_grad():
            if self.cross_patch:
                heatmap_peaks(self.net.cross_patch(images, inside.to(images.dtype), images)[0, 0])
            touched_offsets(inside[0, 0])
        region = self.grid.region_of(geometry)
        if region is not None:
            self._canvas.preview([region], [(geometry, region, images)], self.box_lps)
        self._synchronize()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
