"""Training CT-SAM3D with simulated clicks and cross-patch prompting (``ctsam3d train``).

Modules: ``config`` (the declarative settings), ``cache`` (scans resampled once to the lattice),
``sampler`` and ``augment`` (which patches a step sees), ``interaction`` (the simulated user within
a step), ``losses``, ``step`` (one step's forward pass), ``validation``, ``rng``, ``distributed``
and ``trainer`` (the loop, checkpoints and resumption).
"""
