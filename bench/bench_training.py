"""Training throughput of the CT-SAM3D network: patches per second and peak GPU memory.

Two kinds of step, each on a batch of 64^3 patches (the authors' batch is 6):

- ``plain``: encode, one decoder pass with one click, focal + Dice loss, backward, AdamW update
  (the step the issue's reference figure describes: one H100, bf16, about 55 patches/s; the
  target is at least 3x that);
- ``interactive``: the real training step (`InteractiveTrainingStep`): ``--iterations`` decoder
  passes with the simulated user between them (on the CPU), then the cross-patch U-Net and its
  heatmap loss, backward, update.

Patches are synthetic (random intensities with a ball to segment), so no data is needed. On a CPU
the default is one timed step after no warm-up: a decoder pass of the full network costs about 2 s
per patch there.

    python -m bench.bench_training                       # GPU if present, else CPU
    python -m bench.bench_training --mode plain --batch 6 --steps 30 --compile
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict

import torch

from CTSAM3DLib import build_model, resolve_device
from CTSAM3DLib.training.config import ClickConfig, LossConfig
from CTSAM3DLib.training.losses import mask_loss
from CTSAM3DLib.training.step import InteractiveTrainingStep, autocast_for


def synthetic_batch(batch: int, device: torch.device, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Images (B,1,64^3) in [0,1] and masks (B,1,64^3): a bright ball of random centre and radius."""
    axis = torch.arange(64, dtype=torch.float32)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    masks = []
    for _ in range(batch):
        centre = 20 + 24 * torch.rand(3, generator=generator)
        radius = 6 + 10 * torch.rand(1, generator=generator)
        masks.append(((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < radius**2).float())
    mask = torch.stack(masks)[:, None]
    images = (0.3 * torch.rand(mask.shape, generator=generator) + 0.5 * mask).clamp(0, 1)
    return {"images": images.to(device), "masks": mask.to(device)}


def plain_step(net, optimizer, batch, loss_config: LossConfig, bf16: bool) -> None:
    images, masks = batch["images"], batch["masks"]
    points = torch.full((images.shape[0], 1, 3), 32.0, device=images.device)
    labels = torch.ones(images.shape[0], 1, dtype=torch.int64, device=images.device)
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(images.device, bf16):
        probability, _ = net.decode(net.encode(images), points, labels, None)
    mask_loss(probability, masks, loss_config).mean().backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
    optimizer.step()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--steps", type=int, help="timed steps (default 20 on a GPU, 1 on a CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3 on a GPU, 0 on a CPU)")
    parser.add_argument("--mode", choices=("plain", "interactive", "both"), default="both")
    parser.add_argument("--iterations", type=int, default=5, help="decoder passes per interactive step")
    parser.add_argument("--no-bf16", action="store_true", help="float32 instead of bf16 autocast (CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile encode and decode")
    parser.add_argument("--checkpoint-decoder", action="store_true", help="recompute decoder activations")
    parser.add_argument("--click-workers", type=int, default=0, help="processes simulating clicks in parallel")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    steps = args.steps if args.steps is not None else (20 if on_gpu else 1)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 0)
    bf16 = not args.no_bf16
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    net = build_model(args.variant).to(device).train()
    if args.compile:
        net.encode = torch.compile(net.encode)
        net.decode = torch.compile(net.decode)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_config = LossConfig()
    click_pool = None
    if args.click_workers:
        click_pool = ProcessPoolExecutor(args.click_workers, mp_context=multiprocessing.get_context("spawn"))
    interactive = InteractiveTrainingStep(
        net, ClickConfig(iterations=args.iterations), loss_config, bf16=bf16,
        checkpoint_decoder=args.checkpoint_decoder, click_executor=click_pool,
    )
    generator = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(args.batch, device, generator) for _ in range(2)]

    def run_interactive(batch):
        optimizer.zero_grad(set_to_none=True)
        interactive(batch["images"], batch["masks"])["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        optimizer.step()

    kinds = {"plain": lambda b: plain_step(net, optimizer, b, loss_config, bf16), "interactive": run_interactive}
    modes = ["plain", "interactive"] if args.mode == "both" else [args.mode]
    results = []
    for mode in modes:
        step = kinds[mode]
        for index in range(warmup):
            step(batches[index % 2])
        if on_gpu:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        for index in range(steps):
            step(batches[index % 2])
        if on_gpu:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        result = {
            "mode": mode,
            "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
            "batch": args.batch,
            "iterations": args.iterations if mode == "interactive" else 1,
            "bf16": bf16 and on_gpu,
            "compile": args.compile,
            "checkpoint_decoder": args.checkpoint_decoder and mode == "interactive",
            "click_workers": args.click_workers if mode == "interactive" else 0,
            "steps": steps,
            "seconds_per_step": seconds / steps,
            "patches_per_s": args.batch * steps / seconds,
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
        }
        results.append(result)
        memory = f", peak GPU memory {result['peak_gpu_memory_gib']:.1f} GiB" if on_gpu else ""
        print(
            f"{mode:12s} {result['device']}: batch {args.batch}, {result['seconds_per_step']:.3f} s/step, "
            f"{result['patches_per_s']:.2f} patches/s{memory}",
            flush=True,
        )
    if click_pool is not None:
        click_pool.shutdown()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
