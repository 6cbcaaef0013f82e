"""The book's decoding loop, kept as the baseline that bench/translate.py times against
scriven's KV-cache search (and that tests/test_search.py checks that search against)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from scriven.attention import padding_mask
from scriven.models.transformer import Transformer


def recompute_greedy(
    model: Transformer,
    src: Sequence[int] | Tensor,
    bos_id: int,
    eos_id: int,
    max_len: int,
) -> list[int]:
    """One sentence, and at every step the whole target prefix runs through the decoder again
    (quadratic work). Same output as `scriven.search.greedy_search`; kept only to measure what
    the cache saves."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            device = next(model.parameters()).device
            src_t = torch.as_tensor(src, dtype=torch.long, device=device).reshape(1, -1)  # (1, S)
            src_mask = padding_mask(src_t, model.config.pad_id)
            memory = model.encode(src_t, src_mask)  # (1, S, D)
            out = [bos_id]
            for _ in range(max_len):
                tgt = torch.tensor([out], device=device)
                logits, _ = model.decode(tgt, memory, src_mask)  # (1, t, V)
                token = int(logits[0, -1].argmax())
                if token == eos_id:
                    break
                out.append(token)
            return out[1:]
    finally:
        model.train(was_training)
