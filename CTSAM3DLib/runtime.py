"""The network as sessions run it: prepared once for a device, a precision and a way of sampling.

Whoever owns the network (the CLI, the server, the Slicer logic, the evaluation) builds one ``Runtime``
and hands it to every ``InteractiveSession`` it opens, so that the preparation (the int8 decoder's
codes, the CUDA graphs' capture, the first-use warm-up; see ``CTSAM3DLib.inference``) is paid once. A
session given a bare network builds a runtime of its own.

Weights that change after the preparation (``load_state_dict`` or an optimiser step, which write into
the parameters in place and so bump their version counters) are never served stale: a session that
starts on the runtime asks for ``current()``, which prepares the network again when its parameters'
versions differ from those it was prepared with.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .device import resolve_device
from .inference import cuda_graphs_default, prepare_network, resolve_precision
from .interface import PromptableNetwork

SAMPLING = ("auto", "exact", "device")
"""How patches are cut from the CT: "exact" through SimpleITK on the CPU (bit-exact with the authors'
pipeline), "device" with torch where the network runs (``geometry.DeviceVolume``: on a GPU the volume
stays there; the same values, bit for bit, except on Apple MPS). "auto" is device on CUDA and for the
optimised precisions on a CPU; exact for the float32 network on a CPU (the path the parity tests check)
and on Apple MPS (which has no float64)."""


def weights_version(network: PromptableNetwork) -> Tuple[int, ...]:
    """The version counters of a module's parameters (empty for any other network): they change whenever
    the weights are written in place."""
    if not isinstance(network, torch.nn.Module):
        return ()
    return tuple(parameter._version for parameter in network.parameters())


def _index_given(device: torch.device) -> torch.device:
    """``device`` with its index stated ("cuda" is the current CUDA device)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Runtime:
    """``source`` (a ``PromptableNetwork``) ready to run on ``device`` at ``precision`` (see
    ``CTSAM3DLib.inference``; "auto" resolved), with ``network`` its prepared form (``source`` itself,
    or a ``PreparedNetwork``), ``cuda_graphs`` whether a single patch's encode and decode replay CUDA
    graphs, and ``sampling`` where sessions cut patches by default (see ``SAMPLING``; "auto" resolved)."""

    def __init__(self, network: PromptableNetwork, device: Union[str, torch.device, None] = "auto",
                 precision: str = "auto", *, sampling: str = "auto", cuda_graphs: Optional[bool] = None) -> None:
        if sampling not in SAMPLING:
            raise ValueError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLING)}")
        self.source = network
        self.device = resolve_device(device)
        self.precision = resolve_precision(network, self.device, precision)
        self._cuda_graphs = (cuda_graphs_default() if cuda_graphs is None else cuda_graphs) and (
            self.device.type == "cuda")
        if sampling == "auto":
            on_device = self.device.type == "cuda" or (self.device.type == "cpu" and self.precision != "float32")
            sampling = "device" if on_device else "exact"
        self.sampling = sampling
        self._prepare()

    @property
    def cuda_graphs(self) -> bool:
        return bool(getattr(self.network, "cuda_graphs", False))

    def current(self) -> Runtime:
        """This runtime, prepared again first if the source's weights changed since it was prepared."""
        if self.network is not self.source and weights_version(self.source) != self._version:
            self._prepare()
        return self

    def accepts(self, device: Union[str, torch.device, None], precision: str) -> bool:
        """Whether a session asking for ``device`` and ``precision`` ("auto"/None: any) can run on this runtime."""
        same_device = device in ("auto", None) or _index_given(resolve_device(device)) == _index_given(self.device)
        return same_device and precision in ("auto", self.precision)

    def __repr__(self) -> str:
        return (f"Runtime({type(self.source).__name__}, device={str(self.device)!r}, precision={self.precision!r}, "
                f"sampling={self.sampling!r}, cuda_graphs={self.cuda_graphs})")

    def _prepare(self) -> None:
        self.network: PromptableNetwork = prepare_network(self.source, self.device, self.precision,
                                                          cuda_graphs=self._cuda_graphs)
        self._version = weights_version(self.source)
