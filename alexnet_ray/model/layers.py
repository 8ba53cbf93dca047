"""AlexNet's building blocks: the grouped LRN, the activation, and the paper's initialisations."""

from __future__ import annotations

import torch
from torch import nn

from alexnet_ray.model.lrn import local_response_norm

# Paper §3.3: k=2, n=5, alpha=1e-4, beta=0.75; torch divides alpha by n, hence 5e-4.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 5e-4, 0.75, 2.0
FUSED_LRN_DEFAULT = True  # see GroupedLRN


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
