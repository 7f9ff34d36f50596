"""Deterministic weights by the rule of the reference fixture (shared/reference/README.md).

They let anyone check, without the authors' 300 MB file, that this network computes exactly what
the authors' code computes, and they make a full-size checkpoint for demonstrations and tests.
They are not trained: masks made with them mean nothing anatomically.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict

import torch
from torch import nn


def deterministic_tensor(index: int, name: str, reference: torch.Tensor) -> torch.Tensor:
    """The value of state-dict entry number ``index`` (0-based, in state-dict order)."""
    if reference.dtype == torch.int64:
        return torch.zeros_like(reference)
    shape = tuple(reference.shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
    last_part = name.rsplit(".", 1)[-1]
    if last_part == "running_var":
        value = 1 + 0.1 * noise.abs()
    elif last_part == "running_mean":
        value = 0.1 * noise
    elif len(shape) >= 2:
        value = noise / math.sqrt(math.prod(shape[1:]))
    elif last_part == "weight":
        value = 1 + 0.1 * noise
    else:
        value = 0.1 * noise
    return value.to(torch.float32)


def deterministic_state_dict(net: nn.Module) -> Dict[str, torch.Tensor]:
    """A full state dict for ``net`` made by the reference rule."""
    return OrderedDict(
        (name, deterministic_tensor(index, name, tensor))
        for index, (name, tensor) in enumerate(net.state_dict().items())
    )
