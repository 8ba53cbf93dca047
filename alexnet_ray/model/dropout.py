"""Dropout whose mask belongs to the training step, not to a process.

An element's fate is a pure function of (seed, epoch, step, layer, global row, global column): a
32-bit integer hash of its position in the *global* batch's activation, keyed by the step. Any rank
computes only its own slice (its replica's rows, its tower's columns), on its own device, in one
pass of integer ops, and the slices of all ranks together are exactly the mask the single reference
model draws for the whole global batch. So every towers x replicas layout and every micro-batch
count drops the same units, and a run resumed after a lost worker draws the same masks again.

The hash keeps every intermediate below 2**63 (32-bit values times a 27-bit constant), so int64
arithmetic gives the same bits on every CPU and GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # Thomas Mueller's 32-bit integer hash constant


def _mix32(x: Tensor) -> Tensor:
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def _mix32_int(x: int) -> int:
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def step_key(seed: int, epoch: int, step: int, layer: int) -> tuple[int, int]:
    """Two 32-bit words that key one layer's mask in one training step."""
    words = (seed & _MASK32, seed >> 32, epoch, step, layer)
    a = b = 0x9E3779B9
    for word in words:
        if word < 0 or word > _MASK32:
            raise ValueError(f"dropout key part {word} outside 0..2**32-1 (seed, epoch, step, layer)")
        a = _mix32_int(a ^ word)
        b = _mix32_int((b + word + 0x7F4A7C15) & _MASK32)
    return a, b


def keep_mask(words: Tensor, rows: int, col_offset: int, cols: int, width: int, p: float) -> Tensor:
    """Bool mask (rows x cols) of the kept elements of a `width`-wide activation at global rows
    words[2].., columns col_offset..; words[0:2] is the `step_key`. Kept with probability 1 - p.
    The key and row offset are a tensor so that a compiled graph takes new steps without recompiling."""
    r = torch.arange(rows, dtype=torch.int64, device=words.device) + words[2]
    c = torch.arange(col_offset, col_offset + cols, dtype=torch.int64, device=words.device)
    position = (r[:, None] * width + c[None, :]) & _MASK32
    bits = _mix32(_mix32(position ^ words[0]) ^ words[1])
    return bits >= round(p * (1 << 32))


class StepDropout(nn.Module):
    """Dropout over this module's columns [col_offset, col_offset + cols) of a `width`-wide layer.

    Keyed (`set_key`, normally through the model's `set_dropout_step`): the mask comes from
    `keep_mask` at the global rows starting at `row_offset`. Not keyed: a fresh key is drawn from
    torch's generator on every call, which makes it ordinary dropout.
    """

    def __init__(self, p: float, layer: int, col_offset: int, width: int):
        super().__init__()
        self.p, self.layer, self.col_offset, self.width = float(p), layer, col_offset, width
        self.keyed = False
        self._step, self._key = None, (0, 0)  # the (seed, epoch, step) keyed last and its step_key
        self.register_buffer("words", torch.zeros(3, dtype=torch.int64), persistent=False)

    def set_key(self, seed: int, epoch: int, step: int, row_offset: int = 0) -> None:
        if not 0 <= row_offset < (1 << 32) // self.width:
            raise ValueError(f"dropout row offset {row_offset} x width {self.width} exceeds 2**32 elements")
        if self._step != (seed, epoch, step):  # micro-batches of one step share the key
            self._step, self._key = (seed, epoch, step), step_key(seed, epoch, step, self.layer)
        a, b = self._key
        self.words.copy_(torch.tensor([a, b, row_offset], dtype=torch.int64))
        self.keyed = True

    def clear_key(self) -> None:
        self.keyed = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        words = self.words
        if not self.keyed:
            words = torch.cat([torch.randint(0, 1 << 32, (2,), dtype=torch.int64), torch.zeros(1, dtype=torch.int64)])
            words = words.to(x.device)
        keep = keep_mask(words, x.shape[0], self.col_offset, x.shape[1], self.width, self.p)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer}, col_offset={self.col_offset}, width={self.width}"
