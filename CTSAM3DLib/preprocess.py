"""Intensity preprocessing of the authors' pipeline."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from .constants import HU_WINDOW

Volume = TypeVar("Volume", np.ndarray, torch.Tensor)


def normalize_hu(hounsfield: Volume) -> Volume:
    """Hounsfield units clipped to the window [-125, 225] and mapped linearly to [0, 1] (float32); a
    tensor stays on its device."""
    low, high = HU_WINDOW
    if isinstance(hounsfield, torch.Tensor):
        return (hounsfield.to(torch.float32).clamp(low, high) - low) / (high - low)
    return ((np.clip(hounsfield.astype(np.float32), low, high) - low) / (high - low)).astype(np.float32)
