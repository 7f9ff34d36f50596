"""Stand-in for the PyTorch extension's ``PyTorchUtils`` module, failing as the real one fails.

Imitates fepegar/SlicerPyTorch PyTorchUtils/PyTorchUtils.py (e1c85cc): ``installTorch(askConfirmation=False,
forceComputationBackend=None, torchVersionRequirement=None, torchvisionVersionRequirement=None)`` (L194)
returns the torch module on success and None only when the user declines the confirmation (L212-214);
it catches nothing else: a failing light-the-torch run raises ``subprocess.CalledProcessError`` from
``slicer.util.logProcessOutput`` (Slicer Base/Python/slicer/util.py), and a torch that still cannot be
imported afterwards raises ``ModuleNotFoundError`` (L225).
"""

import subprocess
import sys
import types
from typing import List

OUTCOMES = ("installed", "declined", "installerFailed", "stillMissing")


def makeModule(outcome: str, calls: List[dict]) -> types.ModuleType:
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}")

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            calls.append({"askConfirmation": askConfirmation, "torchVersionRequirement": torchVersionRequirement})
            if outcome == "declined" and askConfirmation:
                return None
            if outcome == "installerFailed":
                raise subprocess.CalledProcessError(
                    1, [sys.executable, "-m", "light_the_torch", "install", "torch"],
                    output="ERROR: No matching distribution found for torch",
                )
            if outcome == "stillMissing":
                raise ModuleNotFoundError("No module named 'torch'", name="torch")
            return types.ModuleType("torch")

    module = types.ModuleType("PyTorchUtils")
    module.PyTorchUtilsLogic = PyTorchUtilsLogic
    return module
