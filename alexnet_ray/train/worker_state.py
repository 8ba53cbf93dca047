"""What one training worker holds between steps: imported by the loop (worker.py) and by the
checkpoint code (checkpointing.py), which the loop calls."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from alexnet_ray.parallel import TowerParallel
from alexnet_ray.train.config import Config
from alexnet_ray.train.precision import LossScaler


@dataclasses.dataclass
class WorkerState:
    config: Config
    groups: Any
    device: torch.device
    model: TowerParallel
    optimizer: torch.optim.SGD
    schedule: Any
    start_epoch: int
    autocast: Any  # run.precision's autocast context
    scaler: LossScaler  # fp16's loss scale (a no-op otherwise)
    resumed_metrics: dict | None = None  # the metrics in this run's checkpoint it resumed from
