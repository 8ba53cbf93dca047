"""One configuration tree for a training run: model, data, optimizer, schedule, parallel, run.

Load it with `load_config(preset=..., path=FILE, overrides=["section.key=value", ...])`; every
value is checked against its field's type, and `validate_config` refuses a bad run with one
message naming the field (or file) before any worker starts.

    schema.py      the section dataclasses (ModelConfig is the model layer's), choices, presets, types
    loading.py     preset -> YAML file -> overrides; the options every job shares
    validation.py  validate_config
"""

from alexnet_ray.model.config import ModelConfig
from alexnet_ray.train.config.loading import add_config_arguments, apply_overrides, config_from_args, load_config
from alexnet_ray.train.config.schema import (CHOICES, PRESETS, SECTIONS, Config, ConfigError, DataConfig,
                                             OptimizerConfig, ParallelConfig, RunConfig, ScheduleConfig, copy_config,
                                             preset_config, scaled_lr)
from alexnet_ray.train.config.validation import validate_config

__all__ = [
    "Config", "ConfigError", "ModelConfig", "DataConfig", "OptimizerConfig", "ScheduleConfig", "ParallelConfig",
    "RunConfig", "SECTIONS", "CHOICES", "PRESETS", "preset_config", "load_config", "apply_overrides",
    "add_config_arguments", "config_from_args", "validate_config", "copy_config", "scaled_lr",
]
