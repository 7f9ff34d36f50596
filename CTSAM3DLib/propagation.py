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
"""

from __future__ import annotations

import itertools
from typing import List, Tuple

import torch
import torch.nn.functional as F

Offset = Tuple[int, int, int]

NEIGHBOUR_OFFSETS: Tuple[Offset, ...] = tuple(
    offset for offset in itertools.product((-1, 0, 1), repeat=3) if offset != (0, 0, 0)
)
"""The 26 adjacent patches as (x, y, z) steps of one patch."""

PEAK_THRESHOLD = 0.5
"""A heatmap peak below this (the training target's peak is 1) is not a prompt."""

MAX_PEAKS = 3
"""Clicks taken from one heatmap at most (its strongest local maxima)."""


def touched_offsets(mask: torch.Tensor) -> List[Offset]:
    """The neighbours whose contact region the mask reaches: for (dx, dy, dz), the voxels with
    x = last (dx = 1), x = 0 (dx = -1) or any x (dx = 0), and likewise for y and z.

    mask: (S, S, S) bool, (z, y, x) order.
    """
    faces = []
    for offset in NEIGHBOUR_OFFSETS:
        index = tuple({-1: 0, 0: slice(None), 1: -1}[step] for step in reversed(offset))
        if bool(mask[index].any()):
            faces.append(offset)
    return faces


def heatmap_peaks(heatmap: torch.Tensor, threshold: float = PEAK_THRESHOLD, max_peaks: int = MAX_PEAKS) -> torch.Tensor:
    """The strongest local maxima (3x3x3) of a heatmap at or above ``threshold``.

    heatmap: (S, S, S), (z, y, x) order. Returns (K, 3) float (x, y, z) voxel positions, K <= max_peaks,
    strongest first.
    """
    volume = heatmap.to(torch.float32)[None, None]
    is_peak = F.max_pool3d(volume, 3, stride=1, padding=1) == volume
    scores = torch.where(is_peak & (volume >= threshold), volume, torch.full_like(volume, -1.0)).flatten()
    values, indices = torch.topk(scores, min(max_peaks, scores.numel()))
    indices = indices[values >= threshold]
    size = heatmap.shape[-1]
    z, y, x = indices // (size * size), (indices // size) % size, indices % size
    return torch.stack([x, y, z], dim=-1).to(torch.float32)
