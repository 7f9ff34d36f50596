"""Segment Editor effect "CT-SAM3D": segment the selected segment in 3D from positive and negative clicks.

Prompts are markups point lists (green +, red -), one pair per segment, referenced from the segment
editor node and saved with the scene. Every change of the prompts (click, markups placement, move,
delete) re-runs the CTSAM3DLib session on the worker thread; the result replaces the selected segment
through the editor (saveStateForUndo + modifySelectedSegmentByLabelmap), so masking, overwrite and the
editor's undo apply as for any other effect. Absolute imports only (Slicer may load this file as a
top-level module named after its folder).
"""

import logging
import os

import qt
import slicer
import vtk
from CTSAM3DSlicerLib import coordinates, prompts
from CTSAM3DSlicerLib.logic import DEFAULT_MAX_PATCHES, CTSAM3DLogic
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

EFFECT_NAME = "CT-SAM3D"
POSITIVE_ROLE = "PositivePrompts"
NEGATIVE_ROLE = "NegativePrompts"
DEBOUNCE_MSEC = 150
POLL_MSEC = 30
SHORTCUTS = {"t": "togglePolarity", "z": "undoLastPrompt", "n": "finishSegment"}
"""Keys (in a slice view while the effect is active) and the method each calls."""

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


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Click-prompted 3D segmentation with CT-SAM3D."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = EFFECT_NAME
        scriptedEffect.title = "CT-SAM3D"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.positivePolarity = True
        self._observations = []
        self._future = None
        self._starting = False
        self._futureSegmentId = None
        self._rerunWanted = False
        self._lastSubmitted = None
        self._debounceTimer = qt.QTimer()
        self._debounceTimer.setSingleShot(True)
        self._debounceTimer.interval = DEBOUNCE_MSEC
        self._debounceTimer.connect("timeout()", self.runPrompts)
        self._pollTimer = qt.QTimer()
        self._pollTimer.interval = POLL_MSEC
        self._pollTimer.connect("timeout()", self._collectResult)

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
            "delete it with the markups tools.<p>"
            "Keys in a slice view: <b>T</b> toggle polarity, <b>Z</b> undo the last prompt, "
            "<b>N</b> finish this segment and start the next. Ctrl+Z is the editor's undo.<p>"
            "The result replaces the selected segment and follows the editor's masking and overwrite "
            "settings. Weights and device are set in the CT-SAM3D module.</html>"
        )

    @property
    def logic(self):
        return CTSAM3DLogic.shared()

    # ------------------------------------------------------------------- GUI
    def setupOptionsFrame(self):
        self.polarityButton = qt.QPushButton()
        self.polarityButton.checkable = True
        self.polarityButton.toolTip = "Next left-click's polarity (T toggles it; Shift+click uses the other)"
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

        self.undoPromptButton = qt.QPushButton("Undo last prompt (Z)")
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

        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addLabeledOptionsWidget("Status:", self.statusLabel)
        self._showPolarity()

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Polarity", "positive")
        self.scriptedEffect.setParameterDefault("CrossPatch", "on")
        self.scriptedEffect.setParameterDefault("MaxPatches", DEFAULT_MAX_PATCHES)

    def updateGUIFromMRML(self):
        self.positivePolarity = self.scriptedEffect.parameter("Polarity") != "negative"
        self._showPolarity()
        if hasattr(self, "crossPatchCheckBox"):
            for widget in (self.crossPatchCheckBox, self.maxPatchesSpinBox):
                wasBlocked = widget.blockSignals(True)
                if widget is self.crossPatchCheckBox:
                    widget.checked = self.scriptedEffect.parameter("CrossPatch") != "off"
                else:
                    widget.value = self.scriptedEffect.integerParameter("MaxPatches")
                widget.blockSignals(wasBlocked)

    def _onCrossPatchChanged(self, *_):
        self.scriptedEffect.setParameter("CrossPatch", "on" if self.crossPatchCheckBox.checked else "off")
        self.scriptedEffect.setParameter("MaxPatches", int(self.maxPatchesSpinBox.value))

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

    # ------------------------------------------------------------ life cycle
    def activate(self):
        self._observePromptLists()
        self._syncPromptListVisibility(shown=True)
        self._lastSubmitted = None
        self.setStatus(f"Model {self.logic.modelState()}. Left-click in a slice view to add a prompt.")

    def deactivate(self):
        self._removePromptObservers()
        self._syncPromptListVisibility(shown=False)

    def cleanup(self):
        self._removePromptObservers()
        self._debounceTimer.stop()
        self._pollTimer.stop()

    def interactionNodeModified(self, interactionNode):
        # Markups place mode is used to add prompts; the default would deactivate the effect.
        pass

    def sourceVolumeNodeChanged(self):
        self._lastSubmitted = None

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

    def _observePromptLists(self):
        positiveList, negativeList = self.promptLists(create=False)
        wanted = [node for node in (positiveList, negativeList) if node is not None]
        observed = [node for node, _ in self._observations[:: len(MARKUPS_EVENTS)]]
        if len(observed) == len(wanted) and all(map(sameNode, observed, wanted)):
            return
        self._removePromptObservers()
        for node in wanted:
            for event in MARKUPS_EVENTS:
                self._observations.append((node, node.AddObserver(event, self._onPromptsModified)))

    def _removePromptObservers(self):
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []

    def _syncPromptListVisibility(self, shown):
        """Show the selected segment's prompts (and only those) while the effect is active."""
        positiveList, negativeList = self.promptLists(create=False) if shown else (None, None)
        scene = self.scriptedEffect.scene()
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
        for node in self.promptLists(create=False):
            if node is not None:
                node.SetLocked(True)
        newSegmentId = segmentationNode.GetSegmentation().AddEmptySegment("")
        self.scriptedEffect.parameterSetNode().SetSelectedSegmentID(newSegmentId)
        self.scriptedEffect.setNodeReference(POSITIVE_ROLE, None)
        self.scriptedEffect.setNodeReference(NEGATIVE_ROLE, None)
        self._removePromptObservers()
        self._syncPromptListVisibility(shown=True)
        self._lastSubmitted = None
        return newSegmentId

    def startMarkupsPlacement(self, positive):
        """Let the markups tools place the next prompt(s) of that polarity."""
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
            if callerInteractor.GetControlKey() or callerInteractor.GetAltKey():
                return False
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

    def _pressIsOnPrompt(self, xy, sliceWidget):
        positiveList, negativeList = self.promptLists(create=False)
        existing = prompts.orderedPrompts(positiveList, negativeList)
        if not existing:
            return False
        xyToRAS = coordinates.arrayFromVtkMatrix(sliceWidget.mrmlSliceNode().GetXYToRAS())
        return prompts.pointNearInSlice(existing, xyToRAS, xy, toleranceXY=6.0, halfThickness=0.5)

    # ------------------------------------------------------------ prediction
    def _onPromptsModified(self, caller, event):
        positiveList, negativeList = self.promptLists(create=False)
        if sameNode(caller, positiveList):
            prompts.labelUnrankedPoints(positiveList, True, negativeList)
        elif sameNode(caller, negativeList):
            prompts.labelUnrankedPoints(negativeList, False, positiveList)
        self._debounceTimer.start()

    def runPrompts(self):
        """Send the selected segment's prompts to the network, unless they are what was last sent."""
        if self._future is not None or self._starting:
            self._rerunWanted = True
            return
        segmentationNode, segmentId = self._segmentTarget()
        if segmentationNode is None:
            return
        volumeNode = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        if volumeNode is None:
            self.setStatus("Select a source volume.")
            return
        ordered = prompts.orderedPrompts(*self.promptLists(create=False))
        request = (segmentId, volumeNode.GetID(), tuple((p.pointRAS, p.positive) for p in ordered))
        if request == self._lastSubmitted:
            return
        self._starting = True  # loading the model pumps events; a prompt change then waits its turn
        try:
            self.logic.ensureModel()
            self.applyCrossPatchSettings()
            self._future = self.logic.startPrediction(volumeNode, request[2])
        except Exception as error:
            logging.error("CT-SAM3D: %s", error)
            self.setStatus(f"Cannot segment: {error}")
            return
        finally:
            self._starting = False
        self._lastSubmitted = request
        self._futureSegmentId = segmentId
        self.setStatus(f"Segmenting from {len(ordered)} prompt(s)...")
        self._pollTimer.start()

    def isBusy(self):
        return self._future is not None or self._starting or self._debounceTimer.isActive()

    def _collectResult(self):
        if self._future is None or not self._future.done():
            return
        self._pollTimer.stop()
        future, segmentId = self._future, self._futureSegmentId
        self._future = None
        try:
            self.applyMask(future.result(), segmentId)
            self.setStatus(f"Done in {self.logic.lastClickSeconds:.2f} s (model {self.logic.modelState()}).")
        except Exception as error:
            logging.error("CT-SAM3D: %s", error)
            self.setStatus(f"Segmentation failed: {error}")
            self._lastSubmitted = None
        if self._rerunWanted:
            self._rerunWanted = False
            self.runPrompts()

    def applyMask(self, mask, segmentId):
        """Replace the segment by ``mask`` (world LPS) through the editor, with an undo state."""
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        if segmentationNode is None or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            return
        modifier = self.scriptedEffect.defaultModifierLabelmap()
        segmentationToWorld = coordinates.nodeToWorldMatrix(segmentationNode)
        coordinates.writeMaskIntoOrientedImage(mask, modifier, segmentationToWorld)
        modeSet = slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet
        self.scriptedEffect.saveStateForUndo()
        if segmentId == self.scriptedEffect.parameterSetNode().GetSelectedSegmentID():
            self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier, modeSet)
        else:
            self.scriptedEffect.modifySegmentByLabelmap(segmentationNode, segmentId, modifier, modeSet)
