"""Rank layout (rank = replica * towers + tower) and the process groups built from it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from alexnet_ray.model import check_towers


def positive_int(value, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{field}={value!r}: must be an integer")
    if value < 1:
        raise ValueError(f"{field}={value!r}: must be >= 1")
    return value


def check_microbatches(microbatches) -> int:
    """Any batch splits over any micro-batch count (near-equal parts): only a count below 1 is refused."""
    return positive_int(microbatches, "parallel.microbatches")


@dataclass(frozen=True)
class Topology:
    """`towers` ranks per replica (adjacent ranks, so partners share a node); `replicas` copies."""

    towers: int = 2
    replicas: int = 1

    @property
    def world_size(self) -> int:
        return self.towers * self.replicas

    def rank(self, replica: int, tower: int) -> int:
        if not 0 <= replica < self.replicas or not 0 <= tower < self.towers:
            raise ValueError(f"(replica={replica}, tower={tower}) is outside {self.replicas} replicas x {self.towers} towers")
        return replica * self.towers + tower

    def replica_of(self, rank: int) -> int:
        self._check_rank(rank)
        return rank // self.towers

    def tower_of(self, rank: int) -> int:
        self._check_rank(rank)
        return rank % self.towers

    def pair_ranks(self, replica: int) -> list[int]:
        return [self.rank(replica, t) for t in range(self.towers)]

    def dp_ranks(self, tower: int) -> list[int]:
        return [self.rank(r, tower) for r in range(self.replicas)]

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")

    def validate(self, world_size: int | None = None, batch_size: int | None = None, microbatches: int = 1) -> "Topology":
        """ValueError naming the field for towers not in {1, 2}, a world size other than towers x
        replicas, or a batch size or micro-batch count below 1. Any batch splits over any
        micro-batch count (near-equal parts), so nothing else is refused."""
        check_towers(self.towers)
        positive_int(self.replicas, "parallel.replicas")
        check_microbatches(microbatches)
        if world_size is not None and world_size != self.world_size:
            raise ValueError(
                f"world size {world_size} != parallel.towers x parallel.replicas = {self.towers} x {self.replicas}")
        if batch_size is not None:
            positive_int(batch_size, "batch_size")
        return self


@dataclass
class ParallelGroups:
    """This rank's place in the topology and its two groups."""

    topology: Topology
    rank: int
    pair_group: object  # ProcessGroup of this replica's towers
    dp_group: object  # ProcessGroup of this tower index across replicas

    @property
    def replica(self) -> int:
        return self.topology.replica_of(self.rank)

    @property
    def tower(self) -> int:
        return self.topology.tower_of(self.rank)

    @property
    def pair_ranks(self) -> list[int]:
        return self.topology.pair_ranks(self.replica)

    @property
    def dp_ranks(self) -> list[int]:
        return self.topology.dp_ranks(self.tower)


def init_parallel_groups(topology: Topology, timeout: float | None = None) -> ParallelGroups | None:
    """Build every pair group and every data-parallel group; all ranks must call this (new_group is
    collective and every rank creates all groups in the same order). The default group must exist.
    `timeout` (seconds) bounds every collective of the groups inside the backend too (torch's
    default for gloo is 30 minutes), so a stalled partner cannot hold a background thread longer.
    Ranks beyond the topology (spare workers of an elastic group that are not a whole tower group)
    take part in creating the groups and get None: they belong to none."""
    topology.validate()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("init_parallel_groups needs torch.distributed initialised (Ray Train does it)")
    if dist.get_world_size() < topology.world_size:
        topology.validate(world_size=dist.get_world_size())
    rank = dist.get_rank()
    spare = rank >= topology.world_size
    options = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
    pair_group = dp_group = None
    for replica in range(topology.replicas):
        group = dist.new_group(topology.pair_ranks(replica), **options)
        if not spare and replica == topology.replica_of(rank):
            pair_group = group
    for tower in range(topology.towers):
        group = dist.new_group(topology.dp_ranks(tower), **options)
        if not spare and tower == topology.tower_of(rank):
            dp_group = group
    if spare:
        return None
    return ParallelGroups(topology=topology, rank=rank, pair_group=pair_group, dp_group=dp_group)
