"""The effect as a Slicer user meets it (issue 22): the mouse and key sequences real Slicer sends (move, press,
release; double click; modifier keys; ROI drawing; segment selection on the editor node; quitting) through the
stand-in view widgets (slicer_standins.effects.SliceViewWidgets), which pan, maximize, drag and place as
Slicer's do when the effect lets an event through."""

import re
import time

import numpy as np
import pytest
import slicer
import vtk
from test_slicer_effect import BESIDE_B, Editor, ProgressSession, SlowSession

from standins.slicer_standins import effects, qt, scenes
from standins.slicer_standins.fixtures import slicerEnv  # noqa: F401  (used by pytestmark)

pytestmark = pytest.mark.usefixtures("slicerEnv")

MOUSE_MOVE = vtk.vtkCommand.MouseMoveEvent


def pointCount(node):
    return 0 if node is None else node.GetNumberOfControlPoints()


def moveMouse(editor, xy):
    editor.harness.processEvent(effects.FakeInteractor(xy), MOUSE_MOVE, editor.sliceWidget)


def xyToRAS(editor):
    return slicer.util.arrayFromVTKMatrix(editor.sliceNode.GetXYToRAS())


def pixelOf(editor, pointRAS):
    """``pointRAS`` in the view's pixels, without scrolling (it must lie on the shown slice)."""
    xyz = np.linalg.inv(xyToRAS(editor)) @ np.array([*pointRAS, 1.0])
    assert abs(xyz[2]) < 0.5, "the point is not on the shown slice"
    return int(round(xyz[0])), int(round(xyz[1]))


def test_shift_drag_pans_the_view_and_a_shift_click_is_still_a_negative_prompt(editor):
    editor.click(editor.centre(scenes.BLOB_A))
    editor.click(editor.centre(scenes.BLOB_B))
    x, y = editor.xyOf(editor.centre(scenes.BLOB_B))
    before = xyToRAS(editor)
    editor.harness.leftDrag((x + 60, y), (x + 100, y + 10), editor.sliceWidget, shift=True)
    editor.wait()
    assert not np.allclose(xyToRAS(editor), before), "Shift+left drag did not pan the slice"
    positive, negative = editor.lists()
    assert (pointCount(positive), pointCount(negative)) == (2, 0), "the pan added a prompt"
    editor.click(editor.centre(BESIDE_B), shift=True)
    assert pointCount(negative) == 1 and negative.GetNthControlPointLabel(0) == "-3"
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)


def test_a_quick_second_click_is_a_prompt_and_leaves_the_view_as_it_is(editor):
    centre = editor.centre(scenes.BLOB_A)
    editor.xyOf(centre)
    first, second = centre - np.array([5.0, 0.0, 0.0]), centre + np.array([5.0, 0.0, 0.0])
    aborted = editor.harness.leftDoubleClick(pixelOf(editor, first), pixelOf(editor, second), editor.sliceWidget)
    editor.wait()
    assert aborted is True and editor.harness.sliceView.maximizeToggles == 0, "the slice view was maximized"
    positive, _ = editor.lists()
    assert pointCount(positive) == 2 and positive.GetNthControlPointLabel(1) == "+2"
    placed = [0.0, 0.0, 0.0]
    positive.GetNthControlPointPositionWorld(1, placed)
    np.testing.assert_allclose(placed, second, atol=0.5)
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)


def test_pressing_where_markups_picks_a_prompt_drags_it_instead_of_adding_one(editor):
    """Markups picks a control point within 11-16 px; a press 9 px from a prompt must drag that prompt."""
    centre = editor.centre(scenes.BLOB_A)
    editor.click(centre)
    x, y = pixelOf(editor, centre)
    editor.harness.leftDrag((x + 9, y), (x + 9, y + 6), editor.sliceWidget)
    editor.wait()
    positive, _ = editor.lists()
    assert pointCount(positive) == 1, "the press added a prompt instead of dragging the one under the mouse"
    moved = [0.0, 0.0, 0.0]
    positive.GetNthControlPointPositionWorld(0, moved)
    np.testing.assert_allclose(np.linalg.inv(xyToRAS(editor)) @ np.array([*moved, 1.0]), (x + 9, y + 6, 0, 1),
                               atol=1e-6)
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)


def test_the_placement_preview_is_no_prompt_and_u_removes_the_last_placed_one(editor):
    centre = editor.centre(scenes.BLOB_A)
    editor.click(centre)
    editor.click(editor.centre(scenes.BLOB_B))
    editor.xyOf(centre)
    editor.effect.placeNegativeButton.click()
    x, y = pixelOf(editor, centre)
    moveMouse(editor, (x + 30, y + 30))
    editor.wait()
    positive, negative = editor.lists()
    assert pointCount(negative) == 1 and negative.GetNthControlPointPositionStatus(0) == negative.PositionPreview
    assert not re.fullmatch(r"[+-]\d+", negative.GetNthControlPointLabel(0)), "the preview got a rank"
    assert editor.key("u") is True
    editor.wait()
    assert pointCount(positive) == 1, "U removed the preview instead of the last prompt"
    assert pointCount(negative) == 1
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)


def test_escape_in_persistent_place_mode_leaves_place_mode_too(editor):
    editor.click(editor.centre(scenes.BLOB_A))
    editor.effect.placeNegativeButton.click()
    interaction = editor.harness.interactionNode
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert editor.key("Escape") == "shortcut"
    assert editor.harness.activeEffect is None
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform
    _, negative = editor.lists()
    editor.harness.leftClick(editor.xyOf(editor.centre(scenes.BLOB_B)), editor.sliceWidget)
    assert pointCount(negative) == 0, "a click after Esc went into the hidden prompt list"


def drawBox(editor, cornerRAS, oppositeRAS):
    """Two clicks of the markups ROI tool in the slice view, the mouse moving between them (the preview
    corner follows it), as a user draws a box."""
    first, second = pixelOf(editor, cornerRAS), pixelOf(editor, oppositeRAS)
    editor.harness.leftClick(first, editor.sliceWidget)
    for step in range(1, 5):
        moveMouse(editor, [round(a + (b - a) * step / 4) for a, b in zip(first, second)])
        qt.processEvents()
    editor.harness.leftClick(second, editor.sliceWidget)


BOX_HALF_RAS = np.array([5.0, 4.0, 0.0])
"""Half the size of the boxes the tests draw (10 x 8 mm in the slice)."""


def editorWithBoxAroundBlobA():
    """An editor running the real session on the CPU, with a box drawn with the ROI tool around blob A's
    centre; returns the editor and that centre (RAS)."""
    from CTSAM3DSlicerLib.logic import defaultSessionFactory

    editor = Editor(sessionFactory=defaultSessionFactory)
    editor.logic.device = "cpu"
    centre = editor.centre(scenes.BLOB_A)
    editor.xyOf(centre)
    editor.effect.boxButton.click()
    drawBox(editor, centre - BOX_HALF_RAS, centre + BOX_HALF_RAS)
    editor.wait()
    return editor, centre


def test_a_box_prompts_its_centre_once_drawn_and_a_second_box_replaces_the_first():
    editor, centre = editorWithBoxAroundBlobA()
    roi = editor.effect.boxNode()
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    positive, _ = editor.lists()
    assert pointCount(positive) == 1
    prompt = [0.0, 0.0, 0.0]
    positive.GetNthControlPointPositionWorld(0, prompt)
    np.testing.assert_allclose(prompt, (np.array(bounds[0::2]) + bounds[1::2]) / 2, atol=0.5,
                               err_msg="the prompt is not at the centre of the drawn box")
    mask = editor.segmentMask(editor.s1)
    assert mask.any() and (mask & editor.maskA).sum() == mask.sum()

    centreB = editor.centre(scenes.BLOB_B)
    editor.xyOf(centreB)
    editor.effect.boxButton.click()
    drawBox(editor, centreB - BOX_HALF_RAS, centreB + BOX_HALF_RAS)
    editor.wait()
    assert editor.harness.sliceView.createdPlaceNodes == [], "the second box went into a new, ignored ROI"
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == 1
    editor.effect.boxNode().GetRASBounds(bounds)
    np.testing.assert_allclose((np.array(bounds[0::2]) + bounds[1::2]) / 2, centreB, atol=0.5)
    editor.harness.cleanup()


def test_prompts_of_a_segment_no_longer_selected_never_run_another_segment(editor):
    """Touching the previous segment's prompts after selecting another segment must not run the newly
    selected one (with "start from the segment's content" off it would be emptied)."""
    editor.setSegment(editor.other, editor.maskB)
    editor.effect.startFromSegmentCheckBox.click()
    editor.click(editor.centre(scenes.BLOB_A))
    positive, _ = editor.lists()
    editor.harness.setCurrentSegmentID(editor.other)
    assert not positive.GetDisplayNode().GetVisibility(), "the previous segment's prompts are still shown"
    positive.SetNthControlPointPositionWorld(0, *(editor.centre(scenes.BLOB_A) + 1.0))
    editor.wait()
    np.testing.assert_array_equal(editor.segmentArray(editor.other), editor.maskB)
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    editor.click(editor.centre(scenes.BLOB_A))
    newPositive, _ = editor.lists()
    assert newPositive.GetID() != positive.GetID() and pointCount(newPositive) == 1
    np.testing.assert_array_equal(editor.segmentArray(editor.other), editor.maskA)


def test_a_run_stays_with_the_segment_it_started_for():
    editor = Editor(sessionFactory=SlowSession)
    editor.setSegment(editor.other, editor.maskB)
    editor.effect.startFromSegmentCheckBox.click()
    editor.click(editor.centre(scenes.BLOB_A), wait=False)
    qt.QTimer.singleShot(50, lambda: editor.harness.setCurrentSegmentID(editor.other))
    editor.wait()
    np.testing.assert_array_equal(editor.segmentArray(editor.other), editor.maskB)
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA)
    assert {segmentId for segmentId, _, _ in editor.harness.modifications} == {editor.s1}
    editor.harness.cleanup()


def test_masking_inside_one_segment_never_moves_old_voxels_into_it(editor):
    """With "inside a single segment" masking Slicer adds what a Remove takes from the edited segment to
    the mask segment; the old voxels of the edited segment must stay where they were."""
    region = np.zeros_like(editor.maskA)
    region[:, :, : int(scenes.BLOB_A[0][0])] = True
    regionId = editor.segmentation.GetSegmentation().AddEmptySegment("", "region")
    editor.setSegment(regionId, region)
    old = editor.maskA & ~region
    old[: int(scenes.BLOB_A[0][2])] = False
    editor.setSegment(editor.s1, old)
    node = editor.harness.parameterNode
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    node.SetMaskSegmentID(regionId)
    node.SetOverwriteMode(node.OverwriteNone)
    editor.click(editor.centre())
    np.testing.assert_array_equal(editor.segmentArray(regionId), region)
    np.testing.assert_array_equal(editor.segmentArray(editor.s1), (editor.maskA & region) | old)


def test_closing_slicer_during_a_run_stops_waiting_for_it():
    """The main window's close (lastWindowClosed) comes while the effect waits in its own event loop; the
    application's aboutToQuit would come only after that loop returned."""

    class VerySlowSession(SlowSession):
        def set_clicks(self, clicks, progress=None, preview=None):
            time.sleep(5.0)
            return super().set_clicks(clicks, progress, preview)

    editor = Editor(sessionFactory=VerySlowSession)
    editor.click(editor.centre(scenes.BLOB_A), wait=False)
    qt.QTimer.singleShot(100, lambda: slicer.app.emit("lastWindowClosed()"))
    started = time.monotonic()
    editor.wait()
    assert time.monotonic() - started < 2.5, "Slicer waited for the prediction to end before quitting"
    assert not editor.segmentArray(editor.s1).any()
    editor.harness.cleanup()


def test_cleanup_disconnects_the_run_timer():
    """Slicer 5.10 calls cleanup() before deleting the effect; a connection left on the timer keeps the
    effect alive (Slicer issue #7392; the Threshold effect disconnects its timer there)."""
    editor = Editor()
    timer = editor.effect._runTimer
    editor.harness.cleanup()
    assert timer.timeout.slotCount() == 0


def test_a_prompt_added_while_a_cancelled_run_winds_down_is_run():
    editor = Editor(sessionFactory=ProgressSession)
    editor.click(editor.centre(scenes.BLOB_A), wait=False)

    def cancelThenAddAPrompt():
        editor.effect.cancelButton.click()
        positive, _ = editor.lists()
        positive.AddControlPointWorld(*editor.centre(scenes.BLOB_B), "")

    qt.QTimer.singleShot(150, cancelThenAddAPrompt)
    editor.wait()
    assert editor.effect.statusLabel.text.startswith("Done"), editor.effect.statusLabel.text
    np.testing.assert_array_equal(editor.segmentMask(editor.s1), editor.maskA | editor.maskB)
    editor.harness.cleanup()


def test_help_says_how_to_pan_place_negative_prompts_undo_and_switch_segments(editor):
    helpText = editor.effect.helpText()
    for told in ("Shift+left-drag", "pans", "Shift+left-click", "Ctrl+Z", "brings", "another segment"):
        assert told in helpText, told


def test_dragging_the_box_outline_resizes_the_box_and_adds_no_prompt():
    """The ROI widget picks the box's outline (its handles) like a prompt: a press there resizes the box."""
    editor, centre = editorWithBoxAroundBlobA()
    before = editor.segmentMask(editor.s1)
    bounds = [0.0] * 6
    editor.effect.boxNode().GetRASBounds(bounds)
    face = np.array([bounds[1], centre[1], centre[2]])
    editor.harness.leftDrag(pixelOf(editor, face), pixelOf(editor, face + np.array([4.0, 0.0, 0.0])),
                            editor.sliceWidget)
    editor.wait()
    positive, _ = editor.lists()
    assert pointCount(positive) == 1, "the press on the box's outline added a prompt"
    resized = [0.0] * 6
    editor.effect.boxNode().GetRASBounds(resized)
    assert resized[1] == pytest.approx(bounds[1] + 4.0, abs=0.5) and resized[0] == pytest.approx(bounds[0])
    after = editor.segmentMask(editor.s1)
    assert after.sum() > before.sum() and not (before & ~after).any(), "the resized box did not re-run"
    editor.harness.cleanup()
