"""``ctsam3d train --config FILE``: train or fine-tune CT-SAM3D with simulated clicks.

The configuration is TOML (Python 3.11+) or JSON; see Resources/Training/example.toml. The same
command runs on one GPU, on the CPU, or under torchrun on several GPUs or nodes:

    torchrun --nproc_per_node 4 -m CTSAM3DLib.cli train --config run.toml

A run continues from ``<output_dir>/last.pth`` when it exists (unless ``--no-resume``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune the network with simulated clicks (one GPU, CPU, or torchrun)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, help="training configuration (.toml or .json)")
    parser.add_argument("--output-dir", type=Path, help="replaces run.output_dir")
    parser.add_argument("--max-steps", type=int, help="replaces optimisation.max_steps")
    parser.add_argument("--device", help="replaces run.device (auto, cpu, cuda, cuda:N, mps)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if last.pth exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training.config import load_config
    from ..training.trainer import Trainer

    config = load_config(args.config)
    if args.output_dir is not None:
        config.run.output_dir = str(args.output_dir.resolve())
    if args.max_steps is not None:
        config.optimisation.max_steps = args.max_steps
    if args.device is not None:
        config.run.device = args.device
    if args.no_resume:
        config.run.resume = False
    if args.no_progress:
        config.run.progress = False
    config.validate()
    trainer = Trainer(config)
    try:
        last = trainer.fit()
        if trainer.context.is_main and last:
            print(
                f"step {last['step']}: loss {last['loss']:.4f}, "
                f"Dice after the last click {last['dice_last_click']:.3f}; "
                f"checkpoint {Path(config.run.output_dir) / 'last.pth'}"
            )
    finally:
        trainer.close()
    return 0
