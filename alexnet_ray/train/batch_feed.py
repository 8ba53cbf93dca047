"""A replica's training batches on both of its towers, one step ahead, and the next epoch's early;
its evaluation batches (`eval_batches`) the same way, one at a time.

Tower 0 reads each batch from the loader; its partner receives the identical batch. Both know the
loader's plan (rows per batch, image size), so only the pixels, labels and lighting travel, and
batch k+1's broadcast is issued before batch k is handed out: the transfer runs (gloo and NCCL run
async collectives off the calling thread) while step k computes, instead of stalling step k+1.

`EarlyStart` begins an iterator in a background thread and holds its first item: the worker
starts the next epoch's loader before evaluating this one, so Ray Data's start-up for the next
epoch overlaps evaluation and the checkpoint rather than the first training step.
"""

from __future__ import annotations

import itertools
import threading
from typing import Iterator

import torch

from alexnet_ray.parallel.mappings import broadcast_from_tower0, start_broadcast_from_tower0
from alexnet_ray.preprocess import as_tensor
from alexnet_ray.train import fault_injection

_END = object()


def _receive_buffers(rows: int, image_size: int, device) -> list[torch.Tensor]:
    return [torch.empty((rows, image_size, image_size, 3), dtype=torch.uint8, device=device),
            torch.empty(rows, dtype=torch.int64, device=device),
            torch.empty((rows, 3), dtype=torch.float32, device=device)]


def _from_loader(batch: dict | None, step: int, sizes: list[int], image_size: int, device) -> list[torch.Tensor]:
    rows = sizes[step]
    if batch is None:
        raise RuntimeError(f"the training loader ended after {step} batches; its plan has {len(sizes)}")
    tensors = [as_tensor(batch["images"]).to(device), as_tensor(batch["labels"]).to(device),
               as_tensor(batch["lighting"]).to(device)]
    if tuple(tensors[0].shape) != (rows, image_size, image_size, 3):
        raise RuntimeError(f"training batch {step} has images {tuple(tensors[0].shape)}; the plan says "
                           f"{(rows, image_size, image_size, 3)}")
    return tensors


def training_batches(source: Iterator[dict] | None, sizes: list[int], image_size: int, groups,
                     device, timeout: float | None = None, label: str = "training batch") -> Iterator[list[torch.Tensor]]:
    """[images uint8 (N,H,W,3), labels int64 (N,), lighting float32 (N,3)] for each planned batch,
    on every tower of the replica. `source` (tower 0 only) yields the loader's batches. A partner
    waits at most `timeout` seconds for a batch (ExchangeTimeoutError naming "`label` <step>")."""

    def start(step: int):
        if groups.tower == 0:
            tensors = _from_loader(next(source, None), step, sizes, image_size, device)
        else:
            tensors = _receive_buffers(sizes[step], image_size, device)
        return start_broadcast_from_tower0(tensors, groups, label=f"{label} {step}")

    pending = start(0) if sizes else None
    for step in range(len(sizes)):
        following = start(step + 1) if step + 1 < len(sizes) else None
        yield pending.wait(timeout)
        pending = following
    if groups.tower == 0 and next(source, None) is not None:
        raise RuntimeError(f"the training loader has more than the {len(sizes)} planned batches")


def eval_batches(source: Iterator[dict] | None, groups, device, timeout: float | None = None,
                 epoch: int = 0) -> Iterator[list[torch.Tensor]]:
    """[images, labels] of each evaluation batch on every tower of the replica: tower 0 reads it,
    its partner receives it over the pair group (shapes travel too: ten-crop batches and the last
    batch differ), waiting at most `timeout` seconds. An empty broadcast marks the end."""
    for index in itertools.count():
        fault_injection.point("eval", epoch, index)
        tensors = []
        if groups.tower == 0:
            batch = next(source, None)
            if batch is not None:
                tensors = [as_tensor(batch["images"]).to(device), as_tensor(batch["labels"]).to(device)]
        received = broadcast_from_tower0(tensors, groups, label=f"epoch {epoch + 1} evaluation batch {index}",
                                         timeout=timeout)
        if not received:
            return
        yield received


class EarlyStart:
    """Iterates `iterator` once: its first item is fetched now, in a background thread."""

    def __init__(self, iterator: Iterator):
        self._iterator, self._first, self._error = iterator, _END, None
        self._thread = threading.Thread(target=self._fetch_first, name="next-epoch-loader", daemon=True)
        self._thread.start()

    def _fetch_first(self) -> None:
        try:
            self._first = next(self._iterator, _END)
        except BaseException as error:  # re-raised in the consuming thread
            self._error = error

    def __iter__(self) -> Iterator:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is not _END:
            yield self._first
            yield from self._iterator
