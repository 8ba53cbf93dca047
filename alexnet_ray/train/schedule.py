"""Learning-rate schedules: the paper's plateau rule, step, cosine; each with an optional linear warm-up.

Pure Python. `lr(t)` takes the epoch as a float (`epoch + step / steps_per_epoch` for per-step
warm-up or cosine; a whole number for per-epoch). The plateau schedule needs `observe(val_error)`
once at the end of every epoch. `state_dict()` / `load_state_dict()` make a resumed run continue
exactly where it stopped.
"""

from __future__ import annotations

import math
from typing import Any

from alexnet_ray.train.config.schema import SCHEDULE_KINDS, ScheduleConfig


class LRSchedule:
    """lr(t) = warm-up factor(t) x the schedule's lr(t).

    plateau: lr x factor**decays; a decay happens when the validation error has not improved on
        its best by more than `threshold` for more than `patience` consecutive observed epochs,
        at most `max_decays` times (Krizhevsky et al. 2012: divide by 10, three times).
    step:    lr x gamma**floor(t / step_size).
    cosine:  from lr at the end of warm-up down to min_lr at `epochs`.
    warm-up: for t < warmup_epochs the factor rises linearly from start_factor to 1.
    """

    def __init__(self, config: ScheduleConfig, base_lr: float, epochs: int) -> None:
        if config.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule.kind={config.kind!r}: expected one of {', '.join(SCHEDULE_KINDS)}")
        if base_lr <= 0:
            raise ValueError(f"base_lr={base_lr}: must be > 0")
        if epochs < 1:
            raise ValueError(f"epochs={epochs}: must be >= 1")
        self.config = config
        self.base_lr = float(base_lr)
        self.epochs = int(epochs)
        self.best = math.inf
        self.bad_epochs = 0
        self.decays = 0
        self.observed = 0

    @property
    def kind(self) -> str:
        return self.config.kind

    def warmup_factor(self, t: float) -> float:
        warmup, start = self.config.warmup_epochs, self.config.warmup_start_factor
        if warmup <= 0 or t >= warmup:
            return 1.0
        return start + (1.0 - start) * max(t, 0.0) / warmup

    def lr(self, t: float) -> float:
        """Learning rate at epoch t (float: fractional epochs allowed)."""
        c = self.config
        if c.kind == "plateau":
            main = self.base_lr * c.plateau_factor**self.decays
        elif c.kind == "step":
            main = self.base_lr * c.step_gamma ** math.floor(max(t, 0.0) / c.step_size)
        else:
            span = max(self.epochs - c.warmup_epochs, 1)
            progress = min(max((t - c.warmup_epochs) / span, 0.0), 1.0)
            main = c.min_lr + (self.base_lr - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return main * self.warmup_factor(t)

    def observe(self, val_error: float) -> bool:
        """Record one epoch's validation error; True when this caused a plateau decay."""
        c = self.config
        self.observed += 1
        if val_error < self.best - c.plateau_threshold:
            self.best = float(val_error)
            self.bad_epochs = 0
            return False
        self.best = min(self.best, float(val_error))
        if c.kind != "plateau" or self.observed <= c.warmup_epochs:
            return False
        self.bad_epochs += 1
        if self.bad_epochs > c.plateau_patience and self.decays < c.plateau_max_decays:
            self.decays += 1
            self.bad_epochs = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain floats and ints (loadable with torch.load(weights_only=True))."""
        return {
            "kind": self.kind,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "decays": self.decays,
            "observed": self.observed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(
                f"schedule state is for kind={state.get('kind')!r}, this run uses schedule.kind={self.kind!r}"
            )
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self.decays = int(state["decays"])
        self.observed = int(state["observed"])


def make_lr_schedule(config: ScheduleConfig, base_lr: float, epochs: int) -> LRSchedule:
    """The schedule for `config` (schedule section), starting from `base_lr` (already scaled for replicas)."""
    return LRSchedule(config, base_lr, epochs)
