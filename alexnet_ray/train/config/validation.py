"""`validate_config`: the rules a Config must meet before any worker starts. Each rule that belongs
to a layer lives there (the model's in ModelConfig.plan, the layout's in parallel.Topology); this
module applies them and adds the run's own, raising one ConfigError naming the field or file.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Mapping

from alexnet_ray import storage, storage_retries
from alexnet_ray.data.demo import DEMO_NUM_CLASSES
from alexnet_ray.data.manifest import MANIFEST_NAME, load_manifest
from alexnet_ray.parallel.topology import Topology
from alexnet_ray.train.config.schema import CHOICES, SECTIONS, Config, ConfigError, check_value, suggest

PREFLIGHT_RETRY_S = 15.0  # how long a location checked before the run may answer "slow down"


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
    _check_types_and_choices(config)
    _apply_layer_rules(config)
    _check_numbers(config)
    _check_locations(config)
    if check_data:
        _check_data(config)
    if cluster_resources is not None:
        _check_resources(config, cluster_resources)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_types_and_choices(config: Config) -> None:
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(config, section))
        hints = typing.get_type_hints(SECTIONS[section])
        for key, value in values.items():
            check_value(value, hints[key], f"{section}.{key}", "config")
    for name, options in CHOICES.items():
        section, key = name.split(".")
        value = getattr(getattr(config, section), key)
        _require(value in options, f"{name}={value!r}: expected one of {', '.join(options)}{suggest(value, options)}")


def _apply_layer_rules(config: Config) -> None:
    """The model's rules (ModelConfig.plan) and the layout's (Topology.validate), as ConfigErrors."""
    p = config.parallel
    try:
        Topology(p.towers, p.min_replicas).validate(microbatches=p.microbatches)
        config.model.plan(p.towers)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_numbers(config: Config) -> None:
    d, o, s, p, r = config.data, config.optimizer, config.schedule, config.parallel, config.run
    _require(d.global_batch_size >= 1,
             f"data.global_batch_size={d.global_batch_size}: must be >= 1 (images per step over all replicas)")
    _require(
        d.global_batch_size >= p.max_replicas,
        f"data.global_batch_size={d.global_batch_size} is smaller than parallel.replicas={replicas_text(p)}"
        f"{' at its maximum' if p.elastic else ''}: every replica needs at least one row of each step",
    )
    _require(
        d.eval_batch_size is None or d.eval_batch_size >= 1,
        f"data.eval_batch_size={d.eval_batch_size}: must be >= 1 (or null for the training share)",
    )
    _require(p.microbatch_rows is None or p.microbatch_rows >= 1,
             f"parallel.microbatch_rows={p.microbatch_rows}: must be >= 1 (or null to derive it)")
    _require(d.prefetch_batches >= 0, f"data.prefetch_batches={d.prefetch_batches}: must be >= 0")
    _require(o.lr > 0 and math.isfinite(o.lr), f"optimizer.lr={o.lr}: must be a positive number")
    _require(0.0 <= o.momentum < 1.0, f"optimizer.momentum={o.momentum}: must be in [0, 1)")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay}: must be >= 0")
    _require(o.base_batch_size >= 1, f"optimizer.base_batch_size={o.base_batch_size}: must be >= 1")
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
    _require(p.exchange_timeout_s > 0, f"parallel.exchange_timeout_s={p.exchange_timeout_s}: must be > 0")
    _require(r.compile or r.compile_mode == "default",
             f"run.compile_mode={r.compile_mode}: takes effect with run.compile=true")
    _require(p.cpus_per_worker > 0, f"parallel.cpus_per_worker={p.cpus_per_worker}: must be > 0")
    _require(0 < p.gpus_per_worker <= 1,
             f"parallel.gpus_per_worker={p.gpus_per_worker}: must be > 0 and <= 1 (a tower uses one GPU)")
    _require(p.resize_interval_s >= 0, f"parallel.resize_interval_s={p.resize_interval_s}: must be >= 0")
    _require(r.epochs >= 1, f"run.epochs={r.epochs}: must be >= 1")
    _require(r.seed >= 0, f"run.seed={r.seed}: must be >= 0")
    _require(r.max_failures >= -1, f"run.max_failures={r.max_failures}: must be >= 0, or -1 to retry forever")
    _require(r.storage_retry_s >= 0, f"run.storage_retry_s={r.storage_retry_s}: must be >= 0 seconds")
    _require(r.checkpoint_keep >= 1, f"run.checkpoint_keep={r.checkpoint_keep}: must be >= 1")
    _require(r.progress_interval_s > 0, f"run.progress_interval_s={r.progress_interval_s}: must be > 0")
    _require(
        r.name is None or (r.name and "/" not in r.name and r.name not in (".", "..")),
        f"run.name={r.name!r}: must be a plain directory name (no '/')",
    )


def _check_locations(config: Config) -> None:
    r = config.run
    _require(bool(r.storage), "run.storage: must name a directory or bucket URI")
    _location("run.storage", r.storage, lambda: None)
    _require(
        r.resume_from is None or _location("run.resume_from", r.resume_from, lambda: storage.exists(r.resume_from)),
        f"run.resume_from={r.resume_from}: no such checkpoint",
    )


def _location(name: str, location: str, check):
    """check() on a local path or URI; a URI without a bucket or an unreachable store: one line,
    within PREFLIGHT_RETRY_S (the run's own budget applies once it runs)."""
    try:
        # a mistyped endpoint refuses every connection: one line soon, not minutes of silence
        with storage_retries.budget(min(storage_retries.retry_budget(), PREFLIGHT_RETRY_S)):
            storage.resolve(location)
            return check()
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{name}={location}: cannot reach it ({str(exc).splitlines()[0]})") from None


def _check_data(config: Config) -> None:
    path, model = config.data.path, config.model
    if path is None:
        _require(
            model.num_classes == DEMO_NUM_CLASSES,
            f"model.num_classes={model.num_classes} but data.path is unset: the embedded demo dataset "
            f"has {DEMO_NUM_CLASSES} classes (set data.path to a prepared dataset, see jobs/prepare.py)",
        )
        return
    _require(_location("data.path", path, lambda: storage.is_dir(path)), f"data.path={path}: directory does not exist")
    manifest_path = storage.join(path, MANIFEST_NAME)
    _require(
        storage.is_file(manifest_path),
        f"data.path={path}: not a prepared dataset (no {MANIFEST_NAME}); run jobs/prepare.py on it first",
    )
    try:
        manifest = load_manifest(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _require(isinstance(manifest.classes, list) and manifest.classes, f"{manifest_path}: has no 'classes' list")
    _require(
        manifest.num_classes == model.num_classes,
        f"model.num_classes={model.num_classes} does not match the {manifest.num_classes} classes in {manifest_path}",
    )
    if isinstance(manifest.size, int):
        _require(
            model.image_size <= manifest.size,
            f"model.image_size={model.image_size} is larger than the dataset's {manifest.size}x{manifest.size} "
            f"images ({manifest_path})",
        )


def replicas_text(p) -> str:
    return f"{p.min_replicas}-{p.max_replicas}" if p.elastic else str(p.replicas)


def _check_resources(config: Config, resources: Mapping[str, float]) -> None:
    """The workers of the fewest replicas must fit the cluster (an elastic run grows into more)."""
    p = config.parallel
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    workers = p.towers * p.min_replicas
    _require(
        not (p.use_gpu == "true" and gpus < 1),
        "parallel.use_gpu=true but the Ray cluster has no GPU (use parallel.use_gpu=auto or false)",
    )
    layout = (f"parallel.towers x parallel.replicas = {p.towers} x {p.replicas} = {workers} workers" if not p.elastic
              else f"parallel.replicas={replicas_text(p)}: its minimum, {p.towers} towers x {p.min_replicas} = "
                   f"{workers} workers,")
    if p.use_gpu == "true" or (p.use_gpu == "auto" and gpus >= 1):
        need = workers * p.gpus_per_worker
        share = f" x parallel.gpus_per_worker={p.gpus_per_worker:g}" if p.gpus_per_worker != 1 else ""
        _require(need <= gpus + 1e-9, f"{layout}{share} need {need:g} GPUs; the Ray cluster has {gpus:g}")
    else:
        need = workers * p.cpus_per_worker
        _require(
            need <= cpus + 1e-9,
            f"{layout} x parallel.cpus_per_worker={p.cpus_per_worker:g} need {need:g} CPUs; the Ray cluster has {cpus:g}",
        )
