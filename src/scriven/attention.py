"""Scaled dot-product and multi-head attention, with masks and an incremental key/value cache.

Shapes: B batch, H heads, Tq query length, Tk key length, D model width, Dh = D / H.
Masks are boolean and say who MAY attend (True = allowed); they broadcast to (B, H, Tq, Tk).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import check, check_float, check_positive_int

# An attention kernel that the accelerator layer (`scriven.accel`) may give a layer: it takes
# the projections unsplit, q (B, Tq, D), k and v (B, Tk, D), the head count, the mask and the
# dropout probability, and returns (B, Tq, D), or None where it does not apply.
AttentionKernel = Callable[[Tensor, Tensor, Tensor, int, "Tensor | None", float], "Tensor | None"]


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    is_causal: bool = False,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """softmax(Q Kᵀ / √d_k + bias) V.

    query (B, H, Tq, Dh), key (B, H, Tk, Dh), value (B, H, Tk, Dv); `mask` boolean, broadcastable
    to (B, H, Tq, Tk), True where attending is allowed; or `is_causal` (no mask, Tq = Tk): query
    i sees keys 0..i, which lets PyTorch's fused kernels skip the masked blocks. Returns the
    output (B, H, Tq, Dv) and, if `need_weights`, the attention weights (B, H, Tq, Tk) before
    dropout (else None). `bias` (float, broadcastable to (B, H, Tq, Tk)) is added to the scores
    before the mask: a position bias such as `alibi_bias`.

    A query row whose keys are all masked gets zero weights and a zero output instead of NaN
    (softmax over nothing is undefined; zero is what padding queries should contribute).
    """
    if is_causal:
        if mask is not None or query.size(-2) != key.size(-2):
            raise ValueError("is_causal takes no mask and as many queries as keys")
        if need_weights:
            mask = causal_mask(query.size(-2), query.device)
    allowed: Tensor | None = None  # (..., Tq, 1) False where a query may attend to nothing
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(
                f"attention mask must be boolean (True = may attend), got {mask.dtype}")
        # Rows with nothing allowed attend everywhere (a finite softmax) and are zeroed below;
        # done unconditionally, since asking whether any row is empty would wait for a GPU.
        allowed = mask.any(dim=-1, keepdim=True)
        mask = mask | ~allowed
    if bias is not None:
        # PyTorch's kernels take one float mask: the bias with -inf where attending is not allowed.
        if is_causal:
            mask, is_causal = causal_mask(query.size(-2), query.device), False
        bias = bias.to(query.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))

    if not need_weights:
        # The fused kernel never materialises the (Tq, Tk) weights: faster and leaner.
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                             dropout_p=dropout_p, is_causal=is_causal)
        return (out if allowed is None else out.masked_fill(~allowed, 0.0)), None

    scores = query @ key.transpose(-2, -1) / math.sqrt(query.size(-1))  # (B, H, Tq, Tk)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: exactly zero weight
    elif mask is not None:
        scores = scores + mask  # the bias, -inf where not allowed
    weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    if allowed is not None:
        weights = weights.masked_fill(~allowed, 0.0)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    return dropped @ value, weights  # (B, H, Tq, Dv), (B, H, Tq, Tk)


def causal_mask(size: int, device: torch.device | str | None = None, past: int = 0) -> Tensor:
    """(size, past + size) boolean mask: query i (at absolute position past + i) may attend to
    keys 0 .. past + i. With `past` > 0 it serves a chunk of queries decoded after a cache."""
    q_pos = torch.arange(past, past + size, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(past + size, device=device)[None, :]  # (1, Tk)
    return k_pos <= q_pos  # (Tq, Tk)


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al., 2022): a geometric sequence from 2^(-8/H) down to
    2^-8, so some heads look far back and others mostly at the last few tokens."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])


def alibi_bias(n_heads: int, size: int, device: torch.device | str | None = None,
               past: int = 0) -> Tensor:
    """(H, size, past + size) ALiBi bias: a query at absolute position i scores a key at j
    lower by slope_h * (i - j). Keys after the query get a positive bias, which the causal mask
    removes. Depends only on distances, so a cached step sees what a full pass sees."""
    q_pos = torch.arange(past, past + size, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(past + size, device=device)[None, :]  # (1, Tk)
    slopes = alibi_slopes(n_heads).to(device)[:, None, None]  # (H, 1, 1)
    return -slopes * (q_pos - k_pos)  # (H, Tq, Tk)


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
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # The one switch for faster attention (see `AttentionKernel`); None: PyTorch's SDPA.
        self.kernel: AttentionKernel | None = None

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
        is_causal: bool = False,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, Tq, D); memory (B, Tk, D) or None; mask broadcastable to (B, H, Tq, Tk), where
        for cached self-attention Tk counts the cached positions too; or `is_causal` for
        self-attention over an empty cache (each position sees itself and those before it);
        `bias` a float position bias added to the scores (see `scaled_dot_product_attention`).

        Returns (output (B, Tq, D), weights (B, H, Tq, Tk) or None). With `cache`, self-attention
        appends this call's keys/values to it; cross-attention projects `memory` only when the
        cache is empty.
        """
        b, t, _ = x.shape
        dropout_p = self.dropout if self.training else 0.0
        q = self.q_proj(x)  # (B, Tq, D)
        if memory is not None and cache is not None and cache.key is not None:
            k, v = cache.key, cache.value  # (B, H, Tk, Dh), projected at the first step
        else:
            source = x if memory is None else memory
            k, v = self.k_proj(source), self.v_proj(source)  # (B, Tk, D) each
            if self.kernel is not None and cache is None and not need_weights and bias is None:
                kernel_mask = causal_mask(t, x.device) if is_causal else mask
                out = self.kernel(q, k, v, self.n_heads, kernel_mask, dropout_p)
                if out is not None:
                    return self.out_proj(out), None
            k, v = self._split_heads(k), self._split_heads(v)  # (B, H, Tk, Dh)
            if cache is not None:
                if memory is None and cache.key is not None and cache.value is not None:
                    k = torch.cat([cache.key, k], dim=2)  # (B, H, past + Tq, Dh)
                    v = torch.cat([cache.value, v], dim=2)
                cache.key, cache.value = k, v
        q = self._split_heads(q)  # (B, H, Tq, Dh)
        out, weights = scaled_dot_product_attention(q, k, v, mask, dropout_p, need_weights,
                                                    is_causal, bias)
        out = out.transpose(1, 2).reshape(b, t, self.d_model)  # (B, Tq, D)
        return self.out_proj(out), weights
