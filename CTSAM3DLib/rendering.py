"""A session's mask on the CT's own grid: where it starts (an initial mask, or nothing) and the open
patches' probabilities rendered onto it.

Rules (``InteractiveSession`` relies on them):
- Where patches overlap, a source voxel takes the probability of the patch whose centre is nearest to
  it (``SourceGrid.assemble``); the voxel is inside where that probability exceeds ``MASK_THRESHOLD``.
- Where no patch reaches, or outside the session's box, the initial mask stays.
- A voxel's value depends only on the patches, the box and the initial mask, never on the pass that
  renders it: so regions may be rendered alone or together, and a preview is the mask a commit would make.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from .constants import MASK_THRESHOLD
from .geometry import DeviceVolume, Lattice, PatchGeometry, SourceGrid, SourceRegion
from .interface import Box, MaskUpdate, SessionInputError

PatchResult = Tuple[PatchGeometry, SourceRegion, torch.Tensor]
"""An open patch as the mask sees it: its geometry, the source voxels it covers and its probability
(1,1,64^3), in opening order."""


class SessionMask:
    """The uint8 0/1 mask of one session (``array``, (z, y, x)) and its initial mask (``initial``).

    ``image`` gives the grid (and the geometry of images made from the mask); ``device`` is where the
    patches' probabilities are; with ``sample_on_device`` the initial mask is sampled onto patches there
    (``DeviceVolume``), else through SimpleITK (``Lattice.sample_mask``).
    """

    def __init__(self, image: sitk.Image, lattice: Lattice, device: torch.device, sample_on_device: bool) -> None:
        self._image = image
        self.grid = SourceGrid(image)
        self.lattice = lattice
        self.device = device
        self._sample_on_device = sample_on_device
        self._whole_image = SourceRegion((0, 0, 0), self.grid.size)
        self.initial = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
        self._initial_image: Optional[sitk.Image] = None
        """The initial mask as float32 for ``Lattice.sample_mask`` (SimpleITK sampling; None without one)."""
        self._initial_volume: Optional[DeviceVolume] = None
        """The initial mask where the network runs (device sampling; None without one)."""
        self.array = self.initial.copy()

    def start_from(self, initial_mask: Optional[sitk.Image]) -> None:
        """Starts again from ``initial_mask`` (on the image's grid; nonzero is inside), or from nothing."""
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
            self.initial = (sitk.GetArrayFromImage(initial_mask) != 0).astype(np.uint8)
        else:
            self.initial[...] = 0
        self._initial_image = None
        self._initial_volume = None
        if self.initial.any() and self._sample_on_device:
            self._initial_volume = DeviceVolume.for_mask(self.as_image(self.initial), self.lattice, self.device)
        elif self.initial.any():
            self._initial_image = self.as_image(self.initial.astype(np.float32))
        self.array = self.initial.copy()

    def initial_on(self, geometry: PatchGeometry) -> Optional[torch.Tensor]:
        """The initial mask on a patch (1,1,64^3), the patch's first mask prompt; None without one."""
        if self._initial_volume is not None:
            return self._initial_volume.sample([geometry])[:, None]
        if self._initial_image is None:
            return None
        return torch.from_numpy(self.lattice.sample_mask(self._initial_image, geometry))[None, None].to(self.device)

    # ----------------------------------------------------------------- rendering
    def render(self, regions: List[SourceRegion], patches: List[PatchResult],
               box: Optional[Box]) -> Optional[SourceRegion]:
        """Renders ``regions`` into the mask; returns the box holding them all (None for none)."""
        enclosing = enclosing_region(regions)
        self._paint(regions, enclosing, patches, box, self.array, self._whole_image)
        return enclosing

    def preview(self, regions: List[SourceRegion], patches: List[PatchResult],
                box: Optional[Box]) -> Optional[MaskUpdate]:
        """What ``render`` would make of ``regions``, as an update, the mask itself unchanged."""
        enclosing = enclosing_region(regions)
        if enclosing is None:
            return None
        mask = self.array[enclosing.slices].copy()
        self._paint(regions, enclosing, patches, box, mask, enclosing)
        return MaskUpdate(enclosing.start, mask)

    def update(self, region: Optional[SourceRegion]) -> MaskUpdate:
        """The mask over ``region`` as an update (nothing for None)."""
        if region is None:
            return MaskUpdate.nothing()
        return MaskUpdate(region.start, self.array[region.slices].copy())

    def probability(self, patches: List[PatchResult]) -> np.ndarray:
        """The probability over the whole image, float32 (z, y, x); outside every patch the initial mask."""
        volume = self.initial.astype(np.float32)
        union = enclosing_region(region for _, region, _ in patches)
        if union is not None:
            volume[union.slices] = self.probability_over(union, patches)
        return volume

    def probability_over(self, region: SourceRegion, patches: List[PatchResult]) -> np.ndarray:
        probability, covered = self.grid.assemble(region, patches, self.device)
        return np.where(covered.cpu().numpy(), probability.cpu().numpy(), self.initial[region.slices])

    def as_image(self, array: np.ndarray) -> sitk.Image:
        """``array`` ((z, y, x), the image's size) as an image with the CT's geometry."""
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(self._image)
        return image

    def _paint(self, regions: List[SourceRegion], enclosing: Optional[SourceRegion], patches: List[PatchResult],
               box: Optional[Box], target: np.ndarray, covering: SourceRegion) -> None:
        """Renders ``regions`` (``enclosing`` holds them) into ``target``, an array over ``covering``: all or
        nothing.

        Regions close together are rendered in one pass over their enclosing box, and each region takes
        its part: a click carried into 16 patches touches 16 regions, each reached by its neighbours, and
        sampling every patch once rather than once per region it reaches is ten times less work."""
        if enclosing is not None and _voxels(enclosing) <= 2 * sum(_voxels(region) for region in regions):
            together = self._rendered(enclosing, patches, box)
            rendered = [together[region.slices_within(enclosing)] for region in regions]
        else:
            rendered = [self._rendered(region, patches, box) for region in regions]
        # Written only once all is rendered: a failure leaves the target as it was.
        for region, values in zip(regions, rendered):
            target[region.slices_within(covering)] = values

    def _rendered(self, region: SourceRegion, patches: List[PatchResult], box: Optional[Box]) -> np.ndarray:
        """The mask over a region from the patches, (z, y, x)."""
        probability, covered = self.grid.assemble(region, patches, self.device)
        inside = (probability > MASK_THRESHOLD) & covered
        if self._initial_image is None and self._initial_volume is None:
            # No initial mask: the patches' mask where they decide, 0 elsewhere, read back at once.
            rendered = inside.cpu().numpy()
            if box is not None:
                rendered &= self.grid.inside_box(region, box)
            return rendered
        decided = covered.cpu().numpy()
        if box is not None:
            decided &= self.grid.inside_box(region, box)
        return np.where(decided, inside.cpu().numpy(), self.initial[region.slices])


def enclosing_region(regions: Iterable[Optional[SourceRegion]]) -> Optional[SourceRegion]:
    """The smallest box holding every region given (None for none)."""
    enclosing = None
    for region in regions:
        if region is not None:
            enclosing = region if enclosing is None else enclosing.union(region)
    return enclosing


def _voxels(region: SourceRegion) -> int:
    return int(np.prod(region.size))
