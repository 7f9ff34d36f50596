"""Stand-in networks for tests of everything around the network.

`InteractiveSession` talks to a network only through ``encode``/``decode`` (and ``cross_patch``),
so these small objects let tests check geometry, undo and bookkeeping exactly, where the real
network's output would be arbitrary.
"""

from typing import List, Optional

import torch

from CTSAM3DLib.interface import CrossPatchNetwork, PromptableNetwork


class ThresholdNet(PromptableNetwork):
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


class TrainableStandIn(torch.nn.Module):
    """A small trainable network with CT-SAM3D's ``encode``/``decode``/``cross_patch`` signatures.

    A few thousand parameters instead of 74 million, working at half resolution (32^3), so
    training tests run in seconds on a CPU. Its decoder sees the image features, the mask prompt
    and the real click maps (the network's own `click_maps`), so it can learn from clicks; its
    quality head is computed but never trained, as in the real network (distributed training must
    cope with unused parameters). Features: [(B,C,32^3) image features]. ``dropout`` > 0 makes
    training draw from torch's global generator (for tests of resumption).
    """

    def __init__(self, channels: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = torch.nn.Dropout3d(dropout)
        from CTSAM3DLib.model.prompt import click_maps

        self._click_maps = click_maps
        conv = torch.nn.Conv3d
        self.image_encoder = torch.nn.Sequential(conv(1, channels, 3, stride=2, padding=1), torch.nn.ReLU())
        self.mask_decoder = torch.nn.Sequential(
            conv(channels + 3, channels, 3, padding=1),
            torch.nn.ReLU(),
            conv(channels, channels, 3, padding=1),
            torch.nn.ReLU(),
        )
        # The head also sees the prompt itself, so that following clicks is quick to learn.
        self.mask_head = conv(channels + 3, 1, 3, padding=1)
        self.quality_head = torch.nn.Linear(channels, 1)
        self.cpp_predictor = torch.nn.Sequential(conv(3, 4, 3, padding=1), torch.nn.ReLU(), conv(4, 1, 3, padding=1))

    @staticmethod
    def _half(volume: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool3d(volume, 2)

    @staticmethod
    def _double(volume: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(volume, scale_factor=2, mode="trilinear", align_corners=False)

    def encode(self, image: torch.Tensor) -> List[torch.Tensor]:
        return [self.image_encoder(image)]

    def decode(
        self,
        features: List[torch.Tensor],
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_prompt: Optional[torch.Tensor] = None,
    ):
        maps = self._click_maps(points, labels).to(features[0].dtype)
        if mask_prompt is None:
            mask_prompt = torch.zeros_like(maps[:, :1])
        prompt = self._half(torch.cat([mask_prompt.to(maps.dtype), maps], dim=1))
        hidden = self.dropout(self.mask_decoder(torch.cat([features[0], prompt], dim=1)))
        probability = torch.sigmoid(self._double(self.mask_head(torch.cat([hidden, prompt], dim=1))))
        return probability, self.quality_head(hidden.mean(dim=(2, 3, 4)))

    def cross_patch(self, image: torch.Tensor, mask: torch.Tensor, neighbour_image: torch.Tensor) -> torch.Tensor:
        inputs = self._half(torch.cat([image, mask.to(image.dtype), neighbour_image], dim=1))
        return self._double(self.cpp_predictor(inputs))


class CrossPatchThresholdNet(ThresholdNet, CrossPatchNetwork):
    """ThresholdNet that honours negative clicks (it clears a ball of ``carve_radius`` voxels around
    each) and has an oracle cross-patch model: the heatmap is a unit Gaussian (sigma 2 voxels) at
    the centroid of the neighbour's bright voxels, or zero when the neighbour has none."""

    def __init__(self, threshold: float = 0.5, carve_radius: float = 6.0) -> None:
        super().__init__(threshold)
        self.carve_radius = carve_radius
        self.cross_patch_calls = 0
        self.decoded_batches: List[int] = []

    def decode(self, features, points, labels, mask_prompt=None):
        probability, quality = super().decode(features, points, labels, mask_prompt)
        self.decoded_batches.append(probability.shape[0])
        size = probability.shape[-1]
        grid = torch.stack(torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij"), dim=-1)
        for row in range(points.shape[0]):
            for point, label in zip(points[row], labels[row]):
                if int(label) == 0:
                    centre_zyx = point.flip(-1).to(torch.float32)
                    ball = ((grid - centre_zyx) ** 2).sum(-1) <= self.carve_radius**2
                    probability[row, 0][ball] = 0
        return probability, quality

    def cross_patch(self, image, mask, neighbour_image):
        self.cross_patch_calls += 1
        size = image.shape[-1]
        coordinates = torch.stack(
            torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij"), dim=-1
        )
        heatmaps = torch.zeros_like(image)
        for row in range(image.shape[0]):
            bright = neighbour_image[row, 0] > self.threshold
            if not bright.any():
                continue
            centroid = coordinates[bright].mean(dim=0)
            squared = ((coordinates - centroid) ** 2).sum(-1)
            heatmaps[row, 0] = torch.exp(-squared / 8.0)
        return heatmaps


class PromptFollowingNet(CrossPatchThresholdNet):
    """Returns its mask prompt (the previous mask) with a ball of ``radius`` voxels added around each
    positive click and cleared around each negative one, later clicks last: a network that edits what it
    is given, for tests of starting from an existing mask. Cross-patch: CrossPatchThresholdNet's oracle."""

    def __init__(self, radius: float = 5.0) -> None:
        super().__init__()
        self.radius = radius
        self.prompts: List[Optional[torch.Tensor]] = []

    def decode(self, features, points, labels, mask_prompt=None):
        self.decode_calls += 1
        self.prompts.append(None if mask_prompt is None else mask_prompt.clone())
        image = features[0]
        probability = torch.zeros_like(image) if mask_prompt is None else mask_prompt.clone().to(image.dtype)
        size = image.shape[-1]
        grid = torch.stack(torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij"), dim=-1)
        for row in range(points.shape[0]):
            for point, label in zip(points[row], labels[row]):
                if int(label) < 0:
                    continue
                ball = ((grid - point.flip(-1).to(torch.float32)) ** 2).sum(-1) <= self.radius**2
                probability[row, 0][ball] = float(int(label) == 1)
        return probability, torch.zeros(image.shape[0], 1, dtype=image.dtype)
