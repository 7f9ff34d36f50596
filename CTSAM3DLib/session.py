"""The interactive session: clicks in world coordinates in, a mask in the CT's own geometry out.

One ``InteractiveSession`` owns all interaction state for one image: the open patches (each with
its cached encoder features and latest probability), the clicks, and the undo history. It keeps the
clicks and the history and runs each call; the patches and the network's work on them are
``open_patches.OpenPatches``, the mask on the CT's grid ``rendering.SessionMask``, and what it accepts
is checked by ``inputs``.

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
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .constants import MASK_THRESHOLD, MAX_OPEN_PATCHES
from .geometry import DeviceVolume, Lattice, SourceRegion
from .inputs import as_box, box_centre, readable_image, validate_image
from .interface import (
    Box,
    Click,
    CrossPatchNetwork,
    MaskUpdate,
    PreviewCallback,
    ProgressCallback,
    PromptableNetwork,
    SessionInputError,
    checked_point,
    kept_clicks,
)
from .open_patches import OpenPatches, PatchChanges, StepTimes
from .patch import Patch
from .propagation import PropagationLimits, heatmap_peaks, touched_offsets
from .rendering import SessionMask, enclosing_region
from .runtime import SAMPLING, Runtime

__all__ = ["SAMPLING", "Click", "InteractiveSession", "MaskUpdate", "PreviewCallback", "ProgressCallback",
           "Runtime", "SessionInputError", "as_box", "readable_image", "validate_image"]


@dataclass
class _HistoryEntry:
    """What one click changed: the patches (as they were before), and for a box's click the box it
    replaced."""

    click: Click
    changes: PatchChanges = field(default_factory=dict)
    box_before: Optional[Tuple[Optional[Box], ...]] = None


class InteractiveSession:
    """Click-driven segmentation of one CT.

    ``net`` is a ``PromptableNetwork`` (a ``CrossPatchNetwork`` for cross-patch prompting; see
    ``CTSAM3DLib.model.CTSAM3D``), or a ``CTSAM3DLib.runtime.Runtime`` of one, which sessions on one
    network share so that it is prepared once (``device`` and ``precision`` are then the runtime's:
    "auto" or the same); ``image`` a 3D scalar ``SimpleITK.Image`` in Hounsfield units,
    with any size, spacing and direction. Points are LPS world millimetres. ``precision`` chooses
    how the network runs (see ``CTSAM3DLib.inference``); "auto" picks the fastest path for the device.
    ``sampling`` chooses where patches are cut from the CT (see ``SAMPLING``; "auto": the runtime's).
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
        net: Union[PromptableNetwork, Runtime],
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
        has_cross_patch = isinstance(net.source if isinstance(net, Runtime) else net, CrossPatchNetwork)
        if cross_patch and not has_cross_patch:
            raise ValueError("cross-patch prompting needs a network with a cross_patch method")
        if isinstance(net, Runtime):
            if not net.accepts(device, precision):
                raise ValueError(f"this session asks for device {device} at precision {precision!r}, but its runtime "
                                 f"runs on {net.device} at {net.precision!r}")
            self.runtime = net.current()
        else:
            self.runtime = Runtime(net, device, precision)
        self.image = image
        self.device = self.runtime.device
        self.precision = self.runtime.precision
        """The precision the network runs at ("auto" resolved; see ``CTSAM3DLib.inference``)."""
        self.net = self.runtime.network
        self.cross_patch = has_cross_patch if cross_patch is None else cross_patch
        self.max_patches = max_patches
        self.cross_patch_box_lps = None if cross_patch_box_lps is None else as_box(*cross_patch_box_lps)
        self._fixed_box = None if box_lps is None else as_box(*box_lps)
        self.box_lps: Optional[Box] = self._fixed_box
        """The box results are clipped to (``box_lps`` or the last ``add_box``), or None."""
        self.lattice = Lattice.of_image(image)
        self.sampling = self.runtime.sampling if sampling == "auto" else sampling
        on_device = self.sampling == "device"
        self._device_volume = DeviceVolume(image, self.lattice, self.device) if on_device else None
        self._canvas = SessionMask(image, self.lattice, self.device, sample_on_device=on_device)
        self.grid = self._canvas.grid
        self._patches = OpenPatches(self.net, self.device, image, self.lattice, self.grid, self._device_volume,
                                    PropagationLimits(self.lattice, self.grid, max_patches, self.cross_patch_box_lps),
                                    self._canvas.initial_on)
        self.last_timing: Dict[str, float] = {}
        self._history: List[_HistoryEntry] = []
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
        return self._patches.in_order()

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
        return self._canvas.as_image(self._canvas.probability(self._patches.results()))

    def probability_in(self, update: MaskUpdate) -> np.ndarray:
        """The current probability (float32, (z, y, x)) over an update's box, as ``probability()`` has it."""
        if update.empty:
            return np.zeros((0, 0, 0), dtype=np.float32)
        return self._canvas.probability_over(SourceRegion(update.start, update.size), self._patches.results())

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
        kept = kept_clicks(wanted, current)
        changed = [self._take_back() for _ in range(len(current) - kept)]
        changed += [self._apply_click(click, progress, preview) for click in wanted[kept:]]
        return self._update(enclosing_region(changed))

    # ----------------------------------------------------------------- internals
    def _apply_click(self, click: Click, progress: Optional[ProgressCallback],
                     preview: Optional[PreviewCallback] = None) -> Optional[SourceRegion]:
        """The work of a click, up to the mask array; returns the source box it re-rendered."""
        times = StepTimes()
        started = time.perf_counter()
        entry = _HistoryEntry(click)
        self._history.append(entry)

        def report(pending: int) -> None:
            if progress is not None:
                progress(times.patches_decoded, times.patches_decoded + pending)

        def show_preview() -> None:
            if preview is not None:
                with times.step("preview"):
                    update = self._canvas.preview(self._patches.regions_touched(entry.changes),
                                                  self._patches.results(), self.box_lps)
                    if update is not None:
                        preview(update)

        try:
            targets = self._patches.containing(click.point_lps)
            report(max(len(targets), 1))
            if not targets:
                geometry = self.lattice.patch_centred_on(self.lattice.nearest_index(click.point_lps))
                images = self._patches.sample([geometry], times)
                targets = self._patches.open([geometry], images, entry.changes, times)
            self._patches.decode(targets, self.clicks, entry.changes, times)
            report(0)
            if self.cross_patch:
                self._patches.propagate(targets, self.clicks, self.box_lps, entry.changes, times, report,
                                        show_preview)
            with times.step("paste"):
                changed = self._render_into_mask(self._patches.regions_touched(entry.changes))
        except BaseException:
            # Rendering writes the mask all or nothing, so the session is exactly as before the click.
            self._history.pop()
            self._patches.restore(entry.changes)
            raise
        times.add("total", time.perf_counter() - started)
        self.last_timing = times.as_dict(len(self._patches))
        return changed

    def _take_back(self) -> Optional[SourceRegion]:
        """Undoes the last click; returns the source box it re-rendered."""
        if not self._history:
            raise IndexError("nothing to undo: the session has no clicks")
        entry = self._history.pop()
        touched = self._patches.regions_touched(entry.changes)
        now, box = self._patches.state_of(entry.changes), self.box_lps
        self._patches.restore(entry.changes)
        if entry.box_before is not None:
            self.box_lps = entry.box_before[0]
        try:
            return self._render_into_mask(touched)
        except BaseException:
            # An undo that cannot render leaves the session as it was: the click back, its patches too.
            self._patches.restore(now)
            self.box_lps = box
            self._history.append(entry)
            raise

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

    def _render_into_mask(self, regions: List[SourceRegion]) -> Optional[SourceRegion]:
        """The mask over ``regions`` from the patches (see ``CTSAM3DLib.rendering``); returns the box
        holding them all (None for none)."""
        return self._canvas.render(regions, self._patches.results(), self.box_lps)

    def _warm_up_device_paths(self) -> None:
        """Samples, renders and searches for cross-patch peaks one patch at the image's centre, and throws
        the results away: on CUDA every kernel's first use loads it (tens of milliseconds in all, on
        this image's sampling path), which the user's first click would otherwise pay."""
        low, high = self.grid.bounds_lps()
        geometry = self.lattice.patch_centred_on(self.lattice.nearest_index((low + high) / 2))
        images = self._patches.sample([geometry], StepTimes())
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
