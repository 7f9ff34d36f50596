"""The "CT-SAM3D" Segment Editor effect driven as the editor drives it: registration and clone, activation,
clicks through a fake interactor on a REAL slice node, writes through the REAL segment editor logic
(masking, overwrite, undo), prompts as markups saved with the scene, oblique and flipped volumes."""

import numpy as np
import pytest
import slicer
import vtk
from slicer_standins import effects, scenes
from slicer_standins.fixtures import pumpUntil, slicerEnv  # noqa: F401  (used by pytestmark)
from slicer_standins.sessions import ComponentSession
from standins import ThresholdNet

pytestmark = pytest.mark.usefixtures("slicerEnv")

EFFECT = "CT-SAM3D"
LEFT_PRESS = vtk.vtkCommand.LeftButtonPressEvent
KEY_PRESS = vtk.vtkCommand.KeyPressEvent


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
        interactor = effects.FakeInteractor(self.xyOf(pointRAS), shift=shift, control=control)
        consumed = self.harness.processEvent(interactor, LEFT_PRESS, self.sliceWidget)
        if wait:
            self.wait()
        return consumed

    def key(self, keySym, wait=True):
        consumed = self.harness.processEvent(
            effects.FakeInteractor(keySym=keySym), KEY_PRESS, self.sliceWidget
        )
        if wait:
            self.wait()
        return consumed

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
    from slicer_standins.application import makeModuleParent

    return makeModuleParent()


@pytest.fixture
def editor(request):
    request.getfixturevalue("slicerEnv")
    created = Editor()
    yield created
    created.harness.cleanup()


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
    assert editor.harness.saveStateCount == 1
    assert editor.harness.modifications == [
        (editor.s1, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
    ]
    editor.harness.cleanup()


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
    besideB = ((scenes.BLOB_B[0][0] + 3.0, scenes.BLOB_B[0][1] - 3.0, scenes.BLOB_B[0][2]), scenes.BLOB_B[1])
    assert editor.click(editor.centre(besideB), shift=True) is True
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    positive, negative = editor.lists()
    assert negative.GetNthControlPointLabel(0) == "-3"
    assert negative.GetDisplayNode().GetSelectedColor() == pytest.approx((1.0, 0.25, 0.21))
    assert [positive for _, positive in editor.logic._session.clicks] == [True, True, False]


def test_undo_restores_the_previous_labelmap_exactly(editor):
    editor.setSegment(editor.s1, editor.maskB)
    before = editor.segmentArray(editor.s1)
    editor.click(editor.centre())
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    editor.harness.undo()
    np.testing.assert_array_equal(editor.segmentArray(editor.s1), before)


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
    assert editor.key("t") is True
    assert editor.harness.parameterNode.GetAttribute(f"{EFFECT}.Polarity") == "negative"
    assert editor.effect.polarityButton.checked
    editor.key("T")
    assert editor.effect.positivePolarity
    editor.click(editor.centre(scenes.BLOB_A))
    editor.click(editor.centre(scenes.BLOB_B))
    assert editor.key("z") is True
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
    assert editor.key("q") is False
    assert (
        editor.harness.processEvent(
            effects.FakeInteractor(keySym="z", control=True), KEY_PRESS, editor.sliceWidget
        )
        is False
    ), "Ctrl+Z belongs to the editor's undo"


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
    from slicer_standins import newScene

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

    def set_clicks(self, clicks):
        import time

        SlowSession.calls += 1
        time.sleep(0.2)
        return super().set_clicks(clicks)


def test_changes_during_a_prediction_are_coalesced_into_one_rerun():
    SlowSession.calls = 0
    editor = Editor(sessionFactory=SlowSession)
    editor.click(editor.centre(scenes.BLOB_A), wait=False)
    pumpUntil(lambda: editor.effect._future is not None)
    positive, _ = editor.lists()
    positive.AddControlPointWorld(*editor.centre(scenes.BLOB_B), "")
    positive.SetNthControlPointPositionWorld(1, *editor.centre(scenes.BLOB_B))
    editor.wait()
    assert SlowSession.calls == 2
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA | editor.maskB)
    editor.harness.cleanup()
