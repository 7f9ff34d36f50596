"""Finds the inference core, CTSAM3DLib, for a module loaded from a build or from a source checkout.

Slicer puts only the folder of a scripted module on ``sys.path`` (Base/QTGUI/qSlicerScriptedLoadableModule
Factory.cxx). The build installs CTSAM3DLib into that folder, beside CTSAM3D.py; a clone added under
*Edit > Application Settings > Modules > Additional module paths* has it one folder up, where Slicer never
looks. That copy is loaded under its own name here, so ``import CTSAM3DLib`` works in both layouts.
"""

import importlib.util
import logging
import sys
from pathlib import Path

PACKAGE = "CTSAM3DLib"


def findCore() -> str:
    """Make ``import CTSAM3DLib`` work and return where it comes from, in words: the copy installed beside
    the module (a build or the Extension Manager), the source checkout the module was loaded from, or
    (neither present) an installed ``ctsam3d`` package. Raises ImportError, saying what to do, without any."""
    moduleFolder = Path(__file__).resolve().parents[1]
    beside, checkout = moduleFolder / PACKAGE, moduleFolder.parent / PACKAGE
    loaded = sys.modules.get(PACKAGE)
    if loaded is not None:
        return f"the package already imported, {Path(loaded.__file__).parent}"
    if (beside / "__init__.py").is_file():
        return f"the copy installed beside the module, {beside}"
    if (checkout / "__init__.py").is_file():
        spec = importlib.util.spec_from_file_location(
            PACKAGE, checkout / "__init__.py", submodule_search_locations=[str(checkout)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[PACKAGE]
            raise
        return f"the source checkout, {checkout}"
    installed = importlib.util.find_spec(PACKAGE)
    if installed is None:
        raise ImportError(
            f"CT-SAM3D cannot find its inference core {PACKAGE}: it is neither beside the module ({beside}) nor "
            f"in a source checkout ({checkout}). Add the CTSAM3D folder of a complete clone of SlicerCTSAM3D "
            "to Slicer's additional module paths, or install the extension."
        )
    return f"the installed package, {Path(installed.origin).parent}"


CORE_ORIGIN = findCore()
logging.info("CT-SAM3D: using %s from %s", PACKAGE, CORE_ORIGIN)
