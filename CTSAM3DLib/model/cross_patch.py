"""The cross-patch prompt (CPP) network: a residual 3D U-Net (the layout of MONAI's ``UNet`` with
channels 16-32-64-128-256, stride 2 at every level, two residual units, instance norm and PReLU),
rebuilt here with the same parameter names so the authors' weights load into it.

Input (B,3,64^3): patch image, its binarised mask, the neighbouring patch's image.
Output (B,1,64^3): the raw heatmap that prompts the same structure in the neighbour.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class NormAct(nn.Sequential):
    """Instance norm ("N") then PReLU ("A"), named as MONAI's ADN block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.add_module("N", nn.InstanceNorm3d(channels))
        self.add_module("A", nn.PReLU())


class ConvLayer(nn.Module):
    """A 3x3x3 convolution (transposed when upsampling), optionally followed by norm and activation."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, transposed: bool = False, conv_only: bool = False
    ) -> None:
        super().__init__()
        if transposed:
            self.conv = nn.ConvTranspose3d(
                in_channels, out_channels, 3, stride=stride, padding=1, output_padding=stride - 1
            )
        else:
            self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.adn = None if conv_only else NormAct(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.adn is None else self.adn(x)


class ResidualUnit(nn.Module):
    """``units`` convolution layers (the first strided) plus a shortcut: identity when the shape is
    kept, else a convolution (1x1x1 when not strided)."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, units: int, last_conv_only: bool = False
    ) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        channels = in_channels
        for index in range(units):
            conv_only = last_conv_only and index == units - 1
            layer = ConvLayer(channels, out_channels, stride if index == 0 else 1, conv_only=conv_only)
            self.conv.add_module(f"unit{index}", layer)
            channels = out_channels
        if stride != 1 or in_channels != out_channels:
            kernel = 3 if stride != 1 else 1
            self.residual = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
        else:
            self.residual = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.residual(x)


class SkipConnection(nn.Module):
    """Concatenates the input with what the inner levels make of it."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


def _level(
    in_channels: int, out_channels: int, channels: Sequence[int], is_top: bool, res_units: int
) -> nn.Sequential:
    """One U-Net level: down, skip around the deeper levels, up."""
    width = channels[0]
    if len(channels) > 2:
        inner = _level(width, width, channels[1:], False, res_units)
        up_in = 2 * width
    else:
        inner = ResidualUnit(width, channels[1], 1, res_units)
        up_in = width + channels[1]
    down = ResidualUnit(in_channels, width, 2, res_units)
    up = nn.Sequential(
        ConvLayer(up_in, out_channels, 2, transposed=True),
        ResidualUnit(out_channels, out_channels, 1, 1, last_conv_only=is_top),
    )
    return nn.Sequential(down, SkipConnection(inner), up)


class CrossPatchUNet(nn.Module):
    """(B,3,64^3) -> (B,1,64^3) raw heatmap."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        res_units: int = 2,
    ) -> None:
        super().__init__()
        self.model = _level(in_channels, out_channels, channels, True, res_units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
