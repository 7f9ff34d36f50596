"""Stand-in networks for the tests and benchmarks of everything around the network.

`InteractiveSession` talks to a network only through ``encode``/``decode`` (and ``cross_patch``),
the interface of ``CTSAM3DLib.interface`` that ``CTSAM3DLib.model.CTSAM3D`` implements, so these small
objects let tests check geometry, undo and bookkeeping exactly, where the real network's output would be
arbitrary, and let benchmarks time a session's or a server's own work.
"""

import threading
import time
import weakref
from typing import List, Optional

import torch

from CTSAM3DLib.interface import CrossPatchNetwork, PromptableNetwork


def voxel_grid(size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """(size, size, size, 3) float32: each voxel's (z, y, x) index."""
    axis = torch.arange(size, dtype=torch.float32, device=device)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)


def ball_around(grid: torch.Tensor, point_xyz: torch.Tensor, radius: float) -> torch.Tensor:
    """The voxels of ``grid`` (see ``voxel_grid``) within ``radius`` of a click at ``point_xyz`` (x, y, z)."""
    return ((grid - point_xyz.flip(-1).to(torch.float32)) ** 2).sum(-1) <= radius**2


def paint_clicks(probability: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, radius: float) -> None:
    """Sets a ball of ``radius`` voxels around every click of ``probability`` (B,1,S,S,S) in place: 1 around a
    positive click, 0 around a negative one, later clicks last; padding (label -1) is skipped."""
    grid = voxel_grid(probability.shape[-1], probability.device)
    for row in range(points.shape[0]):
        for point, label in zip(points[row], labels[row]):
            if int(label) >= 0:
                probability[row, 0][ball_around(grid, point, radius)] = float(int(label) == 1)


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

    def decode(self, features: List[torch.Tensor], points: torch.Tensor, labels: torch.Tensor,
               mask_prompt: Optional[torch.Tensor] = None):
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

    def decode(self, features: List[torch.Tensor], points: torch.Tensor, labels: torch.Tensor,
               mask_prompt: Optional[torch.Tensor] = None):
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
        grid = voxel_grid(probability.shape[-1])
        for row in range(points.shape[0]):
            for point, label in zip(points[row], labels[row]):
                if int(label) == 0:
                    probability[row, 0][ball_around(grid, point, self.carve_radius)] = 0
        return probability, quality

    def cross_patch(self, image, mask, neighbour_image):
        self.cross_patch_calls += 1
        coordinates = voxel_grid(image.shape[-1])
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
        paint_clicks(probability, points, labels, self.radius)
        return probability, torch.zeros(image.shape[0], 1, dtype=image.dtype)


class RecordingNet(ThresholdNet):
    """Remembers the prompts each decode received."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def decode(self, features, points, labels, mask_prompt=None):
        self.calls.append((points.clone(), labels.clone(), None if mask_prompt is None else mask_prompt.clone()))
        return super().decode(features, points, labels, mask_prompt)


class SlowNet(CrossPatchThresholdNet):
    """CrossPatchThresholdNet whose decoder takes at least ``decode_s`` seconds, as a real network's would: a
    job long enough to queue behind. ``started`` is set when a decode begins."""

    def __init__(self, decode_s: float) -> None:
        super().__init__()
        self.decode_s = decode_s
        self.started = threading.Event()

    def decode(self, features, points, labels, mask_prompt=None):
        self.started.set()
        time.sleep(self.decode_s)
        return super().decode(features, points, labels, mask_prompt)


class GatedNet(CrossPatchThresholdNet):
    """CrossPatchThresholdNet whose decoder waits while the test holds its gate (``hold()``, ``release()``):
    a job that stays running exactly as long as a test needs, whatever the machine's speed; ``entered`` is set
    once a decode has begun. A gate held past ``patience_s`` fails the decode, saying so."""

    def __init__(self, patience_s: float = 300.0) -> None:
        super().__init__()
        self.patience_s = patience_s
        self.entered = threading.Event()
        self._open = threading.Event()
        self._open.set()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def decode(self, features, points, labels, mask_prompt=None):
        self.entered.set()
        if not self._open.wait(self.patience_s):
            raise RuntimeError(f"the decoder's gate was held for more than {self.patience_s:g} s")
        return super().decode(features, points, labels, mask_prompt)


class WatchedNet(CrossPatchThresholdNet):
    """CrossPatchThresholdNet that keeps weak references to the features it hands out: they stay alive
    exactly as long as some session holds them."""

    def __init__(self) -> None:
        super().__init__()
        self.features: List[weakref.ref] = []

    def encode(self, image):
        features = [image.clone()]
        self.features += [weakref.ref(feature) for feature in features]
        return features


class BallNet(CrossPatchNetwork):
    """A network that costs next to nothing: the encoder hands the patch on, the decoder answers a ball of
    ``radius`` voxels around each positive click (cleared around negative ones), and cross-patch prompting
    finds nothing."""

    def __init__(self, radius: float = 10.0) -> None:
        self.radius = radius

    def encode(self, image: torch.Tensor) -> List[torch.Tensor]:
        return [image]

    def decode(self, features, points, labels, mask_prompt=None):
        probability = torch.zeros_like(features[0])
        paint_clicks(probability, points, labels, self.radius)
        return probability, torch.zeros(points.shape[0], 1)

    def cross_patch(self, image, mask, neighbour_image):
        return torch.zeros_like(image)


class InstantNetwork(PromptableNetwork):
    """A network that costs nothing (the encoder returns its input, the decoder a fixed ball), so that a
    session's time is the session's own work."""

    def __init__(self, device: torch.device) -> None:
        self.ball = ball_around(voxel_grid(64, device), torch.tensor([32.0, 32.0, 32.0], device=device), 20.0)
        self.ball = self.ball.float()[None, None]

    def encode(self, image: torch.Tensor) -> List[torch.Tensor]:
        return [image]

    def decode(self, features, points, labels, mask_prompt=None):
        batch = features[0].shape[0]
        return self.ball.expand(batch, -1, -1, -1, -1), torch.ones(batch, 1, device=self.ball.device)


class PacedNet(CrossPatchThresholdNet):
    """CrossPatchThresholdNet whose each level of cross-patch prompting first waits until the caller has seen
    as many previews as levels have begun (``seen()`` counts one): a session previews the mask before each
    level, so a test of previews shown while a click goes on does not depend on a machine's timing. A
    preview that never arrives (held back until the answer) fails the level after ``patience_s``, saying so.
    ``fail_at_level`` makes that level fail once its preview was seen (0: none does)."""

    def __init__(self, patience_s: float = 60.0, fail_at_level: int = 0) -> None:
        super().__init__()
        self.patience_s = patience_s
        self.fail_at_level = fail_at_level
        self.levels = 0
        self._seen = 0
        self._changed = threading.Condition()

    def seen(self) -> None:
        with self._changed:
            self._seen += 1
            self._changed.notify_all()

    def cross_patch(self, image, mask, neighbour_image):
        with self._changed:
            self.levels += 1
            level = self.levels
            if not self._changed.wait_for(lambda: self._seen >= level, self.patience_s):
                raise RuntimeError(f"level {level} of cross-patch prompting waited {self.patience_s:g} s for the "
                                   "preview before it to be seen")
        if level == self.fail_at_level:
            raise RuntimeError(f"the network failed at level {level}")
        return super().cross_patch(image, mask, neighbour_image)
