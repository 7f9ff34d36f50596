"""A click that cross-patch prompting carries into several patches, seen growing in the Segment Editor effect:
each breadth-first level is drawn (on the main thread) in a temporary preview segmentation while the worker
goes on; the segment itself is written once at the end, as one undo step; a cancelled or failed run removes
the preview and leaves the segment exactly as it was; with the network on a server (remote mode) the same
previews stream from it. REAL MRML (slicer-core), the real InteractiveSession (and a real loopback server),
a rod that spans five patches on a flipped volume."""

import threading
import time

import numpy as np
import pytest
import slicer
from test_slicer_effect import Editor

from CTSAM3DLib.world import ras_to_lps
from standins.networks import CrossPatchThresholdNet, PacedNet
from standins.slicer_standins import qt
from standins.slicer_standins.fixtures import slicerEnv  # noqa: F401  (used by pytestmark)

pytestmark = pytest.mark.usefixtures("slicerEnv")

ROD_SHAPE_KJI = (28, 40, 170)
ROD_IJK_TO_RAS = np.array([[-2.0, 0.0, 0.0, 150.0], [0.0, 1.6, 0.0, -32.0], [0.0, 0.0, -2.5, 35.0], [0, 0, 0, 1.0]])
"""Every axis reversed from DICOM's usual storage but j, anisotropic: the rod runs 320 mm along i, more than three
96 mm patches, so cross-patch prompting reaches two levels of neighbours."""


class SlowCrossPatchNet(CrossPatchThresholdNet):
    """CrossPatchThresholdNet whose every decode takes ``seconds``, as the real network's do on a CPU, so that
    the main thread (which looks every 20 ms) sees each level before the next is done; ``failAtDecode`` makes
    that decode call fail."""

    def __init__(self, seconds: float = 0.5, failAtDecode: int = 0) -> None:
        super().__init__()
        self.seconds = seconds
        self.failAtDecode = failAtDecode

    def decode(self, features, points, labels, mask_prompt=None):
        time.sleep(self.seconds)
        if self.decode_calls + 1 == self.failAtDecode:
            raise RuntimeError("the network failed half way")
        return super().decode(features, points, labels, mask_prompt)


class RodEditor(Editor):
    """The editor of test_slicer_effect on a rod volume with segment 'rod' selected, the real session."""

    def __init__(self, network) -> None:
        from CTSAM3DSlicerLib.logic import defaultSessionFactory

        super().__init__(sessionFactory=defaultSessionFactory, network=network)
        self.logic.device = "cpu"
        voxels = np.full(ROD_SHAPE_KJI, -1000, dtype=np.int16)
        k, j, i = np.mgrid[0:ROD_SHAPE_KJI[0], 0:ROD_SHAPE_KJI[1], 0:ROD_SHAPE_KJI[2]]
        voxels[(((j - 20) * 1.6) ** 2 + ((k - 14) * 2.5) ** 2 <= 8.0**2) & (i >= 5) & (i < 165)] = 300
        self.rod = slicer.util.addVolumeFromArray(voxels, ROD_IJK_TO_RAS, "rod CT")
        self.rodSegmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "rod segmentation")
        self.rodSegmentation.CreateDefaultDisplayNodes()
        self.rodSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(self.rod)
        self.rodSegment = self.rodSegmentation.GetSegmentation().AddEmptySegment("", "rod", (0.2, 0.7, 0.3))
        self.harness.setSegmentationNode(self.rodSegmentation)
        self.harness.setSourceVolumeNode(self.rod)
        self.harness.setCurrentSegmentID(self.rodSegment)
        self.clickRAS = (ROD_IJK_TO_RAS @ np.array([85.0, 20.0, 14.0, 1.0]))[:3]
        self.previews = []
        """(thread, preview node flags, the preview on the volume grid, the segment then, undo states then)."""
        self.onPreview = None

    def recordPreviews(self, monkeypatch) -> None:
        from CTSAM3DSlicerLib.segmentpreview import SegmentPreview

        show = SegmentPreview.show

        def recordingShow(preview, update):
            show(preview, update)
            node = preview.node
            self.previews.append((
                threading.current_thread() is threading.main_thread(),
                (node.GetHideFromEditors(), node.GetSaveWithScene(), node.GetDisplayNode().GetSaveWithScene()),
                self.previewArray(node),
                self.rodArray(),
                self.harness.saveStateCount,
            ))
            if self.onPreview is not None:
                self.onPreview()

        monkeypatch.setattr(SegmentPreview, "show", recordingShow)

    def previewArray(self, node) -> np.ndarray:
        segmentId = node.GetSegmentation().GetNthSegmentID(0)
        return slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, self.rod).astype(bool)

    def rodArray(self) -> np.ndarray:
        return slicer.util.arrayFromSegmentBinaryLabelmap(self.rodSegmentation, self.rodSegment, self.rod).astype(bool)

    def previewNodes(self):
        return [node for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
                if node.GetName().endswith("CT-SAM3D preview")]

    def clickTheRod(self) -> None:
        self.effect.addPromptRAS(self.clickRAS, True)
        self.wait()

    def onePatchResult(self) -> np.ndarray:
        from CTSAM3DSlicerLib.coordinates import volumeToImage

        from CTSAM3DLib.session import InteractiveSession

        alone = InteractiveSession(CrossPatchThresholdNet(), volumeToImage(self.rod), device="cpu", max_patches=1)
        alone.add_click(ras_to_lps(self.clickRAS))
        return alone.mask_array().astype(bool)


def test_a_click_carried_into_neighbours_is_seen_growing_and_written_once(monkeypatch):
    editor = RodEditor(SlowCrossPatchNet())
    editor.recordPreviews(monkeypatch)
    editor.clickTheRod()
    assert editor.effect.statusLabel.text.startswith("Done"), editor.effect.statusLabel.text
    final = editor.rodArray()
    assert editor.logic._session.patch_count == 5
    np.testing.assert_array_equal(final, editor.logic._session.mask_array().astype(bool))
    assert len(editor.previews) == 2, "one preview before each of the two levels of neighbours"
    onMainThread, flags, shown, segmentThen, undoStatesThen = zip(*editor.previews)
    assert all(onMainThread)
    assert all(flag == (True, False, False) for flag in flags), "hidden from editors, not saved with the scene"
    assert not any(segment.any() for segment in segmentThen), "a preview wrote into the segment"
    assert undoStatesThen == (0, 0)
    # The first patch is on screen as soon as a one-patch click would be done; then the mask grows.
    np.testing.assert_array_equal(shown[0], editor.onePatchResult())
    assert shown[0].sum() < shown[1].sum() < final.sum()
    assert not (shown[1] & ~final).any()
    assert editor.previewNodes() == [], "the preview is removed when the result is written"
    assert editor.harness.saveStateCount == 1, "the whole click is one undo step"
    editor.harness.undo()
    assert not editor.rodArray().any()
    editor.harness.cleanup()


def test_with_the_network_on_a_server_the_click_is_seen_growing_too(monkeypatch):
    """Remote mode: the server streams its previews to the logic's RemoteSession, and the main thread draws each
    one while the server still works (the paced network waits for it before the next level): the previews a
    local session makes, then its result, written once."""
    from CTSAM3DSlicerLib.coordinates import volumeToImage

    from CTSAM3DLib.server.app import BackgroundServer, create_app
    from CTSAM3DLib.session import InteractiveSession

    network = PacedNet()
    server = BackgroundServer(create_app(network, device="cpu")).start()
    try:
        editor = RodEditor(None)
        editor.logic.useServer(server.url)
        editor.recordPreviews(monkeypatch)
        editor.onPreview = network.seen
        editor.clickTheRod()
        assert editor.effect.statusLabel.text.startswith("Done"), editor.effect.statusLabel.text
        assert type(editor.logic._session).__name__ == "RemoteSession"
        here = InteractiveSession(CrossPatchThresholdNet(), volumeToImage(editor.rod), device="cpu",
                                  max_patches=editor.logic.maxPatches)
        localPreviews = []
        here.add_click(ras_to_lps(editor.clickRAS), preview=localPreviews.append)
        assert len(editor.previews) == len(localPreviews) == 2
        onMainThread, _, shown, segmentThen, undoStatesThen = zip(*editor.previews)
        assert all(onMainThread) and not any(segment.any() for segment in segmentThen) and undoStatesThen == (0, 0)
        for drawn, update in zip(shown, localPreviews):
            expected = np.zeros(ROD_SHAPE_KJI, dtype=np.uint8)
            update.apply_to(expected)
            np.testing.assert_array_equal(drawn, expected.astype(bool))
        np.testing.assert_array_equal(editor.rodArray(), here.mask_array().astype(bool))
        assert editor.previewNodes() == [] and editor.harness.saveStateCount == 1
        editor.harness.cleanup()
    finally:
        server.stop()


def test_cancel_while_it_grows_on_a_server_keeps_nothing_and_the_next_run_is_right(monkeypatch):
    """Cancel at the first preview streamed from the server: the segment is left as it was; the forced next
    run starts from the logic's prompts, whatever the server did with the cancelled click."""
    from CTSAM3DLib.server.app import BackgroundServer, create_app

    network = PacedNet()
    server = BackgroundServer(create_app(network, device="cpu")).start()
    try:
        editor = RodEditor(None)
        editor.logic.useServer(server.url)
        before = _segmentWithSomethingElse(editor)
        editor.recordPreviews(monkeypatch)

        def cancelOnce():
            # The server may go on with the click until it notices the closed connection: no level of it,
            # nor of the next run, waits for a preview nobody will see.
            for _ in range(10):
                network.seen()
            editor.effect.cancelButton.click()

        editor.onPreview = cancelOnce
        editor.clickTheRod()
        assert len(editor.previews) == 1
        _assertCancelKeptNothingAndTheNextRunIsRight(editor, before)
        assert editor.effect.statusLabel.text.startswith("Done"), editor.effect.statusLabel.text
        assert editor.rodArray().sum() > before.sum()
        editor.harness.cleanup()
    finally:
        server.stop()


def _segmentWithSomethingElse(editor) -> np.ndarray:
    """The rod segment holding a block away from the rod (what the user had before the click)."""
    before = np.zeros(ROD_SHAPE_KJI, dtype=np.uint8)
    before[2:6, 2:8, 100:120] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(before, editor.rodSegmentation, editor.rodSegment, editor.rod)
    return before.astype(bool)


def _assertCancelKeptNothingAndTheNextRunIsRight(editor, before: np.ndarray) -> None:
    """After a cancel at a preview: the segment exactly as it was, no preview left, no undo state. The prompt
    stays; the next run (here: forced) segments from it, starting from the segment as it was, as one undo
    state."""
    assert "Cancelled: the segment was left as it was" in editor.effect.statusLabel.text
    np.testing.assert_array_equal(editor.rodArray(), before)
    assert editor.previewNodes() == [] and editor.harness.saveStateCount == 0
    editor.onPreview = None
    editor.effect.runner.forgetLastRun()
    editor.effect.runPrompts()
    editor.wait()
    np.testing.assert_array_equal(editor.rodArray(), editor.logic._session.mask_array().astype(bool))
    assert editor.harness.saveStateCount == 1


def test_cancel_while_it_grows_keeps_nothing_of_what_was_seen(monkeypatch):
    editor = RodEditor(SlowCrossPatchNet())
    before = _segmentWithSomethingElse(editor)
    editor.recordPreviews(monkeypatch)
    editor.onPreview = editor.effect.cancelButton.click
    editor.clickTheRod()
    assert len(editor.previews) == 1 and editor.previews[0][2].sum() > before.sum()
    _assertCancelKeptNothingAndTheNextRunIsRight(editor, before)
    assert editor.rodArray().any() and len(editor.previews) == 3
    editor.harness.cleanup()


def test_a_run_that_fails_after_a_preview_leaves_the_segment_as_it_was(monkeypatch):
    editor = RodEditor(SlowCrossPatchNet(failAtDecode=3))
    before = _segmentWithSomethingElse(editor)
    editor.recordPreviews(monkeypatch)
    editor.clickTheRod()
    assert len(editor.previews) >= 1
    assert "Cannot segment: the network failed half way" in editor.effect.statusLabel.text
    np.testing.assert_array_equal(editor.rodArray(), before)
    assert editor.previewNodes() == [] and editor.harness.saveStateCount == 0
    editor.harness.cleanup()


def test_leaving_the_effect_while_it_grows_removes_the_preview(monkeypatch):
    editor = RodEditor(SlowCrossPatchNet())
    editor.recordPreviews(monkeypatch)
    editor.onPreview = lambda: qt.QTimer.singleShot(0, lambda: editor.harness.setActiveEffectByName(""))
    editor.clickTheRod()
    assert len(editor.previews) >= 1
    assert not editor.rodArray().any() and editor.previewNodes() == []
    editor.harness.cleanup()
