"""Layer plan of AlexNet: channel widths, spatial sizes and argument checks (pure Python + torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .lrn import local_response_norm

# Paper widths of the whole network (both towers together), DESIGN.md "The network".
BASE_WIDTHS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256, "fc6": 4096, "fc7": 4096}
LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# Layers whose reference weights are grouped (each tower sees only its own half of the input).
GROUPED = ("conv2", "conv4", "conv5")
# Paper §3.3: k=2, n=5, alpha=1e-4, beta=0.75; torch divides alpha by n, hence 5e-4.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 5e-4, 0.75, 2.0
FUSED_LRN_DEFAULT = True  # see GroupedLRN
CONV1 = dict(kernel_size=11, stride=4, padding=2)
POOLS = {"overlapping": (3, 2), "plain": (2, 2)}
INITS = ("paper", "caffe", "kaiming")
ACTIVATIONS = ("relu", "tanh")


@dataclass(frozen=True)
class ModelPlan:
    """Whole-network widths and the spatial size of conv5's pooled output."""

    widths: dict[str, int]
    num_classes: int
    final_spatial: int

    @property
    def fc6_in(self) -> int:
        return self.widths["conv5"] * self.final_spatial**2


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
    size = CONV1["kernel_size"] - 2 * CONV1["padding"]
    while spatial_sizes(size, pool)["pool5"] < 1:
        size += 1
    return size


def check_model_args(
    num_classes: int = 1000,
    width: float = 1.0,
    image_size: int = 224,
    dropout: float = 0.5,
    init: str = "paper",
    activation: str = "relu",
    lrn: bool = True,
    pool: str = "overlapping",
    towers: int = 1,
) -> ModelPlan:
    """Validate AlexNet/Tower arguments; raise ValueError naming the field. Returns the layer plan."""
    if towers not in (1, 2):
        raise ValueError(f"parallel.towers={towers!r} must be 1 or 2")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"model.num_classes={num_classes!r} must be a positive integer")
    if num_classes % towers:
        raise ValueError(f"model.num_classes={num_classes} does not split evenly over {towers} towers (fc8)")
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"model.width={width!r} must be a positive number")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout!r} must be in [0, 1)")
    if init not in INITS:
        raise ValueError(f"model.init={init!r} must be one of {INITS}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"model.activation={activation!r} must be one of {ACTIVATIONS}")
    if not isinstance(lrn, bool):
        raise ValueError(f"model.lrn={lrn!r} must be true or false")
    if pool not in POOLS:
        raise ValueError(f"model.pool={pool!r} must be one of {tuple(POOLS)}")
    if not isinstance(image_size, int) or isinstance(image_size, bool):
        raise ValueError(f"model.image_size={image_size!r} must be an integer")
    final = spatial_sizes(image_size, pool)["pool5"]
    if final < 1:
        raise ValueError(
            f"model.image_size={image_size} is too small for conv1 and three {pool} poolings "
            f"(needs at least {min_image_size(pool)})"
        )
    widths = {}
    for name, base in BASE_WIDTHS.items():
        channels = int(base * width + 1e-9)
        if channels == 0:
            raise ValueError(f"model.width={width} leaves {name} with 0 channels")
        if channels % 2:
            # The reference groups conv2/4/5 and LRN in two halves; the towers split every layer.
            raise ValueError(f"model.width={width} leaves {name} with {channels} channels, odd: it must split in two halves")
        widths[name] = channels
    return ModelPlan(widths=widths, num_classes=num_classes, final_spatial=final)


class GroupedLRN(nn.Module):
    """LRN applied to each of `groups` channel halves separately, as each GPU did in the paper.

    The paper normalised within one GPU's maps; a single LRN over all 96 channels would mix
    channels 47 and 48 across the tower boundary and the two-tower split could not match it.
    `fused` (the default) runs lrn.local_response_norm, one pass each way; False runs torch's own
    F.local_response_norm per half (use_torch_lrn switches a whole model, for comparisons).
    """

    def __init__(self, groups: int, fused: bool = FUSED_LRN_DEFAULT):
        super().__init__()
        self.groups, self.fused = groups, fused
        self.lrn = nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)

    def forward(self, x):
        if self.fused:
            return local_response_norm(x, LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K, groups=self.groups)
        if self.groups == 1:
            return self.lrn(x)
        import torch

        return torch.cat([self.lrn(part) for part in x.chunk(self.groups, dim=1)], dim=1)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, fused={self.fused}"


def use_torch_lrn(model: nn.Module, torch_lrn: bool = True) -> nn.Module:
    """Switch every GroupedLRN in `model` to torch's LRN (or back to the fused one); returns model."""
    for module in model.modules():
        if isinstance(module, GroupedLRN):
            module.fused = not torch_lrn
    return model


def activation_module(activation: str) -> nn.Module:
    return nn.ReLU(inplace=False) if activation == "relu" else nn.Tanh()


def init_weights(layers: dict[str, nn.Module], init: str) -> None:
    """Paper §5: N(0, 0.01), bias 1 on conv2/4/5 and fc6/7, else 0. Caffe: that bias 0.1, fc6/7 std 0.005.

    "kaiming" is not the paper's: He-normal weights (fan-in, ReLU gain), zero biases, fc8 N(0, 0.01).
    Narrow networks (the demo and tests) sit for many epochs on the paper's init before they learn;
    this one learns from the first epoch.
    """
    if init == "kaiming":
        for name, layer in layers.items():
            if name == "fc8":
                nn.init.normal_(layer.weight, 0.0, 0.01)
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        return
    one_bias = 1.0 if init == "paper" else 0.1
    for name, layer in layers.items():
        std = 0.005 if init == "caffe" and name in ("fc6", "fc7") else 0.01
        nn.init.normal_(layer.weight, 0.0, std)
        nn.init.constant_(layer.bias, one_bias if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0)
