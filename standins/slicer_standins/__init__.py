"""Slicer without its GUI for pytest: the REAL MRML/logic libraries of PyPI's slicer-core plus
hand-written stand-ins for what that package lacks (qt, ctk, slicer.app, slicer.modules, the
ScriptedLoadableModule bases, the Segment Editor's C++ effect adaptor and factory).

``installModules()`` puts the stand-in modules in ``sys.modules`` once; ``newScene()`` gives every test
a fresh scene with its logics bound to ``slicer.mrmlScene``/``slicer.modules``/``slicer.app``.
"""

import sys
import types
from pathlib import Path

import slicer
import slicer.util  # noqa: F401  (the real slicer.util, bound to the attributes set below)

from . import application, ctk, effects, qt

MODULE_DIR = Path(__file__).resolve().parents[2] / "CTSAM3D"


def installModules() -> None:
    """Register the stand-in modules (idempotent) and make the extension's folder importable."""
    if getattr(slicer, "_ctsam3dStandins", False):
        return
    sys.modules["qt"] = qt
    sys.modules["ctk"] = ctk
    sys.modules["SegmentEditorEffects"] = effects.makeSegmentEditorEffectsModule()
    sys.modules["qSlicerSegmentationsEditorEffectsPythonQt"] = effects.makeEditorEffectsPythonQtModule()
    scriptedLoadableModule = application.makeScriptedLoadableModuleModule()
    sys.modules["slicer.ScriptedLoadableModule"] = scriptedLoadableModule
    slicer.ScriptedLoadableModule = scriptedLoadableModule
    i18n = application.makeI18nModule()
    sys.modules["slicer.i18n"] = i18n
    slicer.i18n = i18n
    slicer.qSlicerSegmentEditorAbstractEffect = effects.ModificationModes
    slicer.qSlicerSegmentEditorEffectFactory = effects.EffectFactory
    slicer.qMRMLSegmentEditorWidget = effects.SegmentEditorWidget
    slicer.selfTests = {}
    slicer._ctsam3dStandins = True
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))


class SlicerEnvironment(types.SimpleNamespace):
    """What a test gets: scene, application logic, fake application, and helpers."""


def newScene(cachePath: str, temporaryPath: str) -> SlicerEnvironment:
    """A fresh scene with the logics Slicer would create, bound to the ``slicer`` globals."""
    installModules()
    qt.stopAllTimers()
    scene = slicer.vtkMRMLScene()
    applicationLogic = slicer.vtkMRMLApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    slicer.mrmlScene = scene
    slicer.modules = application.makeModulesNamespace(scene, applicationLogic)
    slicer.app = application.FakeApplication(applicationLogic, cachePath, temporaryPath)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    return SlicerEnvironment(scene=scene, applicationLogic=applicationLogic, app=slicer.app)


def resetEffectFactory() -> None:
    effects.EffectFactory._instance = None
