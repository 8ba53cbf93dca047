"""Building a Config from what a user writes: a preset, a YAML file, `section.key=value` overrides,
and the command-line options every job shares (`add_config_arguments`, `config_from_args`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from alexnet_ray.train.config.schema import (
    PRESETS,
    TYPE_NAMES,
    Config,
    ConfigError,
    IntRange,
    field_type,
    merge,
    parse_int_range,
    preset_config,
    split_optional,
    takes_true_false,
)
from alexnet_ray.train.config.validation import validate_config


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
    merge(config, file_values, source)
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
        value = _parse_text(raw.strip(), field_type(section, key, f"override {item!r}"), f"{section}.{key}")
        setattr(getattr(config, section), key, value)
    return config


# The shortcut flags of add_config_arguments and the fields they set.
SHORTCUTS = (("data", "data.path"), ("epochs", "run.epochs"), ("storage", "run.storage"), ("name", "run.name"),
             ("resume_from", "run.resume_from"))


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The configuration options every job shares: --preset, --config, --set, and shortcuts."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", help=f"base preset: {' | '.join(PRESETS)} (default: demo, or the --config file's preset:)")
    group.add_argument("--config", metavar="FILE", help="YAML file with sections model, data, optimizer, schedule, parallel, run")
    group.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                       help="override one field, e.g. --set model.width=0.25 (repeatable)")
    group.add_argument("--data", metavar="DIR", help="a prepared dataset (data.path); default: the embedded demo dataset")
    group.add_argument("--epochs", type=int, help="run.epochs")
    group.add_argument("--storage", metavar="PATH", help="run.storage: local/NFS path or s3:// / gs:// URI")
    group.add_argument("--name", help="run.name: the same name under the same storage resumes")
    group.add_argument("--resume-from", metavar="CHECKPOINT", help="run.resume_from: a checkpoint to start from (any layout)")
    return parser


def config_from_args(args: argparse.Namespace, *, validate: bool = True) -> Config:
    """Config from add_config_arguments' options; the shortcut flags win over --set."""
    overrides = list(args.overrides or [])
    for flag, name in SHORTCUTS:
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


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_text(raw: str, field_type: Any, name: str) -> Any:
    if field_type == IntRange:
        return parse_int_range(raw, name, "override")
    base, optional = split_optional(field_type)
    if optional and raw.lower() in ("none", "null", ""):
        return None
    if base is bool or takes_true_false(name):
        if raw.lower() in _TRUE:
            return True if base is bool else "true"
        if raw.lower() in _FALSE:
            return False if base is bool else "false"
        if base is bool:
            raise ConfigError(f"override {name}={raw}: {name} must be {TYPE_NAMES[base]}")
        return raw.lower()
    try:
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"override {name}={raw}: {name} must be {TYPE_NAMES[base]}") from None
    return raw
