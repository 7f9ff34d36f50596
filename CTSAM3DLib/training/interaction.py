"""Iterative click simulation on a batch of patches, shared by training and validation.

The simulated user is `CTSAM3DLib.simulated_annotator` (the one the evaluation protocol uses): the first click
goes to the structure's most interior voxel, each later one into the largest current error region
(positive where the structure was missed, negative where too much was taken). It runs on the CPU
on the binarised prediction (SimpleITK's filters), one patch after the other or, given an executor
(a process pool), all patches of the batch at once; everything else stays on the network's device.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..constants import LATTICE_SPACING_MM, MASK_THRESHOLD
from ..model.prompt import click_maps
from ..simulated_annotator import SimulatedClick, first_click, next_click

SPACING_ZYX = (LATTICE_SPACING_MM,) * 3
PADDING_LABEL = -1

Decoder = Callable[[List[torch.Tensor], torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _first_click_or_none(reference: np.ndarray) -> Optional[SimulatedClick]:
    return first_click(reference, SPACING_ZYX) if reference.any() else None


def _next_click_or_none(prediction: np.ndarray, reference: np.ndarray, wanted: bool) -> Optional[SimulatedClick]:
    return next_click(prediction, reference, SPACING_ZYX) if wanted else None


class SimulatedUser:
    """Clicks of a batch of patches: ``points`` (x, y, z) patch voxels and labels (1, 0, -1 padding).

    ``executor``: where to compute the patches' clicks in parallel (e.g. a process pool); the clicks
    are the same with or without one.
    """

    def __init__(self, references: torch.Tensor, max_clicks: int, executor: Optional[Executor] = None) -> None:
        """references: (B,1,64,64,64) 0/1 masks of the structure in each patch."""
        self.references = references[:, 0].detach().cpu().numpy() > MASK_THRESHOLD
        self.max_clicks = max_clicks
        self.executor = executor
        self.points: List[List[Tuple[float, float, float]]] = [[] for _ in range(len(self.references))]
        self.labels: List[List[int]] = [[] for _ in range(len(self.references))]

    def _append(self, sample: int, click: Optional[SimulatedClick]) -> None:
        if click is None or len(self.points[sample]) >= self.max_clicks:
            self.points[sample].append((0.0, 0.0, 0.0))
            self.labels[sample].append(PADDING_LABEL)
            return
        z, y, x = click.index_zyx
        self.points[sample].append((float(x), float(y), float(z)))
        self.labels[sample].append(1 if click.positive else 0)

    def _append_all(self, function: Callable, *arguments) -> None:
        """Append ``function(*arguments[i])`` (a click or None) to patch i, for every patch."""
        if self.executor is None or len(self.references) == 1:
            clicks = list(map(function, *arguments))
        else:
            clicks = list(self.executor.map(function, *arguments))
        for sample, click in enumerate(clicks):
            self._append(sample, click)

    def add_first_clicks(self) -> None:
        """One positive click per patch at its structure's most interior voxel (padding if absent)."""
        self._append_all(_first_click_or_none, list(self.references))

    def add_next_clicks(self, probability: torch.Tensor) -> None:
        """One click per patch into the largest error region of ``probability`` (B,1,64^3) > 0.5
        (padding where the prediction is already exact or the patch has all its clicks)."""
        predictions = (probability[:, 0] > MASK_THRESHOLD).cpu().numpy()
        wanted = [sum(label != PADDING_LABEL for label in labels) < self.max_clicks for labels in self.labels]
        self._append_all(_next_click_or_none, list(predictions), list(self.references), wanted)

    def tensors(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """points (B,N,3) float32 and labels (B,N) int64 on ``device``."""
        points = torch.tensor(np.asarray(self.points, dtype=np.float32), device=device)
        labels = torch.tensor(np.asarray(self.labels, dtype=np.int64), device=device)
        return points, labels

    def first_click_maps(self, device: torch.device) -> torch.Tensor:
        """(B,1,64^3): the positive click map of each patch's first click, the map the network would
        be prompted with for that structure (zeros for a patch without the structure). These are
        the cross-patch heatmap targets."""
        points, labels = self.tensors(device)
        return click_maps(points[:, :1], labels[:, :1])[:, :1]


def interactive_predictions(
    decode: Decoder, features: List[torch.Tensor], user: SimulatedUser, iterations: int
) -> Iterator[torch.Tensor]:
    """Yield the probability (B,1,64^3, float32) after each of ``iterations`` clicks. The first
    pass has the first clicks and no mask prompt; each later pass adds the user's next click and
    feeds the previous probability back, detached, as the mask prompt."""
    device = features[0].device
    user.add_first_clicks()
    previous: Optional[torch.Tensor] = None
    for iteration in range(iterations):
        points, labels = user.tensors(device)
        probability = decode(features, points, labels, previous).to(torch.float32)
        yield probability
        previous = probability.detach()
        if iteration + 1 < iterations:
            user.add_next_clicks(previous)
