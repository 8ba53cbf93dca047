"""Pure-torch reference AlexNet, one Tower, and state-dict split/merge. No Ray, no torch.distributed."""

from alexnet_ray.model.config import (
    LAYER_NAMES,
    ModelConfig,
    ModelPlan,
    check_towers,
    min_image_size,
    spatial_sizes,
)
from alexnet_ray.model.network import (
    EXCHANGE_DIM,
    EXCHANGE_POINTS,
    NUM_STAGES,
    STAGE_LAYERS,
    AlexNet,
    Tower,
    merge_state_dicts,
    split_state_dict,
)

__all__ = [
    "AlexNet", "Tower", "ModelConfig", "ModelPlan", "split_state_dict", "merge_state_dicts", "check_towers",
    "spatial_sizes", "min_image_size", "LAYER_NAMES", "EXCHANGE_POINTS", "EXCHANGE_DIM",
    "NUM_STAGES", "STAGE_LAYERS",
]
