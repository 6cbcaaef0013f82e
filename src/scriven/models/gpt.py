"""Decoder-only Transformer language model (GPT-style): token embeddings (plus a position table,
or ALiBi's distance penalty in attention), pre-norm blocks of causal self-attention and a
feed-forward network, a head tied to the embeddings.

`forward(ids, cache)` returns `(logits, cache)`, the same shape of call as the LSTM's
`forward(ids, state)`, so training and generation drive both the same way; the cache holds each
layer's keys and values so a new token costs one step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..attention import KVCache, MultiHeadAttention, alibi_bias, causal_mask
from ..config import check, check_float, check_positive_int
from .transformer import sinusoidal_positions


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 1024
    dropout: float = 0.1
    max_len: int = 256
    positions: str = "learned"   # learned | sinusoidal | alibi
    tie_embeddings: bool = True
    head_bias: bool = False      # a bias on the output layer: each word's base rate

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_len"):
            check_positive_int(getattr(self, name), name)
        check(self.d_model % self.n_heads == 0, "d_model",
              f"must be divisible by n_heads ({self.n_heads}), got {self.d_model}")
        check_float(self.dropout, "dropout", 0.0, 1.0, high_open=True)
        check(self.positions in POSITIONS, "positions",
              f"must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        check(isinstance(self.tie_embeddings, bool), "tie_embeddings", "must be true or false")
        check(isinstance(self.head_bias, bool), "head_bias", "must be true or false")

    @classmethod
    def preset(cls, name: str, vocab_size: int) -> GPTConfig:
        check(name in GPT_PRESETS, "preset", f"must be one of {', '.join(GPT_PRESETS)}, got {name!r}")
        return cls(vocab_size=vocab_size, **GPT_PRESETS[name])


POSITIONS = ("learned", "sinusoidal", "alibi")

# "default" (which `auto` resizes) uses ALiBi and a head bias: on Anna Karenina's words the same
# 2 x 128 GPT reached perplexity 78.3 with both against 81.1 with a learned position table
# (docs/benchmarks.md, "A GPT with ALiBi"); `lm.train_lm` gives it a learned table on characters,
# where that measured better (same file, "Positions by tokenizer"). "seed" keeps the book's
# learned positions; "gpu" keeps them too, as an additive bias would take the flash kernels'
# causal path away.
GPT_PRESETS: dict[str, dict] = {
    "default": dict(d_model=256, n_heads=4, n_layers=4, d_ff=1024, dropout=0.2, max_len=256,
                    positions="alibi", head_bias=True),
    "seed": dict(d_model=256, n_heads=8, n_layers=6, d_ff=1024, dropout=0.1, max_len=256),
    "tiny": dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.0, max_len=64),
    # Sized for a GPU: eight 512-wide layers.
    "gpu": dict(d_model=512, n_heads=8, n_layers=8, d_ff=2048, dropout=0.1, max_len=256),
}


@dataclass
class GPTCache:
    """Keys and values of every layer for the positions read so far."""

    layers: list[KVCache] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.d_model)
        # Dropout falls on the residual paths only, not on the attention weights: on a CPU,
        # PyTorch's fused attention does not drop, and the path that does cost a third of a
        # small GPT's training speed (docs/benchmarks.md, "Attention dropout").
        self.attn = MultiHeadAttention(c.d_model, c.n_heads)
        self.norm2 = nn.LayerNorm(c.d_model)
        self.ff = nn.Sequential(nn.Linear(c.d_model, c.d_ff), nn.GELU(), nn.Linear(c.d_ff, c.d_model))
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache,
                is_causal: bool = False, bias: Tensor | None = None) -> Tensor:
        a, _ = self.attn(self.norm1(x), mask=mask, cache=cache, is_causal=is_causal,
                         bias=bias)                                   # (B, T, D)
        x = x + self.drop(a)
        return x + self.drop(self.ff(self.norm2(x)))                  # (B, T, D)


class GPT(nn.Module):
    carries_state = False  # context is the cache, rebuilt for every training window

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        if c.positions == "learned":
            self.pos = nn.Embedding(c.max_len, c.d_model)
        elif c.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_positions(c.max_len, c.d_model), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=c.head_bias)
        self.apply(self._init)
        if c.tie_embeddings:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids: Tensor, cache: GPTCache | None = None) -> tuple[Tensor, GPTCache]:
        """ids (B, T) following the `cache.length` positions already read; returns logits
        (B, T, V) and the cache extended by these T positions."""
        b, t = ids.shape
        if cache is None:
            cache = GPTCache([KVCache() for _ in self.blocks])
        past = cache.length
        check(past + t <= self.config.max_len, "sequence length",
              f"{past + t} exceeds the model's max_len {self.config.max_len}")
        x = self.embed(ids)                                           # (B, T, D)
        positions = torch.arange(past, past + t, device=ids.device)
        if self.config.positions == "learned":
            x = x + self.pos(positions)
        elif self.config.positions == "sinusoidal":
            x = x + self.pos_table[positions]
        # ALiBi: no position vectors; attention scores fall with distance instead (on a small
        # text the table of positions must be learnt, the penalty need not).
        bias = (alibi_bias(self.config.n_heads, t, ids.device, past)
                if self.config.positions == "alibi" else None)        # (H, T, past + T)
        x = self.drop(x)
        # A fresh window: plain causal attention (the fused kernels skip masked blocks). After a
        # cache, new positions see all of it and each other causally: an explicit mask.
        is_causal = past == 0 and t > 1
        mask = causal_mask(t, ids.device, past=past) if past > 0 and t > 1 else None
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block(x, mask, layer_cache, is_causal, bias)
        # Dropout before the head too, as the LSTM has it: the head is the embedding table.
        return self.head(self.drop(self.norm(x))), cache             # (B, T, V)
