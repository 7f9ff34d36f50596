"""Geometry between Slicer (RAS world, MRML nodes, vtkOrientedImageData) and CTSAM3DLib (LPS, SimpleITK).

Slicer hands RAS to this module and CTSAM3DLib receives LPS from it, through CTSAM3DLib.world (the
one place that knows the RAS<->LPS flip). Parent transforms of volumes, segmentations and markups are folded in here
too, so a mask lands where the user sees the scan whatever the IJK-to-RAS matrix or transform.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk  # noqa: N813
import slicer
import vtk
from vtk.util import numpy_support

from CTSAM3DLib.world import matrix_ras_to_lps

_GEOMETRY_TOLERANCE_MM = 1e-4


def arrayFromVtkMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def nodeToWorldMatrix(node) -> np.ndarray:
    """4x4 matrix from the node's own coordinates to world RAS (identity without a parent transform).

    Raises ValueError for a non-linear parent transform: the mask cannot be placed by a matrix then,
    and the user has to harden the transform first.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(parent, None, matrix):
        raise ValueError(
            f"'{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
            "harden the transform (Data module, right-click, Harden transform) before segmenting"
        )
    return arrayFromVtkMatrix(matrix)


def imageFromMatrix(
    indexToLPS: np.ndarray, size: Sequence[int], array: Optional[np.ndarray] = None
) -> sitk.Image:
    """A SimpleITK image whose voxel (i, j, k) sits at ``indexToLPS @ (i, j, k, 1)``.

    ``array`` is (k, j, i) as numpy and SimpleITK order it; without it the image is uint8 zeros.
    Raises ValueError when the matrix shears (SimpleITK's direction and spacing cannot express it).
    """
    columns = np.asarray(indexToLPS, dtype=float)[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"degenerate voxel-to-world matrix (spacing {spacing.tolist()})")
    direction = columns / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-5):
        raise ValueError(
            "the voxel-to-world matrix shears (a sheared transform or volume); harden or remove the "
            "shear before segmenting"
        )
    image = sitk.Image([int(s) for s in size], sitk.sitkUInt8) if array is None else sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in direction.flatten()])
    image.SetOrigin([float(o) for o in np.asarray(indexToLPS, dtype=float)[:3, 3]])
    return image


def volumeIjkToWorldRas(volumeNode) -> np.ndarray:
    """4x4 matrix from the volume's voxel indices (i, j, k) to world RAS, parent transforms included."""
    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    return nodeToWorldMatrix(volumeNode) @ arrayFromVtkMatrix(ijkToRAS)


def volumeToImage(volumeNode) -> sitk.Image:
    """The scalar volume as a SimpleITK image in world LPS (a copy; safe to hand to another thread)."""
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise ValueError(f"volume '{volumeNode.GetName()}' has no voxels")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{volumeNode.GetName()}' is not a single-component (grey-scale) volume")
    voxels = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    return imageFromMatrix(matrix_ras_to_lps(volumeIjkToWorldRas(volumeNode)), voxels.shape[::-1], voxels)


def segmentOnVolumeGrid(segmentationNode, segmentId: str, volumeNode) -> Optional[sitk.Image]:
    """The segment's current content on the volume's voxel grid in world LPS (the grid of
    ``volumeToImage``), uint8 0/1; None when the segment is empty."""
    array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
    if array is None or not np.any(array):
        return None
    values = (np.asarray(array) != 0).astype(np.uint8)
    return imageFromMatrix(matrix_ras_to_lps(volumeIjkToWorldRas(volumeNode)), values.shape[::-1], values)


def orientedImageToWorldLps(orientedImage, nodeToWorldRAS: np.ndarray) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """(extent-start-index-to-LPS 4x4, size (i, j, k)) of a vtkOrientedImageData in a node's frame."""
    imageToNode = vtk.vtkMatrix4x4()
    orientedImage.GetImageToWorldMatrix(imageToNode)
    extent = orientedImage.GetExtent()
    shiftToExtentStart = np.eye(4)
    shiftToExtentStart[:3, 3] = (extent[0], extent[2], extent[4])
    indexToLPS = matrix_ras_to_lps(nodeToWorldRAS @ arrayFromVtkMatrix(imageToNode) @ shiftToExtentStart)
    size = (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    return indexToLPS, size


def _indexToLPS(image: sitk.Image) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def maskOnGrid(mask: sitk.Image, indexToLPS: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """The 0/1 mask sampled (nearest voxel) on another grid; returns uint8 (k, j, i).

    Identical grids (the usual case: segmentation geometry taken from the source volume) are copied
    without resampling, so no voxel moves.
    """
    if tuple(mask.GetSize()) == tuple(int(s) for s in size) and np.allclose(
        _indexToLPS(mask), indexToLPS, atol=_GEOMETRY_TOLERANCE_MM
    ):
        return sitk.GetArrayFromImage(mask).astype(np.uint8)
    reference = imageFromMatrix(indexToLPS, size)
    resampled = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resampled)


def writeMaskIntoOrientedImage(mask: sitk.Image, orientedImage, nodeToWorldRAS: np.ndarray) -> int:
    """Fill an unsigned-char vtkOrientedImageData (e.g. the editor's modifier labelmap, which lives in
    the segmentation node's frame) with ``mask`` (world LPS). Returns the number of voxels set."""
    extent = orientedImage.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return 0
    indexToLPS, size = orientedImageToWorldLps(orientedImage, nodeToWorldRAS)
    values = maskOnGrid(mask, indexToLPS, size)
    scalars = orientedImage.GetPointData().GetScalars()
    view = numpy_support.vtk_to_numpy(scalars).reshape(values.shape)
    view[...] = values
    scalars.Modified()
    orientedImage.Modified()
    return int(values.sum())


def updateExtent(orientedImage, nodeToWorldRAS: np.ndarray, volumeNode, update) -> Optional[List[int]]:
    """The extent (i0, i1, j0, j1, k0, k1, inclusive) of ``orientedImage`` that holds a
    ``MaskUpdate``'s box (given on the volume's voxel grid), when the image's voxels are the volume's
    voxels (the usual case: the segmentation's geometry was taken from the volume); None otherwise."""
    indexToLPS, size = orientedImageToWorldLps(orientedImage, nodeToWorldRAS)
    volumeToLPS = matrix_ras_to_lps(volumeIjkToWorldRas(volumeNode))
    volumeSize = volumeNode.GetImageData().GetDimensions()
    if tuple(size) != tuple(volumeSize) or not np.allclose(indexToLPS, volumeToLPS, atol=_GEOMETRY_TOLERANCE_MM):
        return None
    extent = orientedImage.GetExtent()
    bounds = []
    for axis, (start, count) in enumerate(zip(update.start, update.size)):
        bounds += [extent[2 * axis] + start, extent[2 * axis] + start + count - 1]
    return bounds


def writeValuesIntoExtent(values: np.ndarray, orientedImage, extent: Sequence[int]) -> None:
    """Fill an unsigned-char vtkOrientedImageData with 0, and ``values`` ((k, j, i) uint8) in ``extent``."""
    whole = orientedImage.GetExtent()
    scalars = orientedImage.GetPointData().GetScalars()
    shape = (whole[5] - whole[4] + 1, whole[3] - whole[2] + 1, whole[1] - whole[0] + 1)
    view = numpy_support.vtk_to_numpy(scalars).reshape(shape)
    view[...] = 0
    view[tuple(slice(extent[2 * axis] - whole[2 * axis], extent[2 * axis + 1] - whole[2 * axis] + 1)
               for axis in (2, 1, 0))] = values
    scalars.Modified()
    orientedImage.Modified()


def segmentationReferenceImage(segmentationNode, volumeNode):
    """An empty unsigned-char vtkOrientedImageData in the segmentation's reference geometry
    (set from ``volumeNode`` when the segmentation has none yet), in the segmentation node's frame."""
    segmentation = segmentationNode.GetSegmentation()
    parameterName = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    if not segmentation.GetConversionParameter(parameterName):
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    image = slicer.vtkOrientedImageData()
    if not slicer.vtkSegmentationConverter.DeserializeImageGeometry(
        segmentation.GetConversionParameter(parameterName), image, True, vtk.VTK_UNSIGNED_CHAR, 1
    ):
        raise ValueError(f"segmentation '{segmentationNode.GetName()}' has an unreadable reference geometry")
    image.GetPointData().GetScalars().Fill(0)
    return image


def updateToOrientedImage(update, volumeNode):
    """A ``MaskUpdate`` (its box on the volume's voxel grid) as an unsigned-char vtkOrientedImageData in the
    volume node's own frame (its IJK-to-RAS matrix, the box as extent), for a node under the volume's
    parent transform."""
    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(ijkToRAS)
    start, size = update.start, update.size
    image.SetExtent(*(bound for axis in range(3) for bound in (start[axis], start[axis] + size[axis] - 1)))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(update.mask.shape)[...] = update.mask
    return image
