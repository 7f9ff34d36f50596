"""The "CT-SAM3D" Segment Editor effect driven as the editor drives it: registration and clone, activation,
clicks through a fake interactor on a REAL slice node, writes through the REAL segment editor logic
(masking, overwrite, undo), prompts as markups saved with the scene, oblique and flipped volumes."""

import numpy as np
import pytest
import slicer
import vtk

from standins.networks import CrossPatchThresholdNet, ThresholdNet
from standins.slicer_standins import effects, qt, scenes
from standins.slicer_standins.fixtures import pumpUntil, slicerEnv  # noqa: F401  (used by pytestmark)
from standins.slicer_standins.sessions import ComponentSession

pytestmark = pytest.mark.usefixtures("slicerEnv")

EFFECT = "CT-SAM3D"
LEFT_PRESS = vtk.vtkCommand.LeftButtonPressEvent
KEY_PRESS = vtk.vtkCommand.KeyPressEvent
BESIDE_B = ((scenes.BLOB_B[0][0], scenes.BLOB_B[0][1], scenes.BLOB_B[0][2] + 1.0), scenes.BLOB_B[1])
"""Inside blob B one slice from its centre, where a prompt at B's centre is not drawn (so a press there is
no press on that prompt, which the markups widget would drag)."""


class Editor:
    """A scene with a CT, a segmentation (segments S1 selected, and 'other'), an editor with the
    effect active, and a Red-like axial slice view."""

    def __init__(self, geometry="axial", sessionFactory=ComponentSession, network="threshold"):
        from CTSAM3DSlicerLib.logic import CTSAM3DLogic

        import CTSAM3D

        self.module = CTSAM3D.CTSAM3D(_parent())
        slicer.app.emit("startupCompleted()")
        CTSAM3DLogic._shared = CTSAM3DLogic(
            network=ThresholdNet() if network == "threshold" else network, sessionFactory=sessionFactory
        )
        self.logic = CTSAM3DLogic._shared
        self.volume, self.maskA, self.maskB = scenes.addBlobVolume(geometry)
        self.segmentation = scenes.makeSegmentation(self.volume)
        self.s1 = self.segmentation.GetSegmentation().AddEmptySegment("", "S1")
        self.other = self.segmentation.GetSegmentation().AddEmptySegment("", "other")
        self.harness = effects.SegmentEditorHarness(slicer.mrmlScene, slicer.app.applicationLogic())
        self.harness.setSegmentationNode(self.segmentation)
        self.harness.setSourceVolumeNode(self.volume)
        self.harness.setCurrentSegmentID(self.s1)
        self.sliceNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode")
        self.sliceNode.SetOrientation("Axial")
        self.sliceNode.SetDimensions(400, 300, 1)
        self.sliceNode.SetFieldOfView(200.0, 150.0, 1.0)
        self.sliceWidget = effects.FakeSliceWidget(self.sliceNode)
        assert self.harness.setActiveEffectByName(EFFECT)
        self.adaptor = self.harness.effectByName(EFFECT)
        self.effect = self.adaptor.self()

    def xyOf(self, pointRAS):
        """Show ``pointRAS`` in the view (centred, as a user scrolls to it) and return its pixel."""
        self.sliceNode.JumpSliceByCentering(*pointRAS)
        rasToXY = np.linalg.inv(slicer.util.arrayFromVTKMatrix(self.sliceNode.GetXYToRAS()))
        xyz = rasToXY @ np.array([*pointRAS, 1.0])
        return int(round(xyz[0])), int(round(xyz[1]))

    def click(self, pointRAS, shift=False, control=False, wait=True):
        """A left click on ``pointRAS`` (the mouse moves there, press, release); whether the press was taken."""
        consumed = self.harness.leftClick(self.xyOf(pointRAS), self.sliceWidget, shift=shift, control=control)
        if wait:
            self.wait()
        return consumed

    def key(self, keySym, wait=True, **modifiers):
        """Press a key over the slice view: the editor's shortcuts first, then the view's observers."""
        result = self.harness.pressKey(keySym, self.sliceWidget, **modifiers)
        if wait:
            self.wait()
        return result

    def wait(self):
        pumpUntil(lambda: not self.effect.isBusy())

    def segmentMask(self, segmentId):
        return scenes.indicesToMask(
            scenes.segmentVoxelsInVolumeIndex(self.segmentation, segmentId, self.volume)
        )

    def centre(self, blob=scenes.BLOB_A):
        return scenes.blobCentreWorldRAS(self.volume, blob)

    def lists(self):
        node = self.harness.parameterNode
        return node.GetNodeReference(f"{EFFECT}.PositivePrompts"), node.GetNodeReference(
            f"{EFFECT}.NegativePrompts"
        )

    def setSegment(self, segmentId, mask):
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            mask.astype(np.uint8), self.segmentation, segmentId, self.volume
        )

    def segmentArray(self, segmentId):
        return slicer.util.arrayFromSegmentBinaryLabelmap(self.segmentation, segmentId, self.volume).astype(
            bool
        )


def _parent():
    from standins.slicer_standins.application import makeModuleParent

    return makeModuleParent()


def test_registration_clone_and_defaults(editor):
    factory = slicer.qSlicerSegmentEditorEffectFactory.instance()
    assert [effect.name for effect in factory.registeredEffects()] == [EFFECT]
    assert editor.module.registerEditorEffect() is None
    assert [effect.name for effect in factory.registeredEffects()] == [EFFECT], "registered twice"
    prototype = factory.registeredEffects()[0]
    assert prototype is not editor.adaptor and prototype.self() is not editor.effect
    assert editor.adaptor.title == "CT-SAM3D" and editor.adaptor.perSegment and editor.adaptor.requireSegments
    assert editor.harness.parameterNode.GetAttribute(f"{EFFECT}.Polarity") == "positive"
    assert editor.adaptor.optionsWidgetsFlat(), "setupOptionsFrame added no widgets"
    assert not editor.effect.icon().isNull()
    assert "T" in editor.effect.helpText() and "Shift" in editor.effect.helpText()
    assert "CTSAM3D" in slicer.selfTests


@pytest.mark.parametrize("geometry", sorted(scenes.GEOMETRIES))
def test_click_segments_the_structure_under_the_cursor(geometry):
    editor = Editor(geometry)
    centre = editor.centre()
    assert editor.click(centre) is True
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    assert not editor.segmentMask(editor.other).any()
    positive, negative = editor.lists()
    assert positive.GetNumberOfControlPoints() == 1 and negative.GetNumberOfControlPoints() == 0
    assert positive.GetNthControlPointLabel(0) == "+1"
    placed = [0.0, 0.0, 0.0]
    positive.GetNthControlPointPositionWorld(0, placed)
    np.testing.assert_allclose(placed, centre, atol=0.5 * max(editor.volume.GetSpacing()))
    assert positive.GetDisplayNode().GetSelectedColor() == pytest.approx((0.18, 0.80, 0.25))
    # One undo state; only the box the click changed is written: removed, then the mask added there.
    assert editor.harness.saveStateCount == 1
    modes = slicer.qSlicerSegmentEditorAbstractEffect
    (_, remove, removed), (_, add, added) = editor.harness.modifications
    assert (remove, add) == (modes.ModificationModeRemove, modes.ModificationModeAdd) and removed == added
    wholeVoxels = np.prod(editor.volume.GetImageData().GetDimensions())
    assert np.prod([added[1] - added[0] + 1, added[3] - added[2] + 1, added[5] - added[4] + 1]) < wholeVoxels / 2
    editor.harness.cleanup()


def test_a_segmentation_on_another_grid_is_written_whole(editor):
    """When the segment's voxels are not the volume's (here a reference geometry at half the spacing),
    a box of volume voxels is no box of segment voxels: the whole mask is resampled and Set."""
    reference = slicer.vtkOrientedImageData()
    ijkToRAS = vtk.vtkMatrix4x4()
    editor.volume.GetIJKToRASMatrix(ijkToRAS)
    reference.SetImageToWorldMatrix(ijkToRAS)
    reference.SetSpacing([spacing / 2 for spacing in reference.GetSpacing()])
    dimensions = editor.volume.GetImageData().GetDimensions()
    reference.SetExtent(0, 2 * dimensions[0] - 1, 0, 2 * dimensions[1] - 1, 0, 2 * dimensions[2] - 1)
    converter = slicer.vtkSegmentationConverter
    editor.segmentation.GetSegmentation().SetConversionParameter(
        converter.GetReferenceImageGeometryParameterName(), converter.SerializeImageGeometry(reference))
    editor.click(editor.centre())
    assert editor.harness.modifications == [(editor.s1, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet,
                                             None)]
    np.testing.assert_array_equal(editor.segmentArray(editor.s1), editor.maskA)


def test_cross_patch_toggle_and_cap_reach_the_session(editor):
    parameters = editor.harness.parameterNode
    assert parameters.GetAttribute(f"{EFFECT}.CrossPatch") == "on"
    assert parameters.GetAttribute(f"{EFFECT}.MaxPatches") == "16"
    assert editor.effect.crossPatchCheckBox.checked and editor.effect.maxPatchesSpinBox.value == 16
    editor.click(editor.centre())
    assert (editor.logic._session.cross_patch, editor.logic._session.max_patches) == (True, 16)
    editor.effect.crossPatchCheckBox.click()
    editor.effect.maxPatchesSpinBox.value = 5
    assert parameters.GetAttribute(f"{EFFECT}.CrossPatch") == "off"
    assert parameters.GetAttribute(f"{EFFECT}.MaxPatches") == "5"
    editor.click(editor.centre(scenes.BLOB_B))
    # The session was rebuilt with the new settings and replayed every prompt.
    assert (editor.logic._session.cross_patch, editor.logic._session.max_patches) == (False, 5)
    assert len(editor.logic._session.clicks) == 2
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA | editor.maskB)


def test_shift_click_is_negative_and_click_order_is_kept(editor):
    editor.click(editor.centre(scenes.BLOB_A))
    editor.click(editor.centre(scenes.BLOB_B))
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA | editor.maskB)
    assert editor.click(editor.centre(BESIDE_B), shift=True) is False, "a Shift press goes on to the view (pan)"
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    positive, negative = editor.lists()
    assert negative.GetNthControlPointLabel(0) == "-3"
    assert negative.GetDisplayNode().GetSelectedColor() == pytest.approx((1.0, 0.25, 0.21))
    assert [positive for _, positive in editor.logic._session.clicks] == [True, True, False]


def test_undo_restores_the_previous_labelmap_exactly(editor):
    editor.setSegment(editor.s1, editor.maskB)
    before = editor.segmentArray(editor.s1)
    editor.effect.startFromSegmentCheckBox.click()  # replace the segment instead of correcting it
    assert editor.harness.parameterNode.GetAttribute(f"{EFFECT}.StartFromSegment") == "off"
    editor.click(editor.centre())
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    editor.harness.undo()
    np.testing.assert_array_equal(editor.segmentArray(editor.s1), before)


def test_a_segment_that_holds_something_is_corrected_not_replaced(editor):
    """With the option on (the default), the segment's content is where the session starts: a click on
    another structure adds to it, and clearing the prompts brings the start back."""
    editor.setSegment(editor.s1, editor.maskB)
    assert editor.effect.startFromSegmentCheckBox.checked
    editor.click(editor.centre())
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA | editor.maskB)
    assert editor.harness.modifications[-1][0] == editor.s1, "written through the editor"
    editor.harness.undo()
    np.testing.assert_array_equal(editor.segmentArray(editor.s1), editor.maskB)
    editor.click(editor.centre(scenes.BLOB_B), shift=True)
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    editor.effect.clearPrompts()
    editor.wait()
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskB)


def test_masking_limits_the_result_to_the_editable_area(editor):
    region = np.zeros_like(editor.maskA)
    region[:, :, : int(scenes.BLOB_A[0][0])] = True
    regionId = editor.segmentation.GetSegmentation().AddEmptySegment("", "region")
    editor.setSegment(regionId, region)
    node = editor.harness.parameterNode
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    node.SetMaskSegmentID(regionId)
    node.SetOverwriteMode(node.OverwriteNone)
    editor.click(editor.centre())
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA & region)


@pytest.mark.parametrize("overwrite", ["all", "none"])
def test_overwrite_setting_decides_what_happens_to_other_segments(editor, overwrite):
    slab = np.zeros_like(editor.maskA)
    slab[int(scenes.BLOB_A[0][2]) :, :, :] = True
    editor.setSegment(editor.other, slab)
    node = editor.harness.parameterNode
    node.SetOverwriteMode(node.OverwriteAllSegments if overwrite == "all" else node.OverwriteNone)
    editor.click(editor.centre())
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    expectedOther = slab & ~editor.maskA if overwrite == "all" else slab
    np.testing.assert_array_equal(editor.segmentArray(editor.other), expectedOther)


def test_segments_that_do_not_overlap_are_untouched(editor):
    editor.setSegment(editor.other, editor.maskB)
    editor.click(editor.centre())
    np.testing.assert_array_equal(editor.segmentArray(editor.other), editor.maskB)


def test_keyboard_shortcuts(editor):
    assert editor.key("p") is True
    assert editor.harness.parameterNode.GetAttribute(f"{EFFECT}.Polarity") == "negative"
    assert editor.effect.polarityButton.checked
    editor.key("P")
    assert editor.effect.positivePolarity
    editor.click(editor.centre(scenes.BLOB_A))
    editor.click(editor.centre(scenes.BLOB_B))
    assert editor.key("u") is True
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    assert editor.lists()[0].GetNumberOfControlPoints() == 1
    finishedLists = editor.lists()
    assert editor.key("n") is True
    newId = editor.harness.parameterNode.GetSelectedSegmentID()
    assert newId not in (editor.s1, editor.other)
    assert finishedLists[0].GetLocked()
    assert editor.lists() == (None, None)
    editor.click(editor.centre(scenes.BLOB_B))
    np.testing.assert_array_equal(editor.segmentMask(newId), editor.maskB)
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    assert editor.key("h") is False, "keys the effect does not use reach the view"


def test_effect_keys_are_free_in_slicer():
    from SegmentEditorCTSAM3DLib.SegmentEditorEffect import SHORTCUTS

    for key in SHORTCUTS:
        for shift in (False, True):
            assert (key, shift, False) not in effects.EDITOR_SHORTCUTS, f"the Segment Editor takes {key!r}"
        assert key not in effects.SLICE_VIEW_KEYS, f"the slice view uses {key!r}"
    assert all(f"<b>{key.upper()}</b>" in _effectHelp() for key in SHORTCUTS)


def _effectHelp():
    from SegmentEditorCTSAM3DLib.SegmentEditorEffect import SegmentEditorEffect

    return SegmentEditorEffect(effects.ScriptedEffectAdaptor()).helpText()


def test_z_is_the_editor_undo_and_leaves_prompts_and_effect_consistent(editor):
    """Z never reaches the effect (a Segment Editor shortcut takes it): it undoes the segment's last
    state; the prompts stay, and the next prompt re-runs from all of them."""
    editor.click(editor.centre(scenes.BLOB_A))
    editor.click(editor.centre(scenes.BLOB_B))
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA | editor.maskB)
    assert editor.key("z") == "shortcut"
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    assert editor.lists()[0].GetNumberOfControlPoints() == 2
    assert editor.key("z", control=True) == "shortcut"
    assert not editor.segmentMask(editor.s1).any()
    editor.click(editor.centre(BESIDE_B), shift=True)
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    assert [positive for _, positive in editor.logic._session.clicks] == [True, True, False]


def test_pressing_on_a_prompt_leaves_it_to_markups_and_other_events_pass(editor):
    editor.click(editor.centre())
    assert editor.click(editor.centre()) is False
    assert editor.lists()[0].GetNumberOfControlPoints() == 1
    assert editor.click(editor.centre(scenes.BLOB_B), control=True) is False
    assert (
        editor.harness.processEvent(effects.FakeInteractor((5, 5)), LEFT_PRESS, effects.FakeThreeDWidget())
        is False
    )
    assert (
        editor.harness.processEvent(
            effects.FakeInteractor((5, 5)), vtk.vtkCommand.MouseMoveEvent, editor.sliceWidget
        )
        is False
    )
    assert editor.harness.warnings == []


def test_markups_tools_place_and_move_prompts(editor):
    editor.click(editor.centre(scenes.BLOB_A))
    positive, _ = editor.lists()
    editor.harness.interactionNode.SetCurrentInteractionMode(editor.harness.interactionNode.Place)
    assert editor.harness.activeEffect is editor.adaptor, "place mode must not deactivate the effect"
    positive.AddControlPointWorld(*editor.centre(scenes.BLOB_B), "P-2")  # as the markups place widget does
    editor.wait()
    assert positive.GetNthControlPointLabel(1) == "+2"
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA | editor.maskB)
    positive.SetNthControlPointPositionWorld(0, *editor.centre(scenes.BLOB_B))
    editor.wait()
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskB)
    positive.RemoveNthControlPoint(1)
    positive.RemoveNthControlPoint(0)
    editor.wait()
    assert not editor.segmentArray(editor.s1).any()


def test_place_buttons_start_markups_place_mode_on_the_right_list(editor):
    editor.effect.placeNegativeButton.click()
    _, negative = editor.lists()
    assert slicer.modules.markups.logic().GetActiveListID() == negative.GetID()
    assert editor.harness.interactionNode.GetCurrentInteractionMode() == editor.harness.interactionNode.Place
    assert editor.harness.activeEffect is editor.adaptor


def test_prompt_lists_under_a_parent_transform(editor):
    editor.click(editor.centre(scenes.BLOB_B))
    positive, _ = editor.lists()
    transform = scenes.addLinearTransform(scenes.affine(scenes.rotation((1, 1, 0), 30.0), (5.0, -7.0, 3.0)))
    positive.SetAndObserveTransformNodeID(transform.GetID())
    positive.SetNthControlPointPositionWorld(0, *editor.centre(scenes.BLOB_A))
    editor.wait()
    local = positive.GetNthControlPointPosition(0)
    assert not np.allclose(local, editor.centre(scenes.BLOB_A)), "the list is really transformed"
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)


def test_prompts_survive_saving_and_reloading_the_scene(editor, tmp_path):
    editor.click(editor.centre(scenes.BLOB_A))
    editor.click(editor.centre(scenes.BLOB_B), shift=True)
    path = scenes.saveScene(str(tmp_path))
    editor.harness.cleanup()
    slicer.mrmlScene.Clear()
    from standins.slicer_standins import newScene

    newScene(str(tmp_path / "cache2"), str(tmp_path / "temp2"))
    scenes.loadScene(path)
    positive = next(
        slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLMarkupsFiducialNode")
        for i in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode"))
        if slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLMarkupsFiducialNode").GetAttribute(
            "CTSAM3D.Polarity"
        )
        == "positive"
    )
    assert positive.GetNthControlPointLabel(0) == "+1"
    editorNode = slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentEditorNode").GetItemAsObject(0)
    assert editorNode.GetNodeReference(f"{EFFECT}.PositivePrompts").GetID() == positive.GetID()
    negative = editorNode.GetNodeReference(f"{EFFECT}.NegativePrompts")
    assert negative.GetNthControlPointLabel(0) == "-2"
    reloaded = [0.0, 0.0, 0.0]
    negative.GetNthControlPointPositionWorld(0, reloaded)
    np.testing.assert_allclose(reloaded, editor.centre(scenes.BLOB_B), atol=1.0)


def test_hidden_segment_is_not_edited(editor):
    editor.segmentation.GetDisplayNode().SetSegmentVisibility(editor.s1, False)
    assert editor.click(editor.centre()) is False
    assert editor.lists() == (None, None)


def test_missing_weights_are_reported_not_raised():
    editor = Editor(network=None)
    editor.logic.network = None
    editor.click(editor.centre())
    assert "no CT-SAM3D weights" in editor.effect.statusLabel.text
    assert not editor.segmentArray(editor.s1).any()
    editor.harness.cleanup()


class SlowSession(ComponentSession):
    calls = 0

    def set_clicks(self, clicks, progress=None, preview=None):
        import time

        SlowSession.calls += 1
        time.sleep(0.2)
        return super().set_clicks(clicks, progress, preview)


def test_changes_during_a_prediction_are_coalesced_into_one_rerun():
    SlowSession.calls = 0
    editor = Editor(sessionFactory=SlowSession)
    editor.click(editor.centre(scenes.BLOB_A), wait=False)
    positive, _ = editor.lists()
    seenRunning = []

    def changePromptsDuringTheRun():
        # Fired by the events the effect processes while it waits for the first prediction.
        seenRunning.append(editor.effect.runner.running)
        positive.AddControlPointWorld(*editor.centre(scenes.BLOB_B), "")
        positive.SetNthControlPointPositionWorld(1, *editor.centre(scenes.BLOB_B))

    qt.QTimer.singleShot(80, changePromptsDuringTheRun)
    editor.wait()
    assert seenRunning == [True]
    assert SlowSession.calls == 2
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA | editor.maskB)
    editor.harness.cleanup()


def test_place_with_markups_places_prompts_of_the_list_polarity(editor):
    """In place mode the effect leaves left clicks to the markups tool (which the editor's priority-1.0
    observer would otherwise never let through), and a point placed into the - list is negative even
    while the next click's polarity is +."""
    editor.click(editor.centre(scenes.BLOB_A))
    editor.click(editor.centre(scenes.BLOB_B))
    assert editor.effect.positivePolarity
    editor.effect.placeNegativeButton.click()
    assert editor.click(editor.centre(BESIDE_B)) is False, "the markups tool must get the click"
    positive, negative = editor.lists()
    assert positive.GetNumberOfControlPoints() == 2 and negative.GetNumberOfControlPoints() == 1
    assert negative.GetNthControlPointLabel(0) == "-3"
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    editor.effect.placePositiveButton.click()
    editor.click(editor.centre(scenes.BLOB_B))
    assert positive.GetNthControlPointLabel(2) == "+4"
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA | editor.maskB)
    editor.harness.interactionNode.SwitchToViewTransformMode()
    assert editor.click(editor.centre(scenes.BLOB_A) + 4.0, shift=True) is False, "a Shift press is the view's"
    assert negative.GetNumberOfControlPoints() == 2, "out of place mode, clicks are the effect's again"


def _sceneObservations(editor):
    """(node, observer tag) pairs the effect holds on the scene and the editor's parameter node; tests check
    the tags against the real nodes."""
    return list(editor.effect._editorObservations)


def _observersOn(node):
    return [event for event in effectMarkupsEvents() if node.HasObserver(event)]


def effectMarkupsEvents():
    from CTSAM3DSlicerLib.segmentprompts import POINT_EVENTS

    return POINT_EVENTS


@pytest.mark.parametrize("slicerVersion", [(5, 8), (5, 12)])
def test_nothing_is_left_running_after_leaving_the_editor_even_without_cleanup(slicerVersion):
    """Slicer 5.8 never calls an effect's cleanup(): leaving the module must already stop its timers and
    remove its observers (in later versions cleanup() comes only when the editor widget is destroyed)."""
    editor = Editor(sessionFactory=SlowSession)
    editor.harness.slicerVersion = slicerVersion
    editor.click(editor.centre(scenes.BLOB_A))
    positive, _ = editor.lists()
    sceneObservations = _sceneObservations(editor)
    assert _observersOn(positive) and sceneObservations
    positive.SetNthControlPointPositionWorld(0, *editor.centre(scenes.BLOB_B))  # a pending re-run
    assert editor.effect.isBusy()
    editor.harness.cleanup()
    assert qt.activeTimers() == [] and not editor.effect.isBusy()
    assert _observersOn(positive) == []
    assert all(node.GetCommand(tag) is None for node, tag in sceneObservations)
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)


def test_closing_the_scene_releases_the_effect_and_the_session(editor):
    editor.click(editor.centre(scenes.BLOB_A))
    positive, _ = editor.lists()
    positive.SetNthControlPointPositionWorld(0, *editor.centre(scenes.BLOB_B))
    assert editor.logic._session is not None and editor.effect.isBusy()
    sceneObservations = _sceneObservations(editor)
    slicer.mrmlScene.Clear(0)
    assert qt.activeTimers() == [] and not editor.effect.isBusy()
    assert editor.logic._session is None
    assert sceneObservations and all(node.GetCommand(tag) is None for node, tag in sceneObservations)
    assert _observersOn(positive) == []


def test_leaving_the_effect_during_a_prediction_cancels_it_and_writes_nothing():
    editor = Editor(sessionFactory=SlowSession)
    editor.click(editor.centre(scenes.BLOB_A), wait=False)
    qt.QTimer.singleShot(50, lambda: editor.harness.setActiveEffectByName(""))
    editor.wait()
    assert not editor.segmentArray(editor.s1).any()
    assert "Cancelled" in editor.effect.statusLabel.text
    editor.harness.cleanup()


def test_clear_messages_when_the_editor_lacks_what_is_needed(editor, monkeypatch):
    editor.harness.setSourceVolumeNode(None)
    editor.click(editor.centre())
    assert "Select a source volume" in editor.effect.statusLabel.text
    editor.harness.setSourceVolumeNode(editor.volume)
    monkeypatch.setattr(editor.adaptor, "defaultModifierLabelmap", lambda: None)
    editor.effect.clearPrompts()
    editor.wait()
    editor.click(editor.centre())
    assert "no labelmap to write into" in editor.effect.statusLabel.text
    assert not editor.segmentArray(editor.s1).any()
    editor.harness.parameterNode.SetSelectedSegmentID("")
    editor.effect.runPrompts()
    assert "Select a segment" in editor.effect.statusLabel.text


class ProgressSession(ComponentSession):
    """Reports 4 patches, one every 0.1 s, through the session's progress callback."""

    def set_clicks(self, clicks, progress=None, preview=None):
        import time

        for done in range(4):
            if progress is not None:
                progress(done, 4)
            time.sleep(0.1)
        return super().set_clicks(clicks, progress, preview)


def test_progress_is_shown_and_cancel_leaves_the_segment_as_it_was():
    editor = Editor(sessionFactory=ProgressSession)
    editor.click(editor.centre(scenes.BLOB_A))
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    assert not editor.effect.progressBar.visible and not editor.effect.cancelButton.visible
    seen = []

    def lookThenCancel():
        bar = editor.effect.progressBar
        seen.append((bar.visible, bar.maximum, bar.value, bar.format, editor.effect.cancelButton.visible))
        editor.effect.cancelButton.click()

    qt.QTimer.singleShot(250, lookThenCancel)
    editor.click(editor.centre(scenes.BLOB_B))
    visible, maximum, value, text, cancelVisible = seen[0]
    assert visible and cancelVisible and maximum == 4 and 1 <= value <= 3
    assert text == f"Segmenting: {value} of 4 patches"
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    assert "Cancelled" in editor.effect.statusLabel.text
    assert not editor.effect.progressBar.visible and not editor.effect.cancelButton.visible
    assert editor.lists()[0].GetNumberOfControlPoints() == 2, "the prompts stay"
    editor.effect.undoLastPrompt()
    editor.wait()
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    assert editor.effect.statusLabel.text.startswith("Done")
    editor.harness.cleanup()


def test_prompt_lists_follow_their_segmentation_when_an_import_renames_node_ids(editor, tmp_path):
    editor.click(editor.centre(scenes.BLOB_A))
    editor.click(editor.centre(scenes.BLOB_B), shift=True)
    path = scenes.saveScene(str(tmp_path))
    editor.harness.cleanup()
    from standins.slicer_standins import newScene

    newScene(str(tmp_path / "cache2"), str(tmp_path / "temp2"))
    # Nodes that take the imported nodes' IDs, so the import must rename them (and their references).
    volume, _, _ = scenes.addBlobVolume("flipped", name="already here")
    squatter = scenes.makeSegmentation(volume, name="already here")
    squatterId = squatter.GetSegmentation().AddEmptySegment(editor.s1, "S1")
    from CTSAM3DSlicerLib import prompts

    squatterLists = [prompts.createPromptList(slicer.mrmlScene, squatter, squatterId, p) for p in (True, False)]
    slicer.mrmlScene.SetURL(path)
    assert slicer.mrmlScene.Import()
    imported = next(
        node for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode") if node.GetName() == "Segmentation"
    )
    assert imported.GetID() != editor.segmentation.GetID(), "the import did not rename the segmentation"
    positive = prompts.findPromptList(slicer.mrmlScene, imported, editor.s1, True)
    negative = prompts.findPromptList(slicer.mrmlScene, imported, editor.s1, False)
    assert positive is not None and positive.GetID() not in [node.GetID() for node in squatterLists]
    assert positive.GetNthControlPointLabel(0) == "+1" and negative.GetNthControlPointLabel(0) == "-2"
    assert prompts.findPromptList(slicer.mrmlScene, squatter, squatterId, True).GetID() == squatterLists[0].GetID()


def test_a_box_drawn_with_a_markups_roi_prompts_its_centre_and_clips_the_result():
    from CTSAM3DSlicerLib.logic import defaultSessionFactory

    editor = Editor(sessionFactory=defaultSessionFactory)
    editor.logic.device = "cpu"
    editor.effect.boxButton.click()
    roi = editor.effect.boxNode()
    assert roi is not None and slicer.modules.markups.logic().GetActiveListID() == roi.GetID()
    # What the ROI tool leaves after two clicks: a box around the middle of blob A, smaller than it.
    centre = editor.centre(scenes.BLOB_A)
    roi.SetXYZ(*centre)
    roi.SetRadiusXYZ(4.0, 4.0, 4.0)
    editor.wait()
    positive, _ = editor.lists()
    assert positive.GetNumberOfControlPoints() == 1 and positive.GetNthControlPointLabel(0) == "+1"
    mask = editor.segmentMask(editor.s1)
    assert mask.any() and (mask & editor.maskA).sum() == mask.sum()
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    index = np.argwhere(mask)[:, ::-1]
    world = (scenes.volumeIjkToWorld(editor.volume) @ np.c_[index, np.ones(len(index))].T)[:3].T
    assert np.all(world >= np.array(bounds[0::2]) - 1e-6) and np.all(world <= np.array(bounds[1::2]) + 1e-6)
    assert mask.sum() < editor.maskA.sum(), "the box clipped nothing"
    editor.effect.removeBox()
    editor.wait()
    assert editor.effect.boxNode() is None
    assert editor.segmentMask(editor.s1).sum() > mask.sum(), "without the box the result is not clipped"
    editor.harness.cleanup()


def test_the_effect_works_the_same_with_the_network_on_a_server():
    """"Run the network on: a server": the logic opens RemoteSessions on a real loopback server (the app of
    ctsam3d serve, with the same network) and needs no network here; a click, a negative click and the
    editor's undo leave the segment exactly as they do with the network in Slicer."""
    from CTSAM3DSlicerLib.logic import defaultSessionFactory

    from CTSAM3DLib.server.app import BackgroundServer, create_app

    server = BackgroundServer(create_app(CrossPatchThresholdNet(), device="cpu")).start()
    segments = {}
    try:
        for where in ("in Slicer", "on the server"):
            editor = Editor(sessionFactory=defaultSessionFactory, network=CrossPatchThresholdNet())
            if where == "on the server":
                editor.logic.setNetwork(None)
                editor.logic.useServer(server.url)
                assert editor.logic.modelState() == f"on the server {server.url}"
            editor.click(editor.centre())
            editor.click(editor.centre() + 3.0, shift=True)
            afterTwo = editor.segmentArray(editor.s1)
            editor.harness.undo()
            segments[where] = (afterTwo, editor.segmentArray(editor.s1))
            assert afterTwo.any() and editor.harness.saveStateCount == 2
            if where == "on the server":
                assert type(editor.logic._session).__name__ == "RemoteSession" and editor.logic.network is None
            editor.harness.cleanup()
    finally:
        server.stop()
    for here, there in zip(segments["in Slicer"], segments["on the server"]):
        np.testing.assert_array_equal(here, there)
