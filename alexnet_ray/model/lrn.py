"""Local response normalisation (paper §3.3) as one autograd Function: the windowed sum of squares is
computed once, and backward is analytic over what forward saved.

`torch.nn.functional.local_response_norm` builds LRN from square, pad, avg_pool3d, mul, add, pow and
div: seven passes over the activations forward, as many again backward, each saving its own tensors.
With b = a * inv, inv = d^-beta, d = k + alpha/n * (sum of a^2 over the window):

    forward:  d, inv and q = inv / d = d^(-beta-1); saves a, inv, q
    backward: grad_a = g * inv - 2 beta alpha/n * a * (sum over the transposed window of g * a * q)

The window is torch's: channel c sums channels c - n//2 .. c + (n-1)//2, zeros past the edges, and it
stays inside each of `groups` equal channel groups (one tower's maps, as each of the paper's GPUs
normalised its own). Sums run in fp32 (fp64 for fp64); saved tensors keep the input's dtype.

On the CPU the tensor goes through in blocks (a few images, or rows of pixels of one, all channels)
small enough that a block's intermediates stay in cache; on other devices, and under torch.compile,
in one piece.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements per block on the CPU: a block's ~6 tensors stay in cache, and each op is still big enough
# that dispatch and handing work to the threads cost little. Measured on a busy 2-core machine (paper
# model, batch 64): 2^18..2^20 about 15% faster than one piece; 2^15 twice as slow as one piece.
BLOCK_ELEMENTS = 1 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _grouped(t: Tensor, groups: int) -> Tensor:
    """N x C x ... as N x groups x C/groups x (pixels): a view for NCHW and channels-last alike."""
    t = t.unflatten(1, (groups, -1))
    return t.reshape(*t.shape[:3], -1)


def _dense(x: Tensor) -> Tensor:
    """x, or a contiguous copy unless it is contiguous or channels-last (outputs are allocated like x,
    and _grouped must view them)."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _blocks(x4: Tensor):
    """Index tuples covering N x G x C x L in cache-sized blocks (one block off the CPU or compiling)."""
    n, length = x4.shape[0], x4.shape[3]
    if x4.device.type != "cpu" or torch.compiler.is_compiling():
        return [(slice(None),)]
    per_pixel = x4.shape[1] * x4.shape[2]
    pixels = max(1, BLOCK_ELEMENTS // per_pixel)
    if pixels >= length:
        rows = max(1, pixels // length)
        return [(slice(i, i + rows),) for i in range(0, n, rows)]
    return [(i, slice(None), slice(None), slice(j, j + pixels)) for i in range(n) for j in range(0, length, pixels)]


def _offsets(size: int) -> list[int]:
    """Channel c's window is c + o for o in [-(size//2), (size-1)//2]; the nonzero offsets."""
    return [-o for o in range(1, size // 2 + 1)] + list(range(1, (size - 1) // 2 + 1))


def _add_shifted(out: Tensor, a: Tensor, b: Tensor, offset: int, value: float, shift_a: bool) -> None:
    """out[c] += value * a[c (+ offset if shift_a)] * b[c + offset] along the channel dim (-2),
    where c + offset is a channel."""
    dim, n = -2, out.shape[-2]
    width = n - abs(offset)
    if width <= 0:
        return
    lo_out, lo_in = (0, offset) if offset > 0 else (-offset, 0)
    src_a = a.narrow(dim, lo_in if shift_a else lo_out, width)
    out.narrow(dim, lo_out, width).addcmul_(src_a, b.narrow(dim, lo_in, width), value=value)


def _forward_block(x: Tensor, size: int, scale: float, beta: float, k: float, need_q: bool):
    """(b, inv, q) of one block in x's dtype (the compute dtype); channels on dim -2."""
    d = torch.addcmul(torch.full((), k, dtype=x.dtype, device=x.device), x, x, value=scale)
    for offset in _offsets(size):
        _add_shifted(d, x, x, offset, scale, shift_a=True)
    inv = d.pow(-beta)
    return x * inv, inv, (inv / d if need_q else None)


def _backward_block(g: Tensor, x: Tensor, inv: Tensor, q: Tensor, size: int, scale: float, beta: float) -> Tensor:
    value = -2.0 * scale * beta
    t = g * x
    t.mul_(q)
    out = g * inv
    out.addcmul_(x, t, value=value)
    # forward's offset o read channel c + o into c, so backward sends c's term back: offset -o
    for offset in _offsets(size):
        _add_shifted(out, x, t, -offset, value, shift_a=False)
    return out


class _FusedLRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> Tensor:
        compute = _compute_dtype(x.dtype)
        scale = alpha / size
        need_grad = ctx.needs_input_grad[0]
        x = _dense(x)
        x4 = _grouped(x, groups)
        blocks = _blocks(x4)
        if len(blocks) == 1:
            b, inv, q = _forward_block(x4.to(compute), size, scale, beta, k, need_grad)
            y = b.to(x.dtype).reshape(x.shape)
            if need_grad:
                inv, q = (t.to(x.dtype).reshape(x.shape) for t in (inv, q))
        else:
            y = torch.empty_like(x)
            inv = torch.empty_like(x) if need_grad else None
            q = torch.empty_like(x) if need_grad else None
            y4 = _grouped(y, groups)
            inv4 = _grouped(inv, groups) if need_grad else None
            q4 = _grouped(q, groups) if need_grad else None
            for index in blocks:
                b, inv_b, q_b = _forward_block(x4[index].to(compute), size, scale, beta, k, need_grad)
                y4[index].copy_(b)
                if need_grad:
                    inv4[index].copy_(inv_b)
                    q4[index].copy_(q_b)
        if need_grad:
            ctx.save_for_backward(x, inv, q)
        ctx.size, ctx.scale, ctx.beta, ctx.groups = size, scale, beta, groups
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, inv, q = ctx.saved_tensors
        compute = _compute_dtype(x.dtype)
        x4, g4, inv4, q4 = (_grouped(t, ctx.groups) for t in (x, grad, inv, q))
        blocks = _blocks(x4)
        args = (ctx.size, ctx.scale, ctx.beta)
        if len(blocks) == 1:
            dx = _backward_block(g4.to(compute), x4.to(compute), inv4.to(compute), q4.to(compute), *args)
            return dx.to(x.dtype).reshape(x.shape), None, None, None, None, None
        dx = torch.empty_like(x)
        dx4 = _grouped(dx, ctx.groups)
        for index in blocks:
            dx4[index].copy_(_backward_block(g4[index].to(compute), x4[index].to(compute), inv4[index].to(compute),
                                             q4[index].to(compute), *args))
        return dx, None, None, None, None, None


def local_response_norm(x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0,
                        groups: int = 1) -> Tensor:
    """`torch.nn.functional.local_response_norm(x, size, alpha, beta, k)` applied to each of `groups`
    equal channel groups of an N x C x ... tensor, in one fused pass each way."""
    if x.dim() < 3:
        raise ValueError(f"local_response_norm needs N x C x ... input, got shape {tuple(x.shape)}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} LRN groups")
    if x.numel() == 0:
        return x
    return _FusedLRN.apply(x, size, alpha, beta, k, groups)
