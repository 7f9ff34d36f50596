"""The training loop: data, optimiser, schedule, logs, validation, checkpoints, resumption.

Checkpoints use the authors' layout, ``{"model_state_dict": ...}`` with everything else in
separate keys (``optimizer_state_dict``, ``step``, ``rng_states``, ``config``, ...), hold only
tensors, numbers, strings, lists and dicts (so `CTSAM3DLib.load_checkpoint` reads them), and are
written atomically. ``<output_dir>/last.pth`` is the resume point; ``checkpoints/step_NNNNNNN.pth``
keeps the latest few; ``best.pth`` (weights only) follows the best validation Dice.

Continuing from ``last.pth`` reproduces the uninterrupted run: the batches are a function of the
step (see `sampler`), and the weights, optimiser moments, step count and every random generator
(Python, numpy, torch CPU and CUDA, per process) are restored.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import extract_state_dict, read_checkpoint, save_checkpoint
from ..datasets import Case, find_cases
from ..interface import CrossPatchNetwork
from ..model import build_model
from ..progress import ProgressBar
from .cache import CachedCase, build_cached_case, cached_case_folder
from .config import ConfigError, TrainingConfig
from .distributed import DistributedContext
from .rng import capture_rng_state, restore_rng_state
from .sampler import PatchSampler, StepBatches
from .step import InteractiveTrainingStep
from .validation import evaluate_patches, validation_patches

CHECKPOINT_FORMAT = "ctsam3d-training-1"
TRAIN_LOG_COLUMNS = [
    "step", "loss", "mask_loss", "cross_patch_loss", "dice_first_click", "dice_last_click",
    "learning_rate", "grad_norm", "patches_per_s", "elapsed_s",
]
_AVERAGED = ["loss", "mask_loss", "cross_patch_loss", "dice_first", "dice", "grad_norm"]


def learning_rate(step: int, config: TrainingConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then a step decay by ``decay_factor`` every
    ``decay_every`` steps (a function of the step alone, so resuming needs no scheduler state)."""
    options = config.optimisation
    if step < options.warmup_steps:
        return options.learning_rate * (step + 1) / options.warmup_steps
    return options.learning_rate * options.decay_factor ** ((step - options.warmup_steps) // options.decay_every)


def split_cases(names: Sequence[str], config: TrainingConfig) -> Tuple[List[str], List[str]]:
    """(training, validation) case names: the configured validation cases, or a seeded share."""
    names = sorted(names)
    if config.data.validation_cases:
        unknown = sorted(set(config.data.validation_cases) - set(names))
        if unknown:
            raise ConfigError(f"data.validation_cases names unknown case(s) {unknown}; cases are {names}")
        held_out = sorted(config.data.validation_cases)
    else:
        count = int(round(config.data.validation_fraction * len(names)))
        if config.data.validation_fraction > 0 and len(names) >= 2:
            count = max(count, 1)
        order = np.random.default_rng([config.run.seed, 3]).permutation(len(names))
        held_out = sorted(names[i] for i in order[:count])
    training = [name for name in names if name not in held_out]
    if not training:
        raise ConfigError("every case is held out for validation: nothing is left to train on")
    return training, held_out


class CsvLog:
    """A CSV file of rows; on resumption, rows after the resumed step are dropped first."""

    def __init__(self, path: Path, columns: Sequence[str], resume_step: Optional[int]) -> None:
        self.path = path
        self.columns = list(columns)
        kept: List[Dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="", encoding="utf-8") as stream:
                kept = [row for row in csv.DictReader(stream) if int(row["step"]) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".partial")
        with open(temporary, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, self.columns)
            writer.writeheader()
            writer.writerows({column: row.get(column, "") for column in self.columns} for row in kept)
        os.replace(temporary, path)

    def write(self, row: Dict[str, object]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as stream:
            csv.DictWriter(stream, self.columns).writerow(row)


class Trainer:
    """Trains a CT-SAM3D network (or any ``torch.nn.Module`` that is a ``CrossPatchNetwork``: the
    interface of ``CTSAM3DLib.interface``, which the session uses too).

    ``net``: the network to train; by default ``build_model(run.variant)``, or the weights of
    ``run.init_checkpoint``. ``context``: the process group (by default from torchrun's environment).
    """

    def __init__(self, config: TrainingConfig, net: Optional[nn.Module] = None,
                 context: Optional[DistributedContext] = None) -> None:
        self.config = config.validate()
        self.context = context or DistributedContext.from_environment(config.run.device)
        self.device = self.context.device
        self.output_dir = Path(config.run.output_dir)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(config.run.seed)
        if net is not None and not isinstance(net, CrossPatchNetwork):
            raise TypeError(f"a {type(net).__name__} cannot be trained here: it lacks encode, decode or cross_patch")
        self.net = (net if net is not None else self._initial_network()).to(self.device).train()
        if self.context.distributed and self.device.type == "cuda":
            # Batch statistics over the union batch, so N GPUs train as one GPU with N times the batch.
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        if config.optimisation.compile and self.device.type == "cuda":
            self.net.encode = torch.compile(self.net.encode)
            self.net.decode = torch.compile(self.net.decode)
        self.step_module = InteractiveTrainingStep(
            self.net, config.clicks, config.loss, config.optimisation.bf16, config.optimisation.checkpoint_decoder
        )
        self.model: nn.Module = self.step_module
        if self.context.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.step_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,  # the quality head is never trained (as the authors')
            )
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=config.optimisation.learning_rate,
            weight_decay=config.optimisation.weight_decay,
        )
        self.step = 0
        self.best_validation_dice = -1.0
        training, held_out = self._prepare_data()
        self.sampler = PatchSampler(
            training, config.data, config.augmentation, config.run.seed, config.loss.cross_patch
        )
        self.validation_cases = held_out
        self._validation_patches = None
        resumed = self._resume() if config.run.resume else False
        resume_step = self.step if resumed else None
        self.train_log = self.validation_log = None
        if self.context.is_main:
            self.train_log = CsvLog(self.output_dir / "train_log.csv", TRAIN_LOG_COLUMNS, resume_step)
            columns = ["step", "patches"] + [f"dice_after_{k}" for k in range(1, config.validation.clicks + 1)]
            self.validation_log = CsvLog(self.output_dir / "validation_log.csv", columns, resume_step)
        self.click_pool: Optional[ProcessPoolExecutor] = None
        if config.clicks.workers > 0:
            # Spawned, not forked: the training process may already hold a CUDA context.
            context = multiprocessing.get_context("spawn")
            self.click_pool = ProcessPoolExecutor(config.clicks.workers, mp_context=context)
            self.step_module.click_executor = self.click_pool

    # -- setup ---------------------------------------------------------------------------------

    def _initial_network(self) -> nn.Module:
        net = build_model(self.config.run.variant)
        if self.config.run.init_checkpoint:
            path = self.config.run.init_checkpoint
            net.load_state_dict(extract_state_dict(read_checkpoint(path), path), strict=True)
        return net

    def _prepare_data(self) -> Tuple[List[CachedCase], List[CachedCase]]:
        """Cache every case (each process a share, then all), split by case."""
        config = self.config
        cases: List[Optional[Case]] = [case for case in find_cases(config.data.root) if case.structure_names]
        if not cases:
            raise ConfigError(f"{config.data.root}: no case with labelled structures")
        training_names, held_out_names = split_cases([case.name for case in cases], config)
        cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else self.output_dir / "cache"
        folders = [cached_case_folder(case, cache_dir) for case in cases]
        mine = [index for index in range(len(cases)) if index % self.context.world_size == self.context.rank]
        bar = ProgressBar(len(mine), "cache") if self.context.is_main and config.run.progress else None
        for index in mine:
            build_cached_case(cases[index], cache_dir)
            if bar is not None:
                bar.update(status=cases[index].name)
            cases[index] = None  # a case keeps its full-resolution scan once read: let it go
        if bar is not None:
            bar.close()
        self.context.barrier()
        opened = []
        for index, folder in enumerate(folders):
            if (folder / "meta.json").is_file():
                opened.append(CachedCase(folder))
            else:  # another process's share, in a cache folder this process does not see
                opened.append(build_cached_case(cases[index], cache_dir))
                cases[index] = None
        by_name = {case.name: case for case in opened}
        return [by_name[name] for name in training_names], [by_name[name] for name in held_out_names]

    # -- checkpoints ---------------------------------------------------------------------------

    def _gather_rng_states(self) -> List[dict]:
        state = capture_rng_state()
        if not self.context.distributed:
            return [state]
        states: List[Optional[dict]] = [None] * self.context.world_size
        dist.all_gather_object(states, state)
        return states

    def save(self) -> Optional[Path]:
        """Write ``last.pth`` and a numbered copy (main process; every process must call it)."""
        rng_states = self._gather_rng_states()
        if not self.context.is_main:
            return None
        extra = {
            "format": CHECKPOINT_FORMAT,
            "optimizer_state_dict": self.optimizer.state_dict(),
            "step": self.step,
            "rng_states": rng_states,
            "world_size": self.context.world_size,
            "best_validation_dice": self.best_validation_dice,
            "config": self.config.to_dict(),
        }
        last = save_checkpoint(self.output_dir / "last.pth", self.net, extra)
        keep = self.config.run.keep_checkpoints
        if keep > 0:
            numbered = self.output_dir / "checkpoints" / f"step_{self.step:07d}.pth"
            numbered.parent.mkdir(parents=True, exist_ok=True)
            temporary = numbered.with_name(numbered.name + ".partial")
            try:
                os.link(last, temporary)  # the same bytes as last.pth, without writing them again
            except OSError:
                shutil.copyfile(last, temporary)
            os.replace(temporary, numbered)
            for path in sorted(numbered.parent.glob("step_*.pth"))[:-keep]:
                path.unlink()
        return last

    def _resume(self) -> bool:
        path = self.output_dir / "last.pth"
        if not path.is_file():
            return False
        content = read_checkpoint(path)
        if content.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{path} is not a training checkpoint of this program (no optimiser state)")
        saved = content["config"]
        for section, key in (("optimisation", "batch_size"), ("run", "seed"), ("loss", "cross_patch")):
            if saved[section][key] != getattr(getattr(self.config, section), key):
                raise ConfigError(
                    f"{path} was written with {section}.{key} = {saved[section][key]!r}, the configuration now "
                    f"says {getattr(getattr(self.config, section), key)!r}: resuming would not continue that run "
                    "(use a new run.output_dir, or set run.resume = false to start over)"
                )
        self.net.load_state_dict(extract_state_dict(content, str(path)), strict=True)
        self.optimizer.load_state_dict(content["optimizer_state_dict"])
        self.step = int(content["step"])
        self.best_validation_dice = float(content["best_validation_dice"])
        states = content["rng_states"]
        same_layout = len(states) == self.context.world_size
        restore_rng_state(states[self.context.rank] if same_layout else states[0])
        if self.context.is_main:
            note = "" if same_layout else f" (written by {len(states)} processes, now {self.context.world_size})"
            print(f"resuming from {path} at step {self.step}{note}", flush=True)
        return True

    # -- one step ------------------------------------------------------------------------------

    def forward_backward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Loss and gradients of one batch (gradients averaged over processes); no update."""
        images = batch["images"].to(self.device, non_blocking=True)
        masks = batch["masks"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.model(images, masks)
        outputs["loss"].backward()
        return outputs

    def train_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """One optimisation step at ``self.step`` (then advanced by one)."""
        rate = learning_rate(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        outputs = self.forward_backward(batch)
        grad_norm = nn.utils.clip_grad_norm_(self.net.parameters(), self.config.optimisation.gradient_clip)
        self.optimizer.step()
        self.step += 1
        values = {key: outputs[key].detach() for key in ("loss", "mask_loss", "cross_patch_loss", "dice_first", "dice")}
        values["grad_norm"] = grad_norm.detach()
        values["learning_rate"] = rate
        return values

    # -- the loop ------------------------------------------------------------------------------

    def _loader(self) -> torch.utils.data.DataLoader:
        workers = self.config.data.workers
        dataset = StepBatches(
            self.sampler, self.step, self.config.optimisation.max_steps, self.context.rank,
            self.context.world_size, self.config.optimisation.batch_size,
        )
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=workers,
            prefetch_factor=4 if workers else None, pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            # Its own generator: a loader seeds its workers from the global one otherwise, which
            # would make a resumed run draw differently from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.config.run.seed),
        )

    def _mean_over_processes(self, sums: Dict[str, float]) -> Dict[str, float]:
        if not self.context.distributed:
            return sums
        values = torch.tensor([sums[key] for key in _AVERAGED], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return {key: float(v) / self.context.world_size for key, v in zip(_AVERAGED, values.tolist())}

    def validate(self) -> Optional[np.ndarray]:
        """Dice after each simulated click on the held-out patches (main process; None elsewhere)."""
        scores = None
        if self.context.is_main and self.validation_cases:
            if self._validation_patches is None:
                self._validation_patches = validation_patches(
                    self.validation_cases, self.config.data, self.config.validation, self.config.run.seed
                )
            if self._validation_patches:
                scores = evaluate_patches(
                    self.net, self._validation_patches, self.config.validation.clicks, self.device,
                    bf16=self.config.optimisation.bf16, click_executor=self.click_pool,
                )
                means = scores.mean(axis=0)
                row = {"step": self.step, "patches": len(scores)}
                row.update({f"dice_after_{k + 1}": f"{v:.5f}" for k, v in enumerate(means)})
                self.validation_log.write(row)
                if means[-1] > self.best_validation_dice:
                    self.best_validation_dice = float(means[-1])
                    save_checkpoint(self.output_dir / "best.pth", self.net,
                                    {"step": self.step, "validation_dice": self.best_validation_dice})
        self.context.barrier()
        return scores

    def fit(self) -> Dict[str, float]:
        """Train from ``self.step`` to ``optimisation.max_steps``; returns the last logged values.
        An interrupted run (Ctrl-C) saves its last completed step before stopping."""
        options = self.config.optimisation
        run = self.config.run
        if self.step >= options.max_steps:
            return {}
        bar = None
        if self.context.is_main and run.progress:
            bar = ProgressBar(options.max_steps - self.step, "train")
        sums = dict.fromkeys(_AVERAGED, 0.0)
        count = 0
        last_row: Dict[str, float] = {}
        started = time.monotonic()
        interval_start = time.monotonic()
        saved_at = self.step
        try:
            for batch in self._loader():
                values = self.train_step(batch)
                for key in _AVERAGED:
                    sums[key] += float(values[key])
                count += 1
                at_end = self.step == options.max_steps
                if self.step % run.log_every == 0 or at_end:
                    means = {key: v / count for key, v in self._mean_over_processes(sums).items()}
                    elapsed = time.monotonic() - interval_start
                    patches = count * options.batch_size * self.context.world_size
                    last_row = {
                        "step": self.step, "loss": means["loss"], "mask_loss": means["mask_loss"],
                        "cross_patch_loss": means["cross_patch_loss"], "dice_first_click": means["dice_first"],
                        "dice_last_click": means["dice"], "learning_rate": values["learning_rate"],
                        "grad_norm": means["grad_norm"], "patches_per_s": patches / max(elapsed, 1e-9),
                        "elapsed_s": time.monotonic() - started,
                    }
                    if self.train_log is not None:
                        self.train_log.write({k: _format(v) for k, v in last_row.items()})
                    if not math.isfinite(means["loss"]):
                        raise FloatingPointError(f"the loss became {means['loss']} at step {self.step}")
                    sums = dict.fromkeys(_AVERAGED, 0.0)
                    count = 0
                    interval_start = time.monotonic()
                if bar is not None:
                    bar.update(status=f"loss {float(values['loss']):.4f} dice {float(values['dice']):.3f}")
                every = self.config.validation.every
                if every and (self.step % every == 0 or at_end):
                    self.validate()  # before saving, so the checkpoint knows the best Dice so far
                if self.step % run.checkpoint_every == 0 or at_end:
                    self.save()
                    saved_at = self.step
        except KeyboardInterrupt:
            if self.step != saved_at:
                self.save()
            raise
        finally:
            if bar is not None:
                bar.close()
        return last_row

    def close(self) -> None:
        """Stop the click processes and leave the process group."""
        if self.click_pool is not None:
            self.click_pool.shutdown()
            self.click_pool = None
        self.context.close()


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
