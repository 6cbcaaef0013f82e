"""Dropout for CPU training whose mask costs almost nothing.

PyTorch draws a dropout mask on the CPU one random number at a time, which costs more than the
arithmetic around it (docs/benchmarks.md has the measurements). Here element i of a call is
kept when mix(i · m + a) is at least p · 2^32, where mix is a 32-bit xor-shift-multiply mixer and
the offset a and odd multiplier m are drawn per call (the multiplier keeps two calls' masks from
being shifted copies of one sequence); the native kernel computes it sixteen elements at a time.
The seeds come from PyTorch's generator, so runs are reproducible and resume exactly; the
backward pass recomputes the mask from the seeds instead of storing it.

`keep_mask` computes the same mask with PyTorch ops: it is the reference the kernel is tested
against, not a fallback.

Without the kernels, `BitsDropout` is the cheaper mask in PyTorch ops: PyTorch's generator fills
64 random bits per draw, cheaply, where `nn.Dropout` pays one draw per element; each 16 bits
decide one element. The rate is then p rounded to a multiple of 2^-16 (under 1e-5 from p) and
the kept elements are scaled by the rounded rate, so the expectation is exact.
"""

from __future__ import annotations

import math

import torch
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
    # index · m can pass 2^63 and wrap; its low 32 bits, all that is kept, are still exact.
    h = _mix((index * (seed_b | 1) + seed_a) & _MASK32)
    return h >= drop_threshold(p)


def drop_threshold(p: float) -> int:
    """Hashes below this drop: p · 2^32."""
    return min(int(round(p * 2**32)), _MASK32)


def draw_seeds() -> tuple[int, int]:
    """A call's two mask seeds, from PyTorch's generator (so a resumed run draws the same)."""
    seed_a, seed_b = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return seed_a, seed_b


class _HashDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed_a: int, seed_b: int) -> Tensor:
        ctx.args = (p, seed_a, seed_b)
        return native.dropout(x.contiguous(), drop_threshold(p), 1.0 / (1.0 - p), seed_a, seed_b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, seed_a, seed_b = ctx.args
        grad_x = native.dropout(grad.contiguous(), drop_threshold(p), 1.0 / (1.0 - p),
                                seed_a, seed_b)
        return grad_x, None, None, None


class HashDropout(nn.Dropout):
    """`nn.Dropout` whose mask is the hash above, computed by the native kernel, for contiguous
    float32 or bf16 CPU tensors while training; anything else goes to `nn.Dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if (not self.training or self.p == 0.0 or x.device.type != "cpu"
                or x.dtype not in (torch.float32, torch.bfloat16) or self.inplace
                or not 0 < x.numel() < 2**32):  # the hash counts elements in 32 bits
            return super().forward(x)
        seed_a, seed_b = draw_seeds()
        return _HashDropout.apply(x, self.p, seed_a, seed_b)


def bits_threshold(p: float) -> tuple[int, float]:
    """(t, q): an element whose 16 random bits, read as a signed int16, fall below t drops, which
    happens with probability q = p rounded to a multiple of 2^-16."""
    drops = min(max(round(p * 65536), 0), 65535)
    return drops - 32768, drops / 65536


def bits_keep_mask(shape: torch.Size, p: float) -> tuple[Tensor, float]:
    """A bool keep mask of `shape` from 16 random bits per element, and the drop rate it has."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)
    threshold, q = bits_threshold(p)
    keep = words.view(torch.int16)[:n].view(shape) >= threshold
    return keep, q


class _BitsDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        keep, q = bits_keep_mask(x.shape, p)
        scale = 1.0 / (1.0 - q)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


class BitsDropout(nn.Dropout):
    """`nn.Dropout` with masks of 16 random bits per element, for float CPU tensors while
    training; anything else goes to `nn.Dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if (not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace
                or not x.is_floating_point()):
            return super().forward(x)
        return _BitsDropout.apply(x, self.p)
