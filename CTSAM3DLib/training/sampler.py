"""Which patches a training step sees: a pure function of (seed, step, rank), so that training
resumes exactly where it stopped and every process of a distributed run draws its own patches.

The patch stream is cut into *units*: a pair of neighbouring patches (cross-patch training) or a
single patch. Unit ``u`` is drawn by a random generator seeded with ``(seed, u)`` alone. At step
``s`` process ``r`` of ``W`` takes units ``(s W + r) n .. (s W + r) n + n - 1`` with ``n`` units
per process and step, so the union over processes of one step is exactly what a single process
with ``W`` times the batch would take: the distributed gradient equals the single-process one.

Balance: units are grouped into *visits* of ``patches_per_volume`` patches from one scan (the
authors' 8 patches per volume). A visit draws a structure name uniformly over all names in the
training cases, then one of the cases holding it, so rare structures are drawn as often as common
ones; the visit's first unit targets that structure and its other units a structure of the same
scan drawn uniformly by name (never by volume, so small structures are not starved). A patch is
centred on a uniformly drawn voxel of its structure. The pair's second patch is, like the
neighbours the session's cross-patch prompting visits, the adjacent patch one patch step (64
voxels) away along one, two or three axes, drawn among the 26 that the structure reaches; a
structure that stays inside the first patch has no such neighbour, and its second patch is centred
on another of its voxels at least ``pair_min_offset`` voxels away per axis (else the farthest),
so that every patch holds the structure it is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..constants import PATCH_SIZE
from ..preprocess import normalize_hu
from .augment import PATCH_CENTRE, Affine, cut_patch, random_affine
from .cache import CachedCase
from .config import AugmentationConfig, DataConfig

IndexZYX = Tuple[int, int, int]


@dataclass(frozen=True)
class UnitRequest:
    """One unit to cut: its scan, structure, patch centres (lattice z, y, x) and augmentation."""

    case_index: int
    structure: str
    centres: Tuple[IndexZYX, ...]
    affine: Optional[Affine]


class PatchSampler:
    """Deterministic, class-balanced patch sampling over cached cases (see the module docstring)."""

    def __init__(
        self,
        cases: Sequence[CachedCase],
        data: DataConfig,
        augmentation: AugmentationConfig,
        seed: int,
        paired: bool,
    ) -> None:
        self.cases = list(cases)
        self.data = data
        self.augmentation = augmentation
        self.seed = int(seed)
        self.paired = paired
        self.unit_size = 2 if paired else 1
        self.units_per_visit = max(1, data.patches_per_volume // self.unit_size)
        wanted = set(data.structures)
        self.case_structures: List[List[str]] = [
            sorted(
                name
                for name, entry in case.structures.items()
                if (not wanted or name in wanted) and entry.voxels >= data.min_structure_voxels
            )
            for case in self.cases
        ]
        holders: Dict[str, List[int]] = {}
        for index, names in enumerate(self.case_structures):
            for name in names:
                holders.setdefault(name, []).append(index)
        if not holders:
            raise ValueError(
                "no structure to train on: the training cases hold none of at least "
                f"{data.min_structure_voxels} lattice voxels" + (f" among {sorted(wanted)}" if wanted else "")
            )
        self.structure_names = sorted(holders)
        self.holders = holders

    def unit(self, unit_index: int) -> UnitRequest:
        """The request for unit ``unit_index`` (same index, same request, in any process)."""
        visit = unit_index // self.units_per_visit
        visit_rng = np.random.default_rng([self.seed, 0, visit])
        visit_structure = self.structure_names[int(visit_rng.integers(len(self.structure_names)))]
        holders = self.holders[visit_structure]
        case_index = holders[int(visit_rng.integers(len(holders)))]

        rng = np.random.default_rng([self.seed, 1, unit_index])
        if unit_index % self.units_per_visit == 0:
            structure = visit_structure
        else:
            names = self.case_structures[case_index]
            structure = names[int(rng.integers(len(names)))]
        case = self.cases[case_index]
        entry = case.structures[structure]
        voxels = np.flatnonzero(case.structure_box(structure))
        coordinates = np.stack(np.unravel_index(voxels, entry.shape), axis=1) + np.asarray(entry.start)
        first = coordinates[int(rng.integers(len(coordinates)))]
        centres = [tuple(int(v) for v in first)]
        if self.paired:
            centres.append(tuple(int(v) for v in self._partner(coordinates, first, rng)))
        return UnitRequest(case_index, structure, tuple(centres), random_affine(rng, self.augmentation))

    def _partner(self, coordinates: np.ndarray, first: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Centre of the pair's second patch: an adjacent patch (one patch step along one to three
        axes, as the session's cross-patch prompting visits them) that the structure reaches, or,
        when the structure stays inside the first patch, another of its voxels (see module doc)."""
        steps = np.floor_divide(coordinates - first + PATCH_CENTRE, PATCH_SIZE)
        reached = np.unique(steps[(np.abs(steps) <= 1).all(axis=1) & (steps != 0).any(axis=1)], axis=0)
        if len(reached):
            return first + PATCH_SIZE * reached[int(rng.integers(len(reached)))]
        offsets = np.abs(coordinates - first).max(axis=1)
        candidates = np.flatnonzero(offsets >= self.data.pair_min_offset)
        if len(candidates):
            return coordinates[candidates[int(rng.integers(len(candidates)))]]
        return coordinates[int(np.argmax(offsets))]

    def cut(self, request: UnitRequest) -> Tuple[torch.Tensor, torch.Tensor]:
        """(images (n,1,64^3) float32 in [0,1], masks (n,1,64^3) float32 0/1) of one unit. An
        augmentation that would move the structure out of any of its patches is dropped."""
        case = self.cases[request.case_index]
        pivot = np.mean(np.asarray(request.centres, dtype=np.float64), axis=0)
        patches = [cut_patch(case, request.structure, c, request.affine, pivot) for c in request.centres]
        if request.affine is not None and not all(bool(mask.any()) for _, mask in patches):
            patches = [cut_patch(case, request.structure, c) for c in request.centres]
        images = torch.stack([torch.from_numpy(normalize_hu(hu.numpy())) for hu, _ in patches])[:, None]
        masks = torch.stack([mask for _, mask in patches])[:, None].to(torch.float32)
        return images, masks

    def units_for(self, step: int, rank: int, world_size: int, batch_size: int) -> List[int]:
        """Unit indices of process ``rank`` at ``step``; ``batch_size`` patches per process."""
        count = batch_size // self.unit_size
        first = (step * world_size + rank) * count
        return list(range(first, first + count))

    def batch(self, step: int, rank: int = 0, world_size: int = 1, batch_size: int = 6) -> Dict[str, torch.Tensor]:
        """{"images": (B,1,64^3), "masks": (B,1,64^3)} for process ``rank`` at ``step``; with pairs,
        patches 2k and 2k+1 are neighbours."""
        parts = [self.cut(self.unit(u)) for u in self.units_for(step, rank, world_size, batch_size)]
        return {
            "images": torch.cat([images for images, _ in parts]),
            "masks": torch.cat([masks for _, masks in parts]),
        }


class StepBatches(torch.utils.data.Dataset):
    """Map-style view of the batches of steps ``first_step ..`` for one process (for a DataLoader)."""

    def __init__(self, sampler: PatchSampler, first_step: int, last_step: int, rank: int, world_size: int,
                 batch_size: int) -> None:
        self.sampler = sampler
        self.first_step = first_step
        self.count = max(0, last_step - first_step)
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.sampler.batch(self.first_step + index, self.rank, self.world_size, self.batch_size)
