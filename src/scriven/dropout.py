"""Dropout for CPU training whose mask costs almost nothing.

PyTorch draws a dropout mask on the CPU one random number at a time (about 7 ns an element:
dropout 0.1 made a translator's training step about 1.7x slower). Here element i of a call is
kept when a hash of (i, seed) is at least p · 2^32: two rounds of a 32-bit xor-shift-multiply
mixer, which the native kernel computes for sixteen elements at once. The seed is drawn from
PyTorch's generator, so runs are reproducible and resume exactly; the backward pass recomputes
the mask from the seed instead of storing it. Where the native kernels are not available the
same hash runs as PyTorch ops (same mask, slower); on GPUs this is `F.dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native

_MASK32 = 0xFFFFFFFF


def _mix(x: Tensor) -> Tensor:
    """The 32-bit mixer of kernels.c on int64 tensors holding values < 2^32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def keep_mask(n: int, p: float, seed_a: int, seed_b: int) -> Tensor:
    """(n,) bool: which elements a call with these seeds keeps (PyTorch ops)."""
    index = torch.arange(n, dtype=torch.int64)
    h = _mix(_mix((index + seed_a) & _MASK32) ^ seed_b)
    return h >= drop_threshold(p)


def drop_threshold(p: float) -> int:
    """Hashes below this drop: p · 2^32."""
    return min(int(round(p * 2**32)), _MASK32)


def _apply(x: Tensor, p: float, seed_a: int, seed_b: int) -> Tensor:
    x = x.contiguous()
    scale = 1.0 / (1.0 - p)
    lib = native.library() if x.dtype in (torch.float32, torch.bfloat16) else None
    if lib is not None:
        return native.dropout(lib, x, drop_threshold(p), scale, seed_a, seed_b)
    keep = keep_mask(x.numel(), p, seed_a, seed_b).view(x.shape)
    return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype))


class _HashDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed_a: int, seed_b: int) -> Tensor:
        ctx.args = (p, seed_a, seed_b)
        return _apply(x, p, seed_a, seed_b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _apply(grad, *ctx.args), None, None, None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Like `F.dropout(x, p, training)`: zero each element with probability p and scale the
    rest by 1 / (1 - p). On the CPU the mask comes from a hash (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    seed_a, seed_b = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return _HashDropout.apply(x, p, seed_a, seed_b)


class Dropout(nn.Module):
    """`nn.Dropout` with the hashed mask of `dropout` on the CPU."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
