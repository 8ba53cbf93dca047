"""A sweep's search space, written in the `--set` syntax: `section.key=DISTRIBUTION:ARGS`.

    optimizer.lr=loguniform:1e-3:1e-1      a float, log-uniform in [1e-3, 1e-1]
    optimizer.weight_decay=uniform:0:1e-3  a float, uniform
    data.prefetch_batches=randint:1:4      an integer in [1, 4)  (Ray Tune's randint: upper bound excluded)
    model.dropout=choice:0.3,0.5           one of the listed values, at random
    schedule.kind=grid:step,cosine         every listed value (each repeated --samples times)

Every field and value is checked as `--set` checks it (did-you-mean for a misspelt field, the
field's type for each value), and a malformed distribution is refused in one line naming it.
Ray Tune is imported only by `to_tune`, so a bad --search fails before Ray is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from alexnet_ray.train.config import Config, ConfigError, apply_overrides, copy_config
from alexnet_ray.train.config.schema import field_type, merge, split_optional, suggest

# distribution -> (what its arguments are, the field types it can sample)
DISTRIBUTIONS = {
    "loguniform": ("LOW:HIGH, 0 < LOW < HIGH", (float,)),
    "uniform": ("LOW:HIGH, LOW < HIGH", (float,)),
    "randint": ("LOW:HIGH, integers, LOW < HIGH (HIGH excluded)", (int,)),
    "choice": ("V1,V2,...", None),  # any field
    "grid": ("V1,V2,...", None),
}


@dataclass(frozen=True)
class Dimension:
    """One swept field: `name` (section.key), its distribution and its typed arguments."""

    name: str
    distribution: str
    args: tuple

    @property
    def log_scale(self) -> bool:
        """Drawn against log10(value): loguniform, or listed positive numbers spanning 100x or more."""
        if self.distribution == "loguniform":
            return True
        numbers = [a for a in self.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        return len(numbers) == len(self.args) and min(numbers) > 0 and max(numbers) / min(numbers) >= 100

    def describe(self) -> str:
        sep = "," if self.distribution in ("choice", "grid") else ":"
        return f"{self.name}={self.distribution}:{sep.join(str(a) for a in self.args)}"


def parse_dimension(spec: str, base: Config) -> Dimension:
    """One `--search` item; ConfigError naming it when the field, distribution or a value is wrong."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    section, dot, key = name.partition(".")
    where = f"--search {spec!r}"
    if not sep or not dot or not key:
        raise ConfigError(f"{where}: expected section.key=DISTRIBUTION:ARGS, e.g. optimizer.lr=loguniform:1e-3:1e-1")
    base_type, _ = split_optional(field_type(section, key, where))
    distribution, colon, raw_args = rest.strip().partition(":")
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {distribution!r}{suggest(distribution, DISTRIBUTIONS)}; "
                          f"distributions: {', '.join(DISTRIBUTIONS)}")
    usage, types = DISTRIBUTIONS[distribution]
    if not colon or not raw_args.strip():
        raise ConfigError(f"{where}: {distribution} needs {usage}")
    if types is not None and base_type not in types:
        raise ConfigError(f"{where}: {distribution} samples {' or '.join(t.__name__ for t in types)} values but "
                          f"{name} is {base_type.__name__} (use choice:V1,V2 or grid:V1,V2)")
    if distribution in ("choice", "grid"):
        values = tuple(typed_value(name, v.strip(), base, where) for v in raw_args.split(","))
        if len(values) < 2 and distribution == "choice":
            raise ConfigError(f"{where}: choice needs at least two values ({usage})")
        return Dimension(name, distribution, values)
    parts = raw_args.split(":")
    if len(parts) != 2:
        raise ConfigError(f"{where}: {distribution} needs {usage}, got {raw_args!r}")
    low, high = (typed_value(name, p.strip(), base, where) for p in parts)
    if not low < high or (distribution == "loguniform" and low <= 0) or not all(map(math.isfinite, (low, high))):
        raise ConfigError(f"{where}: {distribution} needs {usage}, got {low:g}:{high:g}")
    return Dimension(name, distribution, (low, high))


def typed_value(name: str, raw: str, base: Config, where: str) -> Any:
    """`raw` parsed as `--set name=raw` parses it (the field's type), on a copy of `base`."""
    probe = copy_config(base)
    try:
        apply_overrides(probe, [f"{name}={raw}"])
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    section, key = name.split(".")
    return getattr(getattr(probe, section), key)


def parse_search(specs: Sequence[str], base: Config) -> list[Dimension]:
    """Every `--search` item, each field at most once; at least one."""
    if not specs:
        raise ConfigError("a sweep needs at least one --search section.key=DISTRIBUTION:ARGS")
    dimensions = [parse_dimension(spec, base) for spec in specs]
    names = [d.name for d in dimensions]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--search: {', '.join(twice)} given more than once")
    for reserved in ("run.name", "run.storage", "run.resume_from"):
        if reserved in names:
            raise ConfigError(f"--search {reserved}: set by the sweep for each trial, it cannot be swept")
    return dimensions


def to_tune(dimensions: Sequence[Dimension]) -> dict[str, Any]:
    """Ray Tune's param_space: {section.key: a ray.tune domain}."""
    import ray.tune

    make = {"loguniform": lambda a: ray.tune.loguniform(*a), "uniform": lambda a: ray.tune.uniform(*a),
            "randint": lambda a: ray.tune.randint(*a), "choice": lambda a: ray.tune.choice(list(a)),
            "grid": lambda a: ray.tune.grid_search(list(a))}
    return {d.name: make[d.distribution](d.args) for d in dimensions}


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """`base` with a trial's sampled {section.key: value} set (each checked against its field's type)."""
    config = copy_config(base)
    nested: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        section, key = name.split(".")
        nested.setdefault(section, {})[key] = value.item() if hasattr(value, "item") else value  # numpy scalars
    merge(config, nested, "trial")
    return config
