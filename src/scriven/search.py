"""Decoding a `Transformer`: batched greedy and beam search over the KV cache (one decoder step
per new token), each with a per-step hook for streaming and cancellation. (The book's
prefix-recomputing loop, a benchmark baseline, lives in bench/recompute.py.)

Outputs are token ids without <bos> and <eos>. Each function switches the model to eval mode
(no dropout) for the call and restores its previous mode afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .attention import padding_mask
from .config import check, check_float, check_positive_int
from .models.transformer import Transformer


def output_limit(max_len: int, source_len: int) -> int:
    """Output length limit when none is given: twice the source plus 10, rounded up to a
    multiple of 8 (so sentences of similar length share a limit), within the model's max_len."""
    return min(max_len, -(-(2 * source_len + 10) // 8) * 8)


def length_batches(sources: Sequence[Sequence[int]], limits: Sequence[int], beam: int,
                   batch_size: int) -> list[list[int]]:
    """Indices of `sources` sorted by length into batches of at most `batch_size` (little
    padding). Beam search's result depends on the output limit, so for beam > 1 a batch only
    holds sources that share one (`limits`, one per source); greedy batches mix them."""
    batches: list[list[int]] = []
    for i in sorted(range(len(sources)), key=lambda i: len(sources[i])):
        if (batches and len(batches[-1]) < batch_size
                and (beam == 1 or limits[batches[-1][0]] == limits[i])):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


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


@dataclass(frozen=True)
class GreedyStep:
    """What one step of `greedy_search` decided, for its `on_step` hook."""

    step: int                 # tokens decoded so far per sentence, this one included
    sentences: list[int]      # batch index of each sentence that took a token at this step
    tokens: list[int]         # the token each of them took (eos_id: it ended)
    finished: list[int]       # sentences done after this step: <eos> or their length limit
    outputs: list[list[int]]  # every sentence's tokens so far, without <bos> and <eos>


@dataclass(frozen=True)
class BeamStep:
    """What one step of `beam_search` decided, for its `on_step` hook."""

    step: int             # tokens decoded so far per hypothesis, this one included
    sentences: list[int]  # batch index of each sentence still searching
    finished: list[int]   # sentences whose search ended at this step


# Called after each step with its GreedyStep or BeamStep. True stops the whole search; a
# collection of sentence indices stops those sentences (each keeps what it had found); None or
# False goes on. An exception it raises leaves the search (the model's mode is restored).
StepHook = Callable[[Any], "bool | Collection[int] | None"]


def _ask(on_step: StepHook | None, state: Any) -> bool | set[int]:
    """The hook's answer: True (stop everything) or the set of sentences to stop."""
    if on_step is None:
        return set()
    answer = on_step(state)
    return True if answer is True else set(answer or ())


def greedy_search(
    model: Transformer,
    src: Tensor,
    bos_id: int,
    eos_id: int,
    max_len: int | Sequence[int],
    src_mask: Tensor | None = None,
    on_step: StepHook | None = None,
) -> list[list[int]]:
    """Most likely next token at every step, for a padded batch `src` (B, S).

    `src_mask` (B, 1, 1, S) defaults to the non-pad positions. At most `max_len` tokens are
    generated per sentence (<eos> included): one limit for all, or one per sentence.
    Finished sentences leave the batch, so the remaining ones decode faster. `on_step` (see
    `StepHook`) sees each step's `GreedyStep`: to stream tokens, or to stop sentences early.
    """
    limits = [max_len] * src.size(0) if isinstance(max_len, int) else list(max_len)
    check(len(limits) == src.size(0), "max_len",
          f"needs one limit per sentence ({src.size(0)}), got {len(limits)}")
    for limit in set(limits):
        _check_max_len(model, limit)
    with _eval_mode(model):
        src, src_mask = _source(model, src, src_mask)
        memory = model.encode(src, src_mask)  # (B, S, D)
        cache = model.new_cache()
        results: list[list[int]] = [[] for _ in range(src.size(0))]
        alive = list(range(src.size(0)))  # original sentence index of each batch row
        tokens = src.new_full((src.size(0),), bos_id)  # (A,)
        for step in range(max(limits, default=0)):
            logits = model.decode_step(tokens, memory, src_mask, cache)  # (A, V)
            tokens = logits.argmax(dim=-1)  # (A,)
            chosen = tokens.tolist()
            finished = []
            for row, token in zip(alive, chosen, strict=True):
                if token != eos_id:
                    results[row].append(token)
                if token == eos_id or step + 1 >= limits[row]:
                    finished.append(row)
            stop = _ask(on_step, GreedyStep(step + 1, alive, chosen, finished, results))
            if stop is True:
                break
            leaving = stop.union(finished)
            keep = [i for i, row in enumerate(alive) if row not in leaving]
            if not keep:
                break
            if len(keep) < len(alive):
                index = torch.tensor(keep, device=tokens.device)
                alive, tokens = [alive[i] for i in keep], tokens.index_select(0, index)
                memory, src_mask = memory.index_select(0, index), src_mask.index_select(0, index)
                cache.reorder(index)
        return results


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
    on_step: StepHook | None = None,
) -> list[list[tuple[list[int], float]]]:
    """Beam search for a padded batch `src` (B, S): per sentence the `n_best` hypotheses, best
    first, as (token ids, score), score = log P(tokens + <eos>) / lp(length) with the GNMT
    penalty `length_penalty_gnmt` (length counts <eos>).

    Each step extends every live beam by every token, keeps the 2·beam best candidates, moves
    those ending in <eos> that rank within the top `beam_size` to the sentence's finished list,
    and continues with the `beam_size` best others (as in fairseq). A sentence is done once it
    has `beam_size` finished hypotheses; beams still open after `max_len` tokens are scored
    without an <eos>. With beam_size 1 this is exactly greedy search. `on_step` (see
    `StepHook`) sees each step's `BeamStep` and can stop the search or some sentences; a stopped
    sentence returns the hypotheses it had finished (perhaps none).
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
            logits = model.decode_step(tokens, memory, src_mask, cache).float()  # (A*K, V)
            v = logits.size(-1)
            # Each beam has one <eos> extension, so 2K candidates leave at least K others. A
            # beam adds the same score to all its tokens, so the 2K best of all K·V candidates
            # are among each beam's 2K best tokens: select those first (cheaper than a
            # log-softmax of all V), then the best of the K·2K.
            c = min(2 * k, v)
            best, token = logits.topk(c, dim=-1)                          # (A*K, C)
            logp = best - torch.logsumexp(logits, dim=-1, keepdim=True)   # log-probabilities
            candidates = (scores[:, :, None] + logp.view(a, k, c)).view(a, k * c)  # (A, K*C)
            top_scores, top_index = candidates.topk(min(2 * k, k * c), dim=1)  # (A, 2K)
            top_beam = top_index // c
            top_token = token.view(a, k * c).gather(1, top_index)
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

            done = [s for s in alive if len(finished[s]) >= k]
            stop = _ask(on_step, BeamStep(step + 1, [s for s in alive if len(finished[s]) < k],
                                          done))
            if stop is True:
                break
            keep = [i for i, s in enumerate(alive) if len(finished[s]) < k and s not in stop]
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
