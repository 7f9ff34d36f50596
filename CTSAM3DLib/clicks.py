"""Deprecated name of ``CTSAM3DLib.simulated_annotator`` (the simulated user of the evaluation and of
training), kept so that code importing it keeps working; it will be removed in a later release."""

import warnings

from .simulated_annotator import (  # noqa: F401  (re-exported)
    SimulatedClick,
    first_click,
    index_to_lps,
    interior_point,
    next_click,
    squared_distance_to_background,
)

warnings.warn("CTSAM3DLib.clicks is now CTSAM3DLib.simulated_annotator", DeprecationWarning, stacklevel=2)
