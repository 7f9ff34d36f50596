"""A stand-in for ``CTSAM3DLib.InteractiveSession`` with an exactly known answer, for geometry tests."""

from typing import List

import numpy as np
import SimpleITK as sitk  # noqa: N813

from CTSAM3DLib.interface import MaskUpdate


class ComponentSession:
    """The connected regions brighter than ``threshold_hu`` that contain a positive click, minus those
    containing a negative click, on the input's own grid. Tests use it to see precisely where a click
    landed; it has the session's interface (set_clicks returning a MaskUpdate, reset, clicks, mask,
    last_timing) and ignores the network it is given. With ``initial_mask`` the chosen regions are added to it and the
    negatively clicked ones removed from it; a box it cannot honour is refused."""

    def __init__(self, net, image: sitk.Image, device="auto", threshold_hu: float = 0.0, cross_patch: bool = True,
                 max_patches: int = 16, initial_mask=None, box_lps=None) -> None:
        if box_lps is not None:
            raise NotImplementedError("ComponentSession has no box: use InteractiveSession for box tests")
        self.net = net
        self.image = image
        self.device = device
        self.cross_patch = cross_patch
        self.max_patches = max_patches
        self.last_timing = {}
        self._labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(image > threshold_hu))
        self._initial = np.zeros(self._labels.shape, bool) if initial_mask is None else (
            sitk.GetArrayFromImage(initial_mask) != 0)
        self._clicks: List[tuple] = []

    @property
    def clicks(self) -> List[tuple]:
        return list(self._clicks)

    def reset(self) -> None:
        self._clicks = []

    def set_clicks(self, clicks, progress=None, preview=None) -> sitk.Image:
        """As InteractiveSession.set_clicks: ``progress(done, planned)`` before and after the one
        patch, and an exception it raises leaves the session as it was; ``preview`` is never called, as
        InteractiveSession never calls it for a click that stays in one patch."""
        wanted = [(tuple(float(v) for v in point), bool(positive)) for point, positive in clicks]
        for point, _ in wanted:
            self._label_at(point)
        if progress is not None:
            progress(0, 1)
            progress(1, 1)
        before = self._array()
        self._clicks = wanted
        self.last_timing = {"total": 0.0}
        return changed_box(before, self._array())

    def _label_at(self, point_lps) -> int:
        index = self.image.TransformPhysicalPointToIndex(point_lps)
        if any(i < 0 or i >= n for i, n in zip(index, self.image.GetSize())):
            raise ValueError(f"click {point_lps} is outside the image")
        return int(self._labels[index[2], index[1], index[0]])

    @property
    def mask(self) -> sitk.Image:
        mask = sitk.GetImageFromArray(self._array())
        mask.CopyInformation(self.image)
        return mask

    def _array(self) -> np.ndarray:
        chosen, removed = set(), set()
        for point, positive in self._clicks:
            label = self._label_at(point)
            if label and positive:
                chosen.add(label)
                removed.discard(label)
            elif label:
                chosen.discard(label)
                removed.add(label)
        array = ((self._initial | np.isin(self._labels, sorted(chosen))) & ~np.isin(self._labels, sorted(removed)))
        return array.astype(np.uint8)


def changed_box(before: np.ndarray, after: np.ndarray) -> MaskUpdate:
    """The smallest box holding every voxel that differs, as InteractiveSession reports it (which may
    give a larger box: a caller may rely only on the mask being right inside it)."""
    changed = np.argwhere(before != after)
    if changed.size == 0:
        return MaskUpdate.nothing()
    low, high = changed.min(axis=0), changed.max(axis=0) + 1
    return MaskUpdate(tuple(int(v) for v in low[::-1]), after[tuple(slice(a, b) for a, b in zip(low, high))].copy())
