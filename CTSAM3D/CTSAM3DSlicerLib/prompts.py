"""Prompt points kept as markups: one green (positive) and one red (negative) point list per segment.

The lists are ordinary scene nodes, so they are saved with the scene and edited with the markups tools.
Each list refers to its segmentation node through a node reference (which MRML renames with the node
when a scene import changes node IDs) and names its segment and polarity in attributes. Click order
matters to the network, so each point's label carries its rank: "+1", "-2", "+3", ...
"""

from __future__ import annotations

import re
from typing import List, NamedTuple, Optional, Tuple

SEGMENTATION_REFERENCE_ROLE = "CTSAM3D.Segmentation"
SEGMENT_ATTRIBUTE = "CTSAM3D.SegmentID"
POLARITY_ATTRIBUTE = "CTSAM3D.Polarity"
POSITIVE_COLOR = (0.18, 0.80, 0.25)
NEGATIVE_COLOR = (1.0, 0.25, 0.21)
_RANK_LABEL = re.compile(r"^[+-](\d+)$")


class Prompt(NamedTuple):
    pointRAS: Tuple[float, float, float]
    """World RAS (parent transforms of the list included)."""
    positive: bool
    rank: int


def findPromptList(scene, segmentationNode, segmentId: str, positive: bool):
    """The existing prompt list of that segment and polarity, or None."""
    polarity = "positive" if positive else "negative"
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLMarkupsFiducialNode")
        if (
            node.GetNodeReferenceID(SEGMENTATION_REFERENCE_ROLE) == segmentationNode.GetID()
            and node.GetAttribute(SEGMENT_ATTRIBUTE) == segmentId
            and node.GetAttribute(POLARITY_ATTRIBUTE) == polarity
        ):
            return node
    return None


def createPromptList(scene, segmentationNode, segmentId: str, positive: bool):
    """A new point list for that segment and polarity, coloured green or red."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    segmentName = segment.GetName() if segment is not None else segmentId
    node = scene.AddNewNodeByClass(
        "vtkMRMLMarkupsFiducialNode", f"{segmentName} CT-SAM3D {'+' if positive else '-'}"
    )
    node.SetNodeReferenceID(SEGMENTATION_REFERENCE_ROLE, segmentationNode.GetID())
    node.SetAttribute(SEGMENT_ATTRIBUTE, segmentId)
    node.SetAttribute(POLARITY_ATTRIBUTE, "positive" if positive else "negative")
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    color = POSITIVE_COLOR if positive else NEGATIVE_COLOR
    display.SetSelectedColor(*color)
    display.SetColor(*color)
    display.SetActiveColor(*color)
    return node


def findBox(scene, segmentationNode, segmentId: str):
    """The segment's box (a markups ROI made by ``createBox``), or None."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLMarkupsROINode")
        if (
            node.GetNodeReferenceID(SEGMENTATION_REFERENCE_ROLE) == segmentationNode.GetID()
            and node.GetAttribute(SEGMENT_ATTRIBUTE) == segmentId
        ):
            return node
    return None


def createBox(scene, segmentationNode, segmentId: str):
    """A new, empty markups ROI for that segment's box (placed with the markups tools)."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    segmentName = segment.GetName() if segment is not None else segmentId
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{segmentName} CT-SAM3D box")
    node.SetNodeReferenceID(SEGMENTATION_REFERENCE_ROLE, segmentationNode.GetID())
    node.SetAttribute(SEGMENT_ATTRIBUTE, segmentId)
    node.CreateDefaultDisplayNodes()
    return node


def boxBoundsRAS(roi) -> Optional[Tuple[float, ...]]:
    """World RAS bounds (xmin, xmax, ymin, ymax, zmin, zmax) of a drawn ROI with a volume; else None.

    While the ROI tool draws, the ROI already reports bounds (one corner defined, the other a preview
    point under the mouse: vtkMRMLMarkupsROINode.cxx:839-895 @v5.8.1); those are not the box yet."""
    if roi is None or roi.GetNumberOfDefinedControlPoints() == 0:
        return None
    if roi.GetNumberOfControlPoints() != roi.GetNumberOfDefinedControlPoints():
        return None
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    if any(bounds[2 * axis + 1] - bounds[2 * axis] <= 0 for axis in range(3)):
        return None
    return tuple(float(v) for v in bounds)


def promptListFor(scene, segmentationNode, segmentId: str, positive: bool, create: bool):
    node = findPromptList(scene, segmentationNode, segmentId, positive)
    if node is None and create:
        node = createPromptList(scene, segmentationNode, segmentId, positive)
    return node


def _rank(label: str) -> Optional[int]:
    match = _RANK_LABEL.match(label or "")
    return int(match.group(1)) if match else None


def orderedPrompts(positiveList, negativeList) -> List[Prompt]:
    """Every defined point of both lists in click order (points without a rank label last)."""
    prompts = []
    unranked = 1_000_000
    for node, positive in ((positiveList, True), (negativeList, False)):
        if node is None:
            continue
        for index in range(node.GetNumberOfControlPoints()):
            if not _isDefined(node, index):
                continue
            rank = _rank(node.GetNthControlPointLabel(index))
            if rank is None:
                unranked += 1
                rank = unranked
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(index, position)
            prompts.append(Prompt(tuple(float(v) for v in position), positive, rank))
    return sorted(prompts, key=lambda prompt: prompt.rank)


def nextRank(positiveList, negativeList) -> int:
    ranks = [0]
    for node in (positiveList, negativeList):
        if node is not None:
            for index in range(node.GetNumberOfControlPoints()):
                rank = _rank(node.GetNthControlPointLabel(index))
                if rank is not None:
                    ranks.append(rank)
    return max(ranks) + 1


def rankLabel(rank: int, positive: bool) -> str:
    return f"{'+' if positive else '-'}{rank}"


def _isDefined(node, index: int) -> bool:
    """False for the place tool's preview point (PositionPreview), which follows the mouse until a click."""
    return node.GetNthControlPointPositionStatus(index) == node.PositionDefined


def labelUnrankedPoints(node, positive: bool, otherList) -> None:
    """Give points placed with the markups tools (default labels) the next ranks."""
    for index in range(node.GetNumberOfControlPoints()):
        if _isDefined(node, index) and _rank(node.GetNthControlPointLabel(index)) is None:
            node.SetNthControlPointLabel(index, rankLabel(nextRank(node, otherList), positive))


def addPrompt(node, otherList, pointRAS, positive: bool) -> int:
    """Append a defined point at world ``pointRAS``; returns its index in ``node``."""
    label = rankLabel(nextRank(node, otherList), positive)
    return node.AddControlPointWorld(float(pointRAS[0]), float(pointRAS[1]), float(pointRAS[2]), label)


def removeLastPrompt(positiveList, negativeList) -> bool:
    """Delete the most recent prompt of the two lists; False when there is none."""
    best = None
    for node in (positiveList, negativeList):
        if node is None:
            continue
        for index in range(node.GetNumberOfControlPoints()):
            if not _isDefined(node, index):
                continue
            rank = _rank(node.GetNthControlPointLabel(index)) or 0
            if best is None or rank >= best[0]:
                best = (rank, node, index)
    if best is None:
        return False
    best[1].RemoveNthControlPoint(best[2])
    return True
