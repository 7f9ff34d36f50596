"""Shows a prediction while it grows, without touching the segment it is for.

A click that cross-patch prompting carries into many patches takes seconds on a CPU; the session previews
the mask after each breadth-first level (``CTSAM3DLib.interface.PreviewCallback``). The preview is drawn in a
temporary segmentation node over the edited segment, as Slicer's auto-complete effects draw theirs
(Modules/Loadable/Segmentations/EditorEffects/Python/SegmentEditorEffects/
AbstractScriptedSegmentEditorAutoCompleteEffect.py @v5.8.1: a separate vtkMRMLSegmentationNode, removed when
done). The edited segment itself changes once, when the prediction is complete, through the Segment Editor
(one undo step); a cancelled or failed prediction leaves it exactly as it was. Main thread only."""

import logging
from typing import Optional

import slicer

from CTSAM3DSlicerLib.coordinates import updateToOrientedImage

PREVIEW_FILL_OPACITY = 0.5
"""The preview's 2D fill: the segment under it stays visible."""


class SegmentPreview:
    """The growing mask of one prediction for ``segmentId`` of ``segmentationNode`` on ``volumeNode``, in a node
    hidden from editors and not saved with the scene, made at the first ``show`` and gone after ``remove``."""

    def __init__(self, segmentationNode, segmentId: str, volumeNode) -> None:
        self.segmentationNode = segmentationNode
        self.segmentId = segmentId
        self.volumeNode = volumeNode
        self.node = None
        self._previewSegmentId: Optional[str] = None
        self._givenUp = False

    def show(self, update) -> None:
        """Draw ``update`` (a ``MaskUpdate`` on the volume's voxel grid: the mask over the box a prediction
        has changed so far; each box holds the previous one). A preview that cannot be drawn is given up
        and logged; the prediction goes on."""
        if self._givenUp or update.empty:
            return
        try:
            if self.node is None:
                self._create()
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            if not logic.SetBinaryLabelmapToSegment(updateToOrientedImage(update, self.volumeNode), self.node,
                                                    self._previewSegmentId, logic.MODE_REPLACE):
                raise RuntimeError("the preview's labelmap could not be set")
        except Exception as error:
            logging.warning("CT-SAM3D: no preview for this run: %s", error)
            self._givenUp = True
            self.remove()

    def remove(self) -> None:
        """Take the preview out of the scene (nothing when none was shown or the scene was closed)."""
        node, self.node = self.node, None
        if node is not None and node.GetScene() is not None:
            node.GetScene().RemoveNode(node)

    def _create(self) -> None:
        segment = self.segmentationNode.GetSegmentation().GetSegment(self.segmentId)
        if segment is None:
            raise ValueError("the segment was removed")
        scene = self.segmentationNode.GetScene()
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{segment.GetName()} CT-SAM3D preview")
        self.node = node
        node.SetHideFromEditors(True)
        node.SetSaveWithScene(False)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSaveWithScene(False)
        display.SetOpacity2DFill(PREVIEW_FILL_OPACITY)
        # The preview's voxels are the volume's, in its frame: it hangs under the volume's transform.
        node.SetAndObserveTransformNodeID(self.volumeNode.GetTransformNodeID())
        node.SetReferenceImageGeometryParameterFromVolumeNode(self.volumeNode)
        self._previewSegmentId = node.GetSegmentation().AddEmptySegment(
            "", segment.GetName(), segment.GetColor())
