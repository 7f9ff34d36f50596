"""Fixed-shape network calls replayed from a CUDA graph.

A decode is about 150 small kernels; launched one by one from Python they take three times as long as
the GPU needs for them. A CUDA graph records the launches once and replays them as one. Captured
directly (``torch.cuda.CUDAGraph``) this costs a few hundred milliseconds when the network is prepared;
``torch.compile(mode="reduce-overhead")``, which did it before, took about 40 s in every process and
recompiled in the middle of a session whenever one of its guards failed (17 s for one click).

A graph replays on the same memory every time, so a ``StaticCall`` owns its inputs: a call copies its
arguments into them (any strides, any device), replays, and hands back copies of the outputs, so that
no later call changes what an earlier one returned.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence, Tuple

import torch

GraphFunction = Callable[..., Sequence[torch.Tensor]]

CAPTURE_WARM_UPS = 2
"""Eager runs before the capture, on a side stream: the one-off work (cuDNN and cuBLAS handles, kernel
loading, allocator pools) must not be recorded into the graph."""


class StaticCall:
    """``function`` over tensors of fixed shapes, run from static input buffers.

    ``examples`` give the shapes, dtypes and device of the inputs. With ``capture`` (CUDA only) the
    function is recorded once into a CUDA graph, in ``pool`` (a ``torch.cuda.graph_pool_handle()``
    that several calls may share, since each copies its outputs out before another can replay), and
    every call replays it; without, every call runs the function eagerly on the same buffers, which is
    the same computation (what the CPU tests check). Calls are serialised: the buffers are shared.
    """

    def __init__(self, function: GraphFunction, examples: Sequence[torch.Tensor], capture: bool,
                 pool: Optional[tuple] = None) -> None:
        self._function = function
        self.inputs = tuple(torch.empty_like(example, memory_format=torch.contiguous_format).copy_(example)
                            for example in examples)
        self._lock = threading.Lock()
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._outputs: Tuple[torch.Tensor, ...] = ()
        if capture:
            self._capture(pool)

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def accepts(self, *inputs: torch.Tensor) -> bool:
        """Whether ``inputs`` have this call's shapes (dtypes are converted on the way in)."""
        return len(inputs) == len(self.inputs) and all(
            value.shape == buffer.shape for value, buffer in zip(inputs, self.inputs))

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if not self.accepts(*inputs):
            raise ValueError(
                f"this call takes inputs of shapes {[tuple(b.shape) for b in self.inputs]}, got "
                f"{[tuple(v.shape) for v in inputs]}")
        with self._lock:
            for buffer, value in zip(self.inputs, inputs):
                buffer.copy_(value)
            if self._graph is None:
                outputs = tuple(self._function(*self.inputs))
            else:
                self._graph.replay()
                outputs = self._outputs
            return tuple(output.clone() for output in outputs)

    @torch.no_grad()
    def _capture(self, pool: Optional[tuple]) -> None:
        device = self.inputs[0].device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs run on CUDA devices only, not on {device}")
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARM_UPS):
                self._function(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = tuple(self._function(*self.inputs))
        self._graph, self._outputs = graph, outputs
