"""One training step's forward pass as a module, so DistributedDataParallel can wrap it.

Per step: encode the batch once; run ``clicks.iterations`` decoder passes with the simulated user
(first click, then one more per pass, previous probability as mask prompt); average the mask loss
over the passes; then, with cross-patch training, run the cross-patch U-Net on each patch's image,
its final binarised prediction (detached) and its neighbour's image, and regress the heatmap that
prompts the same structure in the neighbour (see `SimulatedUser.first_click_maps`).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Executor
from typing import Dict, List, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from ..constants import MASK_THRESHOLD
from .config import ClickConfig, LossConfig
from .interaction import SimulatedUser, interactive_predictions
from .losses import dice_score, heatmap_loss, mask_loss


def autocast_for(device: torch.device, bf16: bool):
    """bfloat16 autocast on CUDA when asked for; no autocast elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def swap_pairs(tensor: torch.Tensor) -> torch.Tensor:
    """(2k, ...) with items 2i and 2i+1 exchanged: each patch's neighbour."""
    return tensor.reshape(tensor.shape[0] // 2, 2, *tensor.shape[1:]).flip(1).reshape(tensor.shape)


class InteractiveTrainingStep(nn.Module):
    """forward(images (B,1,64^3) in [0,1], masks (B,1,64^3) 0/1) -> dict of per-step values:
    ``loss`` (scalar, to minimise), and detached ``mask_loss``, ``cross_patch_loss``, ``dice``
    (Dice after the last click), ``dice_first`` (after the first click)."""

    def __init__(self, net: nn.Module, clicks: ClickConfig, loss: LossConfig, bf16: bool = True,
                 checkpoint_decoder: bool = False, click_executor: Optional[Executor] = None) -> None:
        super().__init__()
        self.net, self.click_executor = net, click_executor
        self.clicks, self.loss = clicks, loss
        self.bf16 = bf16
        self.checkpoint_decoder = checkpoint_decoder

    def _autocast(self, device: torch.device):
        return autocast_for(device, self.bf16)

    def _decode(self, features: List[torch.Tensor], points: torch.Tensor, labels: torch.Tensor,
                mask_prompt: Optional[torch.Tensor]) -> torch.Tensor:
        with self._autocast(points.device):
            if self.checkpoint_decoder and torch.is_grad_enabled():
                probability, _ = torch.utils.checkpoint.checkpoint(
                    self.net.decode, features, points, labels, mask_prompt, use_reentrant=False
                )
            else:
                probability, _ = self.net.decode(features, points, labels, mask_prompt)
        return probability

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        with self._autocast(images.device):
            features = self.net.encode(images)
        user = SimulatedUser(masks, self.clicks.max_clicks, self.click_executor)
        losses = []
        first_probability = probability = None
        for probability in interactive_predictions(self._decode, features, user, self.clicks.iterations):
            losses.append(mask_loss(probability, masks, self.loss))
            if first_probability is None:
                first_probability = probability.detach()
        per_sample = torch.stack(losses).mean(dim=0)
        mask_term = per_sample.mean()
        cross_term = torch.zeros((), device=images.device)
        if self.loss.cross_patch:
            binary = (probability.detach() > MASK_THRESHOLD).to(images.dtype)
            with self._autocast(images.device):
                # heatmaps[i] predicts the prompt of patch i's neighbour, so it is compared with the
                # neighbour's target.
                heatmaps = self.net.cross_patch(images, binary, swap_pairs(images))
            targets = swap_pairs(user.first_click_maps(images.device))
            cross_term = heatmap_loss(heatmaps, targets).mean()
        total = mask_term + self.loss.cross_patch_weight * cross_term
        return {
            "loss": total,
            "mask_loss": mask_term.detach(),
            "cross_patch_loss": cross_term.detach(),
            "dice": dice_score(probability.detach() > MASK_THRESHOLD, masks).mean(),
            "dice_first": dice_score(first_probability > MASK_THRESHOLD, masks).mean(),
        }
