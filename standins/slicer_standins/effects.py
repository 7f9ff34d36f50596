"""Stand-ins for the Segment Editor's C++ side: the scripted-effect adaptor, the effect factory, the
``SegmentEditorEffects`` Python base classes, and a harness that plays qMRMLSegmentEditorWidget.

Every data operation (modifier labelmap, masking, overwrite, undo, XY->RAS) is delegated to the REAL
vtkSlicerSegmentEditorLogic of slicer-core; only the Qt/C++ glue is re-implemented here, following
shared/research/slicer-api.md sections 1 to 5.
"""

import importlib.util
import logging
import os
import sys
import types
from typing import List, Optional

import numpy as np
import slicer
import vtk

from . import qt

EFFECT_PARAMETER_MODIFIED = slicer.vtkMRMLSegmentEditorNode.EffectParameterModified


class ModificationModes:
    ModificationModeSet = 0
    ModificationModeAdd = 1
    ModificationModeRemove = 2
    ModificationModeRemoveAll = 3
    NotConfirmed = 0
    ConfirmedWithoutDialog = 1
    ConfirmedWithDialog = 2


def _LOGIC_MODES():
    """The logic's enum values by the adaptor's integer modes (Set, Add, Remove, RemoveAll)."""
    logic = slicer.vtkSlicerSegmentEditorLogic
    modes = (
        logic.ModificationModeSet,
        logic.ModificationModeAdd,
        logic.ModificationModeRemove,
        logic.ModificationModeRemoveAll,
    )
    return {int(mode): mode for mode in modes}


class EffectFactory:
    """qSlicerSegmentEditorEffectFactory: a list of prototypes with the registration rules."""

    _instance: Optional["EffectFactory"] = None

    def __init__(self) -> None:
        self._effects: List[ScriptedEffectAdaptor] = []

    @classmethod
    def instance(cls) -> "EffectFactory":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def registerEffect(self, effect) -> bool:
        if not effect.name:
            logging.error("qSlicerSegmentEditorEffectFactory::registerEffect: Invalid effect name")
            return False
        if any(existing.name == effect.name for existing in self._effects):
            return False
        self._effects.append(effect)
        return True

    def registeredEffects(self) -> List["ScriptedEffectAdaptor"]:
        return list(self._effects)

    def copyEffects(self) -> List["ScriptedEffectAdaptor"]:
        """What each editor widget does: one clone per prototype (a failing clone is left out)."""
        copies = []
        for prototype in self._effects:
            try:
                clone = prototype.clone()
            except Exception:
                logging.exception("failed to clone effect %s", prototype.name)
                continue
            if clone is None:
                logging.error("failed to clone effect %s", prototype.name)
                continue
            copies.append(clone)
        return copies


class ScriptedEffectAdaptor:
    """qSlicerSegmentEditorScriptedEffect: owns the Python effect object and forwards to the editor."""

    def __init__(self, parent=None) -> None:
        self.name = ""
        self.title = ""
        self.perSegment = True
        self.requireSegments = True
        self.showEffectCursorInSliceView = True
        self.showEffectCursorInThreeDView = False
        self.active = False
        self.optionsWidgets: List[object] = []
        self.optionsFrameVisible = False
        self._python = None
        self._editor: Optional[SegmentEditorHarness] = None
        self._parameterSetNode = None

    # ---------------------------------------------------------- Python side
    def setPythonSource(self, path: str) -> bool:
        if not (path.endswith(".py") or path.endswith(".pyc")):
            return False
        moduleName = os.path.basename(os.path.dirname(path))
        className = os.path.splitext(os.path.basename(path))[0]
        if not className.endswith("Effect"):
            className += "Effect"
        module = sys.modules.get(moduleName)
        effectClass = getattr(module, className, None) if module is not None else None
        if effectClass is None:
            spec = importlib.util.spec_from_file_location(moduleName, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[moduleName] = module
            spec.loader.exec_module(module)
            effectClass = getattr(module, className)
        self._python = effectClass(self)
        setattr(slicer, moduleName, self._python)
        return True

    def self(self):
        return self._python

    def clone(self):
        return self._python.clone()

    def _call(self, method: str, *args):
        function = getattr(self._python, method, None)
        return function(*args) if function is not None else None

    # ----------------------------------------------------------- parameters
    def setParameterSetNode(self, node) -> None:
        self._parameterSetNode = node

    def parameterSetNode(self):
        return self._parameterSetNode

    def scene(self):
        return self._parameterSetNode.GetScene() if self._parameterSetNode is not None else None

    def _setAttribute(self, key: str, value) -> None:
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, float):
            value = format(value, ".6g")
        value = str(value)
        node = self._parameterSetNode
        if node.GetAttribute(key) == value:
            return
        wasDisabled = node.GetDisableModifiedEvent()
        node.SetDisableModifiedEvent(True)
        node.SetAttribute(key, value)
        node.SetDisableModifiedEvent(wasDisabled)
        node.InvokeEvent(EFFECT_PARAMETER_MODIFIED, None)

    def setParameter(self, name: str, value) -> None:
        self._setAttribute(f"{self.name}.{name}", value)

    def setCommonParameter(self, name: str, value) -> None:
        self._setAttribute(name, value)

    def parameterDefined(self, name: str) -> bool:
        return bool(self._parameterSetNode.GetAttribute(f"{self.name}.{name}"))

    def commonParameterDefined(self, name: str) -> bool:
        return bool(self._parameterSetNode.GetAttribute(name))

    def setParameterDefault(self, name: str, value) -> None:
        if not self.parameterDefined(name):
            self.setParameter(name, value)

    def setCommonParameterDefault(self, name: str, value) -> None:
        if not self.commonParameterDefined(name):
            self.setCommonParameter(name, value)

    def parameter(self, name: str) -> str:
        node = self._parameterSetNode
        for key in (f"{self.name}.{name}", name):
            value = node.GetAttribute(key)
            if value is not None:
                return value
        logging.critical(
            "qSlicerSegmentEditorAbstractEffect::parameter: Parameter named %s cannot be found", name
        )
        return ""

    def integerParameter(self, name: str) -> int:
        try:
            return int(self.parameter(name))
        except ValueError:
            logging.error("integerParameter: %s is not an integer", name)
            return 0

    def doubleParameter(self, name: str) -> float:
        try:
            return float(self.parameter(name))
        except ValueError:
            logging.error("doubleParameter: %s is not a number", name)
            return 0.0

    def nodeReference(self, name: str):
        return self._parameterSetNode.GetNodeReference(f"{self.name}.{name}")

    def setNodeReference(self, name: str, node) -> None:
        self._parameterSetNode.SetNodeReferenceID(f"{self.name}.{name}", node.GetID() if node else None)

    def setCommonNodeReference(self, name: str, node) -> None:
        self._parameterSetNode.SetNodeReferenceID(name, node.GetID() if node else None)

    # ------------------------------------------------------- images/writing
    def _logic(self):
        return self._editor.logic

    def sourceVolumeImageData(self):
        if not self._logic().UpdateAlignedSourceVolume():
            return None
        return self._logic().GetAlignedSourceVolume()

    def defaultModifierLabelmap(self):
        if not self._logic().ResetModifierLabelmapToDefault():
            return None
        return self._logic().GetModifierLabelmap()

    def modifierLabelmap(self):
        return self._logic().GetModifierLabelmap()

    def maskLabelmap(self):
        self._logic().UpdateMaskLabelmap()
        return self._logic().GetMaskLabelmap()

    def selectedSegmentLabelmap(self):
        self._logic().UpdateSelectedSegmentLabelmap()
        return self._logic().GetSelectedSegmentLabelmap()

    def saveStateForUndo(self) -> None:
        self._editor.saveStateCount += 1
        self._logic().SaveStateForUndo()

    def modifySelectedSegmentByLabelmap(self, labelmap, mode, *args) -> None:
        node = self._parameterSetNode
        self._modify(node.GetSegmentationNode(), node.GetSelectedSegmentID(), labelmap, mode, *args)

    def modifySegmentByLabelmap(self, segmentationNode, segmentId, labelmap, mode, *args) -> None:
        # Its extent overload takes `const int modificationExtent[6]` (qSlicerSegmentEditorAbstractEffect.h,
        # v5.8.1 L151-160), which a Python list cannot fill; only modifySelectedSegmentByLabelmap has a
        # QList<int> extent.
        if args and isinstance(args[0], (list, tuple)):
            raise TypeError("modifySegmentByLabelmap: no overload takes a Python list as the extent")
        self._modify(segmentationNode, segmentId, labelmap, mode, *args)

    def _modify(self, segmentationNode, segmentId, labelmap, mode, *args) -> None:
        extent, bypassMasking = self._extentAndBypass(args)
        self._editor.modifications.append((segmentId, mode, extent))
        mode = _LOGIC_MODES()[int(mode)]
        if extent is None:
            self._logic().ModifySegmentByLabelmap(
                segmentationNode, segmentId, labelmap, mode, self.perSegment, bypassMasking
            )
        else:
            self._logic().ModifySegmentByLabelmap(
                segmentationNode, segmentId, labelmap, mode, extent, self.perSegment, bypassMasking
            )

    @staticmethod
    def _extentAndBypass(args):
        if args and isinstance(args[0], (list, tuple)):
            if len(args[0]) != 6:
                raise ValueError("modifySelectedSegmentByLabelmap: extent must have 6 integers")
            return tuple(int(v) for v in args[0]), bool(args[1]) if len(args) > 1 else False
        return None, bool(args[0]) if args else False

    # --------------------------------------------------------------- editor
    def selectEffect(self, name: str) -> None:
        self._editor.setActiveEffectByName(name)

    def confirmCurrentSegmentVisible(self) -> int:
        node = self._parameterSetNode
        segmentationNode = node.GetSegmentationNode()
        segmentId = node.GetSelectedSegmentID()
        if segmentationNode is None or not segmentId:
            return ModificationModes.NotConfirmed
        display = segmentationNode.GetDisplayNode()
        if display is None or (display.GetVisibility() and display.GetSegmentVisibility(segmentId)):
            return ModificationModes.ConfirmedWithoutDialog
        # The real adaptor asks "make the segment visible?"; in testing mode the answer is no.
        return ModificationModes.NotConfirmed

    def addOptionsWidget(self, widget) -> None:
        self.optionsWidgets.append(widget)

    def addLabeledOptionsWidget(self, label: str, widget):
        self.optionsWidgets.append(qt.QLabel(label))
        self.optionsWidgets.append(widget)
        return widget

    def optionsWidgetsFlat(self) -> list:
        """Every widget added to the options frame (test helper)."""
        found = []
        for item in self.optionsWidgets:
            if isinstance(item, qt.QLayout):
                found.extend(item.widgets())
            else:
                found.append(item)
        return found

    # ------------------------------------------------------------ views
    def cursorOff(self, widget) -> None:
        pass

    def cursorOn(self, widget) -> None:
        pass

    def scheduleRender(self, widget) -> None:
        pass

    def forceRender(self, widget) -> None:
        pass

    def segmentationDisplayableInView(self, viewNode) -> bool:
        return True

    def xyToRas(self, xy, sliceWidget):
        ras = [0.0, 0.0, 0.0]
        slicer.vtkSlicerSegmentEditorLogic.XyToRas([xy.x(), xy.y()], ras, sliceWidget.mrmlSliceNode())
        return qt.QVector3D(*ras)

    def xyzToRas(self, xyz, sliceWidget):
        matrix = sliceWidget.mrmlSliceNode().GetXYToRAS()
        ras = matrix.MultiplyPoint((xyz.x(), xyz.y(), xyz.z(), 1.0))
        return qt.QVector3D(*ras[:3])

    def rasToXy(self, ras, sliceWidget):
        matrix = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(sliceWidget.mrmlSliceNode().GetXYToRAS(), matrix)
        xy = matrix.MultiplyPoint((ras.x(), ras.y(), ras.z(), 1.0))
        return qt.QPoint(int(xy[0]), int(xy[1]))

    def xyToIjk(self, xy, sliceWidget, image, parentTransformNode=None):
        ijk = [0, 0, 0]
        slicer.vtkSlicerSegmentEditorLogic.XyToIjk(
            [xy.x(), xy.y()], ijk, sliceWidget.mrmlSliceNode(), image, parentTransformNode
        )
        return qt.QVector3D(*ijk)


class AbstractScriptedSegmentEditorEffect:
    """SegmentEditorEffects.AbstractScriptedSegmentEditorEffect (Python base of scripted effects)."""

    def __init__(self, scriptedEffect) -> None:
        self.scriptedEffect = scriptedEffect

    def register(self) -> bool:
        return slicer.qSlicerSegmentEditorEffectFactory.instance().registerEffect(self.scriptedEffect)

    def cleanup(self) -> None:
        pass

    def xyToRas(self, xy, viewWidget):
        ras = self.scriptedEffect.xyToRas(qt.QPoint(int(xy[0]), int(xy[1])), viewWidget)
        return [ras.x(), ras.y(), ras.z()]

    def xyzToRas(self, xyz, viewWidget):
        ras = self.scriptedEffect.xyzToRas(qt.QVector3D(*xyz), viewWidget)
        return [ras.x(), ras.y(), ras.z()]

    def rasToXy(self, ras, viewWidget):
        xy = self.scriptedEffect.rasToXy(qt.QVector3D(*ras), viewWidget)
        return [xy.x(), xy.y()]

    def xyToIjk(self, xy, viewWidget, image, parentTransformNode=None):
        ijk = self.scriptedEffect.xyToIjk(
            qt.QPoint(int(xy[0]), int(xy[1])), viewWidget, image, parentTransformNode
        )
        return [int(ijk.x()), int(ijk.y()), int(ijk.z())]


class AbstractScriptedSegmentEditorLabelEffect(AbstractScriptedSegmentEditorEffect):
    pass


def makeSegmentEditorEffectsModule() -> types.ModuleType:
    module = types.ModuleType("SegmentEditorEffects")
    module.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    module.AbstractScriptedSegmentEditorLabelEffect = AbstractScriptedSegmentEditorLabelEffect
    module.__all__ = ["AbstractScriptedSegmentEditorEffect", "AbstractScriptedSegmentEditorLabelEffect"]
    return module


def makeEditorEffectsPythonQtModule() -> types.ModuleType:
    module = types.ModuleType("qSlicerSegmentationsEditorEffectsPythonQt")
    module.qSlicerSegmentEditorScriptedEffect = ScriptedEffectAdaptor
    return module


# ------------------------------------------------------------------ views
class FakeInteractor:
    """vtkRenderWindowInteractor as an effect sees it: event position (bottom-left origin) and keys."""

    def __init__(self, xy=(0, 0), shift=False, control=False, alt=False, keySym="") -> None:
        self.xy = (int(xy[0]), int(xy[1]))
        self.shift, self.control, self.alt, self.keySym = shift, control, alt, keySym

    def GetEventPosition(self):
        return self.xy

    def GetShiftKey(self) -> int:
        return int(self.shift)

    def GetControlKey(self) -> int:
        return int(self.control)

    def GetAltKey(self) -> int:
        return int(self.alt)

    def GetKeySym(self) -> str:
        return self.keySym


class FakeSliceWidget:
    """qMRMLSliceWidget around a REAL vtkMRMLSliceNode (its XYToRAS does the geometry)."""

    def __init__(self, sliceNode) -> None:
        self._sliceNode = sliceNode

    def className(self) -> str:
        return "qMRMLSliceWidget"

    def mrmlSliceNode(self):
        return self._sliceNode

    def sliceLogic(self):
        return None

    def sliceView(self):
        return None

    def isVisible(self) -> bool:
        return True


class FakeThreeDWidget:
    def className(self) -> str:
        return "qMRMLThreeDWidget"


# ------------------------------------------------------ slice view widgets
MARKUPS_PICK_PIXELS = 11.0
"""How near (display pixels) the mouse must be to a control point for the markups widget to take it:
ControlPointSize / 2 + PickingTolerance (30) * ScreenScaleFactor (0.2)
(vtkSlicerMarkupsWidgetRepresentation2D.cxx:1175-1178, vtkMRMLAbstractWidgetRepresentation.cxx:28,176
@v5.8.1), 11 to 16 px with the default glyph scale; the smallest is taken, so the stand-in never picks a
point Slicer would not."""


class SliceViewWidgets:
    """The widgets of a slice view that see a mouse event the editor did not abort (the displayable
    managers' interaction widgets, Libs/MRML/DisplayableManager):
    - markups (vtkSlicerMarkupsWidget.cxx @v5.8.1): hovering within MARKUPS_PICK_PIXELS of a control point,
      or of a drawn ROI's outline on the slice, makes it the display node's active component; a press then
      drags the point (PointModifiedEvent on each move) or moves that face of the ROI (its handles); in
      place mode the active list shows a preview point under the mouse (UpdatePreviewPoint, a control
      point with PositionPreview status) that a press defines (PlacePoint); when the active node
      cannot take more points the displayable manager makes a new node of its class and places there
      (vtkMRMLMarkupsDisplayableManager.cxx:888-915);
    - slice intersection (vtkMRMLSliceIntersectionWidget.cxx @v5.8.1): Shift+left drag pans the slice
      (:210-211, WidgetEventTranslateStart), a left double click maximizes or restores the view (:230)."""

    def __init__(self, scene, interactionNode) -> None:
        self.scene = scene
        self.interactionNode = interactionNode
        self.maximizeToggles = 0
        self.createdPlaceNodes = []
        self._dragged = None
        self._pan = None

    def processEvent(self, interactor, eventId: int, sliceWidget) -> None:
        xy = interactor.GetEventPosition()
        sliceNode = sliceWidget.mrmlSliceNode()
        placing = self.interactionNode.GetCurrentInteractionMode() == self.interactionNode.Place
        if eventId == vtk.vtkCommand.MouseMoveEvent:
            if self._dragged is not None:
                self._dragTo(sliceNode, xy)
            elif self._pan is not None:
                self._panTo(sliceNode, xy)
            elif placing:
                self._movePreview(sliceNode, xy)
            else:
                self._hover(sliceNode, xy)
        elif eventId == vtk.vtkCommand.LeftButtonPressEvent:
            if placing:
                self._place(sliceNode, xy)
            elif self._activeComponent() is not None:
                self._dragged = self._activeComponent()
                self._dragged[0].InvokeEvent(slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent)
            elif interactor.GetShiftKey():
                self._pan = (xy, slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS()),
                             slicer.util.arrayFromVTKMatrix(sliceNode.GetXYToRAS()))
        elif eventId == vtk.vtkCommand.LeftButtonReleaseEvent:
            if self._dragged is not None:
                self._dragged[0].InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
            self._dragged = self._pan = None
        elif eventId == vtk.vtkCommand.LeftButtonDoubleClickEvent and not placing:
            self.maximizeToggles += 1

    def _markupsNodes(self):
        return [self.scene.GetNthNodeByClass(i, className)
                for className in ("vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode")
                for i in range(self.scene.GetNumberOfNodesByClass(className))]

    def _hover(self, sliceNode, xy) -> None:
        """The nearest control point or ROI face within MARKUPS_PICK_PIXELS becomes its display node's
        active component; every other markups node's is cleared (vtkSlicerMarkupsWidget::ProcessMouseMove)."""
        candidates = []
        for node in self._markupsNodes():
            display = node.GetDisplayNode()
            if display is None:
                continue
            display.SetActiveComponent(display.ComponentNone, -1)
            if not display.GetVisibility() or node.GetLocked():
                continue
            if node.IsA("vtkMRMLMarkupsROINode"):
                candidates += [(distance, display, display.ComponentScaleHandle, face)
                               for distance, face in _roiFacesNear(node, sliceNode, xy)]
            else:
                candidates += [(distance, display, display.ComponentControlPoint, index)
                               for distance, index in _pointsNear(node, sliceNode, xy)]
        if candidates:
            _, display, componentType, index = min(candidates, key=lambda candidate: candidate[0])
            display.SetActiveComponent(componentType, index)

    def _activeComponent(self):
        """(node, component type, index) the markups widget has picked, or None."""
        for node in self._markupsNodes():
            display = node.GetDisplayNode()
            if display is not None and display.HasActiveComponent():
                return node, display.GetActiveComponentType(), display.GetActiveComponentIndex()
        return None

    def _dragTo(self, sliceNode, xy) -> None:
        node, componentType, index = self._dragged
        pointRAS = _xyToRAS(sliceNode, xy)
        if node.IsA("vtkMRMLMarkupsROINode"):
            bounds = [0.0] * 6
            node.GetRASBounds(bounds)
            axis = index // 2
            bounds[index] = pointRAS[axis]
            low, high = np.minimum(bounds[0::2], bounds[1::2]), np.maximum(bounds[0::2], bounds[1::2])
            wasModifying = node.StartModify()
            node.SetXYZ(*((low + high) / 2))
            node.SetRadiusXYZ(*((high - low) / 2))
            node.EndModify(wasModifying)
        else:
            node.SetNthControlPointPositionWorld(index, *pointRAS)

    def _panTo(self, sliceNode, xy) -> None:
        startXY, sliceToRAS, xyToRAS = self._pan
        moved = xyToRAS @ np.array([xy[0], xy[1], 0.0, 1.0]) - xyToRAS @ np.array([startXY[0], startXY[1], 0.0, 1.0])
        matrix = sliceNode.GetSliceToRAS()
        for row in range(3):
            matrix.SetElement(row, 3, sliceToRAS[row, 3] - moved[row])
        sliceNode.UpdateMatrices()

    def _activePlaceNode(self):
        markupsLogic = slicer.modules.markups.logic()
        return self.scene.GetNodeByID(markupsLogic.GetActiveListID() or "")

    def _movePreview(self, sliceNode, xy) -> None:
        node = self._activePlaceNode()
        if node is not None and _takesAPoint(node):
            _updatePlacedPoint(node, _xyToRAS(sliceNode, xy), node.PositionPreview)

    def _place(self, sliceNode, xy) -> None:
        node = self._activePlaceNode()
        if node is None:
            return
        if not _takesAPoint(node):
            node = self.scene.AddNewNodeByClass(node.GetClassName())
            node.CreateDefaultDisplayNodes()
            self.createdPlaceNodes.append(node)
            slicer.modules.markups.logic().SetActiveList(node)
        _updatePlacedPoint(node, _xyToRAS(sliceNode, xy), node.PositionDefined)
        # Single place mode ends with one point of a point list, or with a whole ROI (its 2 corners).
        placedWhole = node.IsA("vtkMRMLMarkupsFiducialNode") or node.GetControlPointPlacementComplete()
        if not self.interactionNode.GetPlaceModePersistence() and placedWhole:
            self.interactionNode.SwitchToViewTransformMode()


def _takesAPoint(node) -> bool:
    """A node being placed (its preview point counts towards a complete placement) or not complete yet."""
    return _previewIndex(node) is not None or not node.GetControlPointPlacementComplete()


def _updatePlacedPoint(node, pointRAS, positionStatus) -> None:
    """vtkSlicerMarkupsWidget::UpdatePreviewPoint (PlacePoint calls it with PositionDefined): the REAL display
    node's UpdateActiveControlPointWorld moves the preview point, or adds one (with that status from the
    start) when there is none."""
    eventData = slicer.vtkMRMLInteractionEventData()
    eventData.SetWorldPosition(list(pointRAS))
    preview = _previewIndex(node)
    node.GetDisplayNode().UpdateActiveControlPointWorld(
        -1 if preview is None else preview, eventData, [1, 0, 0, 0, 1, 0, 0, 0, 1], "", "", positionStatus)


def _pointsNear(node, sliceNode, xy):
    """(pixel distance, index) of the defined control points drawn on the slice within the picking distance."""
    rasToXY = np.linalg.inv(slicer.util.arrayFromVTKMatrix(sliceNode.GetXYToRAS()))
    for index in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(index) != node.PositionDefined:
            continue
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, position)
        x, y, z, _ = rasToXY @ np.array([*position, 1.0])
        distance = float(np.hypot(x - xy[0], y - xy[1]))
        if abs(z) <= 0.5 and distance <= MARKUPS_PICK_PIXELS:
            yield distance, index


def _roiFacesNear(roi, sliceNode, xy):
    """(pixel distance, face) of the faces of a drawn ROI whose outline on the slice passes within the picking
    distance; face = 2 * RAS axis + (0: low side, 1: high side). Only unrotated, untransformed ROIs on slices
    normal to an RAS axis (what the tests draw); anything else is refused rather than guessed."""
    if roi.GetNumberOfDefinedControlPoints() == 0 or _previewIndex(roi) is not None:
        return
    sliceToRAS = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())
    normalAxis = int(np.argmax(np.abs(sliceToRAS[:3, 2])))
    objectToNode = slicer.util.arrayFromVTKMatrix(roi.GetObjectToNodeMatrix())
    if (not np.isclose(abs(sliceToRAS[normalAxis, 2]), 1.0) or roi.GetParentTransformNode() is not None
            or not np.allclose(objectToNode[:3, :3], np.eye(3))):
        raise NotImplementedError("the stand-in picks ROI faces only for unrotated ROIs on axis-aligned slices")
    xyToRAS = slicer.util.arrayFromVTKMatrix(sliceNode.GetXYToRAS())
    mmPerPixel = float(np.linalg.norm(xyToRAS[:3, 0]))
    mouseRAS = xyToRAS @ np.array([xy[0], xy[1], 0.0, 1.0])
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    if not bounds[2 * normalAxis] <= mouseRAS[normalAxis] <= bounds[2 * normalAxis + 1]:
        return
    tolerance = MARKUPS_PICK_PIXELS * mmPerPixel
    inPlane = [axis for axis in range(3) if axis != normalAxis]
    for axis, along in (inPlane, inPlane[::-1]):
        if not bounds[2 * along] - tolerance <= mouseRAS[along] <= bounds[2 * along + 1] + tolerance:
            continue
        for side in (0, 1):
            distance = abs(mouseRAS[axis] - bounds[2 * axis + side]) / mmPerPixel
            if distance <= MARKUPS_PICK_PIXELS:
                yield distance, 2 * axis + side


def _xyToRAS(sliceNode, xy):
    return sliceNode.GetXYToRAS().MultiplyPoint((float(xy[0]), float(xy[1]), 0.0, 1.0))[:3]


def _previewIndex(node):
    for index in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(index) == node.PositionPreview:
            return index
    return None


# ----------------------------------------------------------------- editor
def _shortcutKeys():
    """The keys qMRMLSegmentEditorWidget::installKeyboardShortcuts registers, as (key, shift, control):
    Slicer Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx:3162-3243 @v5.8.1
    (:2314-2394 @main). They are QShortcuts on the main window (default Qt::WindowShortcut context),
    installed by the Segment Editor module's enter() (Modules/Scripted/SegmentEditor/SegmentEditor.py:121
    @v5.8.1), so Qt takes these keys before any view's interactor sees them."""
    keys = {}
    digits = "1234567890"
    for index, digit in enumerate(digits):
        keys[(digit, False, False)] = ("effect", index + 1)
        keys[(digit, True, False)] = ("effect", index + 11)
    keys[("Escape", False, False)] = ("effect", 0)
    keys[("space", False, False)] = ("effect", -1)
    keys[("z", False, False)] = ("undo",)
    keys[("z", False, True)] = ("undo",)  # QKeySequence::Undo
    keys[("y", False, False)] = ("redo",)
    keys[("y", False, True)] = ("redo",)  # QKeySequence::Redo on Windows
    keys[("z", True, True)] = ("redo",)  # QKeySequence::Redo on Linux and macOS
    for previous, following in (("q", "w"), ("slash", "asterisk"), ("comma", "period"), ("greater", "less")):
        keys[(previous, False, False)] = ("segment", -1)
        keys[(following, False, False)] = ("segment", 1)
    keys[("i", False, False)] = ("intensityMask",)
    return keys


EDITOR_SHORTCUTS = _shortcutKeys()

SLICE_VIEW_KEYS = frozenset("bfgrtvs") | {"Left", "Right", "Up", "Down", "bracketleft", "bracketright"}
"""Keys the slice view's own widgets act on when no effect consumes them (vtkMRMLSliceIntersectionWidget.cxx
:164-192 @v5.8.1; 's' snaps a hovered markups point, vtkSlicerMarkupsWidget.cxx:65-68)."""


class SegmentEditorHarness:
    """Plays qMRMLSegmentEditorWidget inside the Segment Editor module: clones the registered effects, sets
    them up in the real order, activates/deactivates them, takes its keyboard shortcuts before the views,
    observes view events at priority 1.0 ahead of the markups tools (qMRMLSegmentEditorWidget::processEvents
    sets the abort flag when the effect returns True: :2913-2918 @v5.8.1), over a REAL
    vtkSlicerSegmentEditorLogic.

    ``slicerVersion`` (5, 8) plays Slicer 5.8, which never calls an effect's ``cleanup()`` (the hook came
    with commit 64cfcfc6a2, in 5.10); later versions call it only when the editor widget is destroyed."""

    def __init__(self, scene, applicationLogic, slicerVersion=(5, 12), parameterNode=None) -> None:
        self.scene = scene
        self.applicationLogic = applicationLogic
        self.slicerVersion = tuple(slicerVersion)
        self.parameterNode = parameterNode or scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetMRMLApplicationLogic(applicationLogic)
        self.logic.SetSegmentEditorNode(self.parameterNode)
        self.activeEffect: Optional[ScriptedEffectAdaptor] = None
        self._lastActiveEffectName = ""
        self.saveStateCount = 0
        self.modifications = []
        self.warnings: List[str] = []
        self.shortcutsTaken: List[tuple] = []
        self.shortcutsInstalled = True
        self.effects = slicer.qSlicerSegmentEditorEffectFactory.instance().copyEffects()
        for effect in self.effects:
            effect._editor = self
            effect.setParameterSetNode(self.parameterNode)
            effect._call("setMRMLDefaults")
            effect._call("setupOptionsFrame")
        self._parameterObserver = self.parameterNode.AddObserver(
            EFFECT_PARAMETER_MODIFIED, self._onEffectParameterModified
        )
        self.interactionNode = applicationLogic.GetInteractionNode()
        self._interactionObserver = self.interactionNode.AddObserver(
            vtk.vtkCommand.ModifiedEvent, self._onInteractionNodeModified
        )
        self.sliceView = SliceViewWidgets(scene, self.interactionNode)
        self._closed = False

    def effectByName(self, name: str) -> ScriptedEffectAdaptor:
        return next(effect for effect in self.effects if effect.name == name)

    def setSegmentationNode(self, segmentationNode) -> None:
        self.parameterNode.SetAndObserveSegmentationNode(segmentationNode)
        self.logic.SetSegmentationNode(segmentationNode)

    def setSourceVolumeNode(self, volumeNode) -> None:
        self.parameterNode.SetAndObserveSourceVolumeNode(volumeNode)
        self.logic.SetSourceVolumeNode(volumeNode)
        for effect in self.effects:
            effect._call("sourceVolumeNodeChanged")

    def setCurrentSegmentID(self, segmentId: str) -> None:
        self.parameterNode.SetSelectedSegmentID(segmentId)

    def effectButtonEnabled(self, effect: ScriptedEffectAdaptor) -> bool:
        if not effect.requireSegments:
            return True
        segmentationNode = self.parameterNode.GetSegmentationNode()
        hasSegments = (
            segmentationNode is not None and segmentationNode.GetSegmentation().GetNumberOfSegments() > 0
        )
        return hasSegments and (bool(self.parameterNode.GetSelectedSegmentID()) or not effect.perSegment)

    def setActiveEffectByName(self, name: str) -> bool:
        if self.activeEffect is not None:
            previous = self.activeEffect
            self._lastActiveEffectName = previous.name
            previous.optionsFrameVisible = False
            previous.active = False
            self.activeEffect = None
            previous._call("deactivate")
        if not name:
            self.parameterNode.SetActiveEffectName("")
            return True
        effect = self.effectByName(name)
        if not self.effectButtonEnabled(effect):
            return False
        if not self.logic.SetSourceRepresentationToBinaryLabelMap():
            return False
        self.interactionNode.SetCurrentInteractionMode(self.interactionNode.ViewTransform)
        self.parameterNode.SetActiveEffectName(name)
        self.activeEffect = effect
        effect.optionsFrameVisible = True
        effect.active = True
        effect._call("updateGUIFromMRML")
        effect._call("activate")
        return True

    def _onEffectParameterModified(self, caller, event) -> None:
        if self.activeEffect is not None:
            self.activeEffect._call("updateGUIFromMRML")

    def _onInteractionNodeModified(self, caller, event) -> None:
        effect = self.activeEffect
        if effect is None:
            return
        if hasattr(effect.self(), "interactionNodeModified"):
            effect.self().interactionNodeModified(self.interactionNode)
        elif self.interactionNode.GetCurrentInteractionMode() != self.interactionNode.ViewTransform:
            self.setActiveEffectByName("")

    # ------------------------------------------------------------ events
    def processEvent(self, interactor, eventId: int, viewWidget) -> bool:
        """A view event as the view's observers see it: first the editor's (priority 1.0), which hands it to
        the active effect and aborts it when the effect returns True; then, if not aborted, the view's own
        widgets (markups, slice intersection). Returns True when aborted."""
        if self.activeEffect is not None:
            result = self.activeEffect._call("processInteractionEvents", interactor, eventId, viewWidget)
            if not isinstance(result, bool):
                message = "processInteractionEvents is expected to return a boolean"
                logging.warning(message)
                self.warnings.append(message)
                result = False
            if result:
                return True
        if viewWidget.className() == "qMRMLSliceWidget":
            self.sliceView.processEvent(interactor, eventId, viewWidget)
        return False

    def leftClick(self, xy, viewWidget, shift=False, control=False, alt=False) -> bool:
        """What Qt/VTK deliver for one left click at ``xy``: the mouse moves there, press, release. Returns
        whether the press was aborted by the editor."""
        modifiers = {"shift": shift, "control": control, "alt": alt}
        self.processEvent(FakeInteractor(xy, **modifiers), vtk.vtkCommand.MouseMoveEvent, viewWidget)
        aborted = self.processEvent(FakeInteractor(xy, **modifiers), vtk.vtkCommand.LeftButtonPressEvent, viewWidget)
        self.processEvent(FakeInteractor(xy, **modifiers), vtk.vtkCommand.LeftButtonReleaseEvent, viewWidget)
        return aborted

    def leftDrag(self, fromXY, toXY, viewWidget, shift=False, steps=4) -> bool:
        """Press at ``fromXY``, move in ``steps`` to ``toXY``, release; returns whether the press was aborted."""
        self.processEvent(FakeInteractor(fromXY, shift=shift), vtk.vtkCommand.MouseMoveEvent, viewWidget)
        aborted = self.processEvent(FakeInteractor(fromXY, shift=shift), vtk.vtkCommand.LeftButtonPressEvent,
                                    viewWidget)
        for step in range(1, steps + 1):
            xy = [round(a + (b - a) * step / steps) for a, b in zip(fromXY, toXY)]
            self.processEvent(FakeInteractor(xy, shift=shift), vtk.vtkCommand.MouseMoveEvent, viewWidget)
        self.processEvent(FakeInteractor(toXY, shift=shift), vtk.vtkCommand.LeftButtonReleaseEvent, viewWidget)
        return aborted

    def leftDoubleClick(self, firstXY, secondXY, viewWidget, shift=False) -> bool:
        """Two quick clicks as VTK 9.2 under Qt delivers them (Slicer 5.8's VTK, SuperBuild/External_VTK.cmake
        :141 @v5.8.1; QVTKInteractorAdapter turns Qt's MouseButtonDblClick into LeftButtonDoubleClickEvent):
        press, release, double click, release. Returns whether the double click was aborted."""
        self.leftClick(firstXY, viewWidget, shift=shift)
        self.processEvent(FakeInteractor(secondXY, shift=shift), vtk.vtkCommand.MouseMoveEvent, viewWidget)
        aborted = self.processEvent(
            FakeInteractor(secondXY, shift=shift), vtk.vtkCommand.LeftButtonDoubleClickEvent, viewWidget)
        self.processEvent(FakeInteractor(secondXY, shift=shift), vtk.vtkCommand.LeftButtonReleaseEvent, viewWidget)
        return aborted

    def pressKey(self, keySym: str, viewWidget, shift=False, control=False, alt=False):
        """A key pressed with the mouse over ``viewWidget``: the editor's shortcuts take their keys first
        (the view never sees them); other keys go to the view's observers. Returns "shortcut" when a
        shortcut took the key, else whether the view event was aborted."""
        key = keySym.lower() if len(keySym) == 1 else keySym
        action = EDITOR_SHORTCUTS.get((key, bool(shift), bool(control))) if self.shortcutsInstalled else None
        if action is not None and not alt:
            self.shortcutsTaken.append((keySym, shift, control))
            self._runShortcut(action)
            return "shortcut"
        interactor = FakeInteractor(keySym=keySym, shift=shift, control=control, alt=alt)
        return self.processEvent(interactor, vtk.vtkCommand.KeyPressEvent, viewWidget)

    def _runShortcut(self, action) -> None:
        kind = action[0]
        if kind == "undo":
            self.undo()
        elif kind == "redo":
            self.logic.Redo()
        elif kind == "effect":
            index = action[1]
            if index == 0:
                self.setActiveEffectByName("")
            elif index == -1:
                self.setActiveEffectByName(self._lastActiveEffectName)
            elif index <= len(self.effects):
                self.setActiveEffectByName(self.effects[index - 1].name)
        elif kind == "segment":
            segmentation = self.parameterNode.GetSegmentationNode().GetSegmentation()
            ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
            current = self.parameterNode.GetSelectedSegmentID()
            position = ids.index(current) + action[1] if current in ids else 0
            self.setCurrentSegmentID(ids[min(max(position, 0), len(ids) - 1)])
        elif kind == "intensityMask":
            self.parameterNode.SetSourceVolumeIntensityMask(not self.parameterNode.GetSourceVolumeIntensityMask())

    def undo(self) -> None:
        self.logic.Undo()

    # --------------------------------------------------------- life cycle
    def exitModule(self) -> None:
        """What SegmentEditor.py exit() does when the user leaves the module: no active effect, and the
        shortcuts uninstalled (SegmentEditor.py:137-140 @v5.8.1)."""
        self.setActiveEffectByName("")
        self.shortcutsInstalled = False

    def cleanup(self) -> None:
        """The module left and the editor widget destroyed: effects get ``cleanup()`` only after 5.8."""
        if self._closed:
            return
        self._closed = True
        self.exitModule()
        if self.slicerVersion > (5, 8):
            for effect in self.effects:
                effect._call("cleanup")
        self.parameterNode.RemoveObserver(self._parameterObserver)
        self.interactionNode.RemoveObserver(self._interactionObserver)


class SegmentEditorWidget:
    """``slicer.qMRMLSegmentEditorWidget`` made outside the Segment Editor module (as a self-test does):
    the harness behind the widget's own method names, without the module's keyboard shortcuts."""

    def __init__(self, parent=None) -> None:
        self._scene = None
        self._harness: Optional[SegmentEditorHarness] = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene

    def setMRMLSegmentEditorNode(self, node) -> None:
        self._harness = SegmentEditorHarness(self._scene, slicer.app.applicationLogic(), parameterNode=node)
        self._harness.shortcutsInstalled = False

    def setSegmentationNode(self, node) -> None:
        self._harness.setSegmentationNode(node)

    def setSourceVolumeNode(self, node) -> None:
        self._harness.setSourceVolumeNode(node)

    def setActiveEffectByName(self, name: str) -> bool:
        return self._harness.setActiveEffectByName(name)

    def activeEffect(self):
        return self._harness.activeEffect

    def undo(self) -> None:
        self._harness.undo()


def startEditing(volumeNode, effectName: str, slicerVersion=(5, 12)) -> SegmentEditorHarness:
    """An editor over ``volumeNode`` with a new segmentation, one empty segment selected and the effect
    ``effectName`` active (the module that registers it must have been created)."""
    segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "S1")
    harness = SegmentEditorHarness(slicer.mrmlScene, slicer.app.applicationLogic(), slicerVersion)
    harness.setSegmentationNode(segmentationNode)
    harness.setSourceVolumeNode(volumeNode)
    harness.setCurrentSegmentID(segmentId)
    if not harness.setActiveEffectByName(effectName):
        raise RuntimeError(f"the effect {effectName!r} could not be activated")
    return harness
