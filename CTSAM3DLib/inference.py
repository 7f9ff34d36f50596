"""How the network runs for interactive use on a given device (precision and other optimisations).

``prepare_network`` is the one place that chooses; the plain float32 path is always available and
is the one the parity tests check.
"""

from __future__ import annotations

from typing import Any

import torch

PRECISIONS = ("auto", "float32")


def prepare_network(net: Any, device: torch.device, precision: str = "auto") -> Any:
    """The network ready for ``device``: a ``torch.nn.Module`` is moved there in eval mode; any
    other object with ``encode``/``decode`` (a stand-in) is used as it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if isinstance(net, torch.nn.Module):
        net.to(device).eval()
    return net
