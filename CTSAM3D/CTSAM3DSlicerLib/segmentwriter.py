"""Puts a prediction (a CTSAM3DLib ``MaskUpdate`` and its session) into a segment through the Segment
Editor, so that masking, overwrite and the editor's undo apply as for any other effect.

Only the box of voxels a prediction changed is written (Slicer's cost grows with the extent written) when
the segment still holds what the session's mask was before; otherwise the whole mask is Set."""

from typing import Dict, Optional, Tuple

import numpy as np
import slicer

from CTSAM3DSlicerLib.coordinates import (
    nodeToWorldMatrix,
    segmentOnVolumeGrid,
    updateExtent,
    writeMaskIntoOrientedImage,
    writeValuesIntoExtent,
)
from CTSAM3DSlicerLib.segmentprompts import sameNode

SegmentKey = Tuple[str, str]
"""(segmentation node ID, segment ID)."""


class _StartMask:
    """A start mask (a SimpleITK image or None) compared by identity, so that a copy with equal voxels
    taken later never passes for it."""

    def __init__(self, mask) -> None:
        self.mask = mask

    def __eq__(self, other) -> bool:
        return isinstance(other, _StartMask) and other.mask is self.mask


class SegmentWriter:
    """Writes predictions into segments through ``scriptedEffect`` (the editor's effect adaptor), and
    remembers per segment where its session started and what the segment held after the last write."""

    def __init__(self, scriptedEffect) -> None:
        self.scriptedEffect = scriptedEffect
        self._startMasks: Dict[SegmentKey, object] = {}
        """The segment's content when prompting began (or None: empty)."""
        self._holds: Dict[SegmentKey, tuple] = {}
        """(what the segment held then: the start mask object or the number of the session that wrote it
        last, the segment's labelmap, its modified time)."""

    def forget(self, key: Optional[SegmentKey] = None) -> None:
        """Forget the start of one segment (prompting begins again from what it holds), or of all."""
        if key is None:
            self._startMasks.clear()
            self._holds.clear()
        else:
            self._startMasks.pop(key, None)

    def startMask(self, segmentationNode, segmentId: str, volumeNode):
        """What the segment held when prompting began, on the volume's grid (taken the first time)."""
        key = (segmentationNode.GetID(), segmentId)
        if key not in self._startMasks:
            self._startMasks[key] = segmentOnVolumeGrid(segmentationNode, segmentId, volumeNode)
            self._holds[key] = (_StartMask(self._startMasks[key]), *self._segmentState(segmentationNode, segmentId))
        return self._startMasks[key]

    def write(self, prediction, segmentationNode, segmentId: str, volumeNode, initialMask=None) -> None:
        """Write ``prediction`` into the segment, with one undo state.

        Only its update's box is written (Remove the box, then Add the mask there: a Set would clear the
        segment outside the box) when the segment still holds what the session's mask was before (the start
        mask the session began from, or this session's last write: nobody changed the segment since, by Undo
        or another effect), its voxels are the volume's, and it is the selected segment (Python can pass an
        extent only there: the other overload takes ``const int[6]``). Otherwise the whole mask is Set."""
        key = (segmentationNode.GetID(), segmentId)
        held = self._holds.get(key)
        labelmap, modifiedTime = self._segmentState(segmentationNode, segmentId)
        unchanged = held is not None and held[1] is labelmap and held[2] == modifiedTime and (
            held[0] == _StartMask(initialMask) if prediction.newSession else held[0] == prediction.session)
        modifier = self._modifierLabelmap(segmentationNode, segmentId)
        extent = None
        if unchanged and self._mayWriteOnlyTheBox(segmentationNode, segmentId):
            if prediction.update.empty:
                self._holds[key] = (prediction.session, labelmap, modifiedTime)
                return
            extent = updateExtent(modifier, nodeToWorldMatrix(segmentationNode), volumeNode, prediction.update)
        if extent is None:
            self._setWhole(prediction.wholeMask(), modifier, segmentationNode, segmentId)
        else:
            modes = slicer.qSlicerSegmentEditorAbstractEffect
            self.scriptedEffect.saveStateForUndo()
            writeValuesIntoExtent(np.ones_like(prediction.update.mask), modifier, extent)
            self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier, modes.ModificationModeRemove, extent)
            writeValuesIntoExtent(prediction.update.mask, modifier, extent)
            self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier, modes.ModificationModeAdd, extent)
        self._holds[key] = (prediction.session, *self._segmentState(segmentationNode, segmentId))

    def _mayWriteOnlyTheBox(self, segmentationNode, segmentId: str) -> bool:
        """Whether Remove + Add of a box may write this segment. Not when it is not the selected one, and not
        with "inside a single segment" masking: Slicer adds what a Remove takes from the edited segment to
        the mask segment (vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap; qSlicerSegmentEditorAbstract
        Effect.cxx:637-650 @v5.8.1), which would move the segment's old voxels inside the box into it."""
        parameterNode = self.scriptedEffect.parameterSetNode()
        return (
            sameNode(segmentationNode, parameterNode.GetSegmentationNode())
            and segmentId == parameterNode.GetSelectedSegmentID()
            and parameterNode.GetMaskMode() != slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment
        )

    def _setWhole(self, mask, modifier, segmentationNode, segmentId: str) -> None:
        """Replace the segment by ``mask`` (world LPS), with an undo state."""
        writeMaskIntoOrientedImage(mask, modifier, nodeToWorldMatrix(segmentationNode))
        self.scriptedEffect.saveStateForUndo()
        modeSet = slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet
        self.scriptedEffect.modifySegmentByLabelmap(segmentationNode, segmentId, modifier, modeSet)

    @staticmethod
    def _segmentState(segmentationNode, segmentId: str):
        """(the segment's binary labelmap object, its modified time): changes whenever anything writes it."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        labelmap = None if segment is None else segment.GetRepresentation(
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        return labelmap, (0 if labelmap is None else labelmap.GetMTime())

    def _modifierLabelmap(self, segmentationNode, segmentId: str):
        if segmentationNode.GetScene() is None or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            raise ValueError("the segment was removed while it was being segmented")
        modifier = self.scriptedEffect.defaultModifierLabelmap()
        if modifier is None:
            raise ValueError(
                "the Segment Editor has no labelmap to write into (the segmentation has no reference "
                "geometry): select the source volume again in the Segment Editor"
            )
        return modifier
