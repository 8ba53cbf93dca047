"""The configuration tree's schema: one dataclass per section, the choices each text field allows,
the presets, and the type check every value passes (from a preset, a YAML file or a checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from alexnet_ray.data.demo import DEMO_NUM_CLASSES
from alexnet_ray.model.compiled import COMPILE_MODES
from alexnet_ray.model.config import ACTIVATIONS, INITS, POOLS, ModelConfig
from alexnet_ray.parallel.mappings import WaitLimit
from alexnet_ray.train.precision import CHOICES as PRECISIONS


class ConfigError(ValueError):
    """A configuration the service refuses to run, with one message naming the field or file."""


SCHEDULE_KINDS = ("plateau", "step", "cosine")
LR_SCALINGS = ("none", "linear", "sqrt")
# A fixed count, or [min, max] (written "1-2" in --set or YAML): parallel.replicas
IntRange = int | list[int]


@dataclass
class DataConfig:
    path: str | None = None  # a prepared dataset (jobs/prepare.py); None = embedded demo dataset
    global_batch_size: int = 128  # images per step over all replicas: the run's unit (the paper's 128)
    eval_batch_size: int | None = None  # evaluation batch per replica; None = the training share
    pca_lighting: bool = True
    ten_crop_final_eval: bool = True
    prefetch_batches: int = 2


@dataclass
class OptimizerConfig:
    lr: float = 0.01  # for a global batch of base_batch_size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_scaling: str = "none"  # none | linear | sqrt, from base_batch_size to data.global_batch_size
    base_batch_size: int = 128


@dataclass
class ScheduleConfig:
    kind: str = "plateau"  # plateau | step | cosine
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.1  # warm-up starts at this fraction of the lr
    plateau_patience: int = 1  # epochs without improvement before a decay
    plateau_factor: float = 0.1
    plateau_max_decays: int = 3
    plateau_threshold: float = 0.0  # an improvement must beat the best by more than this
    step_size: int = 30
    step_gamma: float = 0.1
    min_lr: float = 0.0  # cosine floor


@dataclass
class ParallelConfig:
    towers: int = 2  # 1 | 2 workers per replica, one tower each
    # N, or [min, max] ("1-2"): elastic, the replica count follows the cluster at each (re)start
    replicas: IntRange = 1
    microbatches: int = 1
    # At most this many rows in one micro-batch: a replica's larger share (fewer replicas, the same
    # global batch) is split into more micro-batches. None = ceil(global batch / (max replicas x microbatches)).
    microbatch_rows: int | None = None
    use_gpu: str = "auto"  # auto | true | false
    exchange_timeout_s: float = 300.0
    cpus_per_worker: float = 1.0
    # GPU runs: the share of a GPU each tower's worker takes. 0.5 puts a replica's two towers on one
    # GPU (NCCL ranks sharing a device: NCCL_MULTI_RANK_GPU_ENABLE=1, set for the workers; docs/configuration.md)
    gpus_per_worker: float = 1.0
    resize_interval_s: float = 60.0  # elastic: how often a healthy group checks for room to grow

    @property
    def min_replicas(self) -> int:
        return replica_range(self.replicas)[0]

    @property
    def max_replicas(self) -> int:
        return replica_range(self.replicas)[1]

    @property
    def elastic(self) -> bool:
        return isinstance(self.replicas, list)


@dataclass
class RunConfig:
    name: str | None = None  # None = chosen by the Trainer; the same name resumes
    # local dir, NFS path, s3://... or gs://...; by default a durable place in the driver's home
    # (never Ray's temporary copy of the working directory), or $ALEXNET_RAY_STORAGE
    storage: str = field(default_factory=lambda: os.environ.get("ALEXNET_RAY_STORAGE", "~/alexnet-ray/runs"))
    epochs: int = 90
    seed: int = 0
    deterministic: bool = False
    max_failures: int = 0  # -1 = retry forever
    # how long a storage request failing transiently (503 SlowDown, 5xx, a reset, a read timeout)
    # is retried before the run fails (alexnet_ray/storage_retries.py); 0 = not at all
    storage_retry_s: float = 300.0
    checkpoint_keep: int = 2
    progress_interval_s: float = 5.0
    resume_from: str | None = None  # a checkpoint (dir or .pt) to start from; any towers x replicas layout
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (alexnet_ray/train/precision.py)
    compile: bool = False  # torch.compile each tower stage (exchanges stay outside the compiled graphs)
    # torch.compile's mode for those stages; reduce-overhead replays each stage as CUDA graphs on GPUs
    compile_mode: str = "default"
    # An experiment tracker, logged from rank 0 (alexnet_ray/train/tracking.py); credentials from its env vars
    tracking: str = "none"  # none | mlflow | wandb
    tracking_uri: str | None = None  # MLflow's server; None = $MLFLOW_TRACKING_URI
    tracking_project: str | None = None  # MLflow experiment / W&B project; None = "alexnet-ray"
    tracking_group: str | None = None  # a sweep's name: its trials' tracker runs are grouped by it


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "parallel": ParallelConfig,
    "run": RunConfig,
}

# Text fields and the values they allow, each list taken from the code that acts on the value.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.init": INITS,
    "model.activation": ACTIVATIONS,
    "model.pool": tuple(POOLS),
    "optimizer.lr_scaling": LR_SCALINGS,
    "schedule.kind": SCHEDULE_KINDS,
    "parallel.use_gpu": ("auto", "true", "false"),
    "run.precision": PRECISIONS,
    "run.compile_mode": COMPILE_MODES,
    "run.tracking": ("none", "mlflow", "wandb"),
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (str, int, float, bool, None only): safe for weights_only checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> Config:
        """Strict inverse of to_dict: unknown sections/keys and wrong types raise ConfigError."""
        config = cls()
        merge(config, data, source)
        return config

    @property
    def num_workers(self) -> int:
        """Workers at the most replicas (the only count unless parallel.replicas is a range)."""
        return self.parallel.towers * self.parallel.max_replicas

    @property
    def global_batch_size(self) -> int:
        return self.data.global_batch_size

    @property
    def replica_share(self) -> int:
        """The most rows one replica trains on in a step (at the fewest replicas)."""
        return -(-self.data.global_batch_size // self.parallel.min_replicas)

    @property
    def microbatch_rows(self) -> int:
        """The most rows in one micro-batch (parallel.microbatch_rows, or derived from the layout at
        its most replicas, so an elastic group that shrinks runs more micro-batches, not larger ones)."""
        p = self.parallel
        if p.microbatch_rows is not None:
            return p.microbatch_rows
        return -(-self.data.global_batch_size // (p.max_replicas * p.microbatches))

    def at_replicas(self, replicas: int) -> "Config":
        """This config for one attempt of an elastic run on `replicas` replicas: a fixed count, and
        the micro-batch bound of the whole range."""
        config = copy_config(self)
        config.parallel.microbatch_rows = self.microbatch_rows
        config.parallel.replicas = replicas
        return config

    @property
    def data_wait_s(self) -> WaitLimit:
        """How long a rank waits on a partner that may be reading storage (the batch broadcast, the
        exchanges and gradient sums a read-ahead can hold up): the partner's reads may retry for
        run.storage_retry_s, then the exchange has its own parallel.exchange_timeout_s."""
        r, p = self.run, self.parallel
        made_of = f"run.storage_retry_s={r.storage_retry_s:g} + parallel.exchange_timeout_s={p.exchange_timeout_s:g}"
        return WaitLimit(r.storage_retry_s + p.exchange_timeout_s, made_of)

    def effective_lr(self) -> float:
        """optimizer.lr scaled from optimizer.base_batch_size to data.global_batch_size (the replica
        count does not enter: it changes nothing in the run's math)."""
        return scaled_lr(self.optimizer.lr, self.optimizer.lr_scaling, self.data.global_batch_size,
                         self.optimizer.base_batch_size)


def scaled_lr(lr: float, scaling: str, batch: int, base_batch: int = 128) -> float:
    """Learning rate for a global batch of `batch` when `lr` was tuned for `base_batch`.

    linear: lr * k, sqrt: lr * sqrt(k) ("One weird trick", Krizhevsky 2014), k = batch / base.
    """
    ratio = batch / base_batch
    if scaling == "none":
        return lr
    if scaling == "linear":
        return lr * ratio
    if scaling == "sqrt":
        return lr * math.sqrt(ratio)
    raise ConfigError(f"optimizer.lr_scaling={scaling!r}: expected one of {', '.join(LR_SCALINGS)}")


def copy_config(config: Config) -> Config:
    return copy.deepcopy(config)


def replica_range(value: IntRange) -> tuple[int, int]:
    """(min, max) of parallel.replicas: N is (N, N)."""
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def parse_int_range(value: Any, name: str, source: str) -> IntRange:
    """N, [min, max] or "min-max" as N, or [min, max] when min < max; ConfigError naming the field."""
    parts = value
    if isinstance(value, str):
        parts = value.replace(" ", "").split("-")
        try:
            parts = [int(p) for p in parts]
        except ValueError:
            parts = None
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    if (not isinstance(parts, (list, tuple)) or len(parts) not in (1, 2)
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in parts)):
        raise ConfigError(f"{source}: {name} must be an integer or a range min-max (e.g. 1-2 or [1, 2]), "
                          f"got {value!r}")
    low, high = parts[0], parts[-1]
    if low > high:
        raise ConfigError(f"{source}: {name}={low}-{high}: the minimum is above the maximum")
    return low if low == high else [low, high]


# --------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Krizhevsky et al. 2012, section 5: the dataclass defaults are the paper's recipe.
    "paper": {},
    # Small enough for a laptop CPU in a few minutes on the embedded demo dataset.
    "demo": {
        "model": {"num_classes": DEMO_NUM_CLASSES, "width": 0.25, "image_size": 64, "init": "kaiming"},
        "data": {"global_batch_size": 32, "ten_crop_final_eval": True},
        "optimizer": {"lr": 0.01},
        "schedule": {"kind": "cosine", "warmup_epochs": 1},
        "parallel": {"use_gpu": "auto", "cpus_per_worker": 0.5},  # leaves CPU slots for Ray Data
        "run": {"epochs": 8, "progress_interval_s": 5.0},
    },
    # For tests: the smallest network that still learns, deterministic, on CPU.
    "tiny": {
        "model": {
            "num_classes": DEMO_NUM_CLASSES,
            "width": 0.125,
            "image_size": 64,
            "init": "kaiming",  # dropout stays the paper's 0.5: every layout draws the same masks
        },
        "data": {"global_batch_size": 16, "ten_crop_final_eval": False, "prefetch_batches": 1},
        # 0.01 learns faster but is chaotic here (without dropout, fp32 rounding differences
        # between layouts grew from 1e-6 to 1e-2 within two epochs); tests compare layouts to 1e-5.
        "optimizer": {"lr": 0.005},
        "schedule": {"kind": "step", "step_size": 10},
        "parallel": {"use_gpu": "false", "exchange_timeout_s": 60.0, "cpus_per_worker": 0.5},
        "run": {"epochs": 2, "seed": 0, "deterministic": True, "progress_interval_s": 1.0},
    },
}


def preset_config(name: str) -> Config:
    """A fresh Config for the named preset (not validated)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    return Config.from_dict(PRESETS[name], source=f"preset {name!r}")


# --------------------------------------------------------------------------- types

# Fields that meant something else before the global batch defined the run: refused, with what to write.
RETIRED = {
    "data.batch_size": "(images per replica) is gone: a run is defined by its global batch, the images of "
                       "one step over all replicas, and each replica's share follows. Write "
                       "data.global_batch_size=<the old data.batch_size x parallel.replicas> (the paper's is 128)",
    "optimizer.base_replicas": "is gone: the learning rate scales with the global batch, not the replica count. "
                               "Write optimizer.base_batch_size=<the global batch optimizer.lr was tuned for> "
                               "(the old base_replicas x the old per-replica data.batch_size)",
}

def merge(config: Config, values: Mapping[str, Any], source: str) -> None:
    """Set `values` ({section: {key: value}}) on `config`, each checked against its field's type."""
    for section, items in values.items():
        field_type(section, None, source)
        if items is None:
            continue
        if not isinstance(items, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys, got {items!r}")
        target = getattr(config, section)
        for key, value in items.items():
            setattr(target, key, check_value(value, field_type(section, key, source), f"{section}.{key}", source))


def field_type(section: str, key: str | None, source: str) -> Any:
    """The type of section.key (None for key=None, after checking the section); unknown names raise
    ConfigError with the closest known one."""
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown section {section!r}{suggest(section, SECTIONS)}; sections: {', '.join(SECTIONS)}")
    if key is None:
        return None
    hints = typing.get_type_hints(SECTIONS[section])
    if f"{section}.{key}" in RETIRED:
        raise ConfigError(f"{source}: {section}.{key} {RETIRED[f'{section}.{key}']}")
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}{suggest(key, hints, prefix=section + '.')}")
    return hints[key]


def suggest(word: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def split_optional(field_type: Any) -> tuple[Any, bool]:
    """(base type, accepts None) for `T` or `T | None`."""
    args = typing.get_args(field_type)
    if typing.get_origin(field_type) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return field_type, False


def takes_true_false(name: str) -> bool:
    """A text field whose choices include "true" and "false" (parallel.use_gpu: auto | true | false):
    YAML's bare true/false and --set's yes/no/1/0 mean those choices."""
    return {"true", "false"} <= set(CHOICES.get(name, ()))


TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_value(value: Any, field_type: Any, name: str, source: str) -> Any:
    """`value` as the field's type (an int for a float field becomes a float); ConfigError if it is not one."""
    if field_type == IntRange:
        return parse_int_range(value, name, source)
    base, optional = split_optional(field_type)
    if value is None and optional:
        return None
    if isinstance(value, bool) and takes_true_false(name):
        return "true" if value else "false"
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, base)
    if not ok:
        expected = TYPE_NAMES[base] + (" or null" if optional else "")
        raise ConfigError(f"{source}: {name} must be {expected}, got {value!r} ({type(value).__name__})")
    return float(value) if base is float else value
