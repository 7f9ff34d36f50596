"""The declarative training configuration: TOML (Python 3.11+) or JSON, never executable code.

Every value defaults to the authors' recipe where the paper states it (8 patches per volume, up to
24 clicks, 5 click iterations per step, 0.2 x focal + 0.8 x Dice, augmentation with probability
0.6, learning rate 1e-4, clipping at 5, batch 6); values the paper leaves open are marked "project
choice" in the field comments. The patch geometry (64^3 on the 1.5 mm lattice) and the window
[-125, 225] are not settings: the inference code assumes them.

A file holds up to seven tables, each optional: ``[data]``, ``[augmentation]``, ``[clicks]``,
``[loss]``, ``[optimisation]``, ``[validation]``, ``[run]``. Unknown tables or keys are errors, so
a misspelt setting is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from ..constants import MAX_CLICKS


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the setting."""


@dataclass
class DataConfig:
    root: str = ""
    """Folder of cases (TotalSegmentator layout, label map + labels.csv, or masks beside ct.nii.gz)."""
    cache_dir: str = ""
    """Where each scan is stored once resampled to the lattice; default ``<run.output_dir>/cache``."""
    structures: List[str] = field(default_factory=list)
    """Train only on these structure names (empty: all)."""
    min_structure_voxels: int = 20
    """Structures smaller than this on the 1.5 mm lattice are skipped (project choice)."""
    validation_cases: List[str] = field(default_factory=list)
    """Case names kept out for validation; when empty, ``validation_fraction`` of the cases is."""
    validation_fraction: float = 0.1
    """Share of cases held out when ``validation_cases`` is empty (at least one if there are two or more)."""
    patches_per_volume: int = 8
    """Consecutive patches drawn from one scan before moving to the next (authors: 8)."""
    pair_min_offset: int = 16
    """Cross-patch pairs of a structure that stays inside one patch (no adjacent patch holds it): the
    second patch's smallest offset (lattice voxels, largest per-axis distance); see `sampler`."""
    workers: int = 2
    """Data-loading processes per training process (0: load in the training process)."""


@dataclass
class AugmentationConfig:
    probability: float = 0.6
    shift_mm: float = 20.0
    scale: List[float] = field(default_factory=lambda: [0.9, 1.1])
    rotation_degrees: float = 10.0


@dataclass
class ClickConfig:
    iterations: int = 5
    """Decoder passes per step, each with one more simulated click (the authors' ``num_iters``)."""
    max_clicks: int = MAX_CLICKS
    """Clicks kept per patch at most (the authors' 24)."""
    workers: int = 0
    """Processes simulating the clicks of a batch's patches in parallel (0: in the training process).
    The simulated user runs on the CPU between decoder passes; on a GPU set about the batch size."""


@dataclass
class LossConfig:
    focal_weight: float = 0.2
    dice_weight: float = 0.8
    focal_alpha: float = 0.8
    focal_gamma: float = 2.0
    cross_patch_weight: float = 1.0
    """Weight of the cross-patch heatmap MSE added to the mask loss (authors: plain sum, 1)."""
    cross_patch: bool = True
    """Train the cross-patch U-Net on patch pairs."""


@dataclass
class OptimisationConfig:
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    """AdamW weight decay (project choice; 0 makes it Adam)."""
    warmup_steps: int = 500
    """Linear warm-up from 0 to the learning rate (project choice)."""
    decay_every: int = 20000
    """Multiply the learning rate by ``decay_factor`` every this many steps after warm-up (project choice)."""
    decay_factor: float = 0.5
    gradient_clip: float = 5.0
    batch_size: int = 6
    """Patches per step and per process (pairs of neighbours, so even when cross-patch training is on)."""
    max_steps: int = 100000
    bf16: bool = True
    """bfloat16 autocast on CUDA (ignored elsewhere)."""
    checkpoint_decoder: bool = False
    """Recompute each decoder pass in the backward pass instead of keeping its activations."""
    compile: bool = False
    """Wrap the network in ``torch.compile`` (CUDA only)."""


@dataclass
class ValidationConfig:
    every: int = 1000
    """Steps between validations (0: never)."""
    clicks: int = 5
    """Simulated clicks per validation patch; Dice is logged after each."""
    patches_per_structure: int = 1
    max_structures_per_case: int = 20


@dataclass
class RunConfig:
    output_dir: str = "training-run"
    seed: int = 0
    device: str = "auto"
    variant: str = "tiny"
    init_checkpoint: str = ""
    """Start from these weights (fine-tuning) instead of a random initialisation."""
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    """How many numbered checkpoints to keep beside ``last.pth`` and ``best.pth``."""
    log_every: int = 10
    resume: bool = True
    """Continue from ``<output_dir>/last.pth`` when it exists."""
    progress: bool = True


@dataclass
class TrainingConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    clicks: ClickConfig = field(default_factory=ClickConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimisation: OptimisationConfig = field(default_factory=OptimisationConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (storable in a checkpoint and as JSON)."""
        return dataclasses.asdict(self)

    def validate(self) -> TrainingConfig:
        """Raise `ConfigError` naming the first impossible value; returns ``self``."""
        checks = [
            (self.optimisation.batch_size >= 1, "optimisation.batch_size must be at least 1"),
            (
                not self.loss.cross_patch or self.optimisation.batch_size % 2 == 0,
                "optimisation.batch_size must be even when loss.cross_patch is on (patches come in pairs)",
            ),
            (self.optimisation.max_steps >= 1, "optimisation.max_steps must be at least 1"),
            (self.optimisation.learning_rate > 0, "optimisation.learning_rate must be positive"),
            (self.optimisation.warmup_steps >= 0, "optimisation.warmup_steps must be >= 0"),
            (self.optimisation.decay_every >= 1, "optimisation.decay_every must be at least 1"),
            (self.optimisation.gradient_clip > 0, "optimisation.gradient_clip must be positive"),
            (self.clicks.iterations >= 1, "clicks.iterations must be at least 1"),
            (
                1 <= self.clicks.iterations <= self.clicks.max_clicks,
                "clicks.iterations must not exceed clicks.max_clicks",
            ),
            (0.0 <= self.augmentation.probability <= 1.0, "augmentation.probability must lie in [0, 1]"),
            (
                len(self.augmentation.scale) == 2 and 0 < self.augmentation.scale[0] <= self.augmentation.scale[1],
                "augmentation.scale must be [low, high] with 0 < low <= high",
            ),
            (self.data.patches_per_volume >= 1, "data.patches_per_volume must be at least 1"),
            (0.0 <= self.data.validation_fraction < 1.0, "data.validation_fraction must lie in [0, 1)"),
            (self.data.workers >= 0, "data.workers must be >= 0"),
            (self.clicks.workers >= 0, "clicks.workers must be >= 0"),
            (self.validation.clicks >= 1, "validation.clicks must be at least 1"),
            (self.run.checkpoint_every >= 1, "run.checkpoint_every must be at least 1"),
            (self.run.log_every >= 1, "run.log_every must be at least 1"),
        ]
        for passed, message in checks:
            if not passed:
                raise ConfigError(message)
        if not self.data.root:
            raise ConfigError("data.root is required: the folder of training cases")
        return self


def _build(cls: type, values: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a dict, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table of settings, found {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        kwargs[name] = _check_type(value, default, f"{where}.{name}")
    return cls(**kwargs)


def _check_type(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, found {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, found {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, found {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, found {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, found {value!r}")
        return list(value)
    return value


_SECTIONS = {
    "data": DataConfig,
    "augmentation": AugmentationConfig,
    "clicks": ClickConfig,
    "loss": LossConfig,
    "optimisation": OptimisationConfig,
    "validation": ValidationConfig,
    "run": RunConfig,
}


def config_from_dict(values: Dict[str, Any], where: str = "configuration") -> TrainingConfig:
    """A validated `TrainingConfig` from nested plain values (missing ones take the defaults)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: the top level must be a table of sections")
    unknown = sorted(set(values) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; known: {', '.join(_SECTIONS)}")
    sections = {name: _build(cls, values.get(name, {}), f"{where} [{name}]") for name, cls in _SECTIONS.items()}
    return TrainingConfig(**sections).validate()


def _read_toml(path: Path) -> Dict[str, Any]:
    if sys.version_info < (3, 11):
        raise ConfigError(
            f"{path}: TOML needs Python 3.11 or newer (tomllib); on this Python write the same settings as JSON"
        )
    import tomllib

    try:
        with open(path, "rb") as stream:
            return tomllib.load(stream)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


def load_config(path) -> TrainingConfig:
    """Read a ``.toml`` or ``.json`` training configuration.

    Relative paths in ``data.root``, ``data.cache_dir``, ``run.output_dir`` and
    ``run.init_checkpoint`` are taken relative to the configuration file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        values = _read_toml(path)
    elif suffix == ".json":
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON: {error}") from None
    else:
        raise ConfigError(f"{path}: unsupported configuration format {suffix!r}; use .toml or .json")
    config = config_from_dict(values, str(path))
    base = path.resolve().parent
    for section, key in (("data", "root"), ("data", "cache_dir"), ("run", "output_dir"), ("run", "init_checkpoint")):
        part = getattr(config, section)
        value = getattr(part, key)
        if value and not Path(value).is_absolute():
            setattr(part, key, str((base / value).resolve()))
    return config
