"""ResT-V2 image encoder, in 3D (Zhang & Yang, "ResT V2", adapted to CT by the CT-SAM3D authors).

A convolutional stem and three strided patch embeddings build a 4-level pyramid; each level runs
transformer blocks whose keys and values come from a spatially reduced copy of the tokens, and
whose value map is upsampled back and added to the attention output. Four 1x1x1 convolutions
("channel mappers") give the decoder its skip features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EncoderConfig:
    """Widths, depths and heads of one ResT-V2 size."""

    embed_dims: Tuple[int, int, int, int]
    depths: Tuple[int, int, int, int]
    num_heads: Tuple[int, int, int, int] = (1, 2, 4, 8)
    reduction_ratios: Tuple[int, int, int, int] = (8, 4, 2, 1)
    out_channels: int = 256


ENCODER_VARIANTS = {
    "tiny": EncoderConfig(embed_dims=(96, 192, 384, 768), depths=(1, 2, 6, 2)),
    "small": EncoderConfig(embed_dims=(96, 192, 384, 768), depths=(1, 2, 12, 2)),
    "base": EncoderConfig(embed_dims=(96, 192, 384, 768), depths=(1, 3, 16, 3)),
    "large": EncoderConfig(
        embed_dims=(128, 256, 512, 1024), depths=(2, 3, 16, 2), num_heads=(2, 4, 8, 16)
    ),
}


class PixelAttention(nn.Module):
    """Gates every voxel by a sigmoid of a depthwise 3x3x3 convolution (positional encoding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pa_conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.pa_conv(x))


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, D*H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def to_volume(tokens: torch.Tensor, shape: Tuple[int, int, int]) -> torch.Tensor:
    """(B, D*H*W, C) -> (B, C, D, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *shape)


class PatchEmbedding(nn.Module):
    """Halves the resolution with a 3x3x3 stride-2 convolution (or ``proj``, another downsampling), then
    pixel attention and layer norm: (B,C,S^3) -> tokens at the new resolution, and that resolution."""

    def __init__(self, in_channels: int, out_channels: int, proj: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.proj = proj if proj is not None else nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=2,
                                                            padding=1)
        self.pos = PixelAttention(out_channels)
        self.norm = nn.LayerNorm(out_channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        x = self.pos(self.proj(x))
        return self.norm(to_tokens(x)), tuple(x.shape[2:])


class ConvStem(PatchEmbedding):
    """Two stride-2 conv-BN-ReLU layers and a 1x1x1 projection: (B,1,64^3) -> tokens at 16^3."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        hidden = out_channels // 2
        super().__init__(in_channels, out_channels, proj=nn.Sequential(
            nn.Conv3d(in_channels, hidden, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm3d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, kernel_size=1),
        ))


class EfficientAttention(nn.Module):
    """Multi-head attention whose keys and values come from tokens reduced by a strided
    depthwise convolution; the value map, upsampled trilinearly, is added back (ResT-V2)."""

    def __init__(self, dim: int, num_heads: int, reduction: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.reduction = reduction
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        if reduction > 1:
            self.sr = nn.Conv3d(
                dim, dim, kernel_size=reduction + 1, stride=reduction, padding=reduction // 2, groups=dim
            )
            self.sr_norm = nn.LayerNorm(dim, eps=1e-6)
        self.up_norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C/heads)."""
        batch, count, channels = tokens.shape
        return tokens.reshape(batch, count, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, shape: Tuple[int, int, int]) -> torch.Tensor:
        """tokens (B, D*H*W, C) at grid ``shape`` -> (B, D*H*W, C)."""
        batch, count, channels = tokens.shape
        context = tokens
        if self.reduction > 1:
            context = self.sr_norm(to_tokens(self.sr(to_volume(tokens, shape))))
        key, value = self.kv(context).chunk(2, dim=-1)
        query, key, value = self._split_heads(self.q(tokens)), self._split_heads(key), self._split_heads(value)
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(1, 2).reshape(batch, count, channels)

        reduced_shape = tuple(size // self.reduction for size in shape)
        value_map = value.transpose(2, 3).reshape(batch, channels, *reduced_shape)
        value_map = F.interpolate(value_map, size=shape, mode="trilinear", align_corners=False)
        return self.proj(attended + self.up_norm(to_tokens(value_map)))


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: attention then feed-forward, each with a residual connection."""

    def __init__(self, dim: int, num_heads: int, reduction: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientAttention(dim, num_heads, reduction)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim)

    def forward(self, tokens: torch.Tensor, shape: Tuple[int, int, int]) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens), shape)
        return tokens + self.mlp(self.norm2(tokens))


class ResTV2Encoder(nn.Module):
    """image (B,1,64,64,64) in [0,1] -> [(B,128,16^3), (B,128,8^3), (B,128,4^3), (B,256,2^3)]."""

    def __init__(self, config: EncoderConfig, in_channels: int = 1) -> None:
        super().__init__()
        dims = config.embed_dims
        self.stem = ConvStem(in_channels, dims[0])
        self.patch_2 = PatchEmbedding(dims[0], dims[1])
        self.patch_3 = PatchEmbedding(dims[1], dims[2])
        self.patch_4 = PatchEmbedding(dims[2], dims[3])
        for level in range(4):
            blocks = nn.ModuleList(
                TransformerBlock(dims[level], config.num_heads[level], config.reduction_ratios[level])
                for _ in range(config.depths[level])
            )
            self.add_module(f"stage{level + 1}", blocks)
        for level in range(3):
            self.add_module(f"channel_mapper{level + 1}", nn.Conv3d(dims[level], config.out_channels // 2, 1))
        self.channel_mapper4 = nn.Conv3d(dims[3], config.out_channels, 1)

    def forward(self, image: torch.Tensor) -> List[torch.Tensor]:
        embeddings = (self.stem, self.patch_2, self.patch_3, self.patch_4)
        stages = (self.stage1, self.stage2, self.stage3, self.stage4)
        mappers = (self.channel_mapper1, self.channel_mapper2, self.channel_mapper3, self.channel_mapper4)
        features = []
        x = image
        for embed, blocks, mapper in zip(embeddings, stages, mappers):
            tokens, shape = embed(x)
            for block in blocks:
                tokens = block(tokens, shape)
            x = to_volume(tokens, shape)
            features.append(mapper(x))
        return features
