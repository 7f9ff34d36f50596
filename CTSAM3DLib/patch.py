"""One open patch of an interactive session: where it lies, its network input and cached results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .geometry import PatchGeometry, SourceRegion

Offset = Tuple[int, int, int]
"""A step between adjacent patches, in whole patches along (x, y, z)."""


@dataclass
class Patch:
    """An open patch: its place on the lattice and the source voxels it covers, its input (1,1,64^3),
    cached encoder features, latest probability (1,1,64^3), the session's initial mask on it (1,1,64^3;
    None without one) and, when it was opened by cross-patch prompting, its parent, the step from the
    parent, and the clicks the heatmap gave it (LPS)."""

    geometry: PatchGeometry
    region: SourceRegion
    image: torch.Tensor
    features: List[torch.Tensor]
    probability: Optional[torch.Tensor] = None
    initial: Optional[torch.Tensor] = None
    parent: Optional[int] = None
    offset: Optional[Offset] = None
    propagated_points_lps: Tuple[Tuple[float, float, float], ...] = ()
