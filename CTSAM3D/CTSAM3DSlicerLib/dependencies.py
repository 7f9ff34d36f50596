"""Python packages CT-SAM3D needs inside Slicer, installed only after the user agrees.

numpy and SimpleITK ship with Slicer and are never pip-installed (a second copy breaks Slicer). torch is
installed through the PyTorch extension's PyTorchUtils, which picks the build matching the GPU driver.
"""

from __future__ import annotations

import importlib.util
import subprocess
from typing import Callable, List

TORCH_REQUIREMENT = ">=2.1"
BUNDLED_WITH_SLICER = ("numpy", "SimpleITK")


class DependencyError(RuntimeError):
    """A needed package is missing and was not (or could not be) installed."""


def missingPackages() -> List[str]:
    """Packages to install before the network can run (bundled ones are never listed)."""
    return [name for name in ("torch",) if importlib.util.find_spec(name) is None]


def installTorch() -> None:
    """Install torch with PyTorchUtils (blocking; it shows its own progress). Its failures (it raises
    CalledProcessError when light-the-torch fails, ModuleNotFoundError when torch still cannot be
    imported, and returns None when declined) become a DependencyError that says what to do."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError as error:
        raise DependencyError(
            "the 'PyTorch' extension is missing: install it from the Extension Manager, restart Slicer, "
            "and try again"
        ) from error
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT
        )
    except subprocess.CalledProcessError as error:
        detail = (error.output or "").strip().splitlines()[-1:] or [f"exit code {error.returncode}"]
        raise DependencyError(
            f"installing PyTorch failed ({detail[0]}); check the network connection and the Python console, "
            "or install it in the PyTorch module, then restart Slicer"
        ) from error
    except ImportError as error:
        raise DependencyError(
            f"PyTorch was installed but cannot be imported ({error}): restart Slicer and try again"
        ) from error
    if torch is None:
        raise DependencyError("PyTorch was not installed (the installation was declined or aborted)")


def ensureDependencies(askUser: Callable[[str], bool]) -> bool:
    """Install missing packages if ``askUser(question)`` agrees; returns whether everything is present."""
    missing = missingPackages()
    if not missing:
        return True
    question = (
        f"CT-SAM3D needs the Python package(s) {', '.join(missing)}, which are not installed. "
        "Install them now? This downloads about 1-3 GB and may take several minutes."
    )
    if not askUser(question):
        return False
    if "torch" in missing:
        installTorch()
    return not missingPackages()
