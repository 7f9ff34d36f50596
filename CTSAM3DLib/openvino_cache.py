"""The int8 OpenVINO decoder of a network's weights, built once and kept on disk.

Building it (tracing the decoder, calibrating, quantising: ``CTSAM3DLib.model.openvino_decoder``) takes
about 17 s on this project's 2-core CPU; reading it back, about 0.5 s. It is kept under
``cache_folder()/openvino/<key>/`` as OpenVINO's own model format (an XML graph and a binary of
numbers: nothing in it is executed as code), where the key is a SHA-256 of the decoder's weights, the
OpenVINO version and ``RECIPE``, so other weights, another OpenVINO or a changed recipe never read a
stale model. A folder that cannot be written only costs the next process the build again (with a
warning); a model that cannot be read is built again and replaced.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from .download import cache_folder
from .model.openvino_decoder import (
    OpenVinoDecoder,
    calibration_inputs,
    import_openvino,
    openvino_core,
    quantized_decoder_model,
)

RECIPE = "fake-quantize-minmax-phantoms-2"
"""Changes whenever ``quantized_decoder_model`` or its calibration would give another model."""

_MODEL_FILE = "decoder.xml"


def decoder_key(decoder: torch.nn.Module) -> str:
    """A SHA-256 of the decoder's parameters and buffers (names, types, shapes, values), the OpenVINO version
    and ``RECIPE``."""
    openvino = import_openvino()

    digest = hashlib.sha256(f"{RECIPE}\n{openvino.get_version()}\n".encode())
    for name, tensor in decoder.state_dict().items():
        tensor = tensor.detach().cpu()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def openvino_decoder(net: Any, threads: int, bfloat16: bool, folder: Optional[Path] = None) -> OpenVinoDecoder:
    """The int8 OpenVINO decoder of ``net`` (a ``CTSAM3D``), read from ``folder`` (default:
    ``cache_folder()/openvino``) or built and written there."""
    folder = Path(folder) if folder is not None else cache_folder() / "openvino"
    place = folder / decoder_key(net.mask_decoder)
    model = None
    if (place / _MODEL_FILE).exists():
        try:
            model = openvino_core().read_model(str(place / _MODEL_FILE))
        except RuntimeError as error:
            reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1:] or ["no reason given"]
            warnings.warn(f"the cached OpenVINO decoder in {place} cannot be read ({reason[0]}); building it again",
                          stacklevel=2)
            shutil.rmtree(place, ignore_errors=True)
    if model is None:
        model = quantized_decoder_model(net, calibration_inputs(net))
        _save(model, place)
    return OpenVinoDecoder(model, threads, bfloat16)


def _save(model: Any, place: Path) -> None:
    """Writes the model into a temporary folder beside ``place`` and renames it, so that another process
    sees the whole model or none; one that got there first wins."""
    openvino = import_openvino()

    try:
        place.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{place.name}.", dir=place.parent))
    except OSError as error:
        warnings.warn(f"the OpenVINO decoder cannot be kept in {place.parent} ({error}); it is built again in the "
                      "next process", stacklevel=3)
        return
    try:
        openvino.save_model(model, str(staging / _MODEL_FILE), compress_to_fp16=False)
        os.replace(staging, place)
    except OSError as error:
        if not (place / _MODEL_FILE).exists():
            warnings.warn(f"the OpenVINO decoder cannot be kept in {place} ({error}); it is built again in the "
                          "next process", stacklevel=3)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
