"""Segment Editor effect "CT-SAM3D": segment the selected segment in 3D from positive and negative clicks.

Prompts are markups point lists (green +, red -), one pair per segment, referenced from the segment
editor node and saved with the scene. Every change of the prompts (click, markups placement, move,
delete) re-runs the CTSAM3DLib session on the worker thread while the main thread waits with events
processed (never a polling timer: under PythonQt that starves the worker); the result replaces the
selected segment through the editor (saveStateForUndo + modifySelectedSegmentByLabelmap), so masking,
overwrite and the editor's undo apply as for any other effect. Only the box of voxels a prediction
changed is written (Slicer's cost grows with the extent written), unless the segment may differ from
the session elsewhere. Absolute imports only (Slicer may load
this file as a top-level module named after its folder).
"""

import logging
import os
import threading

import numpy as np
import qt
import slicer
import vtk
from CTSAM3DSlicerLib import prompts
from CTSAM3DSlicerLib.coordinates import (
    arrayFromVtkMatrix,
    nodeToWorldMatrix,
    segmentOnVolumeGrid,
    updateExtent,
    writeMaskIntoOrientedImage,
    writeValuesIntoExtent,
)
from CTSAM3DSlicerLib.logic import CTSAM3DLogic, PredictionCancelledError
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from CTSAM3DLib.constants import MAX_OPEN_PATCHES

EFFECT_NAME = "CT-SAM3D"
POSITIVE_ROLE = "PositivePrompts"
NEGATIVE_ROLE = "NegativePrompts"
MOVE_DEBOUNCE_MSEC = 150
"""A dragged prompt re-runs once it has rested this long; a new or deleted prompt runs at once."""

# Keys the effect may use in a slice view. While the Segment Editor module is shown, its widget takes
# as QShortcuts (so no view sees them): Escape, Space, 0-9 and Shift+0-9, Z, Y, Ctrl+Z, Ctrl+Y, Q, W,
# / * , . < > and I (Slicer Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx,
# installKeyboardShortcuts, lines 3162-3243 at v5.8.1, 2314-2394 on main). The slice view acts on
# B F G R T V, the arrows and [ ] { } (Libs/MRML/DisplayableManager/vtkMRMLSliceIntersectionWidget.cxx
# 164-192 at v5.8.1), and S, Delete and BackSpace over a markups point (vtkSlicerMarkupsWidget.cxx 65-68).
SHORTCUTS = {"p": "togglePolarity", "u": "undoLastPrompt", "n": "finishSegment"}
"""Free keys (in a slice view while the effect is active) and the method each calls."""

MARKUPS_EVENTS = (
    slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
    slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
    slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
)


def sameNode(first, second):
    """Node identity by ID (VTK may hand out different Python wrappers for one node)."""
    if first is None or second is None:
        return first is None and second is None
    return first.GetID() == second.GetID()



class _StartMask:
    """A start mask (a SimpleITK image or None) compared by identity, so that a copy with equal voxels
    taken later never passes for it."""

    def __init__(self, mask):
        self.mask = mask

    def __eq__(self, other):
        return isinstance(other, _StartMask) and other.mask is self.mask

class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Click-prompted 3D segmentation with CT-SAM3D."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = EFFECT_NAME
        scriptedEffect.title = "CT-SAM3D"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.positivePolarity = True
        self._active = False
        self._promptObservations = []
        self._sceneObservations = []
        self._running = False
        self._cancel = threading.Event()
        self._startMasks = {}
        """(segmentation node ID, segment ID) -> the segment's content when prompting began (or None)."""
        self._segmentHolds = {}
        """(segmentation node ID, segment ID) -> (what the segment held then: the start mask object (None:
        empty) or the number of the session that wrote it last, the segment's labelmap, its modified time)."""
        self._lastSubmitted = None
        self._runTimer = qt.QTimer()
        self._runTimer.setSingleShot(True)
        self._runTimer.connect("timeout()", self.runPrompts)

    def clone(self):
        from qSlicerSegmentationsEditorEffectsPythonQt import qSlicerSegmentEditorScriptedEffect

        clonedEffect = qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return (
            "<html>Segment the selected segment in 3D with CT-SAM3D from clicks.<p>"
            "<b>Left-click</b> in a slice view: add a prompt of the current polarity (green +, red -). "
            "<b>Shift+left-click</b>: add a prompt of the other polarity. Drag a prompt to move it; "
            "delete it with the markups tools. <b>Place + / - with markups</b> places prompts with the "
            "markups tool instead (until you leave place mode). <b>Box</b>: draw a box (markups ROI) around the "
            "structure: a positive prompt is added at its centre and the result stays inside it.<p>"
            "With <b>Start from the segment's current content</b> (on by default), clicks correct what the "
            "segment already holds: outside the 96 mm patches they touch it stays as it was.<p>"
            "Keys in a slice view: <b>P</b> toggle polarity, <b>U</b> undo the last prompt, "
            "<b>N</b> finish this segment and start the next. Z and Ctrl+Z are the editor's undo of the "
            "segment.<p>"
            "The result replaces the selected segment and follows the editor's masking and overwrite "
            "settings. A long run shows its progress and can be cancelled (the segment stays as it was). "
            "Weights and device are set in the CT-SAM3D module.</html>"
        )

    @property
    def logic(self):
        return CTSAM3DLogic.shared()

    # ------------------------------------------------------------------- GUI
    def setupOptionsFrame(self):
        self.polarityButton = qt.QPushButton()
        self.polarityButton.checkable = True
        self.polarityButton.toolTip = "Next left-click's polarity (P toggles it; Shift+click uses the other)"
        self.polarityButton.connect("toggled(bool)", self._onPolarityButtonToggled)
        self.scriptedEffect.addLabeledOptionsWidget("Next click:", self.polarityButton)

        self.placePositiveButton = qt.QPushButton("Place + with markups")
        self.placePositiveButton.connect("clicked()", lambda: self.startMarkupsPlacement(True))
        self.placeNegativeButton = qt.QPushButton("Place - with markups")
        self.placeNegativeButton.connect("clicked()", lambda: self.startMarkupsPlacement(False))
        placeLayout = qt.QHBoxLayout()
        placeLayout.addWidget(self.placePositiveButton)
        placeLayout.addWidget(self.placeNegativeButton)
        self.scriptedEffect.addOptionsWidget(placeLayout)

        self.boxButton = qt.QPushButton("Box (ROI)")
        self.boxButton.toolTip = (
            "Draw a box around the structure with the markups ROI tool: a positive prompt goes to its centre "
            "and the result is clipped to the box"
        )
        self.boxButton.connect("clicked()", self.startBoxPlacement)
        self.removeBoxButton = qt.QPushButton("Remove box")
        self.removeBoxButton.connect("clicked()", self.removeBox)
        boxLayout = qt.QHBoxLayout()
        boxLayout.addWidget(self.boxButton)
        boxLayout.addWidget(self.removeBoxButton)
        self.scriptedEffect.addOptionsWidget(boxLayout)

        self.startFromSegmentCheckBox = qt.QCheckBox("Start from the segment's current content")
        self.startFromSegmentCheckBox.toolTip = (
            "Correct what the segment already holds (from another tool, a colleague, an earlier session) instead "
            "of replacing it: outside the 96 mm patches that prompts touch, it stays exactly as it was"
        )
        self.startFromSegmentCheckBox.connect("toggled(bool)", self._onStartFromSegmentToggled)
        self.scriptedEffect.addOptionsWidget(self.startFromSegmentCheckBox)

        self.undoPromptButton = qt.QPushButton("Undo last prompt (U)")
        self.undoPromptButton.connect("clicked()", self.undoLastPrompt)
        self.clearPromptsButton = qt.QPushButton("Clear prompts")
        self.clearPromptsButton.connect("clicked()", self.clearPrompts)
        self.finishButton = qt.QPushButton("Finish segment, start next (N)")
        self.finishButton.connect("clicked()", self.finishSegment)
        actionLayout = qt.QHBoxLayout()
        actionLayout.addWidget(self.undoPromptButton)
        actionLayout.addWidget(self.clearPromptsButton)
        actionLayout.addWidget(self.finishButton)
        self.scriptedEffect.addOptionsWidget(actionLayout)

        self.crossPatchCheckBox = qt.QCheckBox("Carry into neighbouring patches")
        self.crossPatchCheckBox.toolTip = (
            "Cross-patch prompting: when the structure reaches the edge of the 96 mm patch, continue it into the "
            "adjacent patches (one click segments a whole large organ)"
        )
        self.crossPatchCheckBox.connect("toggled(bool)", self._onCrossPatchChanged)
        self.maxPatchesSpinBox = qt.QSpinBox()
        self.maxPatchesSpinBox.minimum = 1
        self.maxPatchesSpinBox.maximum = 64
        self.maxPatchesSpinBox.toolTip = "Most 96 mm patches one segment may use (each costs one network run)"
        self.maxPatchesSpinBox.connect("valueChanged(int)", self._onCrossPatchChanged)
        crossPatchLayout = qt.QHBoxLayout()
        crossPatchLayout.addWidget(self.crossPatchCheckBox)
        crossPatchLayout.addWidget(qt.QLabel("max patches:"))
        crossPatchLayout.addWidget(self.maxPatchesSpinBox)
        self.scriptedEffect.addOptionsWidget(crossPatchLayout)

        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.toolTip = "Stop the running prediction; the segment stays as it was before it"
        self.cancelButton.visible = False
        self.cancelButton.connect("clicked()", self.cancelPrediction)
        progressLayout = qt.QHBoxLayout()
        progressLayout.addWidget(self.progressBar)
        progressLayout.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(progressLayout)

        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addLabeledOptionsWidget("Status:", self.statusLabel)
        self._showPolarity()

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Polarity", "positive")
        self.scriptedEffect.setParameterDefault("CrossPatch", "on")
        self.scriptedEffect.setParameterDefault("MaxPatches", MAX_OPEN_PATCHES)
        self.scriptedEffect.setParameterDefault("StartFromSegment", "on")

    def updateGUIFromMRML(self):
        self.positivePolarity = self.scriptedEffect.parameter("Polarity") != "negative"
        self._showPolarity()
        if hasattr(self, "crossPatchCheckBox"):
            for widget in (self.crossPatchCheckBox, self.maxPatchesSpinBox, self.startFromSegmentCheckBox):
                wasBlocked = widget.blockSignals(True)
                if widget is self.crossPatchCheckBox:
                    widget.checked = self.scriptedEffect.parameter("CrossPatch") != "off"
                elif widget is self.startFromSegmentCheckBox:
                    widget.checked = self.scriptedEffect.parameter("StartFromSegment") != "off"
                else:
                    widget.value = self.scriptedEffect.integerParameter("MaxPatches")
                widget.blockSignals(wasBlocked)

    def _onCrossPatchChanged(self, *_):
        self.scriptedEffect.setParameter("CrossPatch", "on" if self.crossPatchCheckBox.checked else "off")
        self.scriptedEffect.setParameter("MaxPatches", int(self.maxPatchesSpinBox.value))

    def _onStartFromSegmentToggled(self, checked):
        self.scriptedEffect.setParameter("StartFromSegment", "on" if checked else "off")
        self._startMasks.clear()
        self._segmentHolds.clear()
        self._lastSubmitted = None

    def applyCrossPatchSettings(self):
        """The effect's cross-patch toggle and cap, handed to the logic before each prediction."""
        self.logic.setCrossPatch(
            self.scriptedEffect.parameter("CrossPatch") != "off", self.scriptedEffect.integerParameter("MaxPatches")
        )

    def _showPolarity(self):
        if not hasattr(self, "polarityButton"):
            return
        wasBlocked = self.polarityButton.blockSignals(True)
        self.polarityButton.checked = not self.positivePolarity
        self.polarityButton.text = "positive (+)" if self.positivePolarity else "negative (-)"
        self.polarityButton.blockSignals(wasBlocked)

    def _onPolarityButtonToggled(self, negative):
        self.setPolarity(not negative)

    def setStatus(self, text):
        if hasattr(self, "statusLabel"):
            self.statusLabel.text = text

    def _showProgress(self):
        """The worker's progress (logic.progress) in the progress bar; hidden when nothing runs."""
        if not hasattr(self, "progressBar"):
            return
        progress = self.logic.progress if self._running else None
        self.progressBar.visible = self.cancelButton.visible = progress is not None
        if progress is None:
            return
        self.cancelButton.enabled = not self._cancel.is_set()
        self.progressBar.maximum = progress.total
        self.progressBar.value = progress.done
        if progress.stage == "Segmenting" and progress.total:
            self.progressBar.format = f"Segmenting: {progress.done} of {progress.total} patches"
        elif progress.total:
            self.progressBar.format = f"{progress.stage}: %p%"
        else:
            self.progressBar.format = f"{progress.stage}..."

    # ------------------------------------------------------------ life cycle
    # Slicer 5.8 never calls cleanup() (the hook came in 5.10), so everything that activate() starts is
    # released by deactivate() and by the scene's close, and cleanup() only repeats that.
    def activate(self):
        self._active = True
        scene = self.scriptedEffect.scene()
        self._sceneObservations = [
            (scene, scene.AddObserver(scene.StartCloseEvent, self._onSceneStartClose))
        ]
        self._observePromptLists()
        self._syncPromptListVisibility(shown=True)
        self._lastSubmitted = None
        self.setStatus(f"Model {self.logic.modelState()}. Left-click in a slice view to add a prompt.")

    def deactivate(self):
        self._active = False
        self._release()
        self._syncPromptListVisibility(shown=False)

    def cleanup(self):
        self._active = False
        self._release()

    def _release(self):
        """Stop what runs for the effect: the pending run, a running prediction, and every observer."""
        self._runTimer.stop()
        if self._running:
            self._cancel.set()
        self._removePromptObservers()
        for node, tag in self._sceneObservations:
            node.RemoveObserver(tag)
        self._sceneObservations = []

    def _onSceneStartClose(self, caller, event):
        self._release()
        self._lastSubmitted = None
        self._startMasks.clear()
        self._segmentHolds.clear()
        self.logic.releaseSession()

    def interactionNodeModified(self, interactionNode):
        # Markups place mode is used to add prompts; the default would deactivate the effect.
        pass

    def sourceVolumeNodeChanged(self):
        self._lastSubmitted = None
        self._startMasks.clear()

    # ----------------------------------------------------------------- lists
    def _segmentTarget(self):
        """(segmentation node, selected segment ID) or (None, None)."""
        parameterNode = self.scriptedEffect.parameterSetNode()
        if parameterNode is None:
            return None, None
        segmentationNode = parameterNode.GetSegmentationNode()
        segmentId = parameterNode.GetSelectedSegmentID()
        if segmentationNode is None or not segmentId:
            return None, None
        return segmentationNode, segmentId

    def promptLists(self, create=False):
        """(positive list, negative list) of the selected segment, also set as the parameter node's
        references; (None, None) when there is no selected segment or, without ``create``, no lists."""
        segmentationNode, segmentId = self._segmentTarget()
        if segmentationNode is None:
            return None, None
        scene = self.scriptedEffect.scene()
        positiveList = prompts.promptListFor(scene, segmentationNode, segmentId, True, create)
        negativeList = prompts.promptListFor(scene, segmentationNode, segmentId, False, create)
        for role, node in ((POSITIVE_ROLE, positiveList), (NEGATIVE_ROLE, negativeList)):
            if not sameNode(self.scriptedEffect.nodeReference(role), node):
                self.scriptedEffect.setNodeReference(role, node)
        if create:
            self._observePromptLists()
        return positiveList, negativeList

    def boxNode(self, create=False):
        """The selected segment's box (a markups ROI), or None (created on request)."""
        segmentationNode, segmentId = self._segmentTarget()
        if segmentationNode is None:
            return None
        scene = self.scriptedEffect.scene()
        node = prompts.findBox(scene, segmentationNode, segmentId)
        if node is None and create:
            node = prompts.createBox(scene, segmentationNode, segmentId)
            self._observePromptLists()
        return node

    def _observePromptLists(self):
        positiveList, negativeList = self.promptLists(create=False)
        wanted = [node for node in (positiveList, negativeList, self.boxNode()) if node is not None]
        observed = list(dict.fromkeys(node.GetID() for node, _ in self._promptObservations))
        if observed == [node.GetID() for node in wanted]:
            return
        self._removePromptObservers()
        for node in wanted:
            if node.IsA("vtkMRMLMarkupsROINode"):
                handlers = [(vtk.vtkCommand.ModifiedEvent, self._onBoxModified)]
            else:
                handlers = [(event, self._onPromptsModified) for event in MARKUPS_EVENTS]
            for event, handler in handlers:
                self._promptObservations.append((node, node.AddObserver(event, handler)))

    def _removePromptObservers(self):
        for node, tag in self._promptObservations:
            node.RemoveObserver(tag)
        self._promptObservations = []

    def _syncPromptListVisibility(self, shown):
        """Show the selected segment's prompts (and only those) while the effect is active."""
        positiveList, negativeList = self.promptLists(create=False) if shown else (None, None)
        scene = self.scriptedEffect.scene()
        if scene is None:
            return
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")):
            node = scene.GetNthNodeByClass(index, "vtkMRMLMarkupsFiducialNode")
            if node.GetAttribute(prompts.SEGMENT_ATTRIBUTE) is None or node.GetDisplayNode() is None:
                continue
            node.GetDisplayNode().SetVisibility(sameNode(node, positiveList) or sameNode(node, negativeList))

    # --------------------------------------------------------------- prompts
    def setPolarity(self, positive):
        self.scriptedEffect.setParameter("Polarity", "positive" if positive else "negative")
        self.positivePolarity = bool(positive)
        self._showPolarity()

    def togglePolarity(self):
        self.setPolarity(not self.positivePolarity)

    def addPromptRAS(self, pointRAS, positive):
        """Add a prompt at world RAS to the selected segment's lists (the re-run follows)."""
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return False
        positiveList, negativeList = self.promptLists(create=True)
        if positiveList is None:
            return False
        node, other = (positiveList, negativeList) if positive else (negativeList, positiveList)
        prompts.addPrompt(node, other, pointRAS, positive)
        self._syncPromptListVisibility(shown=True)
        return True

    def undoLastPrompt(self):
        positiveList, negativeList = self.promptLists(create=False)
        return prompts.removeLastPrompt(positiveList, negativeList)

    def clearPrompts(self):
        for node in self.promptLists(create=False):
            if node is not None:
                node.RemoveAllControlPoints()

    def finishSegment(self):
        """Keep the current segment and its prompts (locked, hidden) and start a new empty segment."""
        segmentationNode, segmentId = self._segmentTarget()
        if segmentationNode is None:
            return None
        for node in (*self.promptLists(create=False), self.boxNode()):
            if node is not None:
                node.SetLocked(True)
        self._startMasks.pop((segmentationNode.GetID(), segmentId), None)
        newSegmentId = segmentationNode.GetSegmentation().AddEmptySegment("")
        self.scriptedEffect.parameterSetNode().SetSelectedSegmentID(newSegmentId)
        self.scriptedEffect.setNodeReference(POSITIVE_ROLE, None)
        self.scriptedEffect.setNodeReference(NEGATIVE_ROLE, None)
        self._removePromptObservers()
        self._syncPromptListVisibility(shown=True)
        self._lastSubmitted = None
        return newSegmentId

    def startBoxPlacement(self):
        """Let the markups ROI tool draw the segment's box."""
        box = self.boxNode(create=True)
        if box is None:
            return
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.SetActiveList(box)
        markupsLogic.StartPlaceMode(False)

    def removeBox(self):
        box = self.boxNode()
        if box is not None:
            self.scriptedEffect.scene().RemoveNode(box)
            self._removePromptObservers()
            self._observePromptLists()
            self._runTimer.start(0)

    def _onBoxModified(self, caller, event):
        """A box drawn or changed: a positive prompt at its centre unless one lies inside it already, and a
        re-run (clipped to the box) once it rests."""
        bounds = prompts.boxBoundsRAS(caller)
        if bounds is None:
            return
        low, high = np.array(bounds[0::2]), np.array(bounds[1::2])
        positiveList, negativeList = self.promptLists(create=True)
        inside = [p for p in prompts.orderedPrompts(positiveList, negativeList)
                  if p.positive and np.all(np.array(p.pointRAS) >= low) and np.all(np.array(p.pointRAS) <= high)]
        if not inside:
            prompts.addPrompt(positiveList, negativeList, (low + high) / 2, True)
        self._runTimer.start(MOVE_DEBOUNCE_MSEC)

    def startMarkupsPlacement(self, positive):
        """Let the markups tools place the next prompt(s) of that polarity (persistent place mode; the
        effect leaves left clicks to them until the interaction mode changes back)."""
        positiveList, negativeList = self.promptLists(create=True)
        if positiveList is None:
            return
        self._syncPromptListVisibility(shown=True)
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.SetActiveList(positiveList if positive else negativeList)
        markupsLogic.StartPlaceMode(True)

    # ----------------------------------------------------------- interaction
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            if callerInteractor.GetControlKey() or callerInteractor.GetAltKey() or self._inPlaceMode():
                return False  # place mode: the markups tool takes the click
            xy = callerInteractor.GetEventPosition()
            if self._pressIsOnPrompt(xy, viewWidget):
                return False  # the markups widget moves the point
            positive = self.positivePolarity != bool(callerInteractor.GetShiftKey())
            return bool(self.addPromptRAS(self.xyToRas(xy, viewWidget), positive))
        if eventId == vtk.vtkCommand.KeyPressEvent:
            if callerInteractor.GetControlKey() or callerInteractor.GetAltKey():
                return False
            action = SHORTCUTS.get((callerInteractor.GetKeySym() or "").lower())
            if action is None:
                return False
            getattr(self, action)()
            return True
        return False

    @staticmethod
    def _inPlaceMode():
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        return interactionNode is not None and interactionNode.GetCurrentInteractionMode() == interactionNode.Place

    def _pressIsOnPrompt(self, xy, sliceWidget):
        positiveList, negativeList = self.promptLists(create=False)
        existing = prompts.orderedPrompts(positiveList, negativeList)
        if not existing:
            return False
        xyToRAS = arrayFromVtkMatrix(sliceWidget.mrmlSliceNode().GetXYToRAS())
        return prompts.pointNearInSlice(existing, xyToRAS, xy, toleranceXY=6.0, halfThickness=0.5)

    # ------------------------------------------------------------ prediction
    def _onPromptsModified(self, caller, event):
        positiveList, negativeList = self.promptLists(create=False)
        if sameNode(caller, positiveList):
            prompts.labelUnrankedPoints(positiveList, True, negativeList)
        elif sameNode(caller, negativeList):
            prompts.labelUnrankedPoints(negativeList, False, positiveList)
        moved = event == slicer.vtkMRMLMarkupsNode.PointModifiedEvent
        self._runTimer.start(MOVE_DEBOUNCE_MSEC if moved else 0)

    def isBusy(self):
        return self._running or self._runTimer.isActive()

    def cancelPrediction(self):
        """Stop the running prediction at its next batch of patches; the segment is left as it was."""
        if self._running:
            self._cancel.set()
            self._showProgress()

    def _currentRequest(self):
        """(segment ID, volume node, prompts in click order, initial mask or None, box RAS bounds or None)
        to segment now, or None with the reason shown as the status."""
        segmentationNode, segmentId = self._segmentTarget()
        if segmentationNode is None:
            self.setStatus("Select a segment (or add one) in the Segment Editor.")
            return None
        volumeNode = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        if volumeNode is None or volumeNode.GetImageData() is None:
            self.setStatus("Select a source volume (the CT to segment) in the Segment Editor.")
            return None
        ordered = prompts.orderedPrompts(*self.promptLists(create=False))
        initialMask = None
        if self.scriptedEffect.parameter("StartFromSegment") != "off":
            # What the segment holds when prompting begins is where the session starts, run after run.
            key = (segmentationNode.GetID(), segmentId)
            if key not in self._startMasks:
                self._startMasks[key] = segmentOnVolumeGrid(segmentationNode, segmentId, volumeNode)
                self._segmentHolds[key] = (_StartMask(self._startMasks[key]), *self._segmentState(segmentId))
            initialMask = self._startMasks[key]
        box = prompts.boxBoundsRAS(self.boxNode())
        return segmentId, volumeNode, tuple((p.pointRAS, p.positive) for p in ordered), initialMask, box

    def runPrompts(self):
        """Segment from the selected segment's prompts, unless they are what was last sent; repeats
        while prompts change during a run (events are processed meanwhile, and a call arriving then
        returns at once: this loop takes its change up)."""
        if self._running or not self._active:
            return
        self._running = True
        try:
            while self._active:
                request = self._currentRequest()
                if request is None:
                    break
                segmentId, volumeNode, orderedPrompts, initialMask, box = request
                key = (segmentId, volumeNode.GetID(), orderedPrompts, id(initialMask), box)
                if key == self._lastSubmitted:
                    break
                self._lastSubmitted = key
                if not self._predictAndApply(*request):
                    break
                if not orderedPrompts:
                    # Back at the start: the next prompt starts from what the segment holds then.
                    segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
                    self._startMasks.pop((segmentationNode.GetID(), segmentId), None)
                    break
        finally:
            self._running = False
            self._cancel.clear()
            self._showProgress()

    def _predictAndApply(self, segmentId, volumeNode, orderedPrompts, initialMask, box):
        """One prediction, waited for with events processed; False when it did not complete."""
        self._cancel.clear()
        self.setStatus(f"Segmenting from {len(orderedPrompts)} prompt(s)...")
        try:
            self.logic.ensureModel(onTick=self._showProgress)
            self.applyCrossPatchSettings()
            prediction = self.logic.predict(volumeNode, orderedPrompts, self._cancel.is_set, self._showProgress,
                                            initialMask, box)
            if self._cancel.is_set():
                raise PredictionCancelledError("the prediction was cancelled; the segment was left as it was")
            self.applyPrediction(prediction, segmentId, volumeNode, initialMask)
        except PredictionCancelledError:
            self.setStatus("Cancelled: the segment was left as it was. Change a prompt to segment again.")
            return False
        except Exception as error:
            logging.error("CT-SAM3D: %s", error)
            self.setStatus(f"Cannot segment: {error}")
            self._lastSubmitted = None
            return False
        self.setStatus(f"Done in {self.logic.lastClickSeconds:.2f} s (model {self.logic.modelState()}).")
        return True

    def applyPrediction(self, prediction, segmentId, volumeNode, initialMask=None):
        """Write a prediction into the segment through the editor, with one undo state.

        Only its update's box is written (Remove the box, then Add the mask there: a Set would clear the
        segment outside the box) when the segment still holds what the session's mask was before (the
        start mask the session began from, or this session's last write: nobody changed the segment since,
        by Undo or another effect) and its voxels are the volume's. Otherwise the whole mask is Set. Python
        can pass an extent only for the selected segment (the other overload takes ``const int[6]``)."""
        parameterNode = self.scriptedEffect.parameterSetNode()
        key = (parameterNode.GetSegmentationNode().GetID(), segmentId)
        held = self._segmentHolds.get(key)
        labelmap, modifiedTime = self._segmentState(segmentId)
        unchanged = held is not None and held[1] is labelmap and held[2] == modifiedTime and (
            held[0] == _StartMask(initialMask) if prediction.newSession else held[0] == prediction.session)
        modifier = self._modifierLabelmap(segmentId)
        extent = None
        if unchanged and segmentId == parameterNode.GetSelectedSegmentID():
            if prediction.update.empty:
                self._segmentHolds[key] = (prediction.session, labelmap, modifiedTime)
                return
            extent = updateExtent(modifier, nodeToWorldMatrix(parameterNode.GetSegmentationNode()), volumeNode,
                                  prediction.update)
        if extent is None:
            self.applyMask(prediction.wholeMask(), segmentId)
        else:
            modes = slicer.qSlicerSegmentEditorAbstractEffect
            self.scriptedEffect.saveStateForUndo()
            writeValuesIntoExtent(np.ones_like(prediction.update.mask), modifier, extent)
            self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier, modes.ModificationModeRemove, extent)
            writeValuesIntoExtent(prediction.update.mask, modifier, extent)
            self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier, modes.ModificationModeAdd, extent)
        self._segmentHolds[key] = (prediction.session, *self._segmentState(segmentId))

    def _segmentState(self, segmentId):
        """(the segment's binary labelmap object, its modified time): changes whenever anything writes it."""
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        labelmap = None if segment is None else segment.GetRepresentation(
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        return labelmap, (0 if labelmap is None else labelmap.GetMTime())

    def applyMask(self, mask, segmentId):
        """Replace the segment by ``mask`` (world LPS) through the editor, with an undo state."""
        parameterNode = self.scriptedEffect.parameterSetNode()
        modifier = self._modifierLabelmap(segmentId)
        writeMaskIntoOrientedImage(mask, modifier, nodeToWorldMatrix(parameterNode.GetSegmentationNode()))
        self.scriptedEffect.saveStateForUndo()
        modeSet = slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet
        if segmentId == parameterNode.GetSelectedSegmentID():
            self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier, modeSet)
        else:
            self.scriptedEffect.modifySegmentByLabelmap(
                parameterNode.GetSegmentationNode(), segmentId, modifier, modeSet)

    def _modifierLabelmap(self, segmentId):
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        if segmentationNode is None or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            raise ValueError("the segment was removed while it was being segmented")
        modifier = self.scriptedEffect.defaultModifierLabelmap()
        if modifier is None:
            raise ValueError(
                "the Segment Editor has no labelmap to write into (the segmentation has no reference "
                "geometry): select the source volume again in the Segment Editor"
            )
        return modifier
