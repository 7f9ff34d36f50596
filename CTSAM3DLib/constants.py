"""Fixed settings of the authors' CT-SAM3D pipeline (their checkpoint was trained with these)."""

PATCH_SIZE = 64
"""Edge of the cubic network input, in lattice voxels."""

LATTICE_SPACING_MM = 1.5
"""Spacing of the axis-aligned lattice that patches are cut from."""

HU_WINDOW = (-125.0, 225.0)
"""Hounsfield units clipped to this window and mapped linearly to [0, 1]."""

OUTSIDE_HU = -1024.0
"""Value of lattice voxels that fall outside the scan."""

MASK_THRESHOLD = 0.5
CLICK_SIGMA = 2.0
CLICK_RADIUS = 8
MAX_CLICKS = 24

MAX_OPEN_PATCHES = 16
"""Default cap on the patches one segmentation may open through cross-patch prompting."""
