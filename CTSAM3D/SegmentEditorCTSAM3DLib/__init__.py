"""Segment Editor effect "CT-SAM3D" (imported before registration so Slicer finds the class here)."""

from SegmentEditorCTSAM3DLib.SegmentEditorEffect import SegmentEditorEffect

__all__ = ["SegmentEditorEffect"]
