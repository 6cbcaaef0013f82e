"""Dropout for CPU training whose mask costs almost nothing.

PyTorch draws a dropout mask on the CPU one random number at a time (about 7 ns an element:
dropout 0.1 made a translator's training step about 1.7x slower). Here element i of a call is
kept when mix(i · m + a) is at least p · 2^32, where mix is a 32-bit xor-shift-multiply mixer and
the offset a and odd multiplier m are drawn per call (the multiplier keeps two calls' masks from
being shifted copies of one sequence); the native kernel computes it for sixteen elements at
once. The seeds come from PyTorch's generator, so runs are reproducible and resume exactly; the
backward pass recomputes the mask from the seeds instead of storing it. Where the native kernels
are not available the same hash runs as PyTorch ops (same mask, slower); on GPUs this is
`F.dropout`.

The residual add that follows most dropouts (`x + dropout(h)`) and the ReLU that precedes the
feed-forward one (`dropout(relu(h))`) can be fused into the same pass: each is a trip through
memory saved, and the ReLU's backward pass reads the output's sign instead of re-hashing.
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
    # index · m can pass 2^63 and wrap; its low 32 bits, all that is kept, are still exact.
    h = _mix((index * (seed_b | 1) + seed_a) & _MASK32)
    return h >= drop_threshold(p)


def drop_threshold(p: float) -> int:
    """Hashes below this drop: p · 2^32."""
    return min(int(round(p * 2**32)), _MASK32)


def _apply(x: Tensor, p: float, seed_a: int, seed_b: int, residual: Tensor | None,
           relu: bool) -> Tensor:
    if residual is not None and residual.dtype != x.dtype:  # e.g. an fp32 stream under autocast
        return residual + _apply(x, p, seed_a, seed_b, None, relu)
    x = x.contiguous()
    scale = 1.0 / (1.0 - p)
    lib = native.library() if x.dtype in (torch.float32, torch.bfloat16) else None
    if lib is not None:
        residual = residual.contiguous() if residual is not None else None
        return native.dropout(lib, x, drop_threshold(p), scale, seed_a, seed_b, residual, relu)
    keep = keep_mask(x.numel(), p, seed_a, seed_b).view(x.shape)
    out = torch.where(keep, (F.relu(x) if relu else x) * scale, torch.zeros((), dtype=x.dtype))
    return out if residual is None else residual + out


class _HashDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor | None, p: float, seed_a: int, seed_b: int,
                relu: bool) -> Tensor:
        ctx.args = (p, seed_a, seed_b)
        ctx.relu, ctx.dtype = relu, x.dtype
        out = _apply(x, p, seed_a, seed_b, residual, relu)
        if relu:
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, seed_a, seed_b = ctx.args
        if ctx.relu:  # kept and positive ⇔ output > 0
            (out,) = ctx.saved_tensors
            lib = native.library() if grad.dtype in (torch.float32, torch.bfloat16) else None
            if lib is not None and grad.dtype == out.dtype:
                grad_x = native.relu_dropout_backward(lib, grad, out, 1.0 / (1.0 - p))
            else:
                grad_x = torch.where(out > 0, grad / (1.0 - p), torch.zeros((), dtype=grad.dtype))
        else:
            grad_x = _apply(grad, p, seed_a, seed_b, None, False)
        grad_residual = grad if ctx.needs_input_grad[1] else None
        return grad_x.to(ctx.dtype), grad_residual, None, None, None, None


def dropout(x: Tensor, p: float, training: bool = True, residual: Tensor | None = None,
            relu: bool = False) -> Tensor:
    """Like `F.dropout(x, p, training)`: zero each element with probability p and scale the
    rest by 1 / (1 - p). On the CPU the mask comes from a hash (see the module docstring).

    With `relu`, the input goes through a ReLU first; with `residual` (shaped like x), the
    result is added to it: `residual + dropout(relu(x))`, in one pass on the native kernel."""
    if relu and residual is not None:
        raise ValueError("dropout fuses a ReLU before it or a residual after it, not both")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and input {tuple(x.shape)} differ")
    if not training or p == 0.0:
        x = F.relu(x) if relu else x
        return x if residual is None else residual + x
    if x.device.type != "cpu" or p >= 1.0:
        out = F.dropout(F.relu(x) if relu else x, p, training)
        return out if residual is None else residual + out
    seed_a, seed_b = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return _HashDropout.apply(x, residual, p, seed_a, seed_b, relu)


class Dropout(nn.Module):
    """`nn.Dropout` with the hashed mask of `dropout` on the CPU."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, residual: Tensor | None = None, relu: bool = False) -> Tensor:
        """`residual + dropout(relu(x) if relu else x)`; see `dropout`."""
        return dropout(x, self.p, self.training, residual, relu)

    def extra_repr(self) -> str:
        return f"p={self.p}"
