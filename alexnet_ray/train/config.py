"""One configuration tree for a training run: model, data, optimizer, schedule, parallel, run.

Load it with `load_config(preset=..., path=FILE, overrides=["section.key=value", ...])`; every
value is checked against its field's type, and `validate_config` refuses a bad run with one
message naming the field (or file) before any worker starts.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from alexnet_ray import storage


class ConfigError(ValueError):
    """A configuration the service refuses to run, with one message naming the field or file."""


# The embedded demo dataset (alexnet_ray.data.demo) has this many classes by default.
DEMO_NUM_CLASSES = 10


@dataclass
class ModelConfig:
    """The `AlexNet` constructor's arguments."""

    num_classes: int = 1000
    width: float = 1.0
    image_size: int = 224
    dropout: float = 0.5
    init: str = "paper"
    activation: str = "relu"
    lrn: bool = True
    pool: str = "overlapping"


@dataclass
class DataConfig:
    path: str | None = None  # a prepared dataset (jobs/prepare.py); None = embedded demo dataset
    batch_size: int = 128  # per replica
    eval_batch_size: int | None = None  # None = batch_size
    pca_lighting: bool = True
    ten_crop_final_eval: bool = True
    prefetch_batches: int = 2


@dataclass
class OptimizerConfig:
    lr: float = 0.01  # for base_replicas replicas
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_scaling: str = "none"  # none | linear | sqrt, from base_replicas to parallel.replicas
    base_replicas: int = 1


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
    replicas: int = 1
    microbatches: int = 1
    use_gpu: str = "auto"  # auto | true | false
    exchange_timeout_s: float = 300.0
    cpus_per_worker: float = 1.0


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
    checkpoint_keep: int = 2
    progress_interval_s: float = 5.0
    resume_from: str | None = None  # a checkpoint (dir or .pt) to start from; any towers x replicas layout
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (alexnet_ray/train/precision.py)
    compile: bool = False  # torch.compile each tower stage (exchanges stay outside the compiled graphs)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "parallel": ParallelConfig,
    "run": RunConfig,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.init": ("paper", "caffe", "kaiming"),
    "model.activation": ("relu", "tanh"),
    "model.pool": ("overlapping", "plain"),
    "optimizer.lr_scaling": ("none", "linear", "sqrt"),
    "schedule.kind": ("plateau", "step", "cosine"),
    "parallel.use_gpu": ("auto", "true", "false"),
    "run.precision": ("auto", "bf16", "fp16", "fp32"),
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
        _merge(config, data, source)
        return config

    @property
    def num_workers(self) -> int:
        return self.parallel.towers * self.parallel.replicas

    @property
    def global_batch_size(self) -> int:
        return self.data.batch_size * self.parallel.replicas

    def effective_lr(self) -> float:
        """optimizer.lr scaled from optimizer.base_replicas to parallel.replicas."""
        return scaled_lr(
            self.optimizer.lr,
            self.optimizer.lr_scaling,
            self.parallel.replicas,
            self.optimizer.base_replicas,
        )


def scaled_lr(lr: float, scaling: str, replicas: int, base_replicas: int = 1) -> float:
    """Learning rate for `replicas` replicas when `lr` was tuned for `base_replicas`.

    linear: lr * k, sqrt: lr * sqrt(k) ("One weird trick", Krizhevsky 2014), k = replicas / base.
    """
    ratio = replicas / base_replicas
    if scaling == "none":
        return lr
    if scaling == "linear":
        return lr * ratio
    if scaling == "sqrt":
        return lr * math.sqrt(ratio)
    raise ConfigError(f"optimizer.lr_scaling={scaling!r}: expected one of none, linear, sqrt")


# --------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Krizhevsky et al. 2012, section 5: the dataclass defaults are the paper's recipe.
    "paper": {},
    # Small enough for a laptop CPU in a few minutes on the embedded demo dataset.
    "demo": {
        "model": {"num_classes": DEMO_NUM_CLASSES, "width": 0.25, "image_size": 64, "init": "kaiming"},
        "data": {"batch_size": 32, "ten_crop_final_eval": True},
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
        "data": {"batch_size": 16, "ten_crop_final_eval": False, "prefetch_batches": 1},
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
        raise ConfigError(f"unknown preset {name!r}{_suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    return Config.from_dict(PRESETS[name], source=f"preset {name!r}")


# --------------------------------------------------------------------------- loading

def load_config(
    preset: str | None = None,
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] | None = None,
    *,
    validate: bool = True,
    check_data: bool = True,
) -> Config:
    """Preset (default "demo"), then the YAML file, then `section.key=value` overrides; validated.

    A YAML file may name its base with a top-level `preset:` key.
    """
    file_values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        file_values = _read_yaml(Path(path))
        file_preset = file_values.pop("preset", None)
        if file_preset is not None:
            if preset is not None and preset != file_preset:
                raise ConfigError(f"{path}: preset: {file_preset!r} conflicts with the requested preset {preset!r}")
            preset = file_preset
    config = preset_config(preset or "demo")
    _merge(config, file_values, source)
    apply_overrides(config, overrides or ())
    if validate:
        validate_config(config, check_data=check_data)
    return config


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Apply `section.key=value` strings in place (values parsed to the field's type)."""
    for item in overrides:
        name, sep, raw = item.partition("=")
        name = name.strip()
        section, dot, key = name.partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. model.width=0.25")
        field_type = _field_type(section, key, f"override {item!r}")
        value = _parse_text(raw.strip(), field_type, f"{section}.{key}")
        setattr(getattr(config, section), key, value)
    return config


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The configuration options every job shares: --preset, --config, --set, and shortcuts."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", choices=sorted(PRESETS), help="base preset (default: demo, or the file's preset:)")
    group.add_argument("--config", metavar="FILE", help="YAML file with sections model, data, optimizer, schedule, parallel, run")
    group.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                       help="override one field, e.g. --set model.width=0.25 (repeatable)")
    group.add_argument("--data", metavar="DIR", help="a prepared dataset (data.path); default: the embedded demo dataset")
    group.add_argument("--epochs", type=int, help="run.epochs")
    group.add_argument("--storage", metavar="PATH", help="run.storage: local/NFS path or s3:// / gs:// URI")
    group.add_argument("--name", help="run.name: the same name under the same storage resumes")
    return parser


def config_from_args(args: argparse.Namespace, *, validate: bool = True) -> Config:
    """Config from add_config_arguments' options; the shortcut flags win over --set."""
    overrides = list(args.overrides or [])
    for flag, name in (("data", "data.path"), ("epochs", "run.epochs"), ("storage", "run.storage"), ("name", "run.name")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{name}={value}")
    return load_config(args.preset, args.config, overrides, validate=validate)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, ...), got {type(values).__name__}")
    return values


def _merge(config: Config, values: Mapping[str, Any], source: str) -> None:
    for section, items in values.items():
        _field_type(section, None, source)
        if items is None:
            continue
        if not isinstance(items, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys, got {items!r}")
        target = getattr(config, section)
        for key, value in items.items():
            field_type = _field_type(section, key, source)
            setattr(target, key, _check_value(value, field_type, f"{section}.{key}", source))


def _field_type(section: str, key: str | None, source: str) -> Any:
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown section {section!r}{_suggest(section, SECTIONS)}; sections: {', '.join(SECTIONS)}")
    if key is None:
        return None
    hints = typing.get_type_hints(SECTIONS[section])
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}{_suggest(key, hints, prefix=section + '.')}")
    return hints[key]


def _suggest(word: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _split_optional(field_type: Any) -> tuple[Any, bool]:
    """(base type, accepts None) for `T` or `T | None`."""
    args = typing.get_args(field_type)
    if typing.get_origin(field_type) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return field_type, False


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_value(value: Any, field_type: Any, name: str, source: str) -> Any:
    base, optional = _split_optional(field_type)
    if value is None and optional:
        return None
    if name == "parallel.use_gpu" and isinstance(value, bool):
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
        expected = _TYPE_NAMES[base] + (" or null" if optional else "")
        raise ConfigError(f"{source}: {name} must be {expected}, got {value!r} ({type(value).__name__})")
    return float(value) if base is float else value


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_text(raw: str, field_type: Any, name: str) -> Any:
    base, optional = _split_optional(field_type)
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"override {name}={raw}: {name} must be {_TYPE_NAMES[base]}") from None
    if name == "parallel.use_gpu":
        return raw.lower()
    return raw


# --------------------------------------------------------------------------- validation

def validate_config(
    config: Config,
    *,
    cluster_resources: Mapping[str, float] | None = None,
    check_data: bool = True,
) -> None:
    """Raise ConfigError naming the first bad field; return None when the run may start.

    cluster_resources: e.g. `ray.cluster_resources()`; checks GPUs and worker slots when given.
    check_data: read data.path's manifest.json (class count, image size).
    """
    _validate_types(config)
    _validate_choices(config)
    _validate_model(config.model)
    _validate_numbers(config)
    if check_data:
        _validate_data(config)
    if cluster_resources is not None:
        _validate_resources(config, cluster_resources)


def _validate_types(config: Config) -> None:
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(config, section))
        hints = typing.get_type_hints(SECTIONS[section])
        for key, value in values.items():
            _check_value(value, hints[key], f"{section}.{key}", "config")


def _validate_choices(config: Config) -> None:
    for name, options in CHOICES.items():
        section, key = name.split(".")
        value = getattr(getattr(config, section), key)
        if value not in options:
            raise ConfigError(f"{name}={value!r}: expected one of {', '.join(options)}{_suggest(value, options)}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_model(model: ModelConfig) -> None:
    _require(model.num_classes >= 2, f"model.num_classes={model.num_classes}: need at least 2 classes")
    _require(model.width > 0, f"model.width={model.width}: must be > 0")
    _require(0.0 <= model.dropout < 1.0, f"model.dropout={model.dropout}: must be in [0, 1)")
    smallest = _smallest_image_size(model.pool)
    _require(
        model.image_size >= smallest,
        f"model.image_size={model.image_size}: too small for AlexNet's conv/pool stack "
        f"with model.pool={model.pool!r} (at least {smallest})",
    )
    try:
        from alexnet_ray.model import check_model_args
    except ImportError:  # TODO: drop once the core branch (model layer) is merged
        return
    try:
        check_model_args(**dataclasses.asdict(model))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _smallest_image_size(pool: str) -> int:
    """Smallest input whose feature map survives conv1 (11/4, pad 2) and the three max-pools."""
    kernel, stride = (3, 2) if pool == "overlapping" else (2, 2)

    def survives(size: int) -> bool:
        size = (size + 2 * 2 - 11) // 4 + 1
        for _ in range(3):  # pool1, pool2, pool5 (convs 2-5 keep the size)
            if size < kernel:
                return False
            size = (size - kernel) // stride + 1
        return size >= 1

    return next(s for s in range(11, 512) if survives(s))


def _validate_numbers(config: Config) -> None:
    d, o, s, p, r = config.data, config.optimizer, config.schedule, config.parallel, config.run
    _require(d.batch_size >= 1, f"data.batch_size={d.batch_size}: must be >= 1 (images per replica)")
    _require(
        d.eval_batch_size is None or d.eval_batch_size >= 1,
        f"data.eval_batch_size={d.eval_batch_size}: must be >= 1 (or null for data.batch_size)",
    )
    _require(d.prefetch_batches >= 0, f"data.prefetch_batches={d.prefetch_batches}: must be >= 0")
    _require(o.lr > 0 and math.isfinite(o.lr), f"optimizer.lr={o.lr}: must be a positive number")
    _require(0.0 <= o.momentum < 1.0, f"optimizer.momentum={o.momentum}: must be in [0, 1)")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay}: must be >= 0")
    _require(o.base_replicas >= 1, f"optimizer.base_replicas={o.base_replicas}: must be >= 1")
    _require(s.warmup_epochs >= 0, f"schedule.warmup_epochs={s.warmup_epochs}: must be >= 0")
    _require(
        s.warmup_epochs < r.epochs or s.warmup_epochs == 0,
        f"schedule.warmup_epochs={s.warmup_epochs}: must be less than run.epochs={r.epochs}",
    )
    _require(
        0.0 < s.warmup_start_factor <= 1.0,
        f"schedule.warmup_start_factor={s.warmup_start_factor}: must be in (0, 1]",
    )
    _require(s.plateau_patience >= 0, f"schedule.plateau_patience={s.plateau_patience}: must be >= 0")
    _require(0.0 < s.plateau_factor < 1.0, f"schedule.plateau_factor={s.plateau_factor}: must be in (0, 1)")
    _require(s.plateau_max_decays >= 0, f"schedule.plateau_max_decays={s.plateau_max_decays}: must be >= 0")
    _require(s.plateau_threshold >= 0, f"schedule.plateau_threshold={s.plateau_threshold}: must be >= 0")
    _require(s.step_size >= 1, f"schedule.step_size={s.step_size}: must be >= 1 epoch")
    _require(0.0 < s.step_gamma <= 1.0, f"schedule.step_gamma={s.step_gamma}: must be in (0, 1]")
    _require(0.0 <= s.min_lr < o.lr, f"schedule.min_lr={s.min_lr}: must be in [0, optimizer.lr={o.lr})")
    _require(p.towers in (1, 2), f"parallel.towers={p.towers}: must be 1 or 2 (the paper splits AlexNet in 2)")
    _require(p.replicas >= 1, f"parallel.replicas={p.replicas}: must be >= 1")
    _require(p.microbatches >= 1, f"parallel.microbatches={p.microbatches}: must be >= 1")
    _require(p.exchange_timeout_s > 0, f"parallel.exchange_timeout_s={p.exchange_timeout_s}: must be > 0")
    _require(p.cpus_per_worker > 0, f"parallel.cpus_per_worker={p.cpus_per_worker}: must be > 0")
    _require(r.epochs >= 1, f"run.epochs={r.epochs}: must be >= 1")
    _require(r.seed >= 0, f"run.seed={r.seed}: must be >= 0")
    _require(r.max_failures >= -1, f"run.max_failures={r.max_failures}: must be >= 0, or -1 to retry forever")
    _require(r.checkpoint_keep >= 1, f"run.checkpoint_keep={r.checkpoint_keep}: must be >= 1")
    _require(r.progress_interval_s > 0, f"run.progress_interval_s={r.progress_interval_s}: must be > 0")
    _require(bool(r.storage), "run.storage: must name a directory or bucket URI")
    _location("run.storage", r.storage, lambda: None)
    _require(
        r.resume_from is None or _location("run.resume_from", r.resume_from, lambda: storage.exists(r.resume_from)),
        f"run.resume_from={r.resume_from}: no such checkpoint",
    )
    _require(
        r.name is None or (r.name and "/" not in r.name and r.name not in (".", "..")),
        f"run.name={r.name!r}: must be a plain directory name (no '/')",
    )


def _location(name: str, location: str, check):
    """check() on a local path or URI; a URI without a bucket or an unreachable store: one line."""
    try:
        storage.resolve(location)
        return check()
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{name}={location}: cannot reach it ({str(exc).splitlines()[0]})") from None


def _validate_data(config: Config) -> None:
    path, model = config.data.path, config.model
    if path is None:
        _require(
            model.num_classes == DEMO_NUM_CLASSES,
            f"model.num_classes={model.num_classes} but data.path is unset: the embedded demo dataset "
            f"has {DEMO_NUM_CLASSES} classes (set data.path to a prepared dataset, see jobs/prepare.py)",
        )
        return
    _require(_location("data.path", path, lambda: storage.is_dir(path)), f"data.path={path}: directory does not exist")
    manifest_path = storage.join(path, "manifest.json")
    _require(
        storage.is_file(manifest_path),
        f"data.path={path}: not a prepared dataset (no manifest.json); run jobs/prepare.py on it first",
    )
    try:
        manifest = json.loads(storage.read_text(manifest_path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{manifest_path}: unreadable manifest ({exc})") from None
    classes = manifest.get("classes") if isinstance(manifest, dict) else None
    _require(isinstance(classes, list) and classes, f"{manifest_path}: has no 'classes' list")
    _require(
        len(classes) == model.num_classes,
        f"model.num_classes={model.num_classes} does not match the {len(classes)} classes in {manifest_path}",
    )
    size = manifest.get("size")
    if isinstance(size, int):
        _require(
            model.image_size <= size,
            f"model.image_size={model.image_size} is larger than the dataset's {size}x{size} images ({manifest_path})",
        )


def _validate_resources(config: Config, resources: Mapping[str, float]) -> None:
    p = config.parallel
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    workers = config.num_workers
    _require(
        not (p.use_gpu == "true" and gpus < 1),
        "parallel.use_gpu=true but the Ray cluster has no GPU (use parallel.use_gpu=auto or false)",
    )
    if p.use_gpu == "true" or (p.use_gpu == "auto" and gpus >= 1):
        _require(
            workers <= gpus,
            f"parallel.towers x parallel.replicas = {p.towers} x {p.replicas} = {workers} workers "
            f"need {workers} GPUs; the Ray cluster has {gpus:g}",
        )
    else:
        need = workers * p.cpus_per_worker
        _require(
            need <= cpus + 1e-9,
            f"parallel.towers x parallel.replicas = {p.towers} x {p.replicas} = {workers} workers "
            f"x parallel.cpus_per_worker={p.cpus_per_worker:g} need {need:g} CPUs; the Ray cluster has {cpus:g}",
        )


def copy_config(config: Config) -> Config:
    return copy.deepcopy(config)
