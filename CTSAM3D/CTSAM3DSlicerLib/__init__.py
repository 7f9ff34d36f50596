"""Slicer glue of the CT-SAM3D extension: geometry, prompts, logic, worker thread, weights, dependencies.

Everything here calls CTSAM3DLib for the network and the session; nothing runs at import time.
"""
