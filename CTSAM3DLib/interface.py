"""The vocabulary shared by the network, the session and their callers (local or remote).

- ``PromptableNetwork`` / ``CrossPatchNetwork``: what a session needs of a network. The CT-SAM3D
  network (``CTSAM3DLib.model.CTSAM3D``), its prepared forms (``CTSAM3DLib.inference``), the trainer
  and the test stand-ins all have this shape.
- ``Click``, ``MaskUpdate``, ``SessionInputError``, ``ProgressCallback``, ``PreviewCallback``,
  ``checked_point``: what a session takes and gives back, and the check every click passes, here or on a
  server's client.
- ``Segmenter``: what a session offers its callers, whether the network runs here
  (``InteractiveSession``) or on a server (``RemoteSession``); ``kept_clicks``: the rule of
  ``set_clicks`` both follow.

This module needs numpy only (torch is named for type checkers), so that a client that runs the
network elsewhere can use it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    runtime_checkable,
)

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch


@runtime_checkable
class PromptableNetwork(Protocol):
    """A click-promptable 3D segmentation network on 64^3 patches (see ``CTSAM3DLib.model.CTSAM3D``)."""

    def encode(self, image: torch.Tensor) -> List[torch.Tensor]:
        """image (B,1,64^3) HU normalised to [0,1] -> a list of feature maps (B,C_i,D_i,H_i,W_i)."""

    def decode(
        self,
        features: List[torch.Tensor],
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_prompt: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """features of ``encode``; points (B,N,3) (x, y, z) patch voxels; labels (B,N) int64 (1 positive,
        0 negative, -1 padding); mask_prompt (B,1,64^3) previous probability or None
        -> probability (B,1,64^3), quality (B,1)."""


@runtime_checkable
class CrossPatchNetwork(PromptableNetwork, Protocol):
    """A ``PromptableNetwork`` that can also carry a segmentation into a neighbouring patch."""

    def cross_patch(self, image: torch.Tensor, mask: torch.Tensor, neighbour_image: torch.Tensor) -> torch.Tensor:
        """image, mask (0/1) and the neighbour's image, each (B,1,64^3) -> click heatmap in the neighbour (B,1,64^3)."""


Box = Tuple[np.ndarray, np.ndarray]
"""(lowest, highest) LPS corners of an axis-aligned box."""


class Click(NamedTuple):
    point_lps: Tuple[float, float, float]
    positive: bool


class SessionInputError(ValueError):
    """An image or click that the session cannot use; the session is left unchanged."""


def checked_point(point_lps: Any, what: str = "a click") -> Tuple[float, float, float]:
    """A world point (LPS mm) as three floats; SessionInputError naming ``what`` unless it is 3 finite
    numbers."""
    try:
        point = np.asarray(point_lps, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise SessionInputError(f"{what} needs 3 numbers (LPS mm), got {point_lps!r}") from error
    if point.shape != (3,):
        raise SessionInputError(f"{what} needs 3 coordinates (LPS mm), got {point.size}")
    if not np.all(np.isfinite(point)):
        raise SessionInputError(f"{what}'s coordinates must be finite numbers, got "
                                f"({', '.join(f'{v:g}' for v in point)})")
    return tuple(float(v) for v in point)


def checked_corners(corners: Any, what: str) -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
    """Two opposite corners of a box (LPS mm), each as ``checked_point``; SessionInputError naming ``what``
    unless there are two."""
    if corners is None or len(corners) != 2:
        raise SessionInputError(f"{what} needs two corners of 3 finite coordinates (LPS mm)")
    return checked_point(corners[0], f"{what}'s corner"), checked_point(corners[1], f"{what}'s corner")


ProgressCallback = Callable[[int, int], None]
"""``progress(patches_decoded, patches_planned)``, called before and after each batch of patches a
click decodes; ``patches_planned`` grows as cross-patch prompting finds neighbours. An exception
raised from it abandons the click (how a GUI cancels), leaving the session as it was before it."""


@dataclass(frozen=True)
class MaskUpdate:
    """What one session call changed: a box of source voxels and the whole mask inside it.

    ``start`` is the box's first voxel as an (x, y, z) index of the image; ``mask`` the mask there,
    uint8 0/1 in (z, y, x) order. Outside the box the mask is as it was before the call. A call that
    changed nothing gives an empty box (``mask.size == 0``).
    """

    start: Tuple[int, int, int]
    mask: np.ndarray

    @classmethod
    def nothing(cls) -> MaskUpdate:
        return cls((0, 0, 0), np.zeros((0, 0, 0), dtype=np.uint8))

    @property
    def size(self) -> Tuple[int, int, int]:
        """The box's size as (x, y, z) voxel counts."""
        return tuple(int(n) for n in self.mask.shape[::-1])

    @property
    def empty(self) -> bool:
        return self.mask.size == 0

    @property
    def slices(self) -> Tuple[slice, slice, slice]:
        """numpy (z, y, x) slices of the box in a whole-image array."""
        return tuple(slice(s, s + n) for s, n in zip(self.start[::-1], self.mask.shape))

    def apply_to(self, volume: np.ndarray) -> None:
        """Writes the box into a whole-image (z, y, x) mask array."""
        if not self.empty:
            volume[self.slices] = self.mask


PreviewCallback = Callable[[MaskUpdate], None]
"""``preview(update)``: during a click that cross-patch prompting carries on, called before each further
level of neighbours with the mask as it stands over what the click has changed so far (the box grows;
``update`` has the meaning of a ``MaskUpdate`` against the mask before the click). The click's own
result is still the call's return value, and the session's mask changes only then. An exception raised
from it abandons the click, as from a ``ProgressCallback``."""


def kept_clicks(wanted: Sequence[Click], current: Sequence[Click]) -> int:
    """How many clicks at the start of ``current`` a ``set_clicks(wanted)`` keeps: those it shares with
    ``wanted``, in order; the rest are undone and ``wanted``'s remainder added."""
    kept = 0
    while kept < min(len(wanted), len(current)) and wanted[kept] == current[kept]:
        kept += 1
    return kept


@runtime_checkable
class Segmenter(Protocol):
    """A click-driven segmentation of one CT, wherever its network runs: ``InteractiveSession`` here,
    ``RemoteSession`` on a ``ctsam3d serve`` server. Points are LPS millimetres; every call that changes
    the mask returns what it changed; ``progress`` and ``preview`` (a ``ProgressCallback`` and a
    ``PreviewCallback``) follow a prompt as it runs."""

    last_timing: Dict[str, float]
    """Seconds per step of the last call, and its patch counts."""

    @property
    def clicks(self) -> List[Click]: ...

    @property
    def patch_count(self) -> int: ...

    @property
    def mask(self) -> sitk.Image:
        """The whole mask, uint8 0/1 in the CT's geometry."""

    def mask_array(self) -> np.ndarray:
        """A copy of the whole mask, (z, y, x) uint8."""

    def add_click(self, point_lps: Sequence[float], positive: bool = True,
                  progress: Optional[ProgressCallback] = None,
                  preview: Optional[PreviewCallback] = None) -> MaskUpdate: ...

    def add_box(self, corner_a_lps: Sequence[float], corner_b_lps: Sequence[float],
                progress: Optional[ProgressCallback] = None,
                preview: Optional[PreviewCallback] = None) -> MaskUpdate: ...

    def undo(self) -> MaskUpdate: ...

    def set_clicks(self, clicks: Sequence[Tuple[Sequence[float], bool]],
                   progress: Optional[ProgressCallback] = None,
                   preview: Optional[PreviewCallback] = None) -> MaskUpdate: ...

    def reset(self, initial_mask: Optional[sitk.Image] = None) -> None: ...
