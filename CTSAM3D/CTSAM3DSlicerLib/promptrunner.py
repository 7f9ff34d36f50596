"""Runs the prompts of one segment: the prediction on the worker thread while the main thread waits with
events processed and shows the mask as it grows (in a preview beside the segment), then the result written
into that segment, once.

A run is bound to the segment, source volume and options it started with. Events processed while it waits
may select another segment or change prompts: the run then goes on for its own segment only (re-running
while its prompts change) and reports that something changed, so that the caller runs again afterwards."""

import logging
import threading
from typing import Callable, NamedTuple, Optional, Tuple

from CTSAM3DSlicerLib.logic import PredictionCancelledError
from CTSAM3DSlicerLib.segmentpreview import SegmentPreview
from CTSAM3DSlicerLib.segmentprompts import SegmentPrompts
from CTSAM3DSlicerLib.segmentwriter import SegmentWriter


class Request(NamedTuple):
    """What one prediction segments: the prompts (world RAS, click order) of a segment on a volume."""

    segmentPrompts: SegmentPrompts
    volumeNode: object
    prompts: Tuple[Tuple[Tuple[float, float, float], bool], ...]
    initialMask: object
    boxRAS: Optional[Tuple[float, ...]]

    @property
    def key(self) -> tuple:
        """Equal for requests that would give the same result (the start mask by identity)."""
        return (self.segmentPrompts.key, self.volumeNode.GetID(), self.prompts, id(self.initialMask),
                self.boxRAS)


class PromptRunner:
    """One run at a time; ``run`` returns at once when called during a run (events are processed while it
    waits), noting that something changed."""

    def __init__(self, scriptedEffect, logic: Callable[[], object], setStatus: Callable[[str], None],
                 showProgress: Callable[[], None]) -> None:
        self.scriptedEffect = scriptedEffect
        self.writer = SegmentWriter(scriptedEffect)
        self._logic = logic
        self._setStatus = setStatus
        self._showProgress = showProgress
        self.running = False
        self.cancelled = threading.Event()
        self._changedDuringRun = False
        self._lastSubmitted = None

    def forgetLastRun(self) -> None:
        """Run the next request even if it equals the last one (its inputs changed in ways keys miss)."""
        self._lastSubmitted = None

    def reset(self) -> None:
        """Forget every segment's start and last write too (the scene, the source volume or the start option
        changed): prompting begins again from what each segment holds."""
        self._lastSubmitted = None
        self.writer.forget()

    def cancel(self) -> None:
        """Stop the running prediction at its next batch of patches; the segment is left as it was."""
        if self.running:
            self.cancelled.set()

    def run(self, segmentPrompts: SegmentPrompts) -> bool:
        """Segment from the segment's prompts unless they are what was last sent; again while they change.
        Returns True when a change arrived during the run that it may not have taken up (it was cancelled or
        failed, or the change was another segment's): the caller runs again."""
        if self.running:
            self._changedDuringRun = True
            return False
        self.running = True
        self._changedDuringRun = False
        parameterNode = self.scriptedEffect.parameterSetNode()
        volumeNode = parameterNode.GetSourceVolumeNode()
        startFromSegment = self.scriptedEffect.parameter("StartFromSegment") != "off"
        try:
            while not self.cancelled.is_set():
                request = self._request(segmentPrompts, volumeNode, startFromSegment)
                if request is None or request.key == self._lastSubmitted:
                    break
                self._lastSubmitted = request.key
                if not self._predictAndWrite(request):
                    break
                if not request.prompts:
                    # Back at the start: the next prompt starts from what the segment holds then.
                    self.writer.forget(segmentPrompts.key)
                    break
        finally:
            self.running = False
            self.cancelled.clear()
            self._showProgress()
        return self._changedDuringRun

    def _request(self, segmentPrompts: SegmentPrompts, volumeNode, startFromSegment: bool) -> Optional[Request]:
        """The request for the segment now, or None with the reason shown as the status."""
        if not segmentPrompts.segmentExists():
            self._setStatus("The segment was removed; select a segment in the Segment Editor.")
            return None
        if volumeNode is None or volumeNode.GetImageData() is None:
            self._setStatus("Select a source volume (the CT to segment) in the Segment Editor.")
            return None
        ordered = tuple((prompt.pointRAS, prompt.positive) for prompt in segmentPrompts.ordered())
        initialMask = None
        if startFromSegment:
            # What the segment holds when prompting begins is where the session starts, run after run.
            initialMask = self.writer.startMask(segmentPrompts.segmentationNode, segmentPrompts.segmentId, volumeNode)
        return Request(segmentPrompts, volumeNode, ordered, initialMask, segmentPrompts.boxBoundsRAS())

    def _predictAndWrite(self, request: Request) -> bool:
        """One prediction, waited for with events processed; False when it did not complete."""
        logic = self._logic()
        self._setStatus(f"Segmenting from {len(request.prompts)} prompt(s)...")
        segmentationNode, segmentId = request.segmentPrompts.segmentationNode, request.segmentPrompts.segmentId
        preview = SegmentPreview(segmentationNode, segmentId, request.volumeNode)
        try:
            logic.ensureModel(onTick=self._showProgress)
            logic.setCrossPatch(self.scriptedEffect.parameter("CrossPatch") != "off",
                                self.scriptedEffect.integerParameter("MaxPatches"))
            prediction = logic.predict(request.volumeNode, request.prompts, self.cancelled.is_set,
                                       self._showProgress, request.initialMask, request.boxRAS, preview.show)
            if self.cancelled.is_set():
                raise PredictionCancelledError("the prediction was cancelled; the segment was left as it was")
            self.writer.write(prediction, segmentationNode, segmentId, request.volumeNode, request.initialMask)
        except PredictionCancelledError:
            self._setStatus("Cancelled: the segment was left as it was. Change a prompt to segment again.")
            return False
        except Exception as error:
            logging.error("CT-SAM3D: %s", error)
            self._setStatus(f"Cannot segment: {error}")
            self._lastSubmitted = None
            return False
        finally:
            preview.remove()
        self._setStatus(f"Done in {logic.lastClickSeconds:.2f} s (model {logic.modelState()}).")
        return True
