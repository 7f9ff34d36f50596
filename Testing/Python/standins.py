"""Stand-in networks for tests of everything around the network.

`InteractiveSession` talks to a network only through ``encode``/``decode`` (and ``cross_patch``),
so these small objects let tests check geometry, undo and bookkeeping exactly, where the real
network's output would be arbitrary.
"""

from typing import List, Optional

import torch


class ThresholdNet:
    """Returns its own input patch thresholded: probability 1 where the normalised intensity
    exceeds ``threshold`` (the patch is HU clipped to [-125, 225] and scaled to [0, 1])."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.encode_calls = 0
        self.decode_calls = 0

    def encode(self, image: torch.Tensor) -> List[torch.Tensor]:
        self.encode_calls += 1
        return [image]

    def decode(
        self,
        features: List[torch.Tensor],
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_prompt: Optional[torch.Tensor] = None,
    ):
        self.decode_calls += 1
        image = features[0]
        probability = (image > self.threshold).to(image.dtype)
        return probability, torch.zeros(image.shape[0], 1, dtype=image.dtype, device=image.device)
