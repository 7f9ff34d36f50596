"""Reading and writing CT-SAM3D checkpoints without executing anything stored in them.

A ``.pth`` file is a pickle, and a pickle can run arbitrary code when loaded. The loader here
admits only tensors, their storages and plain containers; the authors' configuration object, if a
file holds one, becomes a plain dict; everything else is refused before it is created. No
``config.py`` beside the weights is ever read.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from .device import load_cuda_libraries_in_background, resolve_device
from .files import atomic_output
from .model import CTSAM3D, build_model
from .model.encoder import ENCODER_VARIANTS

PathLike = Union[str, "os.PathLike[str]"]

_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "dtype"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
}
_ALLOWED_STORAGES = {
    "FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage",
    "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "UntypedStorage",
}
_ALLOWED_DTYPES = {
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
}
# Configuration containers the authors' training code may have pickled beside the weights.
_CONFIG_CLASSES = {("easydict", "EasyDict"), ("addict.addict", "Dict"), ("addict", "Dict")}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


class PlainConfig(dict):
    """Stands in for a pickled configuration object: its items and attributes become a dict."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            for key, value in state.items():
                self.setdefault(key, value)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and (name in _ALLOWED_STORAGES or name in _ALLOWED_DTYPES):
            return super().find_class(module, name)
        if (module, name) in _CONFIG_CLASSES:
            return PlainConfig
        raise pickle.UnpicklingError(
            f"refusing to load '{module}.{name}': a checkpoint may hold only tensors and plain containers"
        )


class _RestrictedPickleModule:
    """What ``torch.load`` needs of a pickle module, with the restricted unpickler."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError
    __name__ = "ctsam3d_restricted_pickle"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def _plain(value: Any) -> Any:
    """Configuration stand-ins and nested containers turned into plain dicts and lists."""
    if isinstance(value, PlainConfig):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, OrderedDict):
        return OrderedDict((key, _plain(item)) for key, item in value.items())
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """The top-level dict of a checkpoint file, read by the restricted unpickler, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        content = torch.load(
            path, map_location="cpu", pickle_module=_RestrictedPickleModule, weights_only=False
        )
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused: {error}") from error
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, IndexError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or foreign file?): {error}") \
            from error
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(content).__name__}")
    return _plain(content)


def extract_state_dict(content: Mapping[str, Any], source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The model's state dict from a checkpoint's content: ``content["model_state_dict"]`` or the
    content itself, with any ``module.`` prefix (DataParallel/DDP) removed."""
    state = content.get("model_state_dict", content)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: 'model_state_dict' is {type(state).__name__}, not a dict of tensors")
    cleaned: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is {type(value).__name__}, not a tensor")
        cleaned[key[len("module."):] if key.startswith("module.") else key] = value
    return cleaned


def infer_variant(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> str:
    """The encoder size whose widths and depths the state dict has."""
    stem = state.get("image_encoder.stem.proj.6.weight")
    if stem is None:
        raise CheckpointError(f"{source}: no 'image_encoder.stem.proj.6.weight': not a CT-SAM3D checkpoint")
    depths = tuple(
        len({key.split(".")[2] for key in state if key.startswith(f"image_encoder.stage{level}.")})
        for level in range(1, 5)
    )
    for name, config in ENCODER_VARIANTS.items():
        if config.depths == depths and config.embed_dims[0] == stem.shape[0]:
            return name
    raise CheckpointError(
        f"{source}: encoder with width {stem.shape[0]} and depths {depths} matches no known variant "
        f"({', '.join(ENCODER_VARIANTS)})"
    )


def _describe_differences(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    missing = [key for key in expected if key not in found]
    extra = [key for key in found if key not in expected]
    misshaped = [
        f"{key} {tuple(found[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in expected
        if key in found and tuple(found[key].shape) != tuple(expected[key].shape)
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", misshaped)):
        if items:
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            parts.append(f"{len(items)} {label}: {shown}")
    return "; ".join(parts)


def state_dict_into_model(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> CTSAM3D:
    """A new network holding exactly ``state``; refuses any missing, extra or mis-shaped entry."""
    net = build_model(infer_variant(state, source))
    differences = _describe_differences(net.state_dict(), state)
    if differences:
        raise CheckpointError(f"{source}: does not match the CT-SAM3D network: {differences}")
    net.load_state_dict(state, strict=True)
    return net


def load_checkpoint(path: PathLike, device: Union[str, torch.device, None] = "auto") -> CTSAM3D:
    """The network stored in ``path`` (the authors' ``params.pth`` or this project's own files),
    in eval mode on ``device``. Nothing is loaded unless everything matches."""
    target = resolve_device(device)
    load_cuda_libraries_in_background(target)
    state = extract_state_dict(read_checkpoint(path), str(path))
    return state_dict_into_model(state, str(path)).to(target).eval()


def save_checkpoint(
    path: PathLike, net_or_state: Union[nn.Module, Mapping[str, torch.Tensor]], extra: Optional[dict] = None
) -> Path:
    """Writes ``{"model_state_dict": ..., **extra}`` (the authors' layout) atomically: the file
    appears complete under its name or not at all."""
    path = Path(path)
    state = net_or_state.state_dict() if isinstance(net_or_state, nn.Module) else net_or_state
    content = {"model_state_dict": OrderedDict((k, v.detach().cpu()) for k, v in state.items())}
    if extra:
        if "model_state_dict" in extra:
            raise ValueError("extra may not replace 'model_state_dict'")
        content.update(extra)
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        torch.save(content, stream)
        stream.flush()
        os.fsync(stream.fileno())
    return path
