"""The whole CT-SAM3D network, with the authors' submodule names."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .cross_patch import CrossPatchUNet
from .decoder import SpadeMaskDecoder
from .encoder import EncoderConfig, ResTV2Encoder
from .prompt import ClickMapEncoder


class CTSAM3D(nn.Module):
    """Image encoder, click-map prompt encoder, SPADE mask decoder and cross-patch U-Net.

    The encoder runs once per patch; the decoder runs for every click with the cached features.
    """

    def __init__(self, encoder_config: EncoderConfig) -> None:
        super().__init__()
        self.encoder_config = encoder_config
        self.image_encoder = ResTV2Encoder(encoder_config)
        self.prompt_encoder = ClickMapEncoder()
        self.mask_decoder = SpadeMaskDecoder(encoder_config.out_channels)
        self.cpp_predictor = CrossPatchUNet()

    def encode(self, image: torch.Tensor) -> List[torch.Tensor]:
        """image (B,1,64,64,64) in [0,1] -> [(B,128,16^3), (B,128,8^3), (B,128,4^3), (B,256,2^3)]."""
        return self.image_encoder(image)

    def decode(self, features: List[torch.Tensor], points: torch.Tensor, labels: torch.Tensor,
               mask_prompt: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """features from ``encode``; points (B,N,3) float (x, y, z) patch voxel indices;
        labels (B,N) (1 positive, 0 negative, -1 padding); mask_prompt (B,1,64^3) previous
        probability or None -> probability (B,1,64^3) in [0,1], quality (B,1)."""
        return self.mask_decoder(features, self.decoder_prompt(points, labels, mask_prompt, features[0].dtype))

    def decoder_prompt(
        self,
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_prompt: Optional[torch.Tensor],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The decoder's prompt (B,3,64^3) in ``dtype``: mask prompt (zeros when None), positive
        and negative click maps."""
        maps = self.prompt_encoder(points, labels).to(dtype)
        if mask_prompt is None:
            mask_prompt = torch.zeros_like(maps[:, :1])
        return torch.cat([mask_prompt.to(maps.dtype), maps], dim=1)

    def cross_patch(
        self, image: torch.Tensor, mask: torch.Tensor, neighbour_image: torch.Tensor
    ) -> torch.Tensor:
        """image, mask (binary, float) and neighbour_image, each (B,1,64^3) -> raw heatmap (B,1,64^3)."""
        return self.cpp_predictor(torch.cat([image, mask.to(image.dtype), neighbour_image], dim=1))
