"""The reference AlexNet and one Tower of it, sharing one layer builder and one staged forward.

A Tower's forward runs in five stages; between stages the network needs the partner tower's
half (the cross-connects).  The stages call `exchange(point, tensor)` there, so the parallel layer
injects its collectives and this module never imports torch.distributed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from alexnet_ray.model.config import CONV1, LAYER_NAMES, POOLS, ModelConfig, check_towers, model_config
from alexnet_ray.model.dropout import StepDropout
from alexnet_ray.model.layers import GroupedLRN, activation_module, init_weights

# Exchange points, named by the layer that consumes the gathered tensor, and the dim gathered.
EXCHANGE_POINTS = ("conv3", "fc6", "fc7", "fc8", "logits")
EXCHANGE_DIM = 1
NUM_STAGES = len(EXCHANGE_POINTS)
# Parameters whose gradients are final once each stage's backward has run.
STAGE_LAYERS = (("conv1", "conv2"), ("conv3", "conv4", "conv5"), ("fc6",), ("fc7",), ("fc8",))
# The dropout modules and the stage that runs each.
DROPOUT_STAGES = {"dropout6": 2, "dropout7": 3}

Exchange = Callable[[str, Tensor], Tensor]


def _no_exchange(point: str, tensor: Tensor) -> Tensor:
    return tensor


class _StagedAlexNet(nn.Module):
    """Layers for `tower` of `towers` (towers=1: the whole network, conv2/4/5 grouped in two)."""

    def __init__(self, tower: int, towers: int, config: ModelConfig):
        super().__init__()
        plan = config.plan(towers)
        if not isinstance(tower, int) or not 0 <= tower < towers:
            raise ValueError(f"tower={tower!r} must be in 0..{towers - 1}")
        self.tower, self.towers, self.plan, self.config = tower, towers, plan, config
        w = {name: c // towers for name, c in plan.widths.items()}
        full = plan.widths
        halves = 2 // towers  # groups inside one module: 2 for the reference, 1 for a tower
        self.conv1 = nn.Conv2d(3, w["conv1"], **CONV1)
        self.conv2 = nn.Conv2d(w["conv1"], w["conv2"], 5, padding=2, groups=halves)
        self.conv3 = nn.Conv2d(full["conv2"], w["conv3"], 3, padding=1)
        self.conv4 = nn.Conv2d(w["conv3"], w["conv4"], 3, padding=1, groups=halves)
        self.conv5 = nn.Conv2d(w["conv4"], w["conv5"], 3, padding=1, groups=halves)
        self.fc6 = nn.Linear(plan.fc6_in, w["fc6"])
        self.fc7 = nn.Linear(full["fc6"], w["fc7"])
        self.fc8 = nn.Linear(full["fc7"], plan.num_classes // towers)
        self.act = activation_module(config.activation)
        self.lrn = GroupedLRN(halves) if config.lrn else nn.Identity()
        self.pool = nn.MaxPool2d(*POOLS[config.pool])
        # Masks keyed by global position: this tower's columns of the whole layer (see dropout.py).
        self.dropout6 = StepDropout(config.dropout, 6, tower * w["fc6"], full["fc6"])
        self.dropout7 = StepDropout(config.dropout, 7, tower * w["fc7"], full["fc7"])
        init_weights({name: getattr(self, name) for name in LAYER_NAMES}, config.init)

    def stage(self, index: int, x: Tensor) -> Tensor:
        """Stage `index` (0..4): its input is the gathered output of stage index-1 (the images for 0)."""
        a, lrn, pool = self.act, self.lrn, self.pool
        if index == 0:
            x = pool(lrn(a(self.conv1(x))))
            return pool(lrn(a(self.conv2(x))))
        if index == 1:
            x = a(self.conv4(a(self.conv3(x))))
            return pool(a(self.conv5(x)))
        if index == 2:
            return self.dropout6(a(self.fc6(torch.flatten(x, 1))))
        if index == 3:
            return self.dropout7(a(self.fc7(x)))
        if index == 4:
            return self.fc8(x)
        raise ValueError(f"stage index {index} out of range 0..{NUM_STAGES - 1}")

    def set_dropout_step(self, seed: int, epoch: int, step: int, row_offset: int = 0, stage: int | None = None) -> None:
        """Key dropout to a training step: the next forward's rows are the global batch's rows
        row_offset.. (a replica's or micro-batch's place in it). Every layout then draws the same masks.
        `stage`: key only the dropout that stage runs (a pipelined step keys each micro-batch's stage)."""
        for name, at in DROPOUT_STAGES.items():
            if stage is None or stage == at:
                getattr(self, name).set_key(seed, epoch, step, row_offset)

    def clear_dropout_step(self) -> None:
        """Back to ordinary dropout (a fresh mask from torch's generator on every forward)."""
        for name in DROPOUT_STAGES:
            getattr(self, name).clear_key()

    def stage_parameters(self, index: int) -> list[tuple[str, nn.Parameter]]:
        return [(f"{layer}.{p}", getattr(getattr(self, layer), p)) for layer in STAGE_LAYERS[index] for p in ("weight", "bias")]

    def forward_staged(self, x: Tensor, exchange: Exchange = _no_exchange) -> Tensor:
        for index, point in enumerate(EXCHANGE_POINTS):
            x = exchange(point, self.stage(index, x))
        return x


class AlexNet(_StagedAlexNet):
    """The paper's network in one process: conv2/4/5 grouped in two halves, LRN within each half.

    Built from a ModelConfig, or its fields by keyword: `AlexNet(config)`, `AlexNet(num_classes=10)`,
    `AlexNet(config, width=0.5)`. conv1 uses padding 2, so 224 -> 55 -> 27 -> 13 -> 13 -> 13 -> 6 as
    in the paper (227 without padding is the other common reading). Defaults have 60,965,224 parameters.
    """

    def __init__(self, config: ModelConfig | None = None, **fields):
        super().__init__(0, 1, model_config(config, **fields))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_staged(x)


class Tower(_StagedAlexNet):
    """One tower's half of every layer; parameter names equal the reference's.

    `Tower(index, towers, config)` or `Tower(index, towers, num_classes=10, ...)`. `forward(x,
    exchange)` needs `exchange` for towers=2 (the parallel layer supplies it); towers=1 is the whole
    model and needs none.
    """

    def __init__(self, tower: int, towers: int, config: ModelConfig | None = None, **fields):
        super().__init__(tower, towers, model_config(config, **fields))

    def forward(self, x: Tensor, exchange: Exchange | None = None) -> Tensor:
        if exchange is None:
            if self.towers > 1:
                raise ValueError("Tower.forward with towers=2 needs an exchange (use alexnet_ray.parallel.TowerParallel)")
            exchange = _no_exchange
        return self.forward_staged(x, exchange)

    @classmethod
    def from_reference(cls, model: AlexNet, tower: int, towers: int) -> "Tower":
        """This tower of `model`, with the reference's weights."""
        result = cls(tower, towers, model.config)
        result.load_state_dict(split_state_dict(model.state_dict(), towers)[tower])
        return result


def split_state_dict(state_dict: dict[str, Tensor], towers: int) -> list[dict[str, Tensor]]:
    """One dict per tower. Every layer splits along its output dim 0: conv2/4/5 are grouped in the
    reference, so their output half t already reads only input half t. Works for any name-keyed dict
    shaped like the parameters (SGD momentum buffers too); 0-d entries are copied to every tower."""
    check_towers(towers)
    result: list[dict[str, Tensor]] = [{} for _ in range(towers)]
    for name, tensor in state_dict.items():
        if tensor.dim() == 0:
            for part in result:
                part[name] = tensor.clone()
            continue
        if tensor.shape[0] % towers:
            raise ValueError(f"{name} has {tensor.shape[0]} rows, which do not split over {towers} towers")
        for part, chunk in zip(result, tensor.chunk(towers, dim=0)):
            part[name] = chunk.clone()
    return result


def merge_state_dicts(state_dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Inverse of split_state_dict: concatenate every entry along dim 0, in tower order."""
    if len(state_dicts) not in (1, 2):
        raise ValueError(f"merge_state_dicts needs 1 or 2 tower dicts, got {len(state_dicts)}")
    keys = list(state_dicts[0])
    for index, sd in enumerate(state_dicts[1:], start=1):
        if list(sd) != keys:
            raise ValueError(f"tower {index} state dict keys differ from tower 0's")
    merged = {}
    for name in keys:
        parts = [sd[name] for sd in state_dicts]
        merged[name] = parts[0].clone() if parts[0].dim() == 0 else torch.cat(parts, dim=0)
    return merged
