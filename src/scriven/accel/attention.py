"""Multi-head attention over short sequences on a native CPU kernel (an `AttentionKernel` for
`scriven.attention.MultiHeadAttention`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import native
from .dropout import draw_seeds, drop_threshold


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, args: native.AttentionArgs) -> Tensor:
        out, lse = native.attention_forward(q, k, v, args)
        ctx.save_for_backward(q, k, v, lse)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, lse = ctx.saved_tensors
        return (*native.attention_backward(q, k, v, lse, grad, ctx.args), None)


# Longest key sequence sent to the native kernel: one pass per (sentence, head) wins while a
# row of scores fits in registers and cache; past about 100 keys the batched matmuls of the
# general path win again.
SHORT_MAX_LEN = 64


def short_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None,
                    dropout_p: float) -> Tensor | None:
    """Multi-head attention on the CPU's native kernel, for sequences of up to `SHORT_MAX_LEN`
    keys: q (B, Tq, D), k and v (B, Tk, D) as the projections made them
    (heads not split), mask as for `scaled_dot_product_attention` but the same for every head.
    Returns (B, Tq, D), or None where the kernel does not apply (then use the general path):
    not a CPU, not float32/bf16, head size not a multiple of 16, more than `SHORT_MAX_LEN` keys,
    a mask that differs between heads, or no native kernels.

    Sentences are short, so one task per (batch row, head) does scores, masking, softmax,
    dropout and the weighted sum in one pass, where the general path runs a dozen batched
    operations on (B, H, T, T) tensors and copies heads in and out of (B, H, T, Dh) twice.
    Dropout draws the hashed mask of `accel/dropout.py` over the (B, H, Tq, Tk) weights.
    """
    b, tq, d = q.shape
    tk = k.size(1)
    head_dim = d // heads
    if (q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16)
            or not (q.dtype == k.dtype == v.dtype) or d % heads or head_dim % 16
            or head_dim > native.ATTENTION_MAX_HEAD_DIM or tk > SHORT_MAX_LEN
            or not 0 < b * heads * tq * tk < 2**32):  # the dropout hash counts weights in 32 bits
        return None
    if native.library() is None:
        return None
    m: Tensor | None = None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(
                f"attention mask must be boolean (True = may attend), got {mask.dtype}")
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
        if m.dim() != 4 or m.size(1) != 1:
            return None  # per-head masks: general path
        m = m[:, 0].expand(m.size(0), m.size(2), tk)  # (B|1, Tq|1, Tk)
        if m.stride(2) != 1:
            m = m.contiguous()
    seed_a, seed_b = draw_seeds() if dropout_p > 0.0 else (0, 0)
    args = native.AttentionArgs(heads, m, 1.0 / math.sqrt(head_dim),
                                drop_threshold(dropout_p) if dropout_p > 0.0 else 0,
                                1.0 / (1.0 - dropout_p), seed_a, seed_b)
    return _ShortAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), args)
