"""The SPADE mask decoder rearranged for speed on x86 CPUs: the same parameters and the same
mathematics as ``SpadeMaskDecoder``, computed in another order and at lower precision.

What changes, and why each is safe:
- Every 3x3x3 convolution with 128 or 256 input channels (the residual convolutions and the SPADE
  gamma/beta convolutions: 99% of the decoder's 250 GFLOP) runs in int8 through oneDNN
  (``Int8Conv3d``: VNNI where the CPU has it), activations quantised per call from their own range.
- ``1 + gamma`` is folded into the gamma bias; a single sample's instance norm uses batch norm's
  channels-last kernel; the SPADE ``mlp_shared`` convolutions (3 input channels, for which oneDNN's
  direct kernels are slow) are one matrix product of the prompt's unfolded 3x3x3 neighbourhoods,
  computed once per block for both norms.
- The 2x2x2 stride-2 transposed convolutions are one matrix product per coarse voxel (bfloat16
  where the CPU has it natively); layer norm and GELU run on its output before the fine voxels are
  interleaved, so they read contiguous channels.
- The last upscaling and the output convolution are fused (``UpscaledHead``) so that the
  64-channel 64^3 volume is never stored.
The float32 path (``CTSAM3D.decode``) is untouched; tests compare the two on real CT patches.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from .decoder import SpadeMaskDecoder, SpadeResidualBlock, Upscale, resize_prompt
from .int8_conv import Int8Conv3d, quantize_activation

_INSTANCE_NORM_EPS = 1e-5
_LEAKY_SLOPE = 0.2


class Int8SpadeBlock:
    """A ``SpadeResidualBlock`` whose convolutions run in int8 (see the module docstring)."""

    def __init__(self, block: SpadeResidualBlock) -> None:
        self.shared = []
        self.modulations = []
        for norm in (block.norm_0, block.norm_1):
            shared = norm.mlp_shared[0]
            self.shared.append((shared.weight.detach().reshape(shared.out_channels, -1).t(), shared.bias.detach()))
            # instance_norm(x) * (1 + gamma) + beta: the 1 goes into gamma's bias.
            self.modulations.append((
                Int8Conv3d(norm.mlp_gamma.weight, norm.mlp_gamma.bias + 1),
                Int8Conv3d(norm.mlp_beta.weight, norm.mlp_beta.bias),
            ))
        self.conv_0 = Int8Conv3d(block.conv_0.weight, block.conv_0.bias)
        self.conv_1 = Int8Conv3d(block.conv_1.weight, block.conv_1.bias)

    def __call__(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """x (B,C,S^3), prompt (B,3,S^3) -> (B,C,S^3) channels-last."""
        columns = _neighbourhoods(prompt)
        modulation = []
        for (weight, bias), (gamma, beta) in zip(self.shared, self.modulations):
            hidden = F.relu_(_columns_product(columns, weight, bias, prompt.shape))
            codes, scale, zero_point = quantize_activation(hidden, non_negative=True)
            modulation.append((gamma.run_codes(codes, scale, zero_point), beta.run_codes(codes, scale, zero_point)))
        residual = self.conv_0(_modulated(x, *modulation[0]))
        residual = self.conv_1(_modulated(residual, *modulation[1]))
        return residual.add_(x)


def _neighbourhoods(x: torch.Tensor) -> torch.Tensor:
    """x (B,C,S^3) -> (B*S^3, C*27): every voxel's zero-padded 3x3x3 neighbourhood, ordered
    (C, kd, kh, kw) as a convolution weight's flattened input axes."""
    channels = x.shape[1]
    windows = F.pad(x, (1, 1, 1, 1, 1, 1)).unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1)
    return windows.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, channels * 27)


def _columns_product(
    columns: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shape: torch.Size
) -> torch.Tensor:
    """A 3x3x3 'same' convolution of a few-channel input (oneDNN's direct kernels are slow for 3
    input channels) as one product of its neighbourhoods: columns from ``_neighbourhoods``,
    weight (Cin*27, Cout) -> (B,Cout,S^3) channels-last."""
    batch, _, depth, height, width = shape
    out = torch.addmm(bias, columns, weight)
    return out.view(batch, depth, height, width, -1).permute(0, 4, 1, 2, 3)


def _instance_normalised(x: torch.Tensor) -> torch.Tensor:
    """instance_norm(x) for (B,C,S^3); a single sample goes through batch norm's channels-last kernel."""
    if x.shape[0] == 1:
        return F.batch_norm(x, None, None, training=True, eps=_INSTANCE_NORM_EPS)
    return F.instance_norm(x, eps=_INSTANCE_NORM_EPS)


def _modulated(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """leaky_relu(instance_norm(x) * scale + shift), all (B,C,S^3), computed in ``shift``'s storage."""
    return F.leaky_relu_(shift.addcmul_(_instance_normalised(x), scale), _LEAKY_SLOPE)


class VoxelwiseUpscale:
    """``Upscale`` (2x2x2 stride-2 transposed convolution, channel layer norm, GELU) as one matrix
    product per coarse voxel, with the norm and GELU applied before the fine voxels interleave."""

    def __init__(self, upscale: Upscale, dtype: torch.dtype = torch.bfloat16) -> None:
        """``dtype``: of the matrix product (bfloat16 halves its cost where the CPU has it);
        the norm and GELU run in float32."""
        transposed, norm = upscale.cna[0], upscale.cna[1]
        in_channels, out_channels = transposed.weight.shape[:2]
        self.out_channels = out_channels
        # Columns ordered (kd, kh, kw, out) so that each fine voxel's channels are contiguous.
        weight = transposed.weight.detach().permute(0, 2, 3, 4, 1).reshape(in_channels, 8 * out_channels)
        self.weight = weight.to(dtype)
        self.bias = transposed.bias.detach().repeat(8).to(dtype)
        self.norm_weight = norm.weight.detach()
        self.norm_bias = norm.bias.detach()
        self.norm_eps = norm.eps

    def fine_voxels(self, voxels: torch.Tensor) -> torch.Tensor:
        """voxels (N, Cin) -> (8N, Cout): the 2x2x2 fine voxels of each, normalised and activated,
        in the order (voxel, kd, kh, kw)."""
        fine = torch.addmm(self.bias, voxels.to(self.weight.dtype), self.weight).view(-1, self.out_channels)
        fine = F.layer_norm(fine.float(), (self.out_channels,), self.norm_weight, self.norm_bias, self.norm_eps)
        return F.gelu(fine)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,Cin,S^3) -> (B,Cout,(2S)^3) channels-last."""
        batch, _, depth, height, width = x.shape
        fine = self.fine_voxels(x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1]))
        fine = fine.view(batch, depth, height, width, 2, 2, 2, self.out_channels)
        fine = fine.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, 2 * depth, 2 * height, 2 * width, -1)
        return fine.permute(0, 4, 1, 2, 3)


class UpscaledHead:
    """The last ``Upscale`` (S^3 -> (2S)^3) and the 3x3x3 output convolution to one channel, fused.

    ``VoxelwiseUpscale`` yields each coarse voxel's 2x2x2 fine voxels with their channels
    contiguous; the output convolution's channel reduction runs right there, as one product with
    the kernel's 27 taps, giving for every fine voxel its contribution to each of its 27
    neighbours. The 64-channel (2S)^3 volume is made a slab at a time, so it stays in cache and is
    never stored. The logits are then sums of shifted coarse grids: fine voxel 2u + a takes tap k
    from fine voxel 2u + a + k - 1, i.e. coarse voxel u + (a + k - 1) // 2, sub-voxel
    (a + k - 1) % 2, per axis. The quality head's channel means are summed on the way.
    """

    def __init__(
        self, upscale: Upscale, head: torch.nn.Conv3d, dtype: torch.dtype = torch.bfloat16, slab_voxels: int = 2048
    ) -> None:
        self.upscale = VoxelwiseUpscale(upscale, dtype)
        self.taps = head.weight.detach()[0].reshape(self.upscale.out_channels, 27).t().contiguous()
        self.head_bias = float(head.bias.detach()[0])
        self.slab_voxels = slab_voxels
        # (output sub-voxel a, tap k) -> (source sub-voxel, coarse shift) as flat indices.
        self.terms = []
        for a in range(8):
            for k in range(27):
                offsets = [(bit + tap - 1) for bit, tap in zip(_bits(a), _digits(k))]
                source = sum(((o % 2) << (2 - axis)) for axis, o in enumerate(offsets))
                shifts = tuple(o // 2 for o in offsets)
                self.terms.append((a, k, source, shifts))

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B,Cin,S^3) -> logits (B,1,(2S)^3), channel means of the upscaled volume (B,Cout)."""
        batch, _, depth, height, width = x.shape
        up = self.upscale
        voxels = x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1])
        per_sample = depth * height * width
        contributions = torch.empty(27, 8, voxels.shape[0], dtype=torch.float32, device=x.device)
        channel_sums = torch.zeros(batch, up.out_channels, dtype=torch.float32, device=x.device)
        for sample in range(batch):
            end = (sample + 1) * per_sample
            for start in range(sample * per_sample, end, self.slab_voxels):
                stop = min(start + self.slab_voxels, end)
                fine = up.fine_voxels(voxels[start:stop])
                slab = torch.mm(self.taps, fine.t()).view(27, stop - start, 8)
                contributions[:, :, start:stop] = slab.permute(0, 2, 1)
                channel_sums[sample] += fine.sum(dim=0)
        grid = contributions.view(27, 8, batch, depth, height, width)
        logits = torch.full((8, batch, depth, height, width), self.head_bias, device=x.device)
        for a, k, source, shifts in self.terms:
            # Zero padding: a shifted source outside the grid contributes nothing.
            target_slices, source_slices = zip(*(_shifted(shift, size) for shift, size in zip(shifts, x.shape[2:])))
            logits[(a, slice(None), *target_slices)] += grid[(k, source, slice(None), *source_slices)]
        logits = logits.view(2, 2, 2, batch, depth, height, width).permute(3, 4, 0, 5, 1, 6, 2)
        return logits.reshape(batch, 1, 2 * depth, 2 * height, 2 * width), channel_sums / (8 * per_sample)


def _shifted(shift: int, size: int) -> Tuple[slice, slice]:
    """(target, source) slices along one axis such that target[i] reads source[i + shift]."""
    return slice(max(0, -shift), size - max(0, shift)), slice(max(0, shift), size + min(0, shift))


def _bits(index: int) -> Tuple[int, int, int]:
    """Sub-voxel index 0..7 -> its (d, h, w) offsets in {0, 1}."""
    return index >> 2 & 1, index >> 1 & 1, index & 1


def _digits(index: int) -> Tuple[int, int, int]:
    """Kernel tap 0..26 -> its (kd, kh, kw) in {0, 1, 2}."""
    return index // 9, index // 3 % 3, index % 3


class Int8SpadeDecoder:
    """``SpadeMaskDecoder.forward`` with its convolutions in int8 (see the module docstring).

    features [(B,128,16^3), (B,128,8^3), (B,128,4^3), (B,256,2^3)], prompt (B,3,64^3)
    -> probability (B,1,64^3) float32, quality (B,1).
    """

    def __init__(self, decoder: SpadeMaskDecoder, upscale_dtype: torch.dtype = torch.bfloat16) -> None:
        """``upscale_dtype``: of the upscaling matrix products (float32 where the CPU has no native bfloat16)."""
        self.decoder = decoder
        self.blocks = [
            Int8SpadeBlock(block)
            for block in (decoder.spade1, decoder.spade2, decoder.spade3, decoder.spade4, decoder.spade5)
        ]
        self.upscales = [decoder.upscale1, decoder.upscale2, VoxelwiseUpscale(decoder.upscale3, upscale_dtype),
                         VoxelwiseUpscale(decoder.upscale4, upscale_dtype)]
        self.head = UpscaledHead(decoder.upscale5, decoder.mask_prediction_head[0], upscale_dtype)

    @torch.no_grad()
    def __call__(self, features: List[torch.Tensor], prompt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if prompt.shape[0] > 1:
            # Activation scales are taken per call: one sample at a time keeps each patch's result
            # independent of what it is batched with (as in float32); the cost is per sample anyway.
            outputs = [self([level[row:row + 1] for level in features], prompt[row:row + 1])
                       for row in range(prompt.shape[0])]
            return torch.cat([p for p, _ in outputs]), torch.cat([q for _, q in outputs])
        skips = features[-2::-1]
        x = features[-1]
        for level, block in enumerate(self.blocks):
            if 0 < level <= len(skips):
                x = torch.cat([x, skips[level - 1].to(x.dtype)], dim=1)
            x = block(x, resize_prompt(prompt, tuple(x.shape[2:])))
            if level < len(self.upscales):
                x = self.upscales[level](x)
        logits, channel_means = self.head(x)
        quality = self.decoder.iou_prediction_head(channel_means)[:, :1]
        return torch.sigmoid(logits), quality
