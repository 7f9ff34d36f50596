"""Segment Editor effect "CT-SAM3D": segment the selected segment in 3D from positive and negative clicks.

The effect keeps the editor's hooks (options, activation, view events, keys). The prompts of a segment (two
markups point lists and a box, saved with the scene) are CTSAM3DSlicerLib.segmentprompts.SegmentPrompts;
every change of the selected segment's prompts arms a timer whose run (CTSAM3DSlicerLib.promptrunner) is bound
to that segment, predicts on the worker thread while events are processed (showing the mask as it grows in a
preview, CTSAM3DSlicerLib.segmentpreview), and writes the result through the editor
(CTSAM3DSlicerLib.segmentwriter), so masking, overwrite and undo apply as for any other effect.
Absolute imports only (Slicer may load this file as a top-level module named after its folder).
"""

import math
import os

import qt
import slicer
import vtk
from CTSAM3DSlicerLib.logic import CTSAM3DLogic
from CTSAM3DSlicerLib.promptrunner import PromptRunner
from CTSAM3DSlicerLib.segmentprompts import SegmentPrompts, sameNode
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from CTSAM3DLib.constants import MAX_OPEN_PATCHES

EFFECT_NAME = "CT-SAM3D"
POSITIVE_ROLE = "PositivePrompts"
NEGATIVE_ROLE = "NegativePrompts"
MOVE_DEBOUNCE_MSEC = 150
"""A dragged prompt re-runs once it has rested this long; a new or deleted prompt runs at once."""
CLICK_TOLERANCE_PIXELS = 3.0
"""A Shift+press and release nearer than this is a click (a prompt), farther a drag (the view's pan)."""

# Keys the effect may use in a slice view. While the Segment Editor module is shown, its widget takes
# as QShortcuts (so no view sees them): Escape, Space, 0-9 and Shift+0-9, Z, Y, Ctrl+Z, Ctrl+Y, Q, W,
# / * , . < > and I (Slicer Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx,
# installKeyboardShortcuts, lines 3162-3243 at v5.8.1, 2314-2394 on main). The slice view acts on
# B F G R T V, the arrows and [ ] { } (Libs/MRML/DisplayableManager/vtkMRMLSliceIntersectionWidget.cxx
# 164-192 at v5.8.1), and S, Delete and BackSpace over a markups point (vtkSlicerMarkupsWidget.cxx 65-68).
SHORTCUTS = {"p": "togglePolarity", "u": "undoLastPrompt", "n": "finishSegment"}
"""Free keys (in a slice view while the effect is active) and the method each calls."""


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
        self._editorObservations = []
        self._shown = None
        """The SegmentPrompts of the selected segment, observed and shown while the effect is active."""
        self._pending = None
        """The SegmentPrompts whose change armed the run timer."""
        self._shiftPress = None
        self.runner = PromptRunner(scriptedEffect, lambda: self.logic, self.setStatus, self._showProgress)
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
            "<b>Shift+left-click</b> (without moving): add a prompt of the other polarity, e.g. a negative "
            "prompt where the result leaks. <b>Shift+left-drag</b> pans the view as usual. Drag a prompt to "
            "move it; delete it with the markups tools. <b>Place + / - with markups</b> places prompts with the "
            "markups tool instead (until you leave place mode or press Esc). <b>Box</b>: draw a box (markups "
            "ROI, two clicks) around the structure: once drawn, a positive prompt is added at its centre and the "
            "result stays inside it; pressing Box again draws it anew.<p>"
            "With <b>Start from the segment's current content</b> (on by default), clicks correct what the "
            "segment already holds: outside the 96 mm patches they touch it stays as it was.<p>"
            "Keys in a slice view (click in it first, so that it has the keyboard focus): <b>P</b> toggle "
            "polarity, <b>U</b> undo the last prompt, <b>N</b> finish this segment and start the next.<p>"
            "Each prompt list belongs to its segment: selecting another segment shows that segment's prompts "
            "(the others are kept, hidden), and a running prediction still goes to the segment it started "
            "for.<p>"
            "The result replaces the selected segment and follows the editor's masking and overwrite "
            "settings. <b>Z</b> / <b>Ctrl+Z</b> is the editor's undo of the segment; the prompts stay, so the "
            "next prompt change brings the undone result back with it (to take a click back, press U). "
            "A long run shows its progress and the mask as it grows (drawn over the segment, which is written "
            "once at the end, as one undo step), and can be cancelled (the segment stays as it was). "
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
        self.runner.reset()

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
        progress = self.logic.progress if self.runner.running else None
        self.progressBar.visible = self.cancelButton.visible = progress is not None
        if progress is None:
            return
        self.cancelButton.enabled = not self.runner.cancelled.is_set()
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
    # released by deactivate() and by the scene's close; cleanup() also disconnects the run timer, whose
    # connection would keep the effect alive (Slicer issue #7392; the Threshold effect does the same).
    def activate(self):
        self._active = True
        scene = self.scriptedEffect.scene()
        parameterNode = self.scriptedEffect.parameterSetNode()
        self._editorObservations = [
            (scene, scene.AddObserver(scene.StartCloseEvent, self._onSceneStartClose)),
            (parameterNode, parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, self._onEditorNodeModified)),
        ]
        self._followSelection()
        self.runner.forgetLastRun()
        self.setStatus(f"Model {self.logic.modelState()}. Left-click in a slice view to add a prompt.")

    def deactivate(self):
        self._leaveOwnPlaceMode()
        self._active = False
        self._release()
        scene = self.scriptedEffect.scene()
        if scene is not None:
            SegmentPrompts.showOnly(scene, None)

    def cleanup(self):
        self._active = False
        self._release()
        self._runTimer.disconnect("timeout()", self.runPrompts)

    def _release(self):
        """Stop what runs for the effect: the pending run, a running prediction, and every observer."""
        self._runTimer.stop()
        self._pending = None
        self.runner.cancel()
        if self._shown is not None:
            self._shown.unobserve()
            self._shown = None
        for node, tag in self._editorObservations:
            node.RemoveObserver(tag)
        self._editorObservations = []

    def _leaveOwnPlaceMode(self):
        """Esc (the editor's "no effect" shortcut) deactivates the effect but would leave markups place mode
        on (the editor resets it only when an effect is activated: qMRMLSegmentEditorWidget.cxx:1696-1698
        @v5.8.1), so that further clicks went into hidden prompt lists."""
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        if interactionNode is None or interactionNode.GetCurrentInteractionMode() != interactionNode.Place:
            return
        activeId = slicer.modules.markups.logic().GetActiveListID()
        scene = self.scriptedEffect.scene()
        if self._shown is not None and self._shown.owns(scene.GetNodeByID(activeId or "")):
            interactionNode.SwitchToViewTransformMode()

    def _onSceneStartClose(self, caller, event):
        self._release()
        self.runner.reset()
        self.logic.releaseSession()

    def _onEditorNodeModified(self, caller, event):
        selected = self._selectedPrompts()
        if (None if selected is None else selected.key) != (None if self._shown is None else self._shown.key):
            self._followSelection()

    def interactionNodeModified(self, interactionNode):
        # Markups place mode is used to add prompts; the default would deactivate the effect.
        pass

    def sourceVolumeNodeChanged(self):
        self.runner.reset()

    # ------------------------------------------------------------- segments
    def _selectedPrompts(self):
        """SegmentPrompts of the selected segment, or None when no segment is selected."""
        parameterNode = self.scriptedEffect.parameterSetNode()
        if parameterNode is None:
            return None
        segmentationNode = parameterNode.GetSegmentationNode()
        segmentId = parameterNode.GetSelectedSegmentID()
        if segmentationNode is None or not segmentId:
            return None
        return SegmentPrompts(self.scriptedEffect.scene(), segmentationNode, segmentId)

    def _followSelection(self):
        """Observe and show the selected segment's prompts, and only those (the editor keeps an effect
        active when another segment is selected: qMRMLSegmentEditorWidget.cxx:2080-2085 @v5.8.1)."""
        if self._shown is not None:
            self._shown.unobserve()
        self._shown = self._selectedPrompts() if self._active else None
        self._observeShown()

    def _observeShown(self):
        """Observe the shown segment's lists (again after one was made), show them, and refer to them from
        the editor's parameter node (saved with the scene)."""
        lists = (None, None)
        if self._shown is not None:
            self._shown.observe(self._onPromptsModified, self._onBoxModified)
            lists = self._shown.lists()
        for role, node in zip((POSITIVE_ROLE, NEGATIVE_ROLE), lists):
            if not sameNode(self.scriptedEffect.nodeReference(role), node):
                self.scriptedEffect.setNodeReference(role, node)
        scene = self.scriptedEffect.scene()
        if scene is not None:
            SegmentPrompts.showOnly(scene, self._shown)

    def boxNode(self, create=False):
        """The selected segment's box (a markups ROI), or None (created on request)."""
        segmentPrompts = self._selectedPrompts()
        if segmentPrompts is None:
            return None
        return segmentPrompts.box(create)

    # ----------------------------------------------------------- interaction
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            return self._processKey(callerInteractor)
        if eventId in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonDoubleClickEvent):
            return self._processPress(callerInteractor, eventId, viewWidget)
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and self._shiftPress is not None:
            (pressXY, pointRAS), self._shiftPress = self._shiftPress, None
            xy = callerInteractor.GetEventPosition()
            if math.hypot(xy[0] - pressXY[0], xy[1] - pressXY[1]) < CLICK_TOLERANCE_PIXELS:
                self.addPromptRAS(pointRAS, not self.positivePolarity)
        return False

    def _processPress(self, callerInteractor, eventId, viewWidget):
        """A left press, or the second press of a double click (VTK 9.2 under Qt sends it as
        LeftButtonDoubleClickEvent, which the slice view takes to maximize the view, as the Draw effect
        knows: SegmentEditorDrawEffect.py:98 @v5.8.1)."""
        self._shiftPress = None
        if callerInteractor.GetControlKey() or callerInteractor.GetAltKey() or self._inPlaceMode():
            return False  # place mode: the markups tool takes the click
        if self._shown is not None and self._shown.pickedByMarkups():
            return False  # the markups widget drags the prompt, or resizes the box, it has picked
        xy = callerInteractor.GetEventPosition()
        pointRAS = self.xyToRas(xy, viewWidget)
        if callerInteractor.GetShiftKey() and eventId == vtk.vtkCommand.LeftButtonPressEvent:
            # Shift+left-drag is the slice view's pan (vtkMRMLSliceIntersectionWidget.cxx:210-211 @v5.8.1;
            # the Paint effect lets modified presses through for it): the press goes on to the view, and
            # the prompt follows on release if the mouse did not move.
            self._shiftPress = (xy, pointRAS)
            return False
        positive = self.positivePolarity != bool(callerInteractor.GetShiftKey())
        return bool(self.addPromptRAS(pointRAS, positive))

    def _processKey(self, callerInteractor):
        if callerInteractor.GetControlKey() or callerInteractor.GetAltKey():
            return False
        action = SHORTCUTS.get((callerInteractor.GetKeySym() or "").lower())
        if action is None:
            return False
        getattr(self, action)()
        return True

    @staticmethod
    def _inPlaceMode():
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        return interactionNode is not None and interactionNode.GetCurrentInteractionMode() == interactionNode.Place

    # --------------------------------------------------------------- prompts
    def setPolarity(self, positive):
        self.scriptedEffect.setParameter("Polarity", "positive" if positive else "negative")
        self.positivePolarity = bool(positive)
        self._showPolarity()

    def togglePolarity(self):
        self.setPolarity(not self.positivePolarity)

    def _editablePrompts(self, withBox=False):
        """The selected segment's prompts with both lists (and the box) made, and observed while the effect
        is active; None when no segment is selected."""
        segmentPrompts = self._selectedPrompts()
        if segmentPrompts is not None:
            segmentPrompts.lists(create=True)
            if withBox:
                segmentPrompts.box(create=True)
            self._observeShown()
        return segmentPrompts

    def addPromptRAS(self, pointRAS, positive):
        """Add a prompt at world RAS to the selected segment's lists (the re-run follows)."""
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return False
        segmentPrompts = self._editablePrompts()
        if segmentPrompts is None:
            return False
        segmentPrompts.add(pointRAS, positive)
        return True

    def undoLastPrompt(self):
        segmentPrompts = self._selectedPrompts()
        return segmentPrompts is not None and segmentPrompts.removeLast()

    def clearPrompts(self):
        segmentPrompts = self._selectedPrompts()
        if segmentPrompts is not None:
            segmentPrompts.clear()

    def finishSegment(self):
        """Keep the current segment and its prompts (locked, hidden) and start a new empty segment."""
        segmentPrompts = self._selectedPrompts()
        if segmentPrompts is None:
            return None
        segmentPrompts.lock()
        self.runner.writer.forget(segmentPrompts.key)
        newSegmentId = segmentPrompts.segmentationNode.GetSegmentation().AddEmptySegment("")
        self.scriptedEffect.parameterSetNode().SetSelectedSegmentID(newSegmentId)  # followed as any selection
        return newSegmentId

    def startBoxPlacement(self):
        """Let the markups ROI tool draw the segment's box (anew: on a drawn ROI the markups tools would
        make a new ROI node instead, vtkMRMLMarkupsDisplayableManager.cxx:888-915 @v5.8.1)."""
        segmentPrompts = self._editablePrompts(withBox=True)
        if segmentPrompts is None:
            return
        box = segmentPrompts.box()
        box.RemoveAllControlPoints()
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.SetActiveList(box)
        markupsLogic.StartPlaceMode(False)

    def removeBox(self):
        box = self.boxNode()
        if box is not None:
            self.scriptedEffect.scene().RemoveNode(box)
            self._observeShown()
            self._armRun(self._selectedPrompts(), 0)

    def startMarkupsPlacement(self, positive):
        """Let the markups tools place the next prompt(s) of that polarity (persistent place mode; the
        effect leaves left clicks to them until the interaction mode changes back)."""
        segmentPrompts = self._editablePrompts()
        if segmentPrompts is None:
            return
        positiveList, negativeList = segmentPrompts.lists()
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.SetActiveList(positiveList if positive else negativeList)
        markupsLogic.StartPlaceMode(True)

    def _onPromptsModified(self, caller, event):
        self._shown.rankUnranked(caller)
        moved = event == slicer.vtkMRMLMarkupsNode.PointModifiedEvent
        self._armRun(self._shown, MOVE_DEBOUNCE_MSEC if moved else 0)

    def _onBoxModified(self, caller, event):
        """A box drawn or changed: a positive prompt at its centre unless one lies inside it already, and a
        re-run (clipped to the box) once it rests."""
        if self._shown.boxBoundsRAS() is None:
            return
        if not self._shown.positiveInBox():
            self._editablePrompts().addAtBoxCentre()
        self._armRun(self._shown, MOVE_DEBOUNCE_MSEC)

    # ------------------------------------------------------------ prediction
    def _armRun(self, segmentPrompts, delayMsec):
        self._pending = segmentPrompts
        self._runTimer.start(delayMsec)

    def isBusy(self):
        return self.runner.running or self._runTimer.isActive()

    def cancelPrediction(self):
        """Stop the running prediction at its next batch of patches; the segment is left as it was."""
        self.runner.cancel()
        self._showProgress()

    def runPrompts(self):
        """Segment the segment whose prompts changed (else the selected one); when prompts changed while it
        ran (a cancelled or failed run stops early), run again."""
        if not self._active:
            return
        segmentPrompts, self._pending = self._pending or self._selectedPrompts(), None
        if segmentPrompts is None:
            self.setStatus("Select a segment (or add one) in the Segment Editor.")
            return
        if self.runner.run(segmentPrompts) and self._active:
            self._runTimer.start(0)
