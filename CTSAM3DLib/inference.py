"""How the network runs for interactive use on a given device (precision and other optimisations).

``prepare_network`` is the one place that chooses. Precisions:

- ``"float32"``: the network itself, unchanged: the path the parity tests check.
- ``"int8"`` (x86 CPU with oneDNN): the decoder's convolutions in int8 (``Int8SpadeDecoder``, VNNI
  where the CPU has it); the encoder and cross-patch U-Net in float32. About 3.5x faster decoding
  than float32 on AVX512-VNNI; masks agree with float32 at Dice >= 0.99
  (``Testing/Python/test_inference.py``, ``BENCHMARKS.md``).
- ``"openvino-int8"`` (x86 CPU, the optional ``openvino`` package): the decoder in int8 through OpenVINO's
  CPU runtime (``CTSAM3DLib.model.openvino_decoder``: static ranges from synthetic calibration, int8
  convolutions fused with their neighbours); built once per weights and kept on disk
  (``CTSAM3DLib.openvino_cache``); the encoder and cross-patch U-Net as for int8. About 1.3x faster
  decoding than int8 on AVX512-VNNI; masks agree with float32 at Dice >= 0.99
  (``Testing/Python/test_inference.py``, ``test_openvino_decoder.py``, ``BENCHMARKS.md``).
- ``"bfloat16"``: autocast to bfloat16 (CPU with native bfloat16, CUDA).
- ``"float16"``: autocast to float16 (CUDA; Apple MPS where this torch supports MPS autocast).
- ``"auto"``: openvino-int8, else int8, else bfloat16, else float32 on a CPU (each only where a probe
  shows it works here); float32 on CUDA (measured faster than float16 on an H200: cuDNN's 3D float16 kernels gain
  nothing there at equal accuracy, see BENCHMARKS.md); float32 on MPS (float16 there is unmeasured).

On CUDA, a single patch's encode and decode replay CUDA graphs (``CTSAM3DLib.cuda_graph``), captured
when the network is prepared (well under a second; no compiler): clicks are padded to ``MAX_CLICKS`` and
a mask prompt is always passed, so one graph serves every click of a patch. Batches of several patches
(cross-patch prompting) and patches with more than ``MAX_CLICKS`` clicks run eagerly: large batches are
bound by arithmetic, not launches. Where a capture fails, a warning says so and those calls run eagerly.
``cuda_graphs=False`` or ``CTSAM3D_CUDA_GRAPHS=0`` switches the graphs off. Nothing is compiled, so no
click ever waits for a compiler. Nothing is kept here either: ``CTSAM3DLib.runtime.Runtime`` holds a
prepared network for the sessions that share it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any, Callable, ContextManager, List, Optional, Tuple

import torch

from .constants import MAX_CLICKS, PATCH_SIZE
from .cuda_graph import StaticCall
from .device import wait_for_cuda_libraries
from .interface import PromptableNetwork
from .model import CTSAM3D
from .model.fast_decoder import Int8SpadeDecoder
from .model.int8_conv import int8_convolution_available
from .model.openvino_decoder import openvino_available

PRECISIONS = ("auto", "float32", "int8", "openvino-int8", "bfloat16", "float16")

_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

CpuDecoder = Callable[[List[torch.Tensor], torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
"""An int8 decoder: features, prompt (B,3,64^3) -> probability (B,1,64^3), quality (B,1)."""


@functools.lru_cache(maxsize=1)
def cpu_bfloat16_native() -> bool:
    """True when oneDNN computes bfloat16 natively on this CPU (AVX512-BF16, AMX), so bfloat16
    autocast speeds convolutions up instead of emulating them."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and probe is not None and probe())
    except RuntimeError:
        return False


def autocast_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.autocast runs ``dtype`` on ``device``'s type in this torch build (some builds
    refuse an unsupported pair, others warn and disable autocast: both count as no)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast(device_type=device.type, dtype=dtype):
                pass
    except (RuntimeError, ValueError):
        return False
    return not any("autocast" in str(warning.message).lower() for warning in caught)


def available_precisions(device: torch.device) -> List[str]:
    """The precisions that work on ``device`` in this torch build ("auto" and "float32" always)."""
    found = ["auto", "float32"]
    if device.type == "cpu":
        if int8_convolution_available():
            found.append("int8")
            if openvino_available():
                found.append("openvino-int8")
        if autocast_available(device, torch.bfloat16):
            found.append("bfloat16")
    elif device.type == "cuda":
        found.append("float16")
        if torch.cuda.is_bf16_supported():
            found.append("bfloat16")
    elif device.type == "mps" and autocast_available(device, torch.float16):
        found.append("float16")
    return found


def choose_precision(device: torch.device) -> str:
    """What "auto" means on ``device`` (see the module docstring)."""
    available = available_precisions(device)
    if device.type == "cpu":
        for optimised in ("openvino-int8", "int8"):
            if optimised in available:
                return optimised
        if "bfloat16" in available and cpu_bfloat16_native():
            return "bfloat16"
    return "float32"


def resolve_precision(net: PromptableNetwork, device: torch.device, precision: str = "auto") -> str:
    """The precision ``net`` will actually run at on ``device`` when asked for ``precision``.

    The optimised paths are built for the CT-SAM3D network (``CTSAM3DLib.model.CTSAM3D``) alone: any
    other network (a user's module, a stand-in) runs as it is, "float32", and asking it for another
    precision is refused. A precision this device cannot run is refused with the list of those it can.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if not isinstance(net, CTSAM3D):
        if precision not in ("auto", "float32"):
            raise ValueError(
                f"precision {precision!r} is built for the CT-SAM3D network; a {type(net).__name__} runs as it "
                "is (float32)"
            )
        return "float32"
    if precision == "auto":
        return choose_precision(device)
    if precision not in available_precisions(device):
        raise ValueError(
            f"precision {precision!r} is not available on {device} with this torch build; "
            f"choose one of {', '.join(available_precisions(device))}"
        )
    return precision


def cuda_graphs_default() -> bool:
    """Whether CUDA graphs are used when the caller does not say: yes, unless ``CTSAM3D_CUDA_GRAPHS=0``
    (or the deprecated ``CTSAM3D_COMPILE=0``, from when the graphs came from torch.compile)."""
    if "CTSAM3D_COMPILE" in os.environ:
        warnings.warn("CTSAM3D_COMPILE is deprecated: the decoder is no longer compiled; use CTSAM3D_CUDA_GRAPHS=0 "
                      "to switch its CUDA graphs off", FutureWarning, stacklevel=3)
    switch = os.environ.get("CTSAM3D_CUDA_GRAPHS", os.environ.get("CTSAM3D_COMPILE", "1"))
    return switch.strip() != "0"


def prepare_network(net: PromptableNetwork, device: torch.device, precision: str = "auto",
                    cuda_graphs: Optional[bool] = None) -> PromptableNetwork:
    """The network ready for ``device`` at ``precision`` (one of ``PRECISIONS``; see ``resolve_precision``).

    A ``torch.nn.Module`` is moved there in eval mode; the CT-SAM3D network at "float32" off CUDA is
    returned itself (warmed up), otherwise wrapped in a new ``PreparedNetwork`` with the same
    ``encode``/``decode``/``cross_patch``. Any other network runs as it is. ``cuda_graphs`` (default:
    ``cuda_graphs_default()``) replays a single patch's encode and decode from CUDA graphs; it is ignored
    off CUDA. Each call prepares anew: keep the result (``CTSAM3DLib.runtime.Runtime`` does).
    """
    precision = resolve_precision(net, device, precision)
    device = torch.device(device)
    if isinstance(net, torch.nn.Module):
        net.to(device).eval()
    if not isinstance(net, CTSAM3D):
        return net
    if cuda_graphs is None:
        cuda_graphs = cuda_graphs_default()
    cuda_graphs = cuda_graphs and device.type == "cuda"
    if precision == "float32" and not cuda_graphs:
        warm_up(net, device)
        return net
    return PreparedNetwork(net, device, precision, cuda_graphs=cuda_graphs)


@torch.no_grad()
def warm_up(network: PromptableNetwork, device: torch.device) -> None:
    """One encode of an empty patch and one decode of a click on it: the one-off work of a network's
    first use (oneDNN primitives, cuDNN plans, loading CUDA kernels), done before any user's first click."""
    image = torch.zeros(1, 1, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE, device=device)
    points = torch.full((1, 1, 3), PATCH_SIZE / 2, device=device)
    labels = torch.ones(1, 1, dtype=torch.int64, device=device)
    network.decode(network.encode(image), points, labels)


class PreparedNetwork:
    """``encode``/``decode``/``cross_patch`` of a loaded ``CTSAM3D`` run at another precision, or from
    CUDA graphs.

    It reuses the network's own parameters: the int8 decoder keeps only their 8-bit codes (and a
    bfloat16 copy of its upscaling matrices), made once here; the OpenVINO decoder is read from its
    cache, or built from them and kept there (``CTSAM3DLib.openvino_cache``). Weights
    loaded into the network later are not seen: prepare it again (``Runtime.current`` notices). Outputs
    are float32 whatever the precision. It warms up here (``warm_up``, and the capture of the graphs),
    so that no one-off work is paid by a user's first click.
    """

    def __init__(self, net: Any, device: torch.device, precision: str, cuda_graphs: bool = False) -> None:
        self.network = net
        self.device = device
        self.precision = precision
        self._cpu_decoder: Optional[CpuDecoder] = None
        if precision == "int8":
            upscale_dtype = torch.bfloat16 if cpu_bfloat16_native() else torch.float32
            self._cpu_decoder = Int8SpadeDecoder(net.mask_decoder, upscale_dtype)
        elif precision == "openvino-int8":
            from .openvino_cache import openvino_decoder

            self._cpu_decoder = openvino_decoder(net, torch.get_num_threads(), cpu_bfloat16_native())
        self._graphed_encode: Optional[StaticCall] = None
        self._graphed_decode: Optional[StaticCall] = None
        if cuda_graphs:
            self._capture_graphs()
        warm_up(self, device)

    @property
    def cuda_graphs(self) -> bool:
        """Whether a single patch's encode and decode replay CUDA graphs."""
        return self._graphed_decode is not None

    def __repr__(self) -> str:
        return (f"PreparedNetwork(precision={self.precision!r}, device={str(self.device)!r}, "
                f"cuda_graphs={self.cuda_graphs})")

    # ------------------------------------------------------------------ interface
    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> List[torch.Tensor]:
        """image (B,1,64^3) in [0,1] -> the four float32 feature maps of ``CTSAM3D.encode``."""
        if self._graphed_encode is not None and self._graphed_encode.accepts(image):
            return list(self._graphed_encode(image))
        return self._encode_eager(image)

    @torch.no_grad()
    def decode(self, features: List[torch.Tensor], points: torch.Tensor, labels: torch.Tensor,
               mask_prompt: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """As ``CTSAM3D.decode``: -> probability (B,1,64^3) float32, quality (B,1) float32."""
        if self._graphed_decode is not None and labels.shape[0] == 1 and labels.shape[1] <= MAX_CLICKS:
            return self._graphed_decode(*features, *fixed_shape_prompt(points, labels, mask_prompt))
        if self._cpu_decoder is not None:
            prompt = self.network.decoder_prompt(points, labels, mask_prompt, torch.float32)
            return self._cpu_decoder(features, prompt)
        return self._decode_eager(*features, points, labels, mask_prompt)

    @torch.no_grad()
    def cross_patch(self, image: torch.Tensor, mask: torch.Tensor, neighbour_image: torch.Tensor) -> torch.Tensor:
        """As ``CTSAM3D.cross_patch``; float32 heatmap (B,1,64^3)."""
        with self._autocast():
            return self.network.cross_patch(image, mask, neighbour_image).float()

    # ------------------------------------------------------------------ internals
    def _capture_graphs(self) -> None:
        """Captures a single patch's encode and decode, once the background loading of CUDA's libraries
        (``load_checkpoint``) is done; a capture that fails leaves those calls eager, with a warning."""
        image = torch.zeros(1, 1, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE, device=self.device)
        points = torch.full((1, 1, 3), PATCH_SIZE / 2, device=self.device)
        labels = torch.ones(1, 1, dtype=torch.int64, device=self.device)
        wait_for_cuda_libraries()
        pool = torch.cuda.graph_pool_handle()
        try:
            encode = StaticCall(self._encode_eager, [image], capture=True, pool=pool)
            features = encode(image)
            decode = StaticCall(self._decode_eager, [*features, *fixed_shape_prompt(points, labels, None)],
                                capture=True, pool=pool)
        except RuntimeError as error:  # a GPU or driver without graph support says so many ways
            warnings.warn(f"capturing the network's CUDA graphs failed ({error}); it runs without them",
                          stacklevel=4)
            return
        self._graphed_encode, self._graphed_decode = encode, decode

    def _encode_eager(self, image: torch.Tensor) -> List[torch.Tensor]:
        with self._autocast():
            features = self.network.encode(image)
        return [feature.float() for feature in features]

    def _decode_eager(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """features..., points, labels, mask_prompt (as ``decode`` takes them, the features spread out)."""
        *features, points, labels, mask_prompt = inputs
        with self._autocast():
            probability, quality = self.network.decode(list(features), points, labels, mask_prompt)
        return probability.float(), quality.float()

    def _autocast(self) -> ContextManager:
        """Autocast for the precision; none for the int8 ones, whose encoder and cross-patch U-Net run in
        float32 (bfloat16 saved at most 20 ms per patch there, for a larger error). Its cache of cast
        weights is off: a CUDA graph cannot record it."""
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=False)


def fixed_shape_prompt(
    points: torch.Tensor, labels: torch.Tensor, mask_prompt: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode's prompt in one shape for any number of clicks: the clicks padded to ``MAX_CLICKS``
    (label -1 is skipped by the click maps) and a mask prompt always present (zeros stand for none, as
    in ``CTSAM3D.decode``). points (B,N,3), labels (B,N), mask_prompt (B,1,64^3) or None
    -> (B,MAX_CLICKS,3) float32, (B,MAX_CLICKS) int64, (B,1,64^3) float32."""
    batch, count = labels.shape
    if count > MAX_CLICKS:
        raise ValueError(f"at most {MAX_CLICKS} clicks fit the fixed shape, got {count}")
    padded_points = torch.zeros(batch, MAX_CLICKS, 3, dtype=torch.float32, device=points.device)
    padded_points[:, :count] = points
    padded_labels = torch.full((batch, MAX_CLICKS), -1, dtype=torch.int64, device=labels.device)
    padded_labels[:, :count] = labels
    if mask_prompt is None:
        mask_prompt = torch.zeros(batch, 1, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE, device=points.device)
    return padded_points, padded_labels, mask_prompt.float()
