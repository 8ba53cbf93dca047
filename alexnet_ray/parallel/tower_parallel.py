"""TowerParallel: one Tower in a process group, with the micro-batch schedule and gradient sync.

`forward()` runs the stages with the autograd exchanges of mappings.py (so `loss.backward()` on it
is correct too).  `forward_backward()` runs the pipelined schedule: stage by stage over the
micro-batches, launching micro-batch m's exchange without waiting and computing stage s of m+1
while it is in flight; backward does the same in reverse with the reduce-scatters, driving each
stage's backward explicitly (as torch.distributed.pipelining does) so that the gradient exchange
also overlaps compute.  Once a stage's parameters have their final gradients, their data-parallel
all-reduce is launched asynchronously, overlapping the backward of earlier stages; `sync_gradients()`
waits for it and averages.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import EXCHANGE_DIM, EXCHANGE_POINTS, NUM_STAGES, Tower
from . import mappings
from .topology import ParallelGroups


class TowerParallel(nn.Module):
    def __init__(self, tower: Tower, groups: ParallelGroups, microbatches: int = 1,
                 exchange_timeout: float | None = None, overlap_grad_sync: bool = True):
        super().__init__()
        if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
            raise ValueError(f"parallel.microbatches={microbatches!r} must be a positive integer")
        if tower.towers != groups.topology.towers or tower.tower != groups.tower:
            raise ValueError(f"Tower({tower.tower}, {tower.towers}) does not match this rank's place "
                             f"(tower {groups.tower} of {groups.topology.towers})")
        self.tower, self.groups, self.microbatches = tower, groups, microbatches
        self.exchange_timeout = exchange_timeout
        # The training step named in exchange errors; forward_backward() counts it, and a trainer
        # may set it (to the global step, so the numbering survives a restart).
        self.step = 0
        self.overlap_grad_sync = overlap_grad_sync  # False: all-reduce only in sync_gradients() (for measuring)
        self._pending_sync: list[mappings.PendingAllReduce] = []
        self.reset_stats()

    # ---- stats ----
    @property
    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def reset_stats(self) -> None:
        self._stats = {"exchange_s": 0.0, "grad_sync_s": 0.0}

    def _waited(self, pending: mappings.PendingExchange) -> Tensor:
        result = pending.wait(self.exchange_timeout)
        self._stats["exchange_s"] += pending.seconds
        pending.seconds = 0.0
        return result

    # ---- forward with autograd exchanges ----
    def _exchange(self, point: str, tensor: Tensor) -> Tensor:
        group = self.groups.pair_group
        if mappings.group_size(group) == 1:
            return tensor
        fn = mappings.gather_logits_from_tower_pair if point == "logits" else mappings.gather_from_tower_pair
        start = time.perf_counter()
        result = fn(tensor, group, EXCHANGE_DIM, point, self.exchange_timeout)
        self._stats["exchange_s"] += time.perf_counter() - start
        return result

    def forward(self, images: Tensor) -> Tensor:
        """Full logits (N x num_classes), identical on every tower of the replica."""
        return self.tower.forward_staged(images, self._exchange)

    # ---- pipelined training step ----
    def _split(self, images: Tensor, labels: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        n = images.shape[0]
        if labels.shape[0] != n:
            raise ValueError(f"images ({n}) and labels ({labels.shape[0]}) differ in batch size")
        if n % self.microbatches:
            raise ValueError(f"replica batch {n} is not divisible by parallel.microbatches={self.microbatches}")
        size = n // self.microbatches
        return list(images.split(size)), list(labels.split(size))

    def forward_backward(self, images: Tensor, labels: Tensor,
                         loss_scale: float | None = None) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy over the replica batch and its detached full logits; accumulates the
        full-batch gradient into the tower's .grad (each micro-batch loss is scaled by its share).
        loss_scale: fp16 loss scaling (train/precision.py): the gradients come out multiplied by it."""
        if self._pending_sync:
            raise RuntimeError("call sync_gradients() before the next forward_backward()")
        xs, ys = self._split(images, labels)
        n, group, tag = images.shape[0], self.groups.pair_group, EXCHANGE_POINTS
        inputs: list[list[Tensor]] = [[None] * len(xs) for _ in range(NUM_STAGES)]
        outputs: list[list[Tensor]] = [[None] * len(xs) for _ in range(NUM_STAGES)]
        pending: list = [None] * len(xs)
        for s in range(NUM_STAGES):
            for m, x in enumerate(xs):
                if s > 0:
                    x = self._waited(pending[m]).detach().requires_grad_(True)
                inputs[s][m] = x
                outputs[s][m] = out = self.tower.stage(s, x)
                pending[m] = mappings.start_gather(out.detach(), group, EXCHANGE_DIM,
                                                   f"{tag[s]} forward mb {m} step {self.step}")
        losses, logits = [], []
        for m in range(len(xs)):
            full = self._waited(pending[m]).detach().requires_grad_(True)
            loss = F.cross_entropy(full, ys[m], reduction="sum") / n
            (loss if loss_scale is None else loss * loss_scale).backward()
            losses.append(loss.detach())
            logits.append(full.detach())
            # forward: all-gather; backward: local slice (the loss is replicated on every tower)
            pending[m] = mappings.local_slice(full.grad, group, EXCHANGE_DIM)
        for s in reversed(range(NUM_STAGES)):
            for m in range(len(xs)):
                grad = pending[m] if s == NUM_STAGES - 1 else self._waited(pending[m])
                torch.autograd.backward(outputs[s][m], grad)
                outputs[s][m] = None
                if s > 0:
                    pending[m] = mappings.start_reduce_scatter(
                        inputs[s][m].grad, group, EXCHANGE_DIM, f"{tag[s - 1]} backward mb {m} step {self.step}")
                    inputs[s][m] = None
            if self.overlap_grad_sync:
                self._launch_grad_sync(s)
        self.step += 1
        return torch.stack(losses).sum(), torch.cat(logits)

    # ---- data-parallel gradient sync ----
    def _launch_grad_sync(self, stage: int) -> None:
        group = self.groups.dp_group
        if mappings.group_size(group) == 1:
            return
        grads = []
        for name, param in self.tower.stage_parameters(stage):
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        pending = mappings.start_gradient_average(grads, group, f"grad sync stage {stage} step {self.step}")
        self._stats["grad_sync_s"] += pending.seconds
        pending.seconds = 0.0
        self._pending_sync.append(pending)

    def sync_gradients(self) -> None:
        """Average gradients across replicas: finish the all-reduces forward_backward launched, or
        (after a plain forward()/backward()) run them now."""
        if not self._pending_sync:
            for stage in range(NUM_STAGES):
                self._launch_grad_sync(stage)
        for pending in self._pending_sync:
            pending.wait(self.exchange_timeout)
            self._stats["grad_sync_s"] += pending.seconds
        self._pending_sync = []
