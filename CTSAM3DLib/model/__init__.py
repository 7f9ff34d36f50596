"""The CT-SAM3D network: ResT-V2 encoder, click-map prompts, SPADE decoder, cross-patch U-Net."""

from __future__ import annotations

from .encoder import ENCODER_VARIANTS
from .network import CTSAM3D

VARIANTS = tuple(ENCODER_VARIANTS)


def build_model(variant: str = "tiny") -> CTSAM3D:
    """A CT-SAM3D network of the given encoder size ("tiny", "small", "base" or "large"),
    randomly initialised, in eval mode."""
    if variant not in ENCODER_VARIANTS:
        raise ValueError(f"unknown CT-SAM3D variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return CTSAM3D(ENCODER_VARIANTS[variant]).eval()


__all__ = ["CTSAM3D", "VARIANTS", "build_model"]
