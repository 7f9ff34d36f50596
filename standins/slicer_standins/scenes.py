"""Synthetic CT scenes for the Slicer tests: two bright ellipsoids in air-like background, on volumes
with LPS-style, flipped and oblique IJK-to-RAS matrices, optionally under parent transforms."""

from typing import Dict, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

SHAPE_KJI = (36, 44, 52)
BLOB_A = ((26.0, 22.0, 18.0), (9.0, 8.0, 6.0))
"""(centre (i, j, k), semi-axes in voxels) of the ellipsoid the tests click on."""
BLOB_B = ((10.0, 12.0, 10.0), (5.0, 5.0, 4.0))


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def affine(linear: np.ndarray, translation) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = translation
    return matrix


GEOMETRIES: Dict[str, np.ndarray] = {
    # What DICOM axial CT gives: LPS axes, so R and A decrease along i and j.
    "axial": affine(np.diag([-0.8, -0.8, 2.5]), (120.0, 95.0, -40.0)),
    # Every axis reversed relative to the usual storage, anisotropic.
    "flipped": affine(np.diag([0.9, 1.1, -2.0]), (-30.0, -60.0, 80.0)),
    # Oblique: rotated about a skew axis, with a reflection, non-zero origin.
    "oblique": affine(rotation((1.0, 2.0, 0.5), 27.0) @ np.diag([-1.0, 1.2, 1.7]), (15.0, -22.0, 33.0)),
}


def ellipsoidMask(centre, semiAxes, shape=SHAPE_KJI) -> np.ndarray:
    k, j, i = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    return (
        ((i - centre[0]) / semiAxes[0]) ** 2
        + ((j - centre[1]) / semiAxes[1]) ** 2
        + ((k - centre[2]) / semiAxes[2]) ** 2
    ) <= 1.0


def blobVolume() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU voxels (k, j, i) int16, mask of blob A, mask of blob B)."""
    maskA = ellipsoidMask(*BLOB_A)
    maskB = ellipsoidMask(*BLOB_B)
    voxels = np.full(SHAPE_KJI, -1000, dtype=np.int16)
    voxels[maskA] = 180
    voxels[maskB] = 120
    return voxels, maskA, maskB


def addBlobVolume(geometry: str = "axial", name: str = "CT"):
    voxels, maskA, maskB = blobVolume()
    volumeNode = slicer.util.addVolumeFromArray(voxels, GEOMETRIES[geometry], name)
    return volumeNode, maskA, maskB


def addVolumeFromFile(path, name: str = "CT"):
    """A CT file read with SimpleITK, placed in Slicer's world as Slicer's own reader places it (RAS =
    diag(-1, -1, 1) LPS; Base/Python/sitkUtils.py)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    ijkToLPS = affine(np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing()), image.GetOrigin())
    ijkToRAS = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijkToLPS
    return slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image).astype(np.int16), ijkToRAS, name)


def addLinearTransform(matrix: np.ndarray, name: str = "T"):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


def worldMatrix(node) -> np.ndarray:
    """Node-to-world 4x4, computed by Slicer's own transform logic (independent of the code under test)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volumeIjkToWorld(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return worldMatrix(volumeNode) @ slicer.util.arrayFromVTKMatrix(matrix)


def blobCentreWorldRAS(volumeNode, blob=BLOB_A) -> np.ndarray:
    return (volumeIjkToWorld(volumeNode) @ np.array([*blob[0], 1.0]))[:3]


def segmentVoxelsInVolumeIndex(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """(N, 3) continuous volume indices (i, j, k) of the centres of every voxel of the segment, found
    from the segment's internal labelmap and Slicer's transforms (not from the code under test)."""
    labelmap = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    extent = labelmap.GetExtent()
    if extent[1] < extent[0]:
        return np.zeros((0, 3))
    dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims)
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    k, j, i = np.nonzero(values == segment.GetLabelValue())
    indices = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)]).astype(float)
    imageToNode = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(imageToNode)
    toWorld = worldMatrix(segmentationNode) @ slicer.util.arrayFromVTKMatrix(imageToNode)
    toVolume = np.linalg.inv(volumeIjkToWorld(volumeNode)) @ toWorld
    return (toVolume @ indices)[:3].T


def indicesToMask(indices: np.ndarray, shape=SHAPE_KJI) -> np.ndarray:
    """Volume-index points (must sit on voxel centres) to a (k, j, i) mask; fails if off-grid."""
    rounded = np.rint(indices).astype(int)
    np.testing.assert_allclose(indices, rounded, atol=1e-3, err_msg="segment voxels are off the volume grid")
    mask = np.zeros(shape, dtype=bool)
    inside = np.all((rounded >= 0) & (rounded < np.array(shape[::-1])), axis=1)
    assert inside.all(), "segment voxels outside the volume"
    mask[rounded[:, 2], rounded[:, 1], rounded[:, 0]] = True
    return mask


def makeSegmentation(volumeNode, name: str = "Segmentation"):
    segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    return segmentationNode


STORAGE_EXTENSIONS = {
    "vtkMRMLScalarVolumeNode": ".nrrd",
    "vtkMRMLSegmentationNode": ".seg.nrrd",
    "vtkMRMLMarkupsFiducialNode": ".mrk.json",
}


def saveScene(directory: str) -> str:
    """Write every storable node and the .mrml file, as File > Save does; returns the .mrml path."""
    import os

    scene = slicer.mrmlScene
    scene.SetRootDirectory(directory)
    for className, extension in STORAGE_EXTENSIONS.items():
        for index in range(scene.GetNumberOfNodesByClass(className)):
            node = scene.GetNthNodeByClass(index, className)
            node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
            storage.SetFileName(os.path.join(directory, f"{node.GetID()}{extension}"))
            assert storage.WriteData(node), f"could not write {node.GetName()}"
    path = os.path.join(directory, "scene.mrml")
    scene.SetURL(path)
    assert scene.Commit(), "could not write the scene"
    return path


def loadScene(path: str) -> None:
    """Read a saved scene into the (fresh) ``slicer.mrmlScene``."""
    slicer.mrmlScene.SetURL(path)
    assert slicer.mrmlScene.Connect(), f"could not read {path}"
