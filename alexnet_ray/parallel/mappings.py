"""Every collective of the project, in one place (Megatron-LM tensor_parallel/mappings.py style).

Cross-connect exchanges are point-to-point: a list of labelled isend/irecv ops is built (sorted by
peer), then fired in one `batch_isend_irecv`, as torch/distributed/pipelining/stage.py does; the
returned `PendingExchange` is waited on later, so compute can run while the bytes move.  Each wait
takes an optional timeout and raises `ExchangeTimeoutError` naming the op (layer, direction, peer).
A group of size 1 does no communication at all.  Receive buffers are allocated like the tensor
being sent (same device and dtype), so CUDA tensors travel over NCCL and CPU tensors over gloo.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor


class ExchangeTimeoutError(RuntimeError):
    """A cross-connect or sync did not complete within its timeout, or failed because the peer's
    connection broke; the message names the op (layer, direction, micro-batch, step, peer rank).
    The pair's connection is not reusable afterwards: treat it as fatal."""


class WaitLimit(float):
    """A timeout in seconds that says what it is made of in the errors it ends in, e.g.
    WaitLimit(360, "run.storage_retry_s=300 + parallel.exchange_timeout_s=60")."""

    def __new__(cls, seconds: float, made_of: str = ""):
        limit = super().__new__(cls, seconds)
        limit.made_of = made_of
        return limit

    def __reduce__(self):
        return WaitLimit, (float(self), self.made_of)


def _limit(timeout: float) -> str:
    made_of = getattr(timeout, "made_of", "")
    return f"{timeout:g}s" + (f" ({made_of})" if made_of else "")


@dataclass
class LabelledOp:
    op: dist.P2POp
    label: str


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_ranks(group) -> tuple[int, list[int]]:
    """(this rank's index in `group`, the group's global ranks in group order)."""
    return dist.get_rank(group), dist.get_process_group_ranks(group)


@dataclass
class PendingExchange:
    """In-flight P2P ops; `wait()` returns the finished result."""

    works: list = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    finish: Callable[[], Tensor] | None = None
    seconds: float = 0.0  # time spent launching and waiting, for stats
    _result: Tensor | None = None

    def wait(self, timeout: float | None = None) -> Tensor:
        if self.finish is None:  # already finished, or nothing was sent (group of one)
            return self._result
        start = time.perf_counter()
        for work, label in zip(self.works, self.labels):
            _wait(work, label, timeout)
        self._result, self.finish, self.works = self.finish(), None, []
        self.seconds += time.perf_counter() - start
        return self._result


def _wait(work, label: str, timeout: float | None) -> None:
    if timeout is None:
        work.wait()
        return
    start = time.perf_counter()
    try:
        completed = work.wait(timedelta(seconds=timeout))
    except RuntimeError as error:
        waited = time.perf_counter() - start
        # the peer's connection broke before the timeout (the backend's own timeout, the group's, may
        # fire first: it counts from when the op was issued, which can be before this wait)
        if waited < 0.9 * timeout and "timed out" not in str(error).lower():
            raise ExchangeTimeoutError(f"{label}: failed after {waited:.1f}s, before the {_limit(timeout)} timeout "
                                       f"({error})") from error
        raise ExchangeTimeoutError(f"{label}: not complete after {_limit(timeout)} ({error})") from error
    if completed is False:
        raise ExchangeTimeoutError(f"{label}: not complete after {_limit(timeout)}")


def build_exchange_ops(send: dict[int, Tensor], recv: dict[int, Tensor], group, label: str) -> list[LabelledOp]:
    """Labelled isend/irecv ops for {global peer rank: tensor}, sorted by peer (recv before send per peer)."""
    ops = []
    for peer in sorted(set(send) | set(recv)):
        if peer in recv:
            ops.append(LabelledOp(dist.P2POp(dist.irecv, recv[peer], peer, group), f"{label}: recv from rank {peer}"))
        if peer in send:
            ops.append(LabelledOp(dist.P2POp(dist.isend, send[peer], peer, group), f"{label}: send to rank {peer}"))
    return ops


def fire(ops: list[LabelledOp], finish: Callable[[], Tensor]) -> PendingExchange:
    """Launch the ops in one batch_isend_irecv; nothing is waited on."""
    start = time.perf_counter()
    works = dist.batch_isend_irecv([o.op for o in ops]) if ops else []
    labels = [o.label for o in ops]
    if len(works) != len(labels):  # NCCL coalesces the batch into one work
        labels = ["; ".join(labels)] * len(works)
    return PendingExchange(works=works, labels=labels, finish=finish, seconds=time.perf_counter() - start)


def completed(tensor: Tensor) -> PendingExchange:
    """An exchange that is already finished (a group of one, or a purely local result)."""
    return PendingExchange(_result=tensor)


def start_gather(local: Tensor, group, dim: int = 1, label: str = "gather") -> PendingExchange:
    """Non-blocking all-gather of every tower's `local` along `dim`, concatenated in tower order."""
    if group_size(group) == 1:
        return completed(local)
    me, ranks = _group_ranks(group)
    local = local.contiguous()
    parts = {rank: torch.empty_like(local) for i, rank in enumerate(ranks) if i != me}
    ops = build_exchange_ops({peer: local for peer in parts}, parts, group, label)
    parts[ranks[me]] = local
    return fire(ops, lambda: torch.cat([parts[rank] for rank in ranks], dim=dim))


def start_reduce_scatter(full: Tensor, group, dim: int = 1, label: str = "reduce-scatter") -> PendingExchange:
    """Non-blocking reduce-scatter along `dim`: tower i gets the sum over towers of chunk i."""
    if group_size(group) == 1:
        return completed(full)
    me, ranks = _group_ranks(group)
    chunks = full.chunk(len(ranks), dim=dim)
    send = {rank: chunks[i].contiguous() for i, rank in enumerate(ranks) if i != me}
    recv = {rank: torch.empty_like(send[rank]) for rank in send}
    ops = build_exchange_ops(send, recv, group, label)

    def finish() -> Tensor:
        total = chunks[me].clone()
        for rank in ranks:
            if rank in recv:
                total += recv[rank]
        return total

    return fire(ops, finish)


def local_slice(full: Tensor, group, dim: int = 1) -> Tensor:
    """This tower's chunk of `full` along `dim` (no communication)."""
    if group_size(group) == 1:
        return full
    me, ranks = _group_ranks(group)
    return full.chunk(len(ranks), dim=dim)[me].contiguous()


class _GatherFromTowerPair(torch.autograd.Function):
    """forward: all-gather the towers' halves along `dim`; backward: reduce-scatter the gradient
    (each tower's next layer read the whole input, so the partner's contribution to my half is summed in)."""

    @staticmethod
    def forward(ctx, local, group, dim, label, timeout):
        ctx.group, ctx.dim, ctx.label, ctx.timeout = group, dim, label, timeout
        return start_gather(local, group, dim, f"{label} forward").wait(timeout)

    @staticmethod
    def backward(ctx, grad):
        pending = start_reduce_scatter(grad, ctx.group, ctx.dim, f"{ctx.label} backward")
        return pending.wait(ctx.timeout), None, None, None, None


class _GatherLogitsFromTowerPair(torch.autograd.Function):
    """forward: all-gather the towers' logit halves along `dim`; backward: take the local slice of
    the gradient (the loss is computed identically on every tower, so summing would double it)."""

    @staticmethod
    def forward(ctx, local, group, dim, label, timeout):
        ctx.group, ctx.dim = group, dim
        return start_gather(local, group, dim, f"{label} forward").wait(timeout)

    @staticmethod
    def backward(ctx, grad):
        return local_slice(grad, ctx.group, ctx.dim), None, None, None, None


def gather_from_tower_pair(local: Tensor, group, dim: int = 1, label: str = "gather",
                           timeout: float | None = None) -> Tensor:
    """forward: all-gather along `dim`; backward: reduce-scatter. Identity for a group of one."""
    if group_size(group) == 1:
        return local
    return _GatherFromTowerPair.apply(local, group, dim, label, timeout)


def gather_logits_from_tower_pair(local: Tensor, group, dim: int = 1, label: str = "logits",
                                  timeout: float | None = None) -> Tensor:
    """forward: all-gather along `dim`; backward: local slice. Identity for a group of one."""
    if group_size(group) == 1:
        return local
    return _GatherLogitsFromTowerPair.apply(local, group, dim, label, timeout)


# ---- collectives outside the autograd graph ---------------------------------------------------

def _device_for(group, tensors: list[Tensor]) -> torch.device:
    if tensors:
        return tensors[0].device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
           torch.int32, torch.int64, torch.bool]
_MAX_DIMS = 8


def broadcast_from_tower0(tensors: list[Tensor], groups, label: str = "broadcast",
                          timeout: float | None = None) -> list[Tensor]:
    """Tower 0's tensors, on every tower of the replica (e.g. the replica's batch). Partners may pass
    an empty list (or placeholders): shapes and dtypes travel first, then the data (forward only).
    Each broadcast waits at most `timeout` seconds (ExchangeTimeoutError naming `label`)."""
    group = groups.pair_group
    if group_size(group) == 1:
        return list(tensors)
    src = groups.pair_ranks[0]
    is_src = dist.get_rank() == src
    device = _device_for(group, list(tensors))

    def broadcast(tensor: Tensor, what: str) -> None:
        work = dist.broadcast(tensor, src, group=group, async_op=True)
        _wait(work, f"{label} {what}: broadcast from rank {src}", timeout)

    count = torch.tensor([len(tensors) if is_src else 0], dtype=torch.int64, device=device)
    broadcast(count, "count")
    header = torch.zeros(int(count.item()), 2 + _MAX_DIMS, dtype=torch.int64, device=device)
    if is_src:
        for row, tensor in zip(header, tensors):
            if tensor.dim() > _MAX_DIMS or tensor.dtype not in _DTYPES:
                raise ValueError(f"broadcast_from_tower0 cannot send a {tensor.dtype} tensor of {tensor.dim()} dims")
            row[0], row[1] = _DTYPES.index(tensor.dtype), tensor.dim()
            row[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    broadcast(header, "shapes")
    result = []
    for index, row in enumerate(header.tolist()):
        if is_src:
            tensor = tensors[index].to(device).contiguous()
        else:
            tensor = torch.empty(row[2:2 + row[1]], dtype=_DTYPES[row[0]], device=device)
        broadcast(tensor, f"tensor {index}")
        result.append(tensor)
    return result


@dataclass
class PendingBroadcast:
    """Tensors being broadcast from tower 0 of the pair; `wait()` returns them once they have arrived."""

    tensors: list[Tensor]
    works: list = field(default_factory=list)
    label: str = "broadcast"

    def wait(self, timeout: float | None = None) -> list[Tensor]:
        for work in self.works:
            _wait(work, self.label, timeout)
        self.works = []
        return self.tensors


def start_broadcast_from_tower0(tensors: list[Tensor], groups, label: str = "batch") -> PendingBroadcast:
    """forward: tower 0's tensors into its partners' `tensors` (preallocated, same shapes and dtypes,
    so nothing but the data travels), asynchronously; backward: none (data, not activations).
    Issue the next batch's broadcast before computing on this one and the transfer overlaps the step."""
    group = groups.pair_group
    if group_size(group) == 1:
        return PendingBroadcast(list(tensors))
    src = groups.pair_ranks[0]
    works = [dist.broadcast(t, src, group=group, async_op=True) for t in tensors]
    return PendingBroadcast(list(tensors), works, f"{label}: broadcast from rank {src}")


def _layout_digest(state_dict: dict[str, Tensor], device) -> Tensor:
    """32 bytes naming every entry's name, shape and dtype: equal digests, equal layouts."""
    layout = repr([(name, tuple(t.shape), str(t.dtype)) for name, t in state_dict.items()]).encode()
    return torch.tensor(list(hashlib.sha256(layout).digest()), dtype=torch.uint8, device=device)


def gather_tower_state_dicts(state_dict: dict[str, Tensor], groups, label: str = "state dict",
                             timeout: float | None = None) -> list[dict[str, Tensor]] | None:
    """On tower 0: [tower 0's dict, tower 1's dict, ...]; None elsewhere. Towers hold equal-shaped halves,
    so tower 0 receives into tensors shaped like its own; a digest of names and shapes is checked first.
    Each transfer waits at most `timeout` seconds (ExchangeTimeoutError naming `label` and the peer)."""
    group = groups.pair_group
    if group_size(group) == 1:
        return [dict(state_dict)]
    me, ranks = _group_ranks(group)
    device = _device_for(group, list(state_dict.values()))
    digest = _layout_digest(state_dict, device)
    if me == 0:
        digests = {rank: torch.empty_like(digest) for rank in ranks[1:]}
        ops = build_exchange_ops({}, digests, group, f"{label} layout")
    else:
        ops = build_exchange_ops({ranks[0]: digest}, {}, group, f"{label} layout")
    fire(ops, lambda: None).wait(timeout)
    if me == 0:
        for index, rank in enumerate(ranks[1:], start=1):
            if not torch.equal(digests[rank], digest):
                raise ValueError(f"tower {index}'s state dict names/shapes differ from tower 0's")
        recv = {rank: {n: torch.empty_like(t.contiguous()) for n, t in state_dict.items()} for rank in ranks[1:]}
        ops = [LabelledOp(dist.P2POp(dist.irecv, recv[rank][name], rank, group), f"{label} {name}: recv from rank {rank}")
               for rank in ranks[1:] for name in state_dict]
    else:
        sends = {n: t.detach().contiguous() for n, t in state_dict.items()}
        ops = [LabelledOp(dist.P2POp(dist.isend, sends[name], ranks[0], group), f"{label} {name}: send to rank {ranks[0]}")
               for name in state_dict]
    fire(ops, lambda: None).wait(timeout)
    if me != 0:
        return None
    return [dict(state_dict)] + [recv[rank] for rank in ranks[1:]]


def all_reduce_sum(tensor: Tensor, group, label: str = "all-reduce", timeout: float | None = None) -> Tensor:
    """Sum `tensor` in place over `group` (e.g. eval counts across replicas); returns it. Waits at most
    `timeout` seconds (ExchangeTimeoutError naming `label` and the group's ranks)."""
    if group_size(group) > 1:
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
        _wait(work, f"{label}: all-reduce over ranks {dist.get_process_group_ranks(group)}", timeout)
    return tensor


@dataclass
class PendingAllReduce:
    """Async all-reduces (sum) of gradient tensors; `wait()` divides them by `divisor` in place."""

    works: list
    tensors: list[Tensor]
    divisor: int
    label: str
    seconds: float = 0.0

    def wait(self, timeout: float | None = None) -> None:
        start = time.perf_counter()
        for work in self.works:
            _wait(work, self.label, timeout)
        if self.divisor != 1:
            for tensor in self.tensors:
                tensor.div_(self.divisor)
        self.works = []
        self.seconds += time.perf_counter() - start


def start_gradient_sum(grads: list[Tensor], group, label: str, divisor: int = 1) -> PendingAllReduce:
    """forward: async all-reduce (sum) of each gradient over the data-parallel group, divided by
    `divisor` on wait(); backward: none. Divisor 1 when each replica's loss was already scaled by
    its share of the global batch's rows (unequal batches weigh by rows); the group size to average
    losses that were each a replica's mean."""
    start = time.perf_counter()
    size = group_size(group)
    works = [dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group, async_op=True) for g in grads] if size > 1 else []
    return PendingAllReduce(works, grads if size > 1 else [], divisor, label, time.perf_counter() - start)
