"""Decoding a `Transformer`: batched greedy and beam search over the KV cache (one decoder step
per new token), and the book's prefix-recomputing greedy loop kept for benchmarks.

Outputs are token ids without <bos> and <eos>. Each function switches the model to eval mode
(no dropout) for the call and restores its previous mode afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import padding_mask
from .config import check, check_float, check_positive_int
from .models.transformer import Transformer


@contextlib.contextmanager
def _eval_mode(model: Transformer) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _check_max_len(model: Transformer, max_len: int) -> None:
    check_positive_int(max_len, "max_len")
    # <bos> sits at position 0, so generated token i is fed at position i.
    check(max_len <= model.config.max_len, "max_len",
          f"must be at most the model's max_len ({model.config.max_len}), got {max_len}")


def _source(model: Transformer, src: Tensor, src_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    check(src.dim() == 2, "src",
          f"must be a (batch, length) tensor of ids, got shape {tuple(src.shape)}")
    if src_mask is None:
        src_mask = padding_mask(src, model.config.pad_id)  # (B, 1, 1, S)
    return src, src_mask


def greedy_search(
    model: Transformer,
    src: Tensor,
    bos_id: int,
    eos_id: int,
    max_len: int,
    src_mask: Tensor | None = None,
) -> list[list[int]]:
    """Most likely next token at every step, for a padded batch `src` (B, S).

    `src_mask` (B, 1, 1, S) defaults to the non-pad positions. At most `max_len` tokens are
    generated per sentence (<eos> included); finished sentences leave the batch, so the
    remaining ones decode faster.
    """
    _check_max_len(model, max_len)
    with _eval_mode(model):
        src, src_mask = _source(model, src, src_mask)
        memory = model.encode(src, src_mask)  # (B, S, D)
        cache = model.new_cache()
        results: list[list[int]] = [[] for _ in range(src.size(0))]
        alive = list(range(src.size(0)))  # original sentence index of each batch row
        tokens = src.new_full((src.size(0),), bos_id)  # (A,)
        for _ in range(max_len):
            logits = model.decode_step(tokens, memory, src_mask, cache)  # (A, V)
            tokens = logits.argmax(dim=-1)  # (A,)
            for row, token in zip(alive, tokens.tolist(), strict=True):
                if token != eos_id:
                    results[row].append(token)
            keep = (tokens != eos_id).nonzero().squeeze(1)  # (A',)
            if keep.numel() == 0:
                break
            if keep.numel() < len(alive):
                alive, tokens = [alive[i] for i in keep.tolist()], tokens[keep]
                memory, src_mask = memory.index_select(0, keep), src_mask.index_select(0, keep)
                cache.reorder(keep)
        return results


def recompute_greedy(
    model: Transformer,
    src: Sequence[int] | Tensor,
    bos_id: int,
    eos_id: int,
    max_len: int,
) -> list[int]:
    """The book's decoding loop: one sentence, and at every step the whole target prefix runs
    through the decoder again (quadratic work). Same output as `greedy_search`; kept only to
    measure what the cache saves."""
    _check_max_len(model, max_len)
    with _eval_mode(model):
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


def length_penalty_gnmt(length: int, alpha: float) -> float:
    """GNMT length penalty lp(n) = ((5 + n) / 6) ** alpha (Wu et al. 2016). A hypothesis scores
    log P / lp(n): alpha = 0 is plain log-probability (favours short outputs), alpha = 1 is
    close to per-token normalisation."""
    return ((5.0 + length) / 6.0) ** alpha


def beam_search(
    model: Transformer,
    src: Tensor,
    beam_size: int,
    bos_id: int,
    eos_id: int,
    max_len: int,
    length_penalty: float = 1.0,
    n_best: int = 1,
    src_mask: Tensor | None = None,
) -> list[list[tuple[list[int], float]]]:
    """Beam search for a padded batch `src` (B, S): per sentence the `n_best` hypotheses, best
    first, as (token ids, score), score = log P(tokens + <eos>) / lp(length) with the GNMT
    penalty `length_penalty_gnmt` (length counts <eos>).

    Each step extends every live beam by every token, keeps the 2·beam best candidates, moves
    those ending in <eos> that rank within the top `beam_size` to the sentence's finished list,
    and continues with the `beam_size` best others (as in fairseq). A sentence is done once it
    has `beam_size` finished hypotheses; beams still open after `max_len` tokens are scored
    without an <eos>. With beam_size 1 this is exactly greedy search.
    """
    check_positive_int(beam_size, "beam_size")
    check_positive_int(n_best, "n_best")
    check(n_best <= beam_size, "n_best", f"must be at most beam_size ({beam_size}), got {n_best}")
    check_float(length_penalty, "length_penalty", 0.0, 10.0)
    _check_max_len(model, max_len)
    k = beam_size
    with _eval_mode(model):
        src, src_mask = _source(model, src, src_mask)
        b, device = src.size(0), src.device
        memory = model.encode(src, src_mask).repeat_interleave(k, dim=0)  # (B*K, S, D)
        src_mask = src_mask.repeat_interleave(k, dim=0)  # (B*K, 1, 1, S)
        cache = model.new_cache()
        alive = list(range(b))  # original sentence index of each live block of K rows
        finished: list[list[tuple[list[int], float]]] = [[] for _ in range(b)]
        # Only beam 0 is live at the start, so the first step does not pick K copies of a token.
        scores = torch.full((b, k), float("-inf"), device=device)  # (A, K) summed log-probs
        scores[:, 0] = 0.0
        history = src.new_empty(b * k, 0)  # (A*K, t) generated tokens
        tokens = src.new_full((b * k,), bos_id)  # (A*K,)

        for step in range(max_len):
            a = len(alive)
            logits = model.decode_step(tokens, memory, src_mask, cache)  # (A*K, V)
            v = logits.size(-1)
            logp = F.log_softmax(logits.float(), dim=-1).view(a, k, v)
            candidates = (scores[:, :, None] + logp).view(a, k * v)  # (A, K*V)
            # Each beam has one <eos> extension, so 2K candidates leave at least K others.
            top_scores, top_index = candidates.topk(min(2 * k, k * v), dim=1)  # (A, 2K)
            top_beam, top_token = top_index // v, top_index % v
            dead = ~torch.isfinite(top_scores)
            is_eos = top_token == eos_id

            penalty = length_penalty_gnmt(step + 1, length_penalty)
            for i, r in (is_eos[:, :k] & ~dead[:, :k]).nonzero().tolist():
                sentence = finished[alive[i]]
                if len(sentence) < k:
                    row = i * k + int(top_beam[i, r])
                    sentence.append((history[row].tolist(), float(top_scores[i, r]) / penalty))

            # Continue with the K best candidates that are not <eos> (stable sort keeps rank).
            blocked = is_eos | dead
            order = torch.sort(blocked.to(torch.int8), dim=1, stable=True).indices[:, :k]
            scores = top_scores.gather(1, order).masked_fill(blocked.gather(1, order),
                                                             float("-inf"))  # (A, K)
            beam = top_beam.gather(1, order)  # (A, K) which live beam each survivor extends
            rows = (torch.arange(a, device=device)[:, None] * k + beam).view(-1)  # (A*K,)
            tokens = top_token.gather(1, order).view(-1)  # (A*K,)
            history = torch.cat([history.index_select(0, rows), tokens[:, None]], dim=1)
            cache.reorder(rows)

            keep = [i for i, s in enumerate(alive) if len(finished[s]) < k]
            if not keep:
                break
            if len(keep) < a:  # drop finished sentences from the batch
                keep_t = torch.tensor(keep, device=device)
                rows = (keep_t[:, None] * k + torch.arange(k, device=device)).view(-1)
                alive = [alive[i] for i in keep]
                scores = scores[keep_t]
                tokens, history = tokens[rows], history[rows]
                memory, src_mask = memory.index_select(0, rows), src_mask.index_select(0, rows)
                cache.reorder(rows)
        else:
            # Out of steps: open beams compete with an un-terminated length of max_len.
            penalty = length_penalty_gnmt(max_len, length_penalty)
            for i, s in enumerate(alive):
                for j in range(k):
                    if torch.isfinite(scores[i, j]):
                        finished[s].append((history[i * k + j].tolist(),
                                            float(scores[i, j]) / penalty))

        return [sorted(hyps, key=lambda h: h[1], reverse=True)[:n_best] for hyps in finished]
