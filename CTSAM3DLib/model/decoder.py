"""The SPADE mask decoder: image features upsampled from 2^3 to 64^3, every scale modulated by
the prompt (mask prompt, positive click map, negative click map) through SPADE normalisation."""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

PROMPT_CHANNELS = 3
"""Mask prompt, positive click map, negative click map, in this order."""


class ChannelLayerNorm(nn.Module):
    """Layer normalisation over the channels of every voxel of (B, C, D, H, W)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(variance + self.eps)
        return self.weight.view(1, -1, 1, 1, 1) * x + self.bias.view(1, -1, 1, 1, 1)


class Upscale(nn.Module):
    """Doubles the resolution: transposed convolution, channel layer norm, GELU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.cna = nn.Sequential(
            nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2),
            ChannelLayerNorm(out_channels),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cna(x)


class SpadeNorm(nn.Module):
    """Instance normalisation whose per-voxel scale and shift are predicted from the prompt."""

    def __init__(self, channels: int, hidden: int = 128) -> None:
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Conv3d(PROMPT_CHANNELS, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv3d(hidden, channels, 3, padding=1)
        self.mlp_beta = nn.Conv3d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """x (B,C,S^3); prompt (B,3,S^3), already resized to x's grid."""
        hidden = self.mlp_shared(prompt)
        return F.instance_norm(x) * (1 + self.mlp_gamma(hidden)) + self.mlp_beta(hidden)


class SpadeResidualBlock(nn.Module):
    """Two SPADE-normalised, leaky-ReLU-activated 3x3x3 convolutions with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_0 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv_1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm_0 = SpadeNorm(channels)
        self.norm_1 = SpadeNorm(channels)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        residual = self.conv_0(F.leaky_relu(self.norm_0(x, prompt), 0.2))
        residual = self.conv_1(F.leaky_relu(self.norm_1(residual, prompt), 0.2))
        return x + residual


class QualityHead(nn.Module):
    """Three-layer perceptron on the pooled last feature map. The authors' loss never trains it."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(in_features, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, out_features)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def resize_prompt(prompt: torch.Tensor, size: Tuple[int, ...]) -> torch.Tensor:
    """The prompt (B,3,64^3) on a coarser decoder grid, as the authors resize it (trilinear,
    half-pixel centres, no anti-aliasing)."""
    return F.interpolate(prompt, size=size, mode="trilinear", align_corners=False)


class SpadeMaskDecoder(nn.Module):
    """features [(B,128,16^3), (B,128,8^3), (B,128,4^3), (B,256,2^3)] and prompt (B,3,64^3)
    -> probability (B,1,64^3), quality (B,1)."""

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        half, quarter = channels // 2, channels // 4
        for level in range(1, 5):
            self.add_module(f"upscale{level}", Upscale(channels, half))
        self.upscale5 = Upscale(half, quarter)
        for level in range(1, 5):
            self.add_module(f"spade{level}", SpadeResidualBlock(channels))
        self.spade5 = SpadeResidualBlock(half)
        # Two output channels, of which only the first is used (the authors' single-mask output).
        self.mask_prediction_head = nn.Sequential(nn.Conv3d(quarter, 2, 3, padding=1))
        self.iou_prediction_head = QualityHead(quarter, 256, 2)

    def forward(
        self, features: List[torch.Tensor], prompt: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        skips = features[-2::-1]
        x = features[-1]
        spades = (self.spade1, self.spade2, self.spade3, self.spade4, self.spade5)
        upscales = (self.upscale1, self.upscale2, self.upscale3, self.upscale4, self.upscale5)
        for level, (spade, upscale) in enumerate(zip(spades, upscales)):
            if 0 < level <= len(skips):
                x = torch.cat([x, skips[level - 1]], dim=1)
            x = upscale(spade(x, resize_prompt(prompt, tuple(x.shape[2:]))))
        head = self.mask_prediction_head[0]
        logits = F.conv3d(x, head.weight[:1], head.bias[:1], padding=1)
        quality = self.iou_prediction_head(x.mean(dim=(2, 3, 4)))[:, :1]
        return torch.sigmoid(logits), quality
