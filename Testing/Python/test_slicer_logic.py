"""CTSAM3DLogic and its geometry against the real MRML libraries (slicer-core): RAS/LPS, any IJK-to-RAS
matrix, parent transforms on volumes and segmentations, the worker thread, and the real session."""

import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import slicer
import vtk

from standins.networks import ThresholdNet
from standins.slicer_standins import scenes
from standins.slicer_standins.fixtures import slicerEnv  # noqa: F401  (used by pytestmark)
from standins.slicer_standins.sessions import ComponentSession

pytestmark = pytest.mark.usefixtures("slicerEnv")


def componentLogic():
    from CTSAM3DSlicerLib.logic import CTSAM3DLogic

    return CTSAM3DLogic(network=ThresholdNet(), sessionFactory=ComponentSession)


def lps(pointRAS):
    return np.array([-pointRAS[0], -pointRAS[1], pointRAS[2]])


def test_world_points_and_matrices_flip_x_and_y():
    from CTSAM3DLib.world import matrix_ras_to_lps, ras_to_lps

    assert ras_to_lps((1.5, -2.0, 3.0)) == (-1.5, 2.0, 3.0)
    assert ras_to_lps(np.array([1.5, -2.0, 3.0])) == (-1.5, 2.0, 3.0)
    matrix = scenes.GEOMETRIES["oblique"]
    flipped = matrix_ras_to_lps(matrix)
    np.testing.assert_allclose(flipped[:2], -matrix[:2])
    np.testing.assert_allclose(flipped[2:], matrix[2:])


@pytest.mark.parametrize("geometry", sorted(scenes.GEOMETRIES))
@pytest.mark.parametrize("underTransform", [False, True])
def test_volume_image_has_slicer_world_geometry(geometry, underTransform):
    from CTSAM3DSlicerLib import coordinates

    volumeNode, _, _ = scenes.addBlobVolume(geometry)
    if underTransform:
        transform = scenes.addLinearTransform(
            scenes.affine(scenes.rotation((0, 1, 1), 40.0), (7.0, -3.0, 12.0))
        )
        volumeNode.SetAndObserveTransformNodeID(transform.GetID())
    image = coordinates.volumeToImage(volumeNode)
    assert image.GetSize() == scenes.SHAPE_KJI[::-1]
    ijkToWorld = scenes.volumeIjkToWorld(volumeNode)
    for index in [(0, 0, 0), (51, 0, 0), (0, 43, 0), (0, 0, 35), (17, 29, 11), (51, 43, 35)]:
        expected = lps(ijkToWorld @ np.array([*index, 1.0]))
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), expected, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(volumeNode))


def test_non_linear_parent_transform_is_refused_with_advice():
    from CTSAM3DSlicerLib import coordinates

    volumeNode, _, _ = scenes.addBlobVolume("axial")
    warp = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    thinPlate = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for point, shift in [
        ((0, 0, 0), (0, 0, 0)),
        ((50, 0, 0), (5, 0, 0)),
        ((0, 50, 0), (0, 0, 0)),
        ((0, 0, 50), (0, 3, 0)),
        ((50, 50, 50), (0, 0, 0)),
    ]:
        source.InsertNextPoint(point)
        target.InsertNextPoint(np.add(point, shift))
    thinPlate.SetSourceLandmarks(source)
    thinPlate.SetTargetLandmarks(target)
    warp.SetAndObserveTransformToParent(thinPlate)
    volumeNode.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(ValueError, match="harden"):
        coordinates.volumeToImage(volumeNode)


def test_sheared_geometry_is_refused():
    from CTSAM3DSlicerLib import coordinates

    shear = np.eye(4)
    shear[0, 1] = 0.4
    with pytest.raises(ValueError, match="shear"):
        coordinates.imageFromMatrix(shear, (4, 4, 4))


@pytest.mark.parametrize("geometry", sorted(scenes.GEOMETRIES))
def test_segment_from_points_lands_exactly_on_the_clicked_structure(geometry):
    volumeNode, maskA, maskB = scenes.addBlobVolume(geometry)
    segmentationNode = scenes.makeSegmentation(volumeNode)
    logic = componentLogic()
    segmentId = logic.segmentFromPoints(
        volumeNode, segmentationNode, None, [scenes.blobCentreWorldRAS(volumeNode)], []
    )
    found = scenes.indicesToMask(scenes.segmentVoxelsInVolumeIndex(segmentationNode, segmentId, volumeNode))
    np.testing.assert_array_equal(found, maskA)
    assert segmentationNode.GetSegmentation().GetSegment(segmentId).GetName() == "CT-SAM3D"


@pytest.mark.parametrize("geometry", ["axial", "oblique"])
def test_segmentation_under_a_parent_transform_gets_the_mask_in_place(geometry):
    volumeNode, maskA, _ = scenes.addBlobVolume(geometry)
    segmentationNode = scenes.makeSegmentation(volumeNode)
    # A translation by whole voxels keeps the grids aligned, so the answer is exact.
    shift = scenes.GEOMETRIES[geometry][:3, :3] @ np.array([3.0, -2.0, 1.0])
    transform = scenes.addLinearTransform(scenes.affine(np.eye(3), shift))
    segmentationNode.SetAndObserveTransformNodeID(transform.GetID())
    segmentId = componentLogic().segmentFromPoints(
        volumeNode, segmentationNode, None, [scenes.blobCentreWorldRAS(volumeNode)]
    )
    found = scenes.indicesToMask(scenes.segmentVoxelsInVolumeIndex(segmentationNode, segmentId, volumeNode))
    np.testing.assert_array_equal(found, maskA)


def test_rotated_volume_and_segmentation_transforms_keep_the_mask_on_the_structure():
    volumeNode, maskA, maskB = scenes.addBlobVolume("oblique")
    volumeTransform = scenes.addLinearTransform(scenes.affine(scenes.rotation((1, 0, 1), 35.0), (10, 5, -8)))
    volumeNode.SetAndObserveTransformNodeID(volumeTransform.GetID())
    segmentationTransform = scenes.addLinearTransform(
        scenes.affine(scenes.rotation((0, 1, 0), -20.0), (-4, 9, 2))
    )
    centreWorld = scenes.blobCentreWorldRAS(volumeNode)
    # The segmentation's own grid: 1 mm axial around the structure, in the segmentation's frame.
    referenceVoxels = np.zeros((60, 60, 60), dtype=np.int16)
    segmentationToWorld = slicer.util.arrayFromVTKMatrix(segmentationTransform.GetMatrixTransformToParent())
    centreLocal = (np.linalg.inv(segmentationToWorld) @ np.array([*centreWorld, 1.0]))[:3]
    reference = slicer.util.addVolumeFromArray(
        referenceVoxels, scenes.affine(np.eye(3), centreLocal - 30.0), "reference grid"
    )
    segmentationNode = scenes.makeSegmentation(reference)
    segmentationNode.SetAndObserveTransformNodeID(segmentationTransform.GetID())
    segmentId = componentLogic().segmentFromPoints(volumeNode, segmentationNode, None, [centreWorld])
    indices = np.rint(scenes.segmentVoxelsInVolumeIndex(segmentationNode, segmentId, volumeNode)).astype(int)
    inside = np.all((indices >= 0) & (indices < np.array(scenes.SHAPE_KJI[::-1])), axis=1)
    assert inside.all()
    onA = maskA[indices[:, 2], indices[:, 1], indices[:, 0]]
    onB = maskB[indices[:, 2], indices[:, 1], indices[:, 0]]
    # Nearest-voxel resampling between two rotated grids may shift boundary voxels by one.
    assert onA.mean() > 0.9 and not onB.any()
    segmentVolume = len(indices) * 1.0
    structureVolume = maskA.sum() * np.prod(volumeNode.GetSpacing())
    assert 0.9 < segmentVolume / structureVolume < 1.1


def test_negative_point_removes_a_structure_and_order_is_kept():
    volumeNode, maskA, maskB = scenes.addBlobVolume("flipped")
    segmentationNode = scenes.makeSegmentation(volumeNode)
    logic = componentLogic()
    centreA = scenes.blobCentreWorldRAS(volumeNode, scenes.BLOB_A)
    centreB = scenes.blobCentreWorldRAS(volumeNode, scenes.BLOB_B)
    segmentId = logic.segmentFromPoints(volumeNode, segmentationNode, None, [centreA, centreB], [centreB])
    found = scenes.indicesToMask(scenes.segmentVoxelsInVolumeIndex(segmentationNode, segmentId, volumeNode))
    np.testing.assert_array_equal(found, maskA)
    assert logic._session.clicks == [
        (tuple(lps(centreA)), True),
        (tuple(lps(centreB)), True),
        (tuple(lps(centreB)), False),
    ]


def test_headless_write_replaces_only_the_given_segment():
    volumeNode, maskA, maskB = scenes.addBlobVolume("axial")
    segmentationNode = scenes.makeSegmentation(volumeNode)
    otherId = segmentationNode.GetSegmentation().AddEmptySegment("", "other")
    slicer.util.updateSegmentBinaryLabelmapFromArray(
        maskB.astype(np.uint8), segmentationNode, otherId, volumeNode
    )
    targetId = segmentationNode.GetSegmentation().AddEmptySegment("", "target")
    slicer.util.updateSegmentBinaryLabelmapFromArray(
        maskB.astype(np.uint8), segmentationNode, targetId, volumeNode
    )
    componentLogic().segmentFromPoints(
        volumeNode, segmentationNode, targetId, [scenes.blobCentreWorldRAS(volumeNode)]
    )
    np.testing.assert_array_equal(
        slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, targetId, volumeNode), maskA
    )
    np.testing.assert_array_equal(
        slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, otherId, volumeNode), maskB
    )


def test_bad_calls_name_the_problem():
    from CTSAM3DSlicerLib.logic import CTSAM3DLogic

    volumeNode, _, _ = scenes.addBlobVolume("axial")
    segmentationNode = scenes.makeSegmentation(volumeNode)
    with pytest.raises(ValueError, match="positive"):
        componentLogic().segmentFromPoints(volumeNode, segmentationNode, None, [], [])
    with pytest.raises(ValueError, match="no segment 'missing'"):
        componentLogic().segmentFromPoints(volumeNode, segmentationNode, "missing", [(0, 0, 0)])
    with pytest.raises(ValueError, match="no CT-SAM3D weights"):
        CTSAM3DLogic().segmentFromPoints(volumeNode, segmentationNode, None, [(0, 0, 0)])


class SlowSpySession(ComponentSession):
    """Records the thread it runs on and takes a while, like the real network."""

    threads = []

    def set_clicks(self, clicks, progress=None, preview=None):
        SlowSpySession.threads.append(threading.current_thread())
        time.sleep(0.3)
        return super().set_clicks(clicks, progress, preview)


def test_network_runs_on_the_worker_thread_while_events_keep_flowing(monkeypatch):
    from CTSAM3DSlicerLib.logic import CTSAM3DLogic

    volumeNode, maskA, _ = scenes.addBlobVolume("axial")
    segmentationNode = scenes.makeSegmentation(volumeNode)
    pumped = []
    monkeypatch.setattr(slicer.app, "processEvents", lambda *args: pumped.append(threading.current_thread()))
    logic = CTSAM3DLogic(network=ThresholdNet(), sessionFactory=SlowSpySession)
    logic.segmentFromPoints(volumeNode, segmentationNode, None, [scenes.blobCentreWorldRAS(volumeNode)])
    assert SlowSpySession.threads and all(t is not threading.main_thread() for t in SlowSpySession.threads)
    assert len(pumped) >= 3 and all(t is threading.main_thread() for t in pumped)
    assert logic.lastClickSeconds >= 0.3


def test_real_interactive_session_with_threshold_network():
    """The default session factory (CTSAM3DLib.InteractiveSession) end to end, with a stand-in network
    whose answer is the bright structure: the segment must overlap it well on an oblique scan."""
    from CTSAM3DSlicerLib.logic import CTSAM3DLogic

    volumeNode, maskA, maskB = scenes.addBlobVolume("oblique")
    segmentationNode = scenes.makeSegmentation(volumeNode)
    logic = CTSAM3DLogic(network=ThresholdNet())
    logic.device = "cpu"
    segmentId = logic.segmentFromPoints(
        volumeNode, segmentationNode, None, [scenes.blobCentreWorldRAS(volumeNode)]
    )
    found = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode).astype(bool)
    bright = maskA | maskB
    dice = 2 * (found & bright).sum() / (found.sum() + bright.sum())
    assert dice > 0.85, dice
