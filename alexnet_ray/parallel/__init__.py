"""Topology, process groups, the cross-connect exchanges, micro-batch schedule, data-parallel sync."""

from alexnet_ray.parallel.mappings import (
    ExchangeTimeoutError,
    all_reduce_sum,
    broadcast_from_tower0,
    gather_from_tower_pair,
    gather_logits_from_tower_pair,
    gather_tower_state_dicts,
)
from alexnet_ray.parallel.topology import ParallelGroups, Topology, init_parallel_groups
from alexnet_ray.parallel.tower_parallel import TowerParallel

__all__ = [
    "Topology", "ParallelGroups", "init_parallel_groups", "TowerParallel", "ExchangeTimeoutError",
    "gather_from_tower_pair", "gather_logits_from_tower_pair", "broadcast_from_tower0",
    "gather_tower_state_dicts", "all_reduce_sum",
]
