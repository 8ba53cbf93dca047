"""The driver's checks of a run's inputs, before Ray starts and before any worker does.

`validate_config` checks the config itself and against the dataset's manifest; on top of it,
`check_inputs` reads what the workers would otherwise fail on minutes later: the dataset's
manifest and shards (`data.path`), and the checkpoint to start from (`run.resume_from`: present,
checksum, model shapes against this config). Each problem is one ConfigError naming the field and
the file. Remote paths (s3://, gs://) are read through the same loaders the workers use.
"""

from __future__ import annotations

import torch

from alexnet_ray import storage
from alexnet_ray.checkpoint import CheckpointError, load_checkpoint
from alexnet_ray.data.manifest import load_manifest
from alexnet_ray.model import AlexNet
from alexnet_ray.train.config import Config, ConfigError, validate_config
from alexnet_ray.train.tracking import check_tracking

TRAINING_SPLITS = ("train", "val")


def check_inputs(config: Config) -> None:
    """ConfigError naming the first bad input; None when the run may start (cluster resources are
    checked once connected, by `validate_config(..., cluster_resources=...)`)."""
    validate_config(config, check_data=True)
    check_tracking(config)
    check_dataset(config)
    check_resume_from(config)


def check_dataset(config: Config) -> None:
    """data.path's manifest reads, and lists a train and a val split whose shards exist."""
    path = config.data.path
    if path is None:  # the embedded demo dataset
        return
    try:
        manifest = load_manifest(path)
    except ValueError as error:
        raise ConfigError(f"data.path={path}: {error}") from None
    splits = manifest.splits if isinstance(manifest.splits, dict) else {}
    for split in TRAINING_SPLITS:
        info = splits.get(split)
        if not isinstance(info, dict) or not info.get("images") or not info.get("shards"):
            raise ConfigError(f"data.path={path}: the manifest has no {split!r} split with images "
                              f"(splits: {', '.join(sorted(splits)) or 'none'}); training needs {' and '.join(TRAINING_SPLITS)}")
        try:
            shards = manifest.shard_paths(split)
        except (KeyError, TypeError):
            raise ConfigError(f"data.path={path}: the manifest's {split!r} split lists no shard files") from None
        missing = [s for s in shards if not storage.is_file(s)]
        if missing:
            raise ConfigError(f"data.path={path}: {len(missing)} {split!r} shard(s) listed in the manifest are "
                              f"missing, e.g. {missing[0]}")


def check_resume_from(config: Config) -> None:
    """run.resume_from loads (checksum verified) and holds weights of the shapes this config's model has."""
    path = config.run.resume_from
    if path is None:
        return
    try:
        state = load_checkpoint(path)
    except CheckpointError as error:
        raise ConfigError(f"run.resume_from={path}: {error}") from None
    problem = model_mismatch(state, config)
    if problem:
        raise ConfigError(f"run.resume_from={path}: {problem}")


def model_mismatch(state: dict, config: Config) -> str | None:
    """Why the checkpoint's weights do not fit `config.model`, or None when every name and shape fits."""
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        expected = {k: tuple(v.shape) for k, v in AlexNet(config.model).state_dict().items()}
    weights = state.get("model")
    if not isinstance(weights, dict):
        return "the checkpoint holds no model weights"
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in weights.items()}
    problem = None
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or unexpected:
        problem = f"its weights lack {missing[:3]} / have unexpected {unexpected[:3]}"
    else:
        for name, shape in expected.items():
            if got[name] != shape:
                problem = f"{name} is {got[name]} in the checkpoint but {shape} for this config's model"
                break
    if problem is None:
        return None
    saved = (state.get("config") or {}).get("model") or {}
    differ = [f"model.{k}={saved[k]!r} there, {v!r} here" for k, v in config.model.to_dict().items()
              if k in saved and saved[k] != v]
    return problem + (f" ({'; '.join(differ)})" if differ else "")
