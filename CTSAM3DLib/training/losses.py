"""The authors' losses, per sample (B,), computed in float32 from probabilities.

The network returns probabilities (its sigmoid is inside), so the losses take probabilities, as
the authors' do:

- focal: the patch's mean binary cross-entropy ``b`` reweighted as ``alpha (1 - exp(-b))^gamma b``
  (their form: the focusing term acts on the patch mean, not per voxel);
- Dice: ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` over the patch;
- mask loss: ``focal_weight * focal + dice_weight * Dice`` (0.2 and 0.8);
- cross-patch: mean squared error between the raw heatmap and its target.

Averaging per-sample values over the batch makes the loss of a batch split across processes
average to the loss of the whole batch, which the distributed gradient relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LossConfig


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32).flatten(1)


def focal_loss(probability: torch.Tensor, target: torch.Tensor, alpha: float = 0.8, gamma: float = 2.0) -> torch.Tensor:
    """probability, target (B,1,D,H,W) -> (B,)."""
    bce = F.binary_cross_entropy(_flat(probability), _flat(target), reduction="none").mean(dim=1)
    return alpha * (1 - torch.exp(-bce)) ** gamma * bce


def dice_loss(probability: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """probability, target (B,1,D,H,W) -> (B,)."""
    p, t = _flat(probability), _flat(target)
    overlap = (p * t).sum(dim=1)
    return 1 - (2 * overlap + smooth) / (p.sum(dim=1) + t.sum(dim=1) + smooth)


def mask_loss(probability: torch.Tensor, target: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """The weighted focal + Dice loss (B,)."""
    focal = focal_loss(probability, target, config.focal_alpha, config.focal_gamma)
    return config.focal_weight * focal + config.dice_weight * dice_loss(probability, target)


def heatmap_loss(heatmap: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (B,)."""
    return ((_flat(heatmap) - _flat(target)) ** 2).mean(dim=1)


def dice_score(mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice of binary masks (B,); 1 when both are empty."""
    m, t = _flat(mask) > 0.5, _flat(target) > 0.5
    overlap = (m & t).sum(dim=1).to(torch.float32)
    total = (m.sum(dim=1) + t.sum(dim=1)).to(torch.float32)
    return torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total))
