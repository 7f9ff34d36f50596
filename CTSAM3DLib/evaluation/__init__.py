"""Evaluation of click-driven segmentation: metrics, the simulated-click protocol, the classical
region-growing baseline, and the report, CSV and plots of ``ctsam3d evaluate``."""

from .baseline import RegionGrowingSession
from .metrics import Scores, dice, score, surface_scores
from .protocol import ClickRecord, ClickSegmenter, run_clicks

__all__ = [
    "ClickRecord",
    "ClickSegmenter",
    "RegionGrowingSession",
    "Scores",
    "dice",
    "run_clicks",
    "score",
    "surface_scores",
]
