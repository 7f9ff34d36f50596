"""What the benchmark scripts share: where the data is, the reference network, the machine's description,
timing on a device, the central patch of a CT, and Dice.

Only the standard library is imported here: torch and the rest load when a helper first needs them, so
that a script can time a fresh process's imports (``gpu_check``)."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

Device = Union[str, "torch.device"]


def shared_data() -> Path:
    """The real CTs: ``$CTSAM3D_SHARED/data``, else ``../shared/data`` beside the clone."""
    shared = os.environ.get("CTSAM3D_SHARED")
    return Path(shared) / "data" if shared else REPO_ROOT.parent / "shared" / "data"


def log(message: str) -> None:
    """Progress, on stderr (stdout carries the results)."""
    print(message, file=sys.stderr, flush=True)


def machine_description(device: Device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    found = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f" {f}" in text]
    flags = ", " + " ".join(found) if found else ""
    return f"{model}, {torch.get_num_threads()} torch threads, {os.cpu_count()} logical CPUs{flags}"


def load_network() -> torch.nn.Module:
    """CT-SAM3D with the deterministic reference weights (the authors' fixture's numbers): real timings,
    masks without anatomical meaning."""
    from CTSAM3DLib.model import build_model
    from CTSAM3DLib.reference_weights import deterministic_state_dict

    net = build_model("tiny")
    net.load_state_dict(deterministic_state_dict(net), strict=True)
    return net.eval()


def synchronise(device: Device) -> None:
    """Waits for the device's queued work (CUDA runs asynchronously), so that a clock reads finished work."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: Device) -> float:
    """Seconds ``function()`` takes on ``device``, its queued work included."""
    synchronise(device)
    started = time.perf_counter()
    function()
    synchronise(device)
    return time.perf_counter() - started


def central_patch(image: sitk.Image) -> torch.Tensor:
    """The normalised 64^3 patch (1,1,64,64,64) of ``image`` centred on the lattice voxel nearest its centre."""
    import torch

    from CTSAM3DLib.geometry import Lattice
    from CTSAM3DLib.preprocess import normalize_hu

    lattice = Lattice.of_image(image)
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    geometry = lattice.patch_centred_on(lattice.nearest_index(centre))
    return torch.from_numpy(normalize_hu(lattice.sample(image, geometry)))[None, None]


def dice(a: Any, b: Any) -> float:
    """Dice of two masks (arrays; nonzero is inside); 1 when both are empty."""
    import numpy as np

    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
