"""The open patches of one session and the network's work on them: opening patches (sampling and
encoding), decoding them with the clicks inside, and cross-patch prompting into their neighbours.

Every change a click makes to a patch is first recorded in the click's ``PatchChanges`` (the patch as it
was, or None for one the click opened): undo restores exactly that. How long each step took goes into
the call's ``StepTimes``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from .constants import MASK_THRESHOLD, PATCH_SIZE
from .geometry import DeviceVolume, Lattice, PatchGeometry, SourceGrid, SourceRegion
from .interface import Box, Click, PromptableNetwork
from .patch import Patch
from .preprocess import normalize_hu
from .propagation import NeighbourJob, PropagationLimits, heatmap_prompts, plan_level
from .rendering import PatchResult

PatchChanges = Dict[int, Optional[Patch]]
"""What one click did to the open patches: each touched patch as it was before (None: opened by it)."""


class StepTimes:
    """Seconds per step of one session call ("sample", "encode", "decode", "cross_patch", "preview",
    "paste", "total") and the patches it decoded: the session's ``last_timing``."""

    NESTED = ("sample", "encode", "decode", "preview")
    """Steps that cross-patch prompting runs inside its own time."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self.patches_decoded = 0

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def nested(self) -> float:
        return sum(self.seconds.get(name, 0.0) for name in self.NESTED)

    def as_dict(self, patches_open: int) -> Dict[str, float]:
        return {**self.seconds, "patches_decoded": float(self.patches_decoded), "patches_open": float(patches_open)}


class OpenPatches:
    """The patches a session has open, by id in opening order, and the network work on them.

    Patches are cut from ``image`` on ``lattice`` by SimpleITK, or from ``device_volume`` where the
    network runs; ``initial_on`` gives a new patch its first mask prompt (the session's initial mask).
    """

    def __init__(self, net: PromptableNetwork, device: torch.device, image: sitk.Image, lattice: Lattice,
                 grid: SourceGrid, device_volume: Optional[DeviceVolume], limits: PropagationLimits,
                 initial_on: Callable[[PatchGeometry], Optional[torch.Tensor]]) -> None:
        self.net, self.device = net, device
        self.image, self.lattice, self.grid = image, lattice, grid
        self.device_volume = device_volume
        self.limits = limits
        self._initial_on = initial_on
        self._patches: Dict[int, Patch] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._patches)

    def in_order(self) -> List[Patch]:
        return [self._patches[pid] for pid in sorted(self._patches)]

    def containing(self, point_lps: Sequence[float]) -> List[int]:
        return [pid for pid in sorted(self._patches) if self._patches[pid].geometry.contains(point_lps)]

    def clear(self) -> None:
        self._patches.clear()

    def results(self) -> List[PatchResult]:
        """The decoded patches as the mask renders them, in opening order."""
        return [(patch.geometry, patch.region, patch.probability)
                for patch in self.in_order() if patch.probability is not None]

    # ----------------------------------------------------------------- undo
    def restore(self, changes: PatchChanges) -> None:
        """Puts every patch a click touched back as it was."""
        for pid, before in changes.items():
            if before is None:
                self._patches.pop(pid, None)
            else:
                self._patches[pid] = before

    def state_of(self, changes: PatchChanges) -> PatchChanges:
        """The patches a click touched as they are now (None: not open), for ``restore`` to go back to."""
        return {pid: self._patches.get(pid) for pid in changes}

    def regions_touched(self, changes: PatchChanges) -> List[SourceRegion]:
        """The source regions of the patches a click touched, as they are now or, if gone, were."""
        regions = []
        for pid, before in changes.items():
            patch = self._patches.get(pid, before)
            if patch is not None:
                regions.append(patch.region)
        return regions

    # ----------------------------------------------------------------- network work
    def sample(self, geometries: List[PatchGeometry], times: StepTimes) -> torch.Tensor:
        """The network inputs (N,1,64^3) of patches, on the device."""
        with times.step("sample"):
            if self.device_volume is not None:
                return normalize_hu(self.device_volume.sample(geometries))[:, None]
            return torch.cat([
                torch.from_numpy(normalize_hu(self.lattice.sample(self.image, geometry)))[None, None]
                for geometry in geometries
            ]).to(self.device)

    def open(self, geometries: List[PatchGeometry], images: torch.Tensor, changes: PatchChanges,
             times: StepTimes) -> List[int]:
        """Encodes new patches (as one batch) and opens them; returns their ids."""
        with times.step("encode"), torch.no_grad():
            features = self.net.encode(images)
            self._synchronize()
        pids = []
        for row, geometry in enumerate(geometries):
            pid = self._next_id
            self._next_id += 1
            initial = self._initial_on(geometry)
            self._patches[pid] = Patch(geometry, self.grid.region_of(geometry), images[row:row + 1],
                                       [level[row:row + 1] for level in features], probability=initial,
                                       initial=initial)
            changes[pid] = None
            pids.append(pid)
        return pids

    def decode(self, pids: List[int], clicks: Sequence[Click], changes: PatchChanges, times: StepTimes) -> None:
        """Runs the decoder once over all ``pids`` as one batch, each with its previous probability as the
        mask prompt and its clicks (``_prompts``)."""
        for pid in pids:
            self._snapshot(changes, pid)
        prompts = [self._prompts(pid, clicks) for pid in pids]
        count = max(len(labels) for _, labels in prompts)
        points = np.zeros((len(pids), count, 3), dtype=np.float32)
        labels = np.full((len(pids), count), -1, dtype=np.int64)
        for row, (patch_points, patch_labels) in enumerate(prompts):
            points[row, : len(patch_labels)] = patch_points
            labels[row, : len(patch_labels)] = patch_labels
        patches = [self._patches[pid] for pid in pids]
        features = [_batch(level) for level in zip(*(patch.features for patch in patches))]
        previous = [patch.probability for patch in patches]
        mask_prompt = None
        if any(p is not None for p in previous):
            zeros = torch.zeros(1, 1, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE, device=self.device)
            mask_prompt = _batch([zeros if p is None else p for p in previous])
        with times.step("decode"), torch.no_grad():
            probability, _ = self.net.decode(features, torch.from_numpy(points).to(self.device),
                                             torch.from_numpy(labels).to(self.device), mask_prompt)
            self._synchronize()
        times.patches_decoded += len(pids)
        for row, patch in enumerate(patches):
            patch.probability = probability[row : row + 1].to(torch.float32)

    def propagate(self, frontier: List[int], clicks: Sequence[Click], box: Optional[Box], changes: PatchChanges,
                  times: StepTimes, progress: Callable[[int], None], before_level: Callable[[], None]) -> None:
        """Cross-patch prompting, breadth-first from the patches a click changed (the policy is
        ``propagation.plan_level``). ``before_level()`` is called before each level of neighbours runs,
        ``progress(pending)`` before and after. Its time ("cross_patch") leaves out the sampling, encoding,
        decoding and previews of the neighbours, which go to those steps, so that the steps add up."""
        started = time.perf_counter()
        nested_before = times.nested()
        while frontier:
            jobs = plan_level(frontier, self._patches, self.limits, box, lambda pid: self._drop(pid, clicks, changes))
            if not jobs:
                break
            before_level()
            progress(len(jobs))
            frontier = self._prompt_neighbours(jobs, clicks, changes, times)
            progress(0)
        times.add("cross_patch", time.perf_counter() - started - (times.nested() - nested_before))

    def _prompt_neighbours(self, jobs: List[NeighbourJob], clicks: Sequence[Click], changes: PatchChanges,
                           times: StepTimes) -> List[int]:
        """Runs the cross-patch U-Net for every (parent, neighbour) pair as one batch, turns each heatmap's
        peaks into clicks, and decodes the neighbours that got any."""
        new_rows = [row for row, job in enumerate(jobs) if job.child is None]
        new_images = self.sample([jobs[row].geometry for row in new_rows], times) if new_rows else None
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
                self._drop(job.child, clicks, changes)
        opening = [row for row in new_rows if prompts[row]]
        opened_ids: Dict[int, int] = {}
        if opening:
            opened = self.open([jobs[row].geometry for row in opening], torch.cat([sampled[row] for row in opening]),
                               changes, times)
            opened_ids = dict(zip(opening, opened))
        decoded = []
        for row, job in enumerate(jobs):
            target = opened_ids.get(row, job.child)
            # A child dropped above (with its descendants) gets no prompt.
            if not prompts[row] or target not in self._patches:
                continue
            self._snapshot(changes, target)
            patch = self._patches[target]
            patch.parent, patch.offset, patch.propagated_points_lps = job.parent, job.offset, prompts[row]
            decoded.append(target)
        if decoded:
            self.decode(decoded, clicks, changes, times)
        return decoded

    def _drop(self, pid: int, clicks: Sequence[Click], changes: PatchChanges) -> None:
        """Closes a propagated patch and its descendants, except those holding a user click, which stay
        open as patches of their own."""
        for cid in [cid for cid, child in self._patches.items() if child.parent == pid]:
            self._drop(cid, clicks, changes)
        self._snapshot(changes, pid)
        patch = self._patches[pid]
        if any(patch.geometry.contains(click.point_lps) for click in clicks):
            patch.parent, patch.offset, patch.propagated_points_lps = None, None, ()
        else:
            del self._patches[pid]

    def _prompts(self, pid: int, clicks: Sequence[Click]) -> Tuple[np.ndarray, np.ndarray]:
        """(x, y, z) voxel points and labels of a patch: its propagated clicks, then every user click
        inside it in click order (later clicks overwrite earlier ones in the click maps)."""
        patch = self._patches[pid]
        geometry = patch.geometry
        inside = [click for click in clicks if geometry.contains(click.point_lps)]
        points_lps = list(patch.propagated_points_lps) + [click.point_lps for click in inside]
        labels = [1] * len(patch.propagated_points_lps) + [1 if click.positive else 0 for click in inside]
        points = np.array([np.round(geometry.to_voxel(point)) for point in points_lps], dtype=np.float32)
        return points.reshape(-1, 3), np.array(labels, dtype=np.int64)

    def _snapshot(self, changes: PatchChanges, pid: int) -> None:
        """Remembers a patch as it was before this click first touched it."""
        if pid not in changes:
            changes[pid] = replace(self._patches[pid])

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _batch(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors (1, ...) as one batch; a single one as it is (a refining click copies nothing here)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=0)
