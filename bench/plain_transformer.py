"""The baseline scriven's translator training is compared with: a plain-PyTorch `nn.Transformer`
of the same sizes, trained as a careful user would write it from PyTorch's documentation (fp32,
`F.cross_entropy` with label smoothing and padding ignored, AdamW), on the same batches.

`speed_vs_plain` alternates timed training steps of the two in one process, so that the ratio
does not depend on this machine's drift.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from scriven import accel
from scriven.models.transformer import Transformer, TransformerConfig, sinusoidal_positions
from scriven.tokenizers import PAD_ID
from scriven.translation import _attention_kernel


class PlainTransformer(nn.Module):
    """Shared embeddings scaled by √d, sinusoidal positions, `nn.Transformer` (pre-norm), and an
    output projection tied to the embeddings."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.src_vocab_size, cfg.d_model, padding_idx=PAD_ID)
        self.register_buffer("positions", sinusoidal_positions(cfg.max_len, cfg.d_model))
        self.transformer = nn.Transformer(
            cfg.d_model, cfg.n_heads, cfg.encoder_layers, cfg.decoder_layers, cfg.d_ff,
            cfg.dropout, batch_first=True, norm_first=cfg.norm_first, bias=cfg.bias)
        self.output = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)
        self.output.weight = self.embed.weight
        self.scale = math.sqrt(cfg.d_model)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        s, t = src.size(1), tgt.size(1)
        x = self.embed(src) * self.scale + self.positions[:s]
        y = self.embed(tgt) * self.scale + self.positions[:t]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=src.device)
        pad = src == PAD_ID
        h = self.transformer(x, y, tgt_mask=causal, tgt_is_causal=True,
                             src_key_padding_mask=pad, memory_key_padding_mask=pad)
        return self.output(h)                                         # (B, T, V)


def _plain_step(model: PlainTransformer, opt: torch.optim.Optimizer, src, tgt) -> int:
    labels = tgt[:, 1:]
    logits = model(src, tgt[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=PAD_ID,
                           label_smoothing=0.1)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return int((labels != PAD_ID).sum())


def _scriven_step(model: Transformer, opt: torch.optim.Optimizer, device, src, tgt) -> int:
    """One step as `TranslationTask.loss` and `fit` take it (the master-weight copy of
    bf16-pure aside: it is a few percent of a step)."""
    labels = tgt[:, 1:].flatten()
    real = (labels != PAD_ID).nonzero().squeeze(1)
    with _attention_kernel(device, model):
        loss = model(src, tgt[:, :-1], real, labels.index_select(0, real), 0.1)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return real.numel()


def speed_vs_plain(cfg: TransformerConfig, batches: list, precision: str, device,
                   rounds: int = 3) -> dict:
    """Target tokens/s of scriven's training step (with `accel.apply`, in `precision`) and of
    the plain baseline (fp32), best of `rounds` alternating passes over `batches`."""
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)
    report = accel.apply(ours, device, "train")
    if precision == "bf16-pure":
        ours = ours.to(torch.bfloat16)
    plain = PlainTransformer(cfg).to(device)
    runs = {
        "scriven": (ours, torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True),
                    lambda m, o, s, t: _scriven_step(m, o, device, s, t)),
        "plain_nn_transformer": (plain, torch.optim.AdamW(plain.parameters(), lr=1e-4),
                                 _plain_step),
    }
    best = {name: 0.0 for name in runs}
    for r in range(rounds + 1):  # round 0 warms up (allocations, kernel choices)
        for name, (model, opt, step) in runs.items():
            model.train()
            start, tokens = time.perf_counter(), 0
            for b in batches:
                tokens += step(model, opt, b.src.to(device), b.tgt.to(device))
            if r:
                best[name] = max(best[name], tokens / (time.perf_counter() - start))
    return {"scriven_target_tokens_per_s": round(best["scriven"]),
            "plain_target_tokens_per_s": round(best["plain_nn_transformer"]),
            "ratio": round(best["scriven"] / best["plain_nn_transformer"], 2),
            "scriven_precision": precision, "plain_precision": "fp32",
            "accelerated": report, "batches": len(batches),
            "rounds": rounds}
