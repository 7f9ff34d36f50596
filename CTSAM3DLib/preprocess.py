"""Intensity preprocessing of the authors' pipeline."""

from __future__ import annotations

import numpy as np

from .constants import HU_WINDOW


def normalize_hu(hounsfield: np.ndarray) -> np.ndarray:
    """Hounsfield units clipped to the window [-125, 225] and mapped linearly to [0, 1] (float32)."""
    low, high = HU_WINDOW
    return ((np.clip(hounsfield.astype(np.float32), low, high) - low) / (high - low)).astype(np.float32)
