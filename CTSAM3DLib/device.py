"""Choice of the torch device: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

from typing import Union

import torch


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: Union[str, torch.device, None] = "auto") -> torch.device:
    """``"auto"`` (or None) picks CUDA, then MPS, then CPU; an explicit device is checked and
    refused with a clear message when this machine does not have it."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} was asked for, but this torch build sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec!r} was asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist"
            )
    elif device.type == "mps" and not mps_available():
        raise ValueError(f"device {spec!r} was asked for, but Apple MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    return device
