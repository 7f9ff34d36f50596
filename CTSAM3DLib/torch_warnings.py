"""Warnings raised inside torch's own modules are not for the users of this program.

torch warns about its internals (one of its modules using another's deprecated API: 14 lines of
``torch.jit.script_method is deprecated`` in one ``ctsam3d segment`` on a GPU); a user of the command
line, the server or Slicer can do nothing about them, and they bury the project's own warnings, which
the command line and the server show every time. A warning torch raises about a caller's use of it is
attributed to the caller's module (its ``stacklevel``), so it still shows.
"""

from __future__ import annotations

import warnings

TORCH_MODULES = r"torch(\.|$)"
"""Module names the filter matches: torch and its submodules."""


def hide_torch_internal_warnings() -> None:
    """Puts a filter in front of those in force that drops warnings raised in torch's own modules (once:
    the warnings module replaces an identical filter rather than adding another)."""
    warnings.filterwarnings("ignore", module=TORCH_MODULES)
