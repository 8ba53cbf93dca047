"""The model's configuration and its rules: `ModelConfig` (what `AlexNet` and `Tower` are built
from) and `ModelConfig.plan(towers)`, which checks it and derives every layer's width and the
spatial sizes. Pure Python: training's config validation and the network both call it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# Paper widths of the whole network (both towers together), Krizhevsky et al. 2012, Figure 2.
BASE_WIDTHS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256, "fc6": 4096, "fc7": 4096}
LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
CONV1 = dict(kernel_size=11, stride=4, padding=2)
POOLS = {"overlapping": (3, 2), "plain": (2, 2)}  # max-pool (kernel, stride)
INITS = ("paper", "caffe", "kaiming")
ACTIVATIONS = ("relu", "tanh")
TOWER_COUNTS = (1, 2)  # the whole network in one process, or the paper's two towers


@dataclass
class ModelConfig:
    """`AlexNet`'s and `Tower`'s arguments. The defaults are the paper's network."""

    num_classes: int = 1000
    width: float = 1.0  # multiplies every layer's channel count
    image_size: int = 224
    dropout: float = 0.5
    init: str = "paper"  # paper | caffe | kaiming
    activation: str = "relu"  # relu | tanh
    lrn: bool = True
    pool: str = "overlapping"  # overlapping (3/2) | plain (2/2)

    def plan(self, towers: int = 1) -> ModelPlan:
        """Validate for `towers` towers; raise ValueError naming the field. Returns the layer plan."""
        check_towers(towers)
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 2:
            raise ValueError(f"model.num_classes={self.num_classes!r}: need an integer of at least 2 classes")
        if self.num_classes % towers:
            raise ValueError(f"model.num_classes={self.num_classes}: does not split evenly over {towers} towers (fc8)")
        if not _is_number(self.width) or not math.isfinite(self.width) or self.width <= 0:
            raise ValueError(f"model.width={self.width!r}: must be > 0")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout!r}: must be in [0, 1)")
        for name, options in (("init", INITS), ("activation", ACTIVATIONS), ("pool", tuple(POOLS))):
            if getattr(self, name) not in options:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: expected one of {', '.join(options)}")
        if not isinstance(self.lrn, bool):
            raise ValueError(f"model.lrn={self.lrn!r}: must be true or false")
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool):
            raise ValueError(f"model.image_size={self.image_size!r}: must be an integer")
        final = spatial_sizes(self.image_size, self.pool)["pool5"]
        if final < 1:
            raise ValueError(
                f"model.image_size={self.image_size}: too small for conv1 and three {self.pool} max-pools "
                f"(at least {min_image_size(self.pool)})"
            )
        widths = {}
        for name, base in BASE_WIDTHS.items():
            channels = int(base * self.width + 1e-9)
            if channels == 0:
                raise ValueError(f"model.width={self.width}: leaves {name} with 0 channels")
            if channels % 2:
                # The reference groups conv2/4/5 and LRN in two halves; the towers split every layer.
                raise ValueError(f"model.width={self.width}: leaves {name} with {channels} channels, odd: "
                                 "it must split in two halves")
            widths[name] = channels
        return ModelPlan(widths=widths, num_classes=self.num_classes, final_spatial=final)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelPlan:
    """Whole-network widths and the spatial size of conv5's pooled output."""

    widths: dict[str, int]
    num_classes: int
    final_spatial: int

    @property
    def fc6_in(self) -> int:
        return self.widths["conv5"] * self.final_spatial**2


def model_config(config: ModelConfig | None = None, **fields) -> ModelConfig:
    """`config` with `fields` replaced (a fresh default ModelConfig when None): how AlexNet and Tower
    accept both `AlexNet(config)` and `AlexNet(num_classes=10)`."""
    if config is None:
        return ModelConfig(**fields)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"expected a ModelConfig, got {type(config).__name__} (pass fields by keyword: num_classes=...)")
    return dataclasses.replace(config, **fields) if fields else config


def check_towers(towers) -> int:
    if towers not in TOWER_COUNTS or isinstance(towers, bool):
        raise ValueError(f"parallel.towers={towers!r}: must be 1 or 2 (the paper splits AlexNet in 2)")
    return towers


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _conv1_out(size: int) -> int:
    return (size + 2 * CONV1["padding"] - CONV1["kernel_size"]) // CONV1["stride"] + 1


def _pool_out(size: int, pool: str) -> int:
    kernel, stride = POOLS[pool]
    return (size - kernel) // stride + 1 if size >= kernel else 0


def spatial_sizes(image_size: int, pool: str = "overlapping") -> dict[str, int]:
    """Output side length after conv1, pool1, pool2, (conv3-5 keep it), pool5."""
    conv1 = _conv1_out(image_size)
    pool1 = _pool_out(conv1, pool) if conv1 > 0 else 0
    pool2 = _pool_out(pool1, pool)
    pool5 = _pool_out(pool2, pool)
    return {"conv1": conv1, "pool1": pool1, "pool2": pool2, "pool5": pool5}


def min_image_size(pool: str = "overlapping") -> int:
    """The smallest input whose feature map survives conv1 and the three max-pools."""
    size = CONV1["kernel_size"] - 2 * CONV1["padding"]
    while spatial_sizes(size, pool)["pool5"] < 1:
        size += 1
    return size
