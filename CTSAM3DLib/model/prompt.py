"""Click prompts as Gaussian maps (the paper's PSAP prompt encoding).

Each click becomes a 3D Gaussian (sigma 2 voxels) written into a 17^3 window around the click's
truncated voxel position, in one map for positive clicks and one for negative clicks. Where windows
overlap, the later click's window replaces the earlier one's values; this, not a maximum, is what
the authors' trained weights saw, so it is reproduced exactly (without a loop over points).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..constants import CLICK_RADIUS, CLICK_SIGMA, PATCH_SIZE


def gaussian_kernel(radius: int = CLICK_RADIUS, sigma: float = CLICK_SIGMA) -> torch.Tensor:
    """(2r+1)^3 float32 Gaussian with peak 1; values below float32 epsilon x peak set to 0."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    squared = offsets.view(-1, 1, 1) ** 2 + offsets.view(1, -1, 1) ** 2 + offsets.view(1, 1, -1) ** 2
    kernel = torch.exp(-squared / (2 * sigma * sigma))
    kernel[kernel < torch.finfo(torch.float32).eps * kernel.max()] = 0
    return kernel


def click_maps(
    points: torch.Tensor,
    labels: torch.Tensor,
    size: int = PATCH_SIZE,
    radius: int = CLICK_RADIUS,
    sigma: float = CLICK_SIGMA,
    kernel: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Positive and negative click maps.

    points: (B, N, 3) float, (x, y, z) voxel indices; truncated toward zero as the authors do.
    labels: (B, N): 1 positive, -1 padding (skipped), any other value negative.
    kernel: ``gaussian_kernel(radius, sigma)`` already on the points' device (made here when None; a
    CUDA graph cannot record the copy of a new one from the CPU).
    Returns (B, 2, size, size, size) float32, channel 0 positive, channel 1 negative, (z, y, x) order.
    """
    batch, count = labels.shape
    device = points.device
    if count == 0:
        return torch.zeros(batch, 2, size, size, size, device=device)
    if kernel is None:
        kernel = gaussian_kernel(radius, sigma).to(device)
    centres = points.detach().to(torch.float32).trunc().long()
    axis = torch.arange(size, device=device)
    # offsets[b, n, a, i]: voxel i along axis a minus the click's coordinate on that axis,
    # with axes ordered (z, y, x) to match the map's layout.
    offsets = axis.view(1, 1, 1, size) - centres.flip(-1).unsqueeze(-1)
    inside = offsets.abs() <= radius
    window = offsets.clamp(-radius, radius) + radius

    values = kernel[
        window[:, :, 0, :, None, None], window[:, :, 1, None, :, None], window[:, :, 2, None, None, :]
    ]
    within = inside[:, :, 0, :, None, None] & inside[:, :, 1, None, :, None] & inside[:, :, 2, None, None, :]
    # The last covering click wins: rank clicks 1..N and keep the highest rank per voxel.
    rank = torch.arange(1, count + 1, device=device).view(1, count, 1, 1, 1)
    maps = []
    for polarity in (labels == 1, (labels != 1) & (labels != -1)):
        winner = (within & polarity.view(batch, count, 1, 1, 1)).mul(rank).amax(dim=1, keepdim=True)
        chosen = values.gather(1, (winner - 1).clamp(min=0))
        maps.append(torch.where(winner > 0, chosen, torch.zeros_like(chosen)))
    return _min_max_normalise(torch.cat(maps, dim=1))


def _min_max_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Scales each sample's map of each polarity to [0, 1] unless it is empty.

    The authors normalise over the whole batch; per sample is the same whenever a click's peak
    lies inside its patch (peak 1, background 0), and keeps batched neighbour patches independent.
    """
    flat = maps.flatten(2)
    low = flat.amin(dim=2, keepdim=True)
    high = flat.amax(dim=2, keepdim=True)
    has_click = flat.sum(dim=2, keepdim=True) != 0
    scale = torch.where(has_click, high - low, torch.ones_like(high))
    shift = torch.where(has_click, low, torch.zeros_like(low))
    return ((flat - shift) / scale).view_as(maps)


class PositionEmbeddingRandom(nn.Module):
    """Holds the authors' random Fourier matrix (3x128). The click-map prompt never uses it; it is
    kept so that their checkpoint loads with ``strict=True``."""

    def __init__(self, num_features: int = 128) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_features))


class ClickMapEncoder(nn.Module):
    """points (B,N,3), labels (B,N) -> click maps (B,2,64,64,64)."""

    def __init__(self, size: int = PATCH_SIZE) -> None:
        super().__init__()
        self.size = size
        self.pe_layer = PositionEmbeddingRandom()
        # Not in the authors' state dict: made here, and moved with the network to its device.
        self.register_buffer("kernel", gaussian_kernel(), persistent=False)

    def forward(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return click_maps(points, labels, self.size, kernel=self.kernel)
