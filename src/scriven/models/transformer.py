"""Encoder–decoder Transformer for translation ("Attention Is All You Need"), with pre- or
post-norm layers, sinusoidal or learned positions, optional tied embeddings and a KV cache for
incremental decoding. No I/O: checkpoints and tokenizers live elsewhere.

Shapes: B batch, S source length, T target length, D d_model, V target vocabulary, H heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import KVCache, MultiHeadAttention, causal_mask, padding_mask
from ..config import check, check_float, check_positive_int, from_dict
from ..errors import ScrivenError

ACTIVATIONS = ("relu", "gelu")
POSITIONS = ("sinusoidal", "learned")

# Named sizes; vocabulary sizes come from the tokenizers at build time.
PRESETS: dict[str, dict[str, Any]] = {
    # The book's model (and the paper's layout): 6+6 post-norm layers, separate vocabularies.
    "seed": {
        "d_model": 256, "n_heads": 8, "d_ff": 1024, "encoder_layers": 6, "decoder_layers": 6,
        "dropout": 0.1, "activation": "relu", "norm_first": False, "positions": "sinusoidal",
        "max_len": 256, "share_embeddings": False, "bias": True,
    },
    # Fast on 2 CPU cores: half the depth; pre-norm trains stably without a long warm-up;
    # tied embeddings when source and target share one vocabulary; no biases in the attention
    # and feed-forward layers (their broadcasts and gradient sums cost 1/12 of a training step).
    "default": {
        "d_model": 256, "n_heads": 4, "d_ff": 1024, "encoder_layers": 3, "decoder_layers": 3,
        "dropout": 0.1, "activation": "relu", "norm_first": True, "positions": "sinusoidal",
        "max_len": 256, "share_embeddings": True, "bias": False,
    },
    # Sized for a GPU, where 256-wide matmuls leave most of the chip idle: the paper's base
    # widths with pre-norm, tied embeddings and no biases.
    "gpu": {
        "d_model": 512, "n_heads": 8, "d_ff": 2048, "encoder_layers": 6, "decoder_layers": 6,
        "dropout": 0.1, "activation": "relu", "norm_first": True, "positions": "sinusoidal",
        "max_len": 256, "share_embeddings": True, "bias": False,
    },
}


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes and layout of a `Transformer`; validated on construction."""

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    encoder_layers: int = 3
    decoder_layers: int = 3
    dropout: float = 0.1
    activation: str = "relu"  # "relu" | "gelu"
    norm_first: bool = True  # pre-norm; False = post-norm as in the paper
    positions: str = "sinusoidal"  # "sinusoidal" | "learned"
    max_len: int = 256  # longest source or target sequence, in tokens
    share_embeddings: bool = False  # one table for source, target and output projection
    bias: bool = True  # biases in the attention projections and feed-forward layers
    pad_id: int = 0

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "d_ff",
                     "encoder_layers", "decoder_layers", "max_len"):
            check_positive_int(getattr(self, name), name)
        check(self.d_model % self.n_heads == 0, "d_model",
              f"must be divisible by n_heads ({self.n_heads}), got {self.d_model}")
        check_float(self.dropout, "dropout", 0.0, 1.0, high_open=True)
        check(self.activation in ACTIVATIONS, "activation",
              f"must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        check(self.positions in POSITIONS, "positions",
              f"must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        check(isinstance(self.norm_first, bool), "norm_first",
              f"must be true or false, got {self.norm_first!r}")
        for name in ("share_embeddings", "bias"):
            check(isinstance(getattr(self, name), bool), name,
                  f"must be true or false, got {getattr(self, name)!r}")
        check_positive_int(self.pad_id, "pad_id", allow_zero=True)
        check(self.pad_id < min(self.src_vocab_size, self.tgt_vocab_size), "pad_id",
              f"must be smaller than both vocabulary sizes, got {self.pad_id}")
        check(not self.share_embeddings or self.src_vocab_size == self.tgt_vocab_size,
              "share_embeddings", "needs one shared vocabulary, but src_vocab_size="
              f"{self.src_vocab_size} and tgt_vocab_size={self.tgt_vocab_size} differ")

    @classmethod
    def preset(cls, name: str, src_vocab_size: int, tgt_vocab_size: int,
               share_embeddings: bool | None = None) -> TransformerConfig:
        """The preset `name` for the given vocabularies. `share_embeddings=None` keeps the
        preset's choice when the two sizes are equal (one shared tokenizer) and is False
        otherwise; pass False for two different vocabularies that happen to be the same size."""
        if name not in PRESETS:
            raise ScrivenError(f"preset {name!r} unknown; choose from {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        if share_embeddings is None:
            share_embeddings = values["share_embeddings"] and src_vocab_size == tgt_vocab_size
        values.update(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size,
                      share_embeddings=share_embeddings)
        return from_dict(cls, values, where=f"preset {name}")


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """(max_len, d_model) table: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
    position = torch.arange(max_len, dtype=torch.float32)[:, None]  # (L, 1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                         * (-math.log(10000.0) / d_model))  # (ceil(D/2),)
    angles = position * inv_freq  # (L, ceil(D/2))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])  # odd d_model: one fewer cosine
    return table


class FeedForward(nn.Module):
    """Position-wise Linear → activation → dropout → Linear (the activation is what makes it
    more than one linear map)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str,
                 bias: bool = True) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.activation = F.gelu if activation == "gelu" else F.relu

    def forward(self, x: Tensor) -> Tensor:
        h = self.dropout(self.activation(self.linear1(x)))  # (B, T, F)
        return self.linear2(h)  # (B, T, D)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.bias)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation, cfg.bias)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """x (B, S, D), mask (B, 1, 1, S) → (B, S, D), weights (B, H, S, S) or None."""
        if self.norm_first:
            h, w = self.self_attn(self.norm1(x), mask=mask, need_weights=need_weights)
            x = x + self.dropout(h)
            x = x + self.dropout(self.ff(self.norm2(x)))
        else:
            h, w = self.self_attn(x, mask=mask, need_weights=need_weights)
            x = self.norm1(x + self.dropout(h))
            x = self.norm2(x + self.dropout(self.ff(x)))
        return x, w


@dataclass
class DecoderCache:
    """Per-layer KV caches for incremental decoding, and how many target tokens they hold."""

    self_attn: list[KVCache]
    cross_attn: list[KVCache]
    position: int = 0

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (surviving beams, unfinished sentences) in every layer."""
        for c in self.self_attn + self.cross_attn:
            c.reorder(index)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.bias)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.bias)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation, cfg.bias)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.norm3 = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None,
        src_mask: Tensor | None,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
        need_weights: bool = False,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (B, T, D), memory (B, S, D) → (B, T, D), self weights (B, H, T, past+T) and cross
        weights (B, H, T, S) (None unless asked)."""
        if self.norm_first:
            h, w_self = self.self_attn(self.norm1(x), mask=tgt_mask, cache=self_cache,
                                       need_weights=need_weights, is_causal=is_causal)
            x = x + self.dropout(h)
            h, w_cross = self.cross_attn(self.norm2(x), memory=memory, mask=src_mask,
                                         cache=cross_cache, need_weights=need_weights)
            x = x + self.dropout(h)
            x = x + self.dropout(self.ff(self.norm3(x)))
        else:
            h, w_self = self.self_attn(x, mask=tgt_mask, cache=self_cache,
                                       need_weights=need_weights, is_causal=is_causal)
            x = self.norm1(x + self.dropout(h))
            h, w_cross = self.cross_attn(x, memory=memory, mask=src_mask, cache=cross_cache,
                                         need_weights=need_weights)
            x = self.norm2(x + self.dropout(h))
            x = self.norm3(x + self.dropout(self.ff(x)))
        return x, w_self, w_cross


AttentionMaps = dict[str, list[Tensor]]


class Transformer(nn.Module):
    """Encoder–decoder Transformer: `forward(src, tgt)` gives next-token logits for teacher
    forcing; `encode` + `new_cache` + `decode_step` decode one token at a time."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.src_embed = nn.Embedding(cfg.src_vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.tgt_embed = (self.src_embed if cfg.share_embeddings else
                          nn.Embedding(cfg.tgt_vocab_size, cfg.d_model, padding_idx=cfg.pad_id))
        self.embed_scale = math.sqrt(cfg.d_model)
        if cfg.positions == "learned":
            self.src_pos: nn.Embedding | None = nn.Embedding(cfg.max_len, cfg.d_model)
            self.tgt_pos: nn.Embedding | None = nn.Embedding(cfg.max_len, cfg.d_model)
        else:
            self.src_pos = self.tgt_pos = None
        # Not persistent: recomputed from the config, so it never goes into a checkpoint.
        self.register_buffer("sinusoids", sinusoidal_positions(cfg.max_len, cfg.d_model),
                             persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        # Pre-norm leaves the residual stream un-normalised: one final norm per stack.
        self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        self.output = nn.Linear(cfg.d_model, cfg.tgt_vocab_size)
        # The training loss's one switch: None computes logits, then `F.cross_entropy`; the
        # accelerator layer may set a function of (hidden, weight, bias, labels, smoothing) that
        # fuses the two (see `scriven.accel.losses`).
        self.fused_loss: Callable[..., Tensor] | None = None
        self._init_weights()
        if cfg.share_embeddings:
            self.output.weight = self.tgt_embed.weight

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                # std d^-1/2: after the √d scale embeddings have unit variance, and a tied
                # output projection starts with small logits.
                nn.init.normal_(module.weight, std=self.config.d_model ** -0.5)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()

    def _embed(self, ids: Tensor, table: nn.Embedding, pos: nn.Embedding | None,
               offset: int = 0) -> Tensor:
        """ids (B, T) at absolute positions offset .. offset+T-1 → (B, T, D)."""
        end = offset + ids.size(1)
        if end > self.config.max_len:
            raise ScrivenError(f"sequence of {end} tokens is longer than the model's max_len="
                               f"{self.config.max_len}")
        x = table(ids) * self.embed_scale  # (B, T, D)
        if pos is not None:
            x = x + pos(torch.arange(offset, end, device=ids.device))
        else:
            x = x + self.sinusoids[offset:end]
        return self.dropout(x)

    def _encode(self, src: Tensor, src_mask: Tensor | None,
                need_weights: bool) -> tuple[Tensor, list[Tensor]]:
        if src_mask is None:
            src_mask = padding_mask(src, self.config.pad_id)  # (B, 1, 1, S)
        x = self._embed(src, self.src_embed, self.src_pos)  # (B, S, D)
        weights = []
        for layer in self.encoder:
            x, w = layer(x, src_mask, need_weights)
            if w is not None:
                weights.append(w)
        return self.encoder_norm(x), weights

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """src (B, S) token ids; src_mask (B, 1, 1, S), True at real tokens (derived from
        pad_id when None) → memory (B, S, D)."""
        return self._encode(src, src_mask, need_weights=False)[0]

    def new_cache(self) -> DecoderCache:
        """An empty cache for `decode`/`decode_step`; it fills on the first call."""
        n = len(self.decoder)
        return DecoderCache([KVCache() for _ in range(n)], [KVCache() for _ in range(n)])

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        src_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
        need_weights: bool = False,
        at: Tensor | None = None,
    ) -> tuple[Tensor, AttentionMaps | None]:
        """tgt (B, T) target ids (starting with <bos>), memory (B, S, D), src_mask (B, 1, 1, S)
        or None (all memory positions real) → logits (B, T, V), and when `need_weights` the maps
        {"decoder_self": [(B, H, T, past+T)] * layers, "cross": [(B, H, T, S)] * layers}.

        With `cache`, `tgt` continues the tokens already in it (positions shift by
        `cache.position`) and only the new tokens are computed. With `at` (N,), indices into the
        flattened (B*T) positions, logits come only for those, (N, V): training skips padding
        before the vocabulary projection, its most expensive layer, instead of after it.
        """
        x, maps = self._decode_states(tgt, memory, src_mask, cache, need_weights)
        if at is not None:
            x = x.flatten(0, 1).index_select(0, at)  # (N, D)
        return self.output(x), maps                  # (B, T, V) or (N, V)

    def _decode_states(self, tgt: Tensor, memory: Tensor, src_mask: Tensor | None,
                       cache: DecoderCache | None,
                       need_weights: bool) -> tuple[Tensor, AttentionMaps | None]:
        """The decoder's final normalised states (B, T, D), before the vocabulary projection."""
        past = cache.position if cache is not None else 0
        t = tgt.size(1)
        x = self._embed(tgt, self.tgt_embed, self.tgt_pos, offset=past)  # (B, T, D)
        # Without a cache: plain causal attention (the fused kernels skip masked blocks). One new
        # token after a cache sees all of it: no mask. A chunk after a cache: an explicit mask.
        is_causal = past == 0 and t > 1
        tgt_mask = causal_mask(t, tgt.device, past=past) if past > 0 and t > 1 else None
        self_maps: list[Tensor] = []
        cross_maps: list[Tensor] = []
        for i, layer in enumerate(self.decoder):
            x, w_self, w_cross = layer(
                x, memory, tgt_mask, src_mask,
                self_cache=cache.self_attn[i] if cache is not None else None,
                cross_cache=cache.cross_attn[i] if cache is not None else None,
                need_weights=need_weights, is_causal=is_causal,
            )
            if w_self is not None and w_cross is not None:
                self_maps.append(w_self)
                cross_maps.append(w_cross)
        if cache is not None:
            cache.position = past + t
        maps = {"decoder_self": self_maps, "cross": cross_maps} if need_weights else None
        return self.decoder_norm(x), maps           # (B, T, D)

    def decode_step(self, tokens: Tensor, memory: Tensor, src_mask: Tensor | None,
                    cache: DecoderCache) -> Tensor:
        """Feed one token per sentence, tokens (B,), through the cached decoder → next-token
        logits (B, V)."""
        logits, _ = self.decode(tokens[:, None], memory, src_mask, cache)  # (B, 1, V)
        return logits[:, -1]

    def forward(self, src: Tensor, tgt: Tensor, at: Tensor | None = None,
                labels: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
        """Teacher forcing: src (B, S), tgt (B, T) decoder input → logits (B, T, V), or (N, V)
        at the flattened positions `at` (N,) only (see `decode`).

        With `labels` (N,), the targets at those positions, returns the training loss instead:
        the mean label-smoothed cross-entropy, with the vocabulary projection fused into it so
        that the (N, V) logits never exist whole where the accelerator layer set `fused_loss`."""
        src_mask = padding_mask(src, self.config.pad_id)  # (B, 1, 1, S)
        memory = self.encode(src, src_mask)
        if labels is None:
            return self.decode(tgt, memory, src_mask, at=at)[0]
        if at is None:
            raise ValueError("labels need the positions `at` they belong to")
        x, _ = self._decode_states(tgt, memory, src_mask, None, False)  # (B, T, D)
        x = x.flatten(0, 1).index_select(0, at)                         # (N, D)
        if self.fused_loss is not None:
            return self.fused_loss(x, self.output.weight, self.output.bias, labels,
                                   label_smoothing)
        return F.cross_entropy(self.output(x).float(), labels, label_smoothing=label_smoothing)

    @torch.no_grad()
    def attention_maps(self, src: Tensor, tgt: Tensor) -> AttentionMaps:
        """Per-layer, per-head attention weights for one teacher-forced pass, in eval mode (no
        dropout): {"encoder_self": [(B, H, S, S)], "decoder_self": [(B, H, T, T)],
        "cross": [(B, H, T, S)]}, one tensor per layer. Rows of padded queries are meaningless."""
        was_training = self.training
        self.eval()
        try:
            src_mask = padding_mask(src, self.config.pad_id)
            memory, enc_maps = self._encode(src, src_mask, need_weights=True)
            _, maps = self.decode(tgt, memory, src_mask, need_weights=True)
        finally:
            self.train(was_training)
        assert maps is not None
        return {"encoder_self": enc_maps, **maps}

    def num_parameters(self) -> int:
        """Trainable parameters, tied tables counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

