"""``ctsam3d train --config FILE``: train or fine-tune CT-SAM3D with simulated clicks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import CommandError, HelpFormatter
from ..files import atomic_output

DESCRIPTION = """\
Train or fine-tune CT-SAM3D with simulated clicks. The configuration is TOML (Python 3.11+) or JSON;
--write-example-config FILE writes one with every setting at its default. The same command runs on
the CPU, one GPU, or under torchrun on several GPUs or nodes. A run continues from
<output_dir>/last.pth when it exists (unless --no-resume)."""

EXAMPLES = """\
examples:
  ctsam3d train --write-example-config run.json     # then set data.root in run.json
  ctsam3d train --config run.json --output-dir runs/a --max-steps 2000
  torchrun --nproc_per_node 4 -m CTSAM3DLib.cli train --config run.json"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune the network with simulated clicks (one GPU, CPU, or torchrun)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="training configuration (.toml or .json)")
    parser.add_argument("--write-example-config", type=Path, metavar="FILE",
                        help="write a JSON configuration with every setting at its default, and stop")
    parser.add_argument("--output-dir", type=Path, help="replaces run.output_dir")
    parser.add_argument("--max-steps", type=int, help="replaces optimisation.max_steps")
    parser.add_argument("--device", help="replaces run.device (auto, cpu, cuda, cuda:N, mps)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if last.pth exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def write_example_config(path: Path) -> None:
    """Every setting at its default, as JSON (readable by every supported Python)."""
    from ..training.config import TrainingConfig

    if path.exists():
        raise CommandError(f"{path} exists; give a new file name")
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(TrainingConfig().to_dict(), indent=2) + "\n")
    print(f"wrote {path}: every setting at its default; set data.root to your folder of cases, then "
          f"ctsam3d train --config {path}")


def run(args: argparse.Namespace) -> int:
    from ..training.config import load_config
    from ..training.trainer import Trainer

    if args.write_example_config is not None:
        write_example_config(args.write_example_config)
        return 0
    if args.config is None:
        raise CommandError("give --config FILE (or --write-example-config FILE to start one)")
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
