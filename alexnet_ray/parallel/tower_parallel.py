"""TowerParallel: one Tower in a process group, with the micro-batch schedule and gradient sync.

`forward()` runs the stages with the autograd exchanges of mappings.py (so `loss.backward()` on it
is correct too). `forward_backward()` runs a pipelined step the way torch.distributed.pipelining
does: a schedule (`fill_drain_schedule`) is a plain list of actions — forward stage s of
micro-batch m, the loss of m, backward stage s of m, sync stage s's gradients — and a short loop
fires them. Each forward or backward action starts its exchange without waiting; the next action
computes while the bytes move, and the action that needs them waits. Stage s's data-parallel
all-reduce starts as soon as its gradients are final, overlapping the backward of earlier stages;
`sync_gradients()` waits for it.

One step equals the single model's step on the global batch, whatever the layout: each
micro-batch's loss is its cross-entropy sum over the global batch's row count (replicas may hold
unequal last batches, and micro-batches of one batch may differ by a row), and replicas then sum
their gradients. Dropout is keyed by (seed, epoch, step) and each micro-batch's global row offset.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet_ray.model import EXCHANGE_DIM, EXCHANGE_POINTS, NUM_STAGES, Tower
from alexnet_ray.parallel import mappings
from alexnet_ray.parallel.topology import ParallelGroups, check_microbatches


@dataclass(frozen=True)
class Action:
    """One step of a schedule: "F" forward stage, "L" loss, "B" backward stage, "S" gradient sync."""

    kind: str
    stage: int | None = None
    microbatch: int | None = None

    def __str__(self) -> str:
        stage = "" if self.stage is None else str(self.stage)
        return f"{self.kind}{stage}" + ("" if self.microbatch is None else f"m{self.microbatch}")


def fill_drain_schedule(stages: int, microbatches: int) -> list[Action]:
    """GPipe order: each stage over every micro-batch (micro-batch m's exchange is in flight while
    the stage runs on m + 1), every loss, then each stage's backward in reverse over every
    micro-batch, with that stage's gradient sync right after its last backward."""
    mbs = range(microbatches)
    actions = [Action("F", s, m) for s in range(stages) for m in mbs]
    actions += [Action("L", None, m) for m in mbs]
    for s in reversed(range(stages)):
        actions += [Action("B", s, m) for m in mbs] + [Action("S", s)]
    return actions


@dataclass
class MicroBatch:
    """A micro-batch's rows and what its forward left for its backward."""

    index: int
    images: Tensor
    labels: Tensor
    row_offset: int  # its first row's place in the step's global batch
    inputs: list = field(default_factory=lambda: [None] * NUM_STAGES)  # per stage: the leaf it read
    outputs: list = field(default_factory=lambda: [None] * NUM_STAGES)  # per stage: the graph's root
    inflight: mappings.PendingExchange | None = None  # the exchange leaving its last action
    loss_sum: Tensor | None = None
    logits: Tensor | None = None


def microbatch_count(rows: int, microbatches: int, max_rows: int | None = None) -> int:
    """How many micro-batches `rows` rows make: `microbatches`, more when one would exceed
    `max_rows`, and never more than the rows."""
    parts = microbatches if max_rows is None else max(microbatches, -(-rows // max_rows))
    return max(1, min(parts, rows))


def split_microbatches(images: Tensor, labels: Tensor, microbatches: int, row_offset: int,
                       max_rows: int | None = None) -> list[MicroBatch]:
    """Near-equal micro-batches (sizes differ by at most one row) of at most `max_rows` rows each;
    one per row when the batch has fewer rows than `microbatches`."""
    n = images.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"images ({n}) and labels ({labels.shape[0]}) differ in batch size")
    if n == 0:
        raise ValueError("an empty batch has nothing to train on")
    parts = microbatch_count(n, microbatches, max_rows)
    result, offset = [], row_offset
    for index, (x, y) in enumerate(zip(images.tensor_split(parts), labels.tensor_split(parts))):
        result.append(MicroBatch(index, x, y, offset))
        offset += x.shape[0]
    return result


class TowerParallel(nn.Module):
    def __init__(self, tower: Tower, groups: ParallelGroups, microbatches: int = 1,
                 exchange_timeout: float | None = None, overlap_grad_sync: bool = True,
                 microbatch_rows: int | None = None):
        super().__init__()
        check_microbatches(microbatches)
        if microbatch_rows is not None and microbatch_rows < 1:
            raise ValueError(f"microbatch_rows={microbatch_rows} must be at least 1")
        self.microbatch_rows = microbatch_rows  # a larger share is split into more micro-batches
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
        self._sync_divisor: int | None = None  # set when forward_backward left the all-reduces to sync_gradients
        self._dropout_step: tuple[int, int, int] | None = None  # (seed, epoch, step) of the step running
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
        """Full logits (N x num_classes), identical on every tower of the replica. Dropout uses the
        tower's key (`tower.set_dropout_step`), or ordinary dropout when it has none."""
        return self.tower.forward_staged(images, self._exchange)

    # ---- pipelined training step: the actions and the loop that fires them ----
    def _forward(self, s: int, mb: MicroBatch) -> None:
        if s == 0:
            x = mb.images
        else:
            x = self._waited(mb.inflight).detach().requires_grad_(True)
        if self._dropout_step is not None:
            self.tower.set_dropout_step(*self._dropout_step, row_offset=mb.row_offset, stage=s)
        mb.inputs[s], mb.outputs[s] = x, self.tower.stage(s, x)
        label = f"{EXCHANGE_POINTS[s]} forward mb {mb.index} step {self.step}"
        mb.inflight = mappings.start_gather(mb.outputs[s].detach(), self.groups.pair_group, EXCHANGE_DIM, label)

    def _loss(self, mb: MicroBatch, global_rows: int, loss_scale: float | Tensor) -> None:
        full = self._waited(mb.inflight).detach().requires_grad_(True)
        loss_sum = F.cross_entropy(full, mb.labels, reduction="sum")
        (loss_sum * (loss_scale / global_rows)).backward()
        mb.loss_sum, mb.logits = loss_sum.detach(), full.detach()
        # forward: all-gather; backward: local slice (the loss is replicated on every tower)
        mb.inflight = mappings.completed(mappings.local_slice(full.grad, self.groups.pair_group, EXCHANGE_DIM))

    def _backward(self, s: int, mb: MicroBatch) -> None:
        torch.autograd.backward(mb.outputs[s], self._waited(mb.inflight))
        mb.outputs[s] = None
        if s > 0:
            label = f"{EXCHANGE_POINTS[s - 1]} backward mb {mb.index} step {self.step}"
            mb.inflight = mappings.start_reduce_scatter(mb.inputs[s].grad, self.groups.pair_group, EXCHANGE_DIM, label)
        mb.inputs[s] = None

    def forward_backward(self, images: Tensor, labels: Tensor, *, row_offset: int | None = None,
                         global_rows: int | None = None, dropout_step: tuple[int, int, int] | None = None,
                         loss_scale: float | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Accumulate this replica's share of the global batch's gradient into the tower's .grad;
        return the replica batch's mean cross-entropy and its detached full logits.

        row_offset / global_rows: this replica's first row in the step's global batch, and that
        batch's rows (default: equal batches on every replica). dropout_step: (seed, epoch, step)
        keys the masks, so every layout drops the same units (default: ordinary dropout).
        loss_scale: multiplies the loss before backward (fp16 loss scaling, train/precision.py): the
        gradients come out multiplied by it.
        """
        if self._pending_sync:
            raise RuntimeError("call sync_gradients() before the next forward_backward()")
        n, replicas = images.shape[0], mappings.group_size(self.groups.dp_group)
        row_offset = self.groups.replica * n if row_offset is None else row_offset
        global_rows = n * replicas if global_rows is None else global_rows
        loss_scale = 1.0 if loss_scale is None else loss_scale
        if n == 0:  # past the rows of a short last batch: add nothing, still join the all-reduces
            return self._empty_share(images, labels)
        mbs = split_microbatches(images, labels, self.microbatches, row_offset, self.microbatch_rows)
        self._dropout_step = dropout_step
        try:
            for action in fill_drain_schedule(NUM_STAGES, len(mbs)):
                if action.kind == "F":
                    self._forward(action.stage, mbs[action.microbatch])
                elif action.kind == "L":
                    self._loss(mbs[action.microbatch], global_rows, loss_scale)
                elif action.kind == "B":
                    self._backward(action.stage, mbs[action.microbatch])
                elif self.overlap_grad_sync:
                    self._launch_grad_sync(action.stage, divisor=1)
        finally:
            self._dropout_step = None
        if not self.overlap_grad_sync:
            self._sync_divisor = 1
        self.step += 1
        loss = torch.stack([mb.loss_sum for mb in mbs]).sum() / n
        return loss, torch.cat([mb.logits for mb in mbs])

    def _empty_share(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        for param in self.tower.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        for stage in reversed(range(NUM_STAGES)):
            if self.overlap_grad_sync:
                self._launch_grad_sync(stage, divisor=1)
        if not self.overlap_grad_sync:
            self._sync_divisor = 1
        self.step += 1
        classes = self.tower.fc8.out_features * self.groups.topology.towers
        return images.new_zeros(()), images.new_zeros((0, classes))

    # ---- data-parallel gradient sync ----
    def _launch_grad_sync(self, stage: int, divisor: int) -> None:
        group = self.groups.dp_group
        if mappings.group_size(group) == 1:
            return
        grads = []
        for name, param in self.tower.stage_parameters(stage):
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        pending = mappings.start_gradient_sum(grads, group, f"grad sync stage {stage} step {self.step}", divisor)
        self._stats["grad_sync_s"] += pending.seconds
        pending.seconds = 0.0
        self._pending_sync.append(pending)

    def sync_gradients(self) -> None:
        """Finish the replicas' gradient all-reduces forward_backward launched (each replica's loss
        was scaled by its rows: the sum is the global batch's gradient), or, after a plain
        forward()/backward() on each replica's mean loss, run them now and average."""
        if not self._pending_sync:
            divisor = self._sync_divisor or mappings.group_size(self.groups.dp_group)
            for stage in range(NUM_STAGES):
                self._launch_grad_sync(stage, divisor)
        self._sync_divisor = None
        for pending in self._pending_sync:
            pending.wait(self.exchange_timeout)
            self._stats["grad_sync_s"] += pending.seconds
        self._pending_sync = []
