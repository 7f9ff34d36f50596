"""Choice of the torch device: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import threading
from typing import List, Union

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


_library_loaders: List[threading.Thread] = []
_library_loaders_lock = threading.Lock()


def load_cuda_libraries_in_background(device: torch.device) -> None:
    """On a CUDA device, one small convolution and one matrix product in a background thread: the first
    use of each loads cuDNN and cuBLAS, whose libraries (about a gigabyte, read from disk after a machine
    starts: 0.4 s measured on an H200) then load while the caller goes on, reading the weights. Nothing
    else is shared with the caller; elsewhere nothing happens. ``wait_for_cuda_libraries`` joins it."""
    if device.type == "cuda":
        loader = threading.Thread(target=_first_kernels, args=(device,), name="ctsam3d-cuda-libraries", daemon=True)
        with _library_loaders_lock:
            _library_loaders.append(loader)
        loader.start()


def wait_for_cuda_libraries() -> None:
    """Returns once every loader ``load_cuda_libraries_in_background`` started has finished. A CUDA graph
    capture must wait for them: a loader's synchronize, in any thread, during a capture invalidates it."""
    with _library_loaders_lock:
        loaders = list(_library_loaders)
        _library_loaders.clear()
    for loader in loaders:
        loader.join()


@torch.no_grad()
def _first_kernels(device: torch.device) -> None:
    try:
        volume = torch.zeros(1, 8, 8, 8, 8, device=device)
        torch.nn.functional.conv3d(volume, torch.zeros(8, 8, 3, 3, 3, device=device), padding=1)
        torch.mm(torch.zeros(8, 8, device=device), torch.zeros(8, 8, device=device))
        torch.cuda.synchronize(device)
    except RuntimeError:
        pass  # the caller meets the same problem on its first use of the device, and reports it there
