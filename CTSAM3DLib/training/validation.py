"""Validation with the simulated-click protocol, on patches of the held-out cases.

Each held-out structure gets a fixed patch centred on its most interior lattice voxel (and, when
``patches_per_structure`` > 1, further patches centred on voxels drawn with a fixed seed); the
simulated user clicks ``validation.clicks`` times and the Dice inside the patch is recorded after
every click. This is a patch-level check of learning; the whole-scan protocol (where the session
moves and joins patches) belongs to the evaluation command.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..constants import MASK_THRESHOLD
from ..preprocess import normalize_hu
from ..simulated_annotator import interior_point
from .augment import cut_patch
from .cache import CachedCase
from .config import DataConfig, ValidationConfig
from .interaction import SPACING_ZYX, SimulatedUser, interactive_predictions
from .losses import dice_score
from .step import autocast_for


@dataclass
class ValidationPatch:
    case: str
    structure: str
    image: torch.Tensor
    """(1,64,64,64) float32 in [0, 1]"""
    mask: torch.Tensor
    """(1,64,64,64) float32 0/1"""


def validation_patches(
    cases: Sequence[CachedCase], data: DataConfig, validation: ValidationConfig, seed: int
) -> List[ValidationPatch]:
    """The fixed validation patches of ``cases`` (deterministic given ``seed``)."""
    wanted = set(data.structures)
    patches = []
    for case_index, case in enumerate(cases):
        names = sorted(
            name for name, entry in case.structures.items()
            if (not wanted or name in wanted) and entry.voxels >= data.min_structure_voxels
        )[: validation.max_structures_per_case]
        for structure_index, name in enumerate(names):
            entry = case.structures[name]
            box = case.structure_box(name)
            centres = [np.asarray(interior_point(box != 0, SPACING_ZYX)) + entry.start]
            if validation.patches_per_structure > 1:
                rng = np.random.default_rng([seed, 2, case_index, structure_index])
                voxels = np.flatnonzero(box)
                for flat in rng.choice(voxels, size=validation.patches_per_structure - 1):
                    centres.append(np.asarray(np.unravel_index(flat, entry.shape)) + entry.start)
            for centre in centres:
                hounsfield, mask = cut_patch(case, name, tuple(int(v) for v in centre))
                patches.append(
                    ValidationPatch(case.name, name, torch.from_numpy(normalize_hu(hounsfield.numpy()))[None],
                                    mask[None].to(torch.float32))
                )
    return patches


@torch.no_grad()
def evaluate_patches(
    net: nn.Module, patches: Sequence[ValidationPatch], clicks: int, device: torch.device,
    batch_size: int = 4, bf16: bool = True, click_executor: Optional[Executor] = None,
) -> np.ndarray:
    """Dice (len(patches), clicks) after each simulated click, with ``net`` in eval mode
    (its training mode is restored afterwards)."""
    was_training = net.training
    net.eval()

    def decode(features, points, labels, mask_prompt):
        with autocast_for(device, bf16):
            return net.decode(features, points, labels, mask_prompt)[0]

    scores = np.zeros((len(patches), clicks), dtype=np.float64)
    try:
        for start in range(0, len(patches), batch_size):
            chunk = patches[start : start + batch_size]
            images = torch.stack([p.image for p in chunk]).to(device)
            masks = torch.stack([p.mask for p in chunk]).to(device)
            with autocast_for(device, bf16):
                features = net.encode(images)
            user = SimulatedUser(masks, clicks, click_executor)
            for click, probability in enumerate(interactive_predictions(decode, features, user, clicks)):
                dice = dice_score(probability > MASK_THRESHOLD, masks)
                scores[start : start + len(chunk), click] = dice.cpu().numpy()
    finally:
        net.train(was_training)
    return scores
