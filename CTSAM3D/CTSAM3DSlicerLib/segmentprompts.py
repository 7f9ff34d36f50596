"""The prompts of one segment as the effect uses them: its two point lists and its box, found or made in the
scene, observed while the segment is selected, shown only then, ranked in click order."""

from typing import Callable, List, Optional, Tuple

import slicer
import vtk

from CTSAM3DSlicerLib import prompts

POINT_EVENTS = (
    slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
    slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
    slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
)
"""Changes of a prompt list that change the prompts (a click, a placement, a move, a deletion)."""


def sameNode(first, second) -> bool:
    """Node identity by ID (VTK may hand out different Python wrappers for one node)."""
    if first is None or second is None:
        return first is None and second is None
    return first.GetID() == second.GetID()


class SegmentPrompts:
    """Positive and negative point lists and the box of ``segmentId`` in ``segmentationNode``; the nodes are
    found in the scene on every call, so lists removed or re-imported by the user are never held stale."""

    def __init__(self, scene, segmentationNode, segmentId: str) -> None:
        self.scene = scene
        self.segmentationNode = segmentationNode
        self.segmentId = segmentId
        self._observations: List[Tuple[object, int]] = []

    @property
    def key(self) -> Tuple[str, str]:
        """(segmentation node ID, segment ID): what the prompts belong to."""
        return self.segmentationNode.GetID(), self.segmentId

    def segmentExists(self) -> bool:
        return (self.segmentationNode.GetScene() is not None
                and self.segmentationNode.GetSegmentation().GetSegment(self.segmentId) is not None)

    def lists(self, create: bool = False) -> Tuple[Optional[object], Optional[object]]:
        """(positive list, negative list); None for one that does not exist (made on request)."""
        return tuple(prompts.promptListFor(self.scene, self.segmentationNode, self.segmentId, positive, create)
                     for positive in (True, False))

    def box(self, create: bool = False):
        node = prompts.findBox(self.scene, self.segmentationNode, self.segmentId)
        if node is None and create:
            node = prompts.createBox(self.scene, self.segmentationNode, self.segmentId)
        return node

    def nodes(self) -> list:
        return [node for node in (*self.lists(), self.box()) if node is not None]

    def ordered(self) -> List[prompts.Prompt]:
        return prompts.orderedPrompts(*self.lists())

    def boxBoundsRAS(self):
        return prompts.boxBoundsRAS(self.box())

    def positiveInBox(self) -> bool:
        """Whether a positive prompt lies in the drawn box."""
        bounds = self.boxBoundsRAS()
        return bounds is not None and any(
            prompt.positive and all(low <= value <= high for value, low, high in
                                    zip(prompt.pointRAS, bounds[0::2], bounds[1::2]))
            for prompt in self.ordered())

    def addAtBoxCentre(self) -> None:
        """A positive prompt at the centre of the drawn box."""
        bounds = self.boxBoundsRAS()
        self.add([(low + high) / 2 for low, high in zip(bounds[0::2], bounds[1::2])], True)

    def add(self, pointRAS, positive: bool) -> None:
        positiveList, negativeList = self.lists(create=True)
        node, other = (positiveList, negativeList) if positive else (negativeList, positiveList)
        prompts.addPrompt(node, other, pointRAS, positive)

    def removeLast(self) -> bool:
        return prompts.removeLastPrompt(*self.lists())

    def clear(self) -> None:
        for node in self.lists():
            if node is not None:
                node.RemoveAllControlPoints()

    def lock(self) -> None:
        for node in self.nodes():
            node.SetLocked(True)

    def rankUnranked(self, changedList) -> None:
        """Give points the markups tools placed in ``changedList`` (one of this segment's) their ranks."""
        positiveList, negativeList = self.lists()
        if sameNode(changedList, positiveList):
            prompts.labelUnrankedPoints(positiveList, True, negativeList)
        elif sameNode(changedList, negativeList):
            prompts.labelUnrankedPoints(negativeList, False, positiveList)

    def owns(self, node) -> bool:
        return any(sameNode(node, own) for own in self.nodes())

    def pickedByMarkups(self) -> bool:
        """True when the markups widget has picked one of these prompts or the box under the mouse (it hovers
        within its picking distance, 11-16 px: vtkSlicerMarkupsWidgetRepresentation2D.cxx:1175-1178 @v5.8.1,
        and makes it the display node's active component), so a press there drags or resizes it."""
        return any(node.GetDisplayNode() is not None and node.GetDisplayNode().HasActiveComponent()
                   for node in self.nodes())

    def observe(self, onPointsModified: Callable, onBoxModified: Callable) -> None:
        """Observe this segment's lists and box (again when one was made or removed since)."""
        wanted = self.nodes()
        observed = list(dict.fromkeys(node.GetID() for node, _ in self._observations))
        if observed == [node.GetID() for node in wanted]:
            return
        self.unobserve()
        for node in wanted:
            if node.IsA("vtkMRMLMarkupsROINode"):
                handlers = [(vtk.vtkCommand.ModifiedEvent, onBoxModified)]
            else:
                handlers = [(event, onPointsModified) for event in POINT_EVENTS]
            for event, handler in handlers:
                self._observations.append((node, node.AddObserver(event, handler)))

    def unobserve(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []

    @staticmethod
    def showOnly(scene, shown: Optional["SegmentPrompts"]) -> None:
        """Show the prompt lists and box of ``shown`` and hide every other segment's (None: hide all)."""
        shownNodes = shown.nodes() if shown is not None else ()
        for className in ("vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode"):
            for index in range(scene.GetNumberOfNodesByClass(className)):
                node = scene.GetNthNodeByClass(index, className)
                if node.GetAttribute(prompts.SEGMENT_ATTRIBUTE) is None or node.GetDisplayNode() is None:
                    continue
                node.GetDisplayNode().SetVisibility(any(sameNode(node, own) for own in shownNodes))
