"""Scaled dot-product and multi-head attention, with masks and an incremental key/value cache.

Shapes: B batch, H heads, Tq query length, Tk key length, D model width, Dh = D / H.
Masks are boolean and say who MAY attend (True = allowed); they broadcast to (B, H, Tq, Tk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .config import check, check_float, check_positive_int
from .dropout import drop_threshold
from .linear import Linear


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """softmax(Q Kᵀ / √d_k) V.

    query (B, H, Tq, Dh), key (B, H, Tk, Dh), value (B, H, Tk, Dv); `mask` boolean, broadcastable
    to (B, H, Tq, Tk), True where attending is allowed. Returns the output (B, H, Tq, Dv) and, if
    `need_weights`, the attention weights (B, H, Tq, Tk) before dropout (else None).

    A query row whose keys are all masked gets zero weights and a zero output instead of NaN
    (softmax over nothing is undefined; zero is what padding queries should contribute).
    """
    empty_rows: Tensor | None = None  # (..., Tq, 1) True where a query may attend to nothing
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(
                f"attention mask must be boolean (True = may attend), got {mask.dtype}")
        any_allowed = mask.any(dim=-1, keepdim=True)
        if not bool(any_allowed.all()):
            empty_rows = ~any_allowed
            # Let empty rows attend everywhere (finite softmax), then zero them below.
            mask = mask | empty_rows

    if not need_weights:
        # The fused kernel never materialises the (Tq, Tk) weights: faster and leaner.
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)
        if empty_rows is not None:
            out = out.masked_fill(empty_rows, 0.0)
        return out, None

    scores = query @ key.transpose(-2, -1) / math.sqrt(query.size(-1))  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: exactly zero weight
    weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    if empty_rows is not None:
        weights = weights.masked_fill(empty_rows, 0.0)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    return dropped @ value, weights  # (B, H, Tq, Dv), (B, H, Tq, Tk)


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, args: native.AttentionArgs) -> Tensor:
        lib = native.library()
        assert lib is not None
        out, lse = native.attention_forward(lib, q, k, v, args)
        ctx.save_for_backward(q, k, v, lse)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        lib = native.library()
        assert lib is not None
        q, k, v, lse = ctx.saved_tensors
        return (*native.attention_backward(lib, q, k, v, lse, grad, ctx.args), None)


# Longest key sequence sent to the native kernel: measured 3-4x faster than the general path
# (forward + backward, bf16) at 10 keys and 1.3-2x at 32, but slower past about 100 keys
# without a causal mask.
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
    Dropout draws the hashed mask of `dropout.py` over the (B, H, Tq, Tk) weights.
    """
    b, tq, d = q.shape
    tk = k.size(1)
    head_dim = d // heads
    if (q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16)
            or not (q.dtype == k.dtype == v.dtype) or d % heads or head_dim % 16
            or head_dim > native.ATTENTION_MAX_HEAD_DIM or tk > SHORT_MAX_LEN
            or not 0 < b * heads * tq * tk < 2**32):  # the dropout hash counts weights in 32 bits
        return None
    lib = native.library()
    if lib is None:
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
    seed_a, seed_b = (torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
                      if dropout_p > 0.0 else (0, 0))
    args = native.AttentionArgs(heads, m, 1.0 / math.sqrt(head_dim),
                                drop_threshold(dropout_p) if dropout_p > 0.0 else 0,
                                1.0 / (1.0 - dropout_p), seed_a, seed_b)
    return _ShortAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), args)


def causal_mask(size: int, device: torch.device | str | None = None, past: int = 0) -> Tensor:
    """(size, past + size) boolean mask: query i (at absolute position past + i) may attend to
    keys 0 .. past + i. With `past` > 0 it serves a chunk of queries decoded after a cache."""
    q_pos = torch.arange(past, past + size, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(past + size, device=device)[None, :]  # (1, Tk)
    return k_pos <= q_pos  # (Tq, Tk)


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """(B, 1, 1, T) boolean mask, True at real (non-pad) tokens of `ids` (B, T): keys only, so
    it broadcasts over heads and query positions."""
    return (ids != pad_id)[:, None, None, :]


@dataclass
class KVCache:
    """Projected keys/values of one attention layer kept between decoding steps.

    Self-attention appends each step's new keys/values; cross-attention fills it once from the
    encoder memory and reuses it. Either way a new token costs one projection, not a prefix.
    """

    key: Tensor | None = None  # (B, H, T, Dh)
    value: Tensor | None = None  # (B, H, T, Dh)

    @property
    def length(self) -> int:
        """Number of cached positions (0 when empty)."""
        return 0 if self.key is None else self.key.size(2)

    def reorder(self, index: Tensor) -> None:
        """Select rows along the batch dimension (beam search: keep the surviving hypotheses;
        drop finished sentences). `index` is a 1-D LongTensor of batch rows, repeats allowed."""
        if self.key is not None and self.value is not None:
            self.key = self.key.index_select(0, index)
            self.value = self.value.index_select(0, index)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query/key/value projections and an output projection.

    Self-attention when `memory` is None (keys/values from `x`), cross-attention otherwise (keys
    and values from `memory`).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        check(d_model % n_heads == 0, "d_model",
              f"must be divisible by n_heads ({n_heads}), got {d_model}")
        check_float(dropout, "dropout", 0.0, 1.0, high_open=True)
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = Linear(d_model, d_model, bias=bias)
        self.k_proj = Linear(d_model, d_model, bias=bias)
        self.v_proj = Linear(d_model, d_model, bias=bias)
        self.out_proj = Linear(d_model, d_model, bias=bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, Tq, D); memory (B, Tk, D) or None; mask broadcastable to (B, H, Tq, Tk), where
        for cached self-attention Tk counts the cached positions too.

        Returns (output (B, Tq, D), weights (B, H, Tq, Tk) or None). With `cache`, self-attention
        appends this call's keys/values to it; cross-attention projects `memory` only when the
        cache is empty.
        """
        b, t, _ = x.shape
        dropout_p = self.dropout if self.training else 0.0
        if cache is None and not need_weights and x.device.type == "cpu":
            source = x if memory is None else memory
            out = short_attention(self.q_proj(x), self.k_proj(source), self.v_proj(source),
                                  self.n_heads, mask, dropout_p)
            if out is not None:
                return self.out_proj(out), None
        q = self._split_heads(self.q_proj(x))  # (B, H, Tq, Dh)
        if memory is None:
            k = self._split_heads(self.k_proj(x))  # (B, H, Tq, Dh)
            v = self._split_heads(self.v_proj(x))
            if cache is not None:
                if cache.key is not None and cache.value is not None:
                    k = torch.cat([cache.key, k], dim=2)  # (B, H, past + Tq, Dh)
                    v = torch.cat([cache.value, v], dim=2)
                cache.key, cache.value = k, v
        elif cache is not None and cache.key is not None and cache.value is not None:
            k, v = cache.key, cache.value  # (B, H, Tk, Dh), projected at the first step
        else:
            k = self._split_heads(self.k_proj(memory))  # (B, H, Tk, Dh)
            v = self._split_heads(self.v_proj(memory))
            if cache is not None:
                cache.key, cache.value = k, v

        out, weights = scaled_dot_product_attention(q, k, v, mask, dropout_p, need_weights)
        out = out.transpose(1, 2).reshape(b, t, self.d_model)  # (B, Tq, D)
        return self.out_proj(out), weights
