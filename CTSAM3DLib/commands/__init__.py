"""Subcommands of the ``ctsam3d`` command line."""
