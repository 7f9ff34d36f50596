"""8-bit 3D convolutions for x86 CPUs with VNNI, through oneDNN, with float output.

Weights are quantised once, symmetric per output channel; activations are quantised on every call
with a scale taken from that call's own range (dynamic quantisation), so no calibration data is
needed and an unusual input cannot overflow. The products accumulate in int32 and oneDNN returns
them rescaled to float, so only the inputs carry quantisation error.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional, Sequence, Tuple

import torch

_QUANT_MAX = 255.0


def quantize_activation(x: torch.Tensor, non_negative: bool = False) -> Tuple[torch.Tensor, float, int]:
    """x (B,C,D,H,W) float, channels-last -> (uint8 codes of the same shape and layout, scale,
    zero point): the asymmetric per-tensor code that spans x's own minimum and maximum (and zero).
    ``non_negative``: x is known to be >= 0 (a ReLU's output), which saves a pass."""
    flat = x.permute(0, 2, 3, 4, 1).reshape(-1)
    low = 0.0 if non_negative else min(float(flat.amin()), 0.0)
    high = max(float(flat.amax()), 0.0)
    scale = (high - low) / _QUANT_MAX
    if scale <= 0.0:
        scale = 1.0
    zero_point = int(round(-low / scale))
    codes = _quantize(flat, scale, zero_point)
    return codes.view(x.shape[0], *x.shape[2:], x.shape[1]).permute(0, 4, 1, 2, 3), scale, zero_point


def _quantize(flat: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """uint8 codes of a 1D float tensor: torch's vectorised quantiser (one pass) where this torch
    has it, else the same rounding spelled out in tensor operations."""
    try:
        with warnings.catch_warnings():
            # quantize_per_tensor is marked deprecated; the fallback below keeps working once it is gone.
            warnings.simplefilter("ignore")
            return torch.quantize_per_tensor(flat, scale, zero_point, torch.quint8).int_repr()
    except (AttributeError, RuntimeError):
        return flat.mul(1.0 / scale).round_().add_(zero_point).clamp_(0, _QUANT_MAX).to(torch.uint8)


class Int8Conv3d:
    """A 3D convolution (stride 1, 'same' padding) computed in int8 by oneDNN.

    weight (O, C, k, k, k) and bias (O,) are the float parameters of the loaded network;
    only their 8-bit code (O x C x k^3 bytes) is kept here, packed for oneDNN on first use.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        weight = weight.detach().float()
        self.out_channels = weight.shape[0]
        self.padding = [weight.shape[-1] // 2] * 3
        amax = weight.abs().amax(dim=(1, 2, 3, 4)).clamp_min(torch.finfo(torch.float32).tiny)
        self.weight_scale = (amax / 127.0).float()
        self.weight_code = torch.round(weight / self.weight_scale.view(-1, 1, 1, 1, 1)).clamp(-127, 127).to(torch.int8)
        self.weight_zero_point = torch.zeros(self.out_channels, dtype=torch.int32)
        self.bias = None if bias is None else bias.detach().float().clone()
        self._packed: Optional[torch.Tensor] = None

    def _pack(self, shape: Sequence[int], scale: float, zero_point: int) -> torch.Tensor:
        if self._packed is None:
            self._packed = torch.ops.onednn.qconv_prepack(
                self.weight_code, self.weight_scale, scale, zero_point,
                [1, 1, 1], self.padding, [1, 1, 1], 1, list(shape),
            )
        return self._packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, S, S, S) float, any memory format -> (B, O, S, S, S) float32, channels-last."""
        codes, scale, zero_point = quantize_activation(x.contiguous(memory_format=torch.channels_last_3d))
        return self.run_codes(codes, scale, zero_point)

    def run_codes(self, codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        """The convolution of already quantised, channels-last input codes (uint8)."""
        packed = self._pack(codes.shape, scale, zero_point)
        return torch.ops.onednn.qconv_pointwise(
            codes, scale, zero_point, packed, self.weight_scale, self.weight_zero_point, self.bias,
            [1, 1, 1], self.padding, [1, 1, 1], 1, 1.0, 0, torch.float32, "none", [], "",
        )


@functools.lru_cache(maxsize=1)
def int8_convolution_available() -> bool:
    """True when this torch build runs oneDNN int8 3D convolutions on this CPU and gets them right
    (checked once on a tiny random case against float32)."""
    if not torch.backends.mkldnn.is_available():
        return False
    onednn = getattr(torch.ops, "onednn", None)
    if onednn is None or not hasattr(onednn, "qconv_prepack") or not hasattr(onednn, "qconv_pointwise"):
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 4, 3, 3, 3, generator=generator) / 10
    x = torch.rand(1, 4, 6, 6, 6, generator=generator)
    try:
        result = Int8Conv3d(weight, torch.zeros(8))(x)
    except (RuntimeError, NotImplementedError, TypeError):
        # Older torch builds lack 3D int8 convolutions or spell the operators differently.
        return False
    expected = torch.nn.functional.conv3d(x, weight, padding=1)
    return bool((result - expected).abs().max() < 0.05 * expected.abs().max())
