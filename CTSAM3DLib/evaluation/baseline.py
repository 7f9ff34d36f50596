"""The classical baseline: click-driven confidence-connected region growing (SimpleITK).

What a 3D Slicer user could do without a network, driven by the same clicks as the model:

1. Each positive click seeds its own ``sitk.ConfidenceConnected`` region growing on the CT (HU,
   unsmoothed): the mean and standard deviation of the HU in a (2 * radius + 1)^3 block around
   the seed give the interval mean +- ``multiplier`` x std; the region of connected voxels inside
   it is grown, the statistics recomputed over that region, and the growth repeated
   ``iterations`` times. Parameters are the ITK Software Guide's example values (multiplier 2.5,
   5 iterations, radius 2), not tuned on any data. Growing each seed on its own keeps a click in
   another tissue from widening every interval.
2. The mask is the union of the regions of all positive clicks.
3. Negative clicks carve: every voxel of the union that lies closer (in mm) to a negative click than
   to every positive click is removed (a Voronoi split of the mask between the clicks).
4. Only the connected parts (26-connectivity) that hold a positive click are kept.

Steps 2 to 4 are recomputed from all clicks after each click; the growing of step 1 runs once per
positive click and is cached.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

from ..geometry import SourceGrid, SourceRegion
from ..interface import MaskUpdate

Box = Tuple[slice, slice, slice]

CARVE_RADIUS_MM = 25.0
"""How far from a negative click the baseline removes, when it corrects a start mask."""


def _occupied_box(mask: np.ndarray) -> Optional[Box]:
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(box)


class RegionGrowingSession:
    """Session-like click segmenter (``add_click``/``reset``/``clicks``/``mask``) over one CT image."""

    max_patches = None  # no patch limit: the baseline works on the whole scan

    def __init__(
        self,
        image: sitk.Image,
        multiplier: float = 2.5,
        iterations: int = 5,
        radius: int = 2,
    ) -> None:
        if image.GetDimension() != 3:
            raise ValueError(f"region growing needs a 3D image, got {image.GetDimension()}D")
        self.image = sitk.Cast(image, sitk.sitkFloat32)
        self.multiplier = multiplier
        self.iterations = iterations
        self.radius = radius
        self.spacing_zyx = np.asarray(tuple(reversed(image.GetSpacing())), dtype=np.float64)
        self.shape_zyx = tuple(reversed(image.GetSize()))
        self.clicks: List[Tuple[Tuple[int, int, int], bool]] = []
        """(index_zyx, positive) of each click so far."""
        self._grown: Dict[Tuple[int, int, int], Tuple[Optional[Box], np.ndarray]] = {}
        self.reset()

    def reset(self, initial_mask: Optional[sitk.Image] = None) -> None:
        """Forget all clicks and the box, and start from ``initial_mask`` (on the image's grid) or nothing
        (the cache of grown regions is kept: it depends on the seed only)."""
        self.clicks = []
        self._box_inside: Optional[np.ndarray] = None
        self._initial = (np.zeros(self.shape_zyx, bool) if initial_mask is None
                         else sitk.GetArrayFromImage(initial_mask) != 0)
        self.mask = self._to_image(self._initial.astype(np.uint8))

    def add_box(self, corner_a_lps: Sequence[float], corner_b_lps: Sequence[float]) -> MaskUpdate:
        """A positive click at the box's centre, and every result clipped to the box (as the session's)."""
        low = np.minimum(corner_a_lps, corner_b_lps)
        high = np.maximum(corner_a_lps, corner_b_lps)
        grid = SourceGrid(self.image)
        size_x, size_y, _ = grid.size
        # Slice by slice: a whole scan's world coordinates would take gigabytes.
        self._box_inside = np.stack([
            np.all((points >= low) & (points <= high), axis=-1)
            for points in (grid.world_points(SourceRegion((0, 0, z), (size_x, size_y, 1)))[0]
                           for z in range(grid.size[2]))
        ])
        return self.add_click((low + high) / 2, True)

    def add_click(self, point_lps: Sequence[float], positive: bool = True) -> MaskUpdate:
        """Add a click at ``point_lps`` (mm, LPS); the update covers the whole image (region growing
        may change any voxel)."""
        x, y, z = self.image.TransformPhysicalPointToIndex(tuple(float(c) for c in point_lps))
        if not all(0 <= i < n for i, n in zip((z, y, x), self.shape_zyx)):
            raise ValueError(f"click at {tuple(point_lps)} (LPS) lies outside the image")
        self.clicks.append(((z, y, x), bool(positive)))
        segmented = self._segment().astype(np.uint8)
        self.mask = self._to_image(segmented)
        return MaskUpdate((0, 0, 0), segmented)

    def _to_image(self, array_zyx: np.ndarray) -> sitk.Image:
        mask = sitk.GetImageFromArray(array_zyx)
        mask.CopyInformation(self.image)
        return mask

    def _grow(self, seed_zyx: Tuple[int, int, int]) -> Tuple[Optional[Box], np.ndarray]:
        if seed_zyx not in self._grown:
            region = sitk.ConfidenceConnected(
                self.image,
                seedList=[tuple(int(i) for i in reversed(seed_zyx))],
                numberOfIterations=self.iterations,
                multiplier=self.multiplier,
                initialNeighborhoodRadius=self.radius,
                replaceValue=1,
            )
            array = sitk.GetArrayViewFromImage(region) != 0
            box = _occupied_box(array)
            self._grown[seed_zyx] = (box, array[box].copy() if box is not None else np.zeros((0, 0, 0), bool))
        return self._grown[seed_zyx]

    def _segment(self) -> np.ndarray:
        grown = self._grown_from_positives()
        if self._initial.any():
            result = self._initial | grown
            # A negative click removes the region grown from it within CARVE_RADIUS_MM, where it is nearer
            # than any positive click (region growing alone would take every organ of similar intensity).
            positives = [index for index, positive in self.clicks if positive]
            for seed in [index for index, positive in self.clicks if not positive]:
                box, region = self._grow(seed)
                if box is None:
                    continue
                nearby = self._squared_distance(box, [seed]) <= CARVE_RADIUS_MM**2
                if positives:
                    nearby &= ~self._closer_to_positive(box, positives, [seed])
                result[box] &= ~(region & nearby)
        else:
            result = grown
        if self._box_inside is not None:
            result = np.where(self._box_inside, result, self._initial)
        return result

    def _grown_from_positives(self) -> np.ndarray:
        union = np.zeros(self.shape_zyx, bool)
        positives = [index for index, positive in self.clicks if positive]
        negatives = [index for index, positive in self.clicks if not positive]
        for seed in positives:
            box, region = self._grow(seed)
            if box is not None:
                union[box] |= region
        box = _occupied_box(union)
        if box is None:
            return union
        if negatives:
            union[box] &= self._closer_to_positive(box, positives, negatives)
        return self._keep_clicked_parts(union, box, positives)

    def _squared_distance(self, box: Box, clicks: List[Tuple[int, int, int]]) -> np.ndarray:
        """Squared distance (mm^2) from each voxel of ``box`` to the nearest of ``clicks``."""
        axes = [np.arange(s.start, s.stop, dtype=np.float64) for s in box]
        nearest = None
        for click in clicks:
            parts = [((axis - c) * s) ** 2 for axis, c, s in zip(axes, click, self.spacing_zyx)]
            squared = parts[0][:, None, None] + parts[1][None, :, None] + parts[2][None, None, :]
            nearest = squared if nearest is None else np.minimum(nearest, squared)
        return nearest

    def _closer_to_positive(self, box: Box, positives, negatives) -> np.ndarray:
        if not positives:
            return np.zeros(tuple(s.stop - s.start for s in box), bool)
        return self._squared_distance(box, positives) <= self._squared_distance(box, negatives)

    @staticmethod
    def _keep_clicked_parts(mask: np.ndarray, box: Box, positives) -> np.ndarray:
        cropped = sitk.GetImageFromArray(mask[box].astype(np.uint8))
        labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(cropped, True))
        kept = {
            int(labels[tuple(i - s.start for i, s in zip(seed, box))])
            for seed in positives
            if all(s.start <= i < s.stop for i, s in zip(seed, box))
        }
        kept.discard(0)
        result = np.zeros_like(mask)
        result[box] = np.isin(labels, sorted(kept))
        return result
