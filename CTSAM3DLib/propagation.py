"""Cross-patch prompting (CPP): where a segmented patch continues, and how that becomes a prompt.

A structure larger than a 96 mm patch leaves through the patch's faces, edges or corners. Each of
the 26 adjacent patches whose contact region the mask reaches is a candidate; the cross-patch
U-Net, given the patch, its mask and the neighbour's image, predicts a click heatmap in the
neighbour, and the heatmap's peaks become positive clicks there.

Why clicks at the peaks rather than the heatmap itself as the positive click map: the authors
trained the U-Net to regress the Gaussian click map that prompts the structure in the neighbour,
and the decoder only ever saw exact Gaussian click maps (peak 1, sigma 2). Re-drawing clean
Gaussians at the heatmap's local maxima keeps the decoder's input in the distribution it was
trained on whatever the regression's scale and blur, and the prompts are ordinary points that can
be shown, saved and undone. Peaks below ``PEAK_THRESHOLD`` mean the structure does not continue.

The policy, level by level from the patches a click changed (``plan_level``): a patch's children at
neighbours its mask no longer reaches are dropped; reached neighbours, faces before edges before
corners, are prompted again (an open child) or opened when ``PropagationLimits.may_open`` allows it. The session
runs the networks and keeps the undo history; this module decides where.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .constants import MASK_THRESHOLD
from .geometry import Lattice, PatchGeometry, SourceGrid
from .interface import Box
from .patch import Offset, Patch

NEIGHBOUR_OFFSETS: Tuple[Offset, ...] = tuple(
    offset for offset in itertools.product((-1, 0, 1), repeat=3) if offset != (0, 0, 0)
)
"""The 26 adjacent patches as (x, y, z) steps of one patch."""

PEAK_THRESHOLD = 0.5
"""A heatmap peak below this (the training target's peak is 1) is not a prompt."""

MAX_PEAKS = 3
"""Clicks taken from one heatmap at most (its strongest local maxima)."""


def touched_offsets(mask: torch.Tensor) -> List[Offset]:
    """The neighbours whose contact region the mask reaches: faces first, then edges, then corners (each in
    ``NEIGHBOUR_OFFSETS`` order). The contact region of (dx, dy, dz): the voxels with x = last (dx = 1),
    x = 0 (dx = -1) or any x (dx = 0), and likewise for y and z.

    Faces first because when ``max_patches`` cuts a level short, the patches a structure continues into
    through a face are the ones worth opening, and because that choice must not hang on single voxels: a
    corner, which one voxel of the mask reaches (and any rounding can flip), comes last. Not the largest
    contact first: contacts of nearly equal size (a mask that fills its patch touches all twelve edges
    with about 64 voxels each) would let a voxel rounded the other way choose other patches.

    mask: (S, S, S) bool, (z, y, x) order. The 26 answers are reduced on the mask's device and read
    back at once (one wait for a GPU, not 26).
    """
    reached = mask
    for axis in range(3):
        # Along this axis: first slice, any slice, last slice, as steps -1, 0, 1.
        reached = torch.stack([reached.select(axis, 0), reached.any(dim=axis), reached.select(axis, -1)], dim=axis)
    reached = reached.cpu()
    touched = [offset for offset in NEIGHBOUR_OFFSETS if bool(reached[offset[2] + 1, offset[1] + 1, offset[0] + 1])]
    return sorted(touched, key=lambda offset: sum(map(abs, offset)))


def heatmap_peaks(heatmap: torch.Tensor, threshold: float = PEAK_THRESHOLD, max_peaks: int = MAX_PEAKS) -> torch.Tensor:
    """The strongest local maxima (3x3x3) of a heatmap at or above ``threshold``.

    heatmap: (S, S, S), (z, y, x) order. Returns (K, 3) float (x, y, z) voxel positions, K <= max_peaks,
    strongest first.
    """
    return batched_heatmap_peaks(heatmap[None], threshold, max_peaks)[0]


def batched_heatmap_peaks(heatmaps: torch.Tensor, threshold: float = PEAK_THRESHOLD,
                          max_peaks: int = MAX_PEAKS) -> List[torch.Tensor]:
    """``heatmap_peaks`` of each of (N, S, S, S) heatmaps, found together and read back to the CPU at
    once: a list of N (K, 3) float tensors on the CPU."""
    volume = heatmaps.to(torch.float32)[:, None]
    is_peak = F.max_pool3d(volume, 3, stride=1, padding=1) == volume
    scores = torch.where(is_peak & (volume >= threshold), volume, torch.full_like(volume, -1.0)).flatten(1)
    values, indices = (found.cpu() for found in torch.topk(scores, min(max_peaks, scores.shape[1]), dim=1))
    size = heatmaps.shape[-1]
    peaks = []
    for row_values, row_indices in zip(values, indices):
        kept = row_indices[row_values >= threshold]
        z, y, x = kept // (size * size), (kept // size) % size, kept % size
        peaks.append(torch.stack([x, y, z], dim=-1).to(torch.float32))
    return peaks


class NeighbourJob(NamedTuple):
    """One neighbour to prompt at one level: from patch ``parent`` one ``offset`` away; ``child`` is the
    parent's patch already open there (None: a patch to open at ``geometry``)."""

    parent: int
    offset: Offset
    child: Optional[int]
    geometry: PatchGeometry


@dataclass(frozen=True)
class PropagationLimits:
    """Where cross-patch prompting may open patches: at most ``max_patches`` open, inside the image
    and its lattice, with the centre inside ``centre_box`` (optional), reaching into ``box``
    (optional), and not where an open patch already covers the centre."""

    lattice: Lattice
    grid: SourceGrid
    max_patches: int
    centre_box: Optional[Box] = None

    def may_open(self, geometry: PatchGeometry, patches: Dict[int, Patch], pending: int,
                 box: Optional[Box] = None) -> bool:
        if len(patches) + pending >= self.max_patches:
            return False
        start = np.array(geometry.start_index)
        if np.any(start + geometry.size <= 0) or np.any(start >= np.array(self.lattice.size)):
            return False
        if self.grid.region_of(geometry) is None:
            return False
        centre = geometry.centre_lps
        if self.centre_box is not None and (np.any(centre < self.centre_box[0]) or np.any(centre > self.centre_box[1])):
            return False
        if box is not None:
            low = np.array(geometry.origin_lps) - geometry.spacing / 2
            high = low + geometry.size * geometry.spacing
            if np.any(high <= box[0]) or np.any(low >= box[1]):
                return False
        return not any(patch.geometry.contains(centre) for patch in patches.values())


def reached_offsets(patch: Patch) -> List[Offset]:
    """The neighbours a patch's segmentation carries into, faces first (``touched_offsets``); on an
    initial mask, only what clicks changed is carried on."""
    inside = patch.probability[0, 0] > MASK_THRESHOLD
    if patch.initial is not None:
        inside = inside != (patch.initial[0, 0] > MASK_THRESHOLD)
    return touched_offsets(inside)


def plan_level(
    frontier: List[int],
    patches: Dict[int, Patch],
    limits: PropagationLimits,
    box: Optional[Box],
    drop: Callable[[int], None],
) -> List[NeighbourJob]:
    """The jobs of one level of cross-patch prompting from the patches in ``frontier``; children of
    theirs at neighbours no longer reached are handed to ``drop`` first (which closes them)."""
    jobs: List[NeighbourJob] = []
    for pid in frontier:
        patch = patches[pid]
        reached = reached_offsets(patch)
        children = {child.offset: cid for cid, child in patches.items() if child.parent == pid}
        for offset in sorted(set(children) - set(reached)):
            drop(children[offset])
        for offset in reached:
            if offset in children:
                jobs.append(NeighbourJob(pid, offset, children[offset], patches[children[offset]].geometry))
            else:
                geometry = patch.geometry.shifted(offset)
                if limits.may_open(geometry, patches, len(jobs), box):
                    jobs.append(NeighbourJob(pid, offset, None, geometry))
    return jobs


def heatmap_prompts(heatmaps: torch.Tensor, jobs: List[NeighbourJob]) -> List[Tuple[Tuple[float, float, float], ...]]:
    """For each job, the LPS clicks at its heatmap's peaks (empty: the structure does not continue).

    heatmaps: (len(jobs), 1, S, S, S)."""
    prompts = []
    for job, peaks in zip(jobs, batched_heatmap_peaks(heatmaps[:, 0])):
        prompts.append(tuple(tuple(float(v) for v in job.geometry.to_world(peak)) for peak in peaks.numpy()))
    return prompts
