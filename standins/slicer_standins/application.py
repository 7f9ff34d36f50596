"""Stand-ins for ``slicer.app``, ``slicer.modules``, ``slicer.i18n`` and ``slicer.ScriptedLoadableModule``.

Behaviour follows Slicer's Base/Python/slicer/ScriptedLoadableModule.py and qSlicerApplication as
described in shared/research/slicer-api.md (sections 10, 11 and 17).
"""

import types
import unittest
from typing import Callable, Dict, List

import slicer

from . import qt


class FakeSettings:
    """QSettings held in memory (value/setValue/contains/remove)."""

    def __init__(self) -> None:
        self.values: Dict[str, object] = {}

    def value(self, key: str, default=None):
        return self.values.get(key, default)

    def setValue(self, key: str, value) -> None:
        self.values[key] = value

    def contains(self, key: str) -> bool:
        return key in self.values

    def remove(self, key: str) -> None:
        self.values.pop(key, None)


class FakeApplication:
    """The parts of qSlicerApplication used by the code under test and by slicer.util."""

    applicationName = "3D Slicer"

    def __init__(self, applicationLogic, cachePath: str, temporaryPath: str) -> None:
        self._applicationLogic = applicationLogic
        self.cachePath = cachePath
        self.temporaryPath = temporaryPath
        self._settings = FakeSettings()
        self._connections: Dict[str, List[Callable]] = {}
        self.overrideCursorDepth = 0

    def testingEnabled(self) -> bool:
        return True

    def processEvents(self, *args) -> None:
        qt.processEvents()

    def setOverrideCursor(self, cursor) -> None:
        self.overrideCursorDepth += 1

    def restoreOverrideCursor(self) -> None:
        self.overrideCursorDepth -= 1

    def applicationLogic(self):
        return self._applicationLogic

    def userSettings(self) -> FakeSettings:
        return self._settings

    def settings(self) -> FakeSettings:
        return self._settings

    def layoutManager(self):
        return None

    def topLevelWidgets(self) -> list:
        return []

    def mainWindow(self):
        return None

    SIGNALS = frozenset({"startupCompleted()", "aboutToQuit()", "lastWindowClosed()"})
    """Signals the code connects to: qSlicerCoreApplication::startupCompleted, QCoreApplication::aboutToQuit
    and QGuiApplication::lastWindowClosed (emitted when the main window closed and Slicer begins to quit)."""

    def connect(self, signal: str, slot: Callable) -> bool:
        if signal not in self.SIGNALS:
            raise AttributeError(f"qSlicerApplication has no signal {signal}")
        self._connections.setdefault(signal, []).append(slot)
        return True

    def emit(self, signal: str) -> None:
        """Test helper: what the application does when ``signal`` fires (e.g. "startupCompleted()")."""
        for slot in list(self._connections.get(signal, [])):
            slot()


def makeModulesNamespace(scene, applicationLogic) -> types.SimpleNamespace:
    """``slicer.modules`` with real segmentations, volumes and markups logics on ``scene``."""
    colorLogic = slicer.vtkMRMLColorLogic()
    colorLogic.SetMRMLScene(scene)
    segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentationsLogic.SetMRMLScene(scene)
    if hasattr(applicationLogic, "SetModuleLogic"):
        applicationLogic.SetModuleLogic("Colors", colorLogic)
    volumesLogic = slicer.vtkSlicerVolumesLogic()
    volumesLogic.SetMRMLApplicationLogic(applicationLogic)
    volumesLogic.SetMRMLScene(scene)
    markupsLogic = slicer.vtkSlicerMarkupsLogic()
    markupsLogic.SetMRMLApplicationLogic(applicationLogic)
    markupsLogic.SetMRMLScene(scene)

    def module(logic):
        return types.SimpleNamespace(logic=lambda: logic)

    return types.SimpleNamespace(
        segmentations=module(segmentationsLogic),
        volumes=module(volumesLogic),
        markups=module(markupsLogic),
        colors=module(colorLogic),
    )


# ------------------------------------------------- ScriptedLoadableModule
def makeScriptedLoadableModuleModule() -> types.ModuleType:
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title = ""
            parent.categories = []
            parent.dependencies = []
            parent.contributors = []
            parent.helpText = ""
            parent.acknowledgementText = ""
            parent.hidden = False
            slicer.selfTests[self.moduleName] = self.runTest

        def runTest(self, msec=100, **kwargs) -> None:
            import importlib

            testClass = getattr(importlib.import_module(self.moduleName), self.moduleName + "Test")
            testClass().runTest(**kwargs)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Widget"):
                self.moduleName = self.moduleName[: -len("Widget")]
            self.parent = parent if parent is not None else qt.QWidget()
            self.layout = qt.QVBoxLayout(self.parent)
            self.developerMode = False

        def setup(self) -> None:
            pass

        def cleanup(self) -> None:
            pass

        def enter(self) -> None:
            pass

        def exit(self) -> None:
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None) -> None:
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[: -len("Logic")]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            scene = slicer.mrmlScene
            for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
                node = scene.GetNthNodeByClass(index, "vtkMRMLScriptedModuleNode")
                if node.GetAttribute("ModuleName") == self.moduleName:
                    return node
            node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)

        def delayDisplay(self, message, msec=100) -> None:
            print(message)

        def setUp(self) -> None:
            pass

        def runTest(self) -> None:
            pass

    module.ScriptedLoadableModule = ScriptedLoadableModule
    module.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    module.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    module.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    return module


def makeModuleParent() -> types.SimpleNamespace:
    """The qSlicerScriptedLoadableModule a module class receives as ``parent``."""
    return types.SimpleNamespace(path="", icon=None)


def makeI18nModule() -> types.ModuleType:
    module = types.ModuleType("slicer.i18n")
    module.tr = lambda text: text
    module.translate = lambda context, text: text
    return module
