"""Decoding rules as small pure functions on logits, composed in a fixed order by `sample_rows`
(one batched sampler, each row with its own settings; `sample_next` is its scalar form).

Every filter takes logits (..., V) and returns logits of the same shape, with removed tokens at
-inf, so each can be tested alone: top-k of 1 equals argmax, top-p of 1 changes nothing,
temperature 0 means greedy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import ScrivenError


def validate(temperature: float, top_k: int | None, top_p: float | None,
             repetition_penalty: float, vocab_size: int) -> None:
    """Check sampling parameters once, at the boundary, with messages that name the parameter."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ScrivenError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise ScrivenError(f"top_k must be a positive integer, got {top_k!r}")
        if top_k > vocab_size:
            raise ScrivenError(f"top_k must be at most the vocabulary size {vocab_size}, got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) \
                or not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise ScrivenError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) \
            or not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise ScrivenError(f"repetition_penalty must be a number > 0 (1 = off), got {repetition_penalty!r}")


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide by the temperature (> 0): below 1 sharpens, above 1 flattens."""
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the k highest logits; others get -inf."""
    if k >= logits.size(-1):
        return logits
    values, indices = torch.topk(logits, k, dim=-1)  # (..., k)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_k_values(logits: Tensor, k: int, block: int = 128) -> tuple[Tensor, Tensor]:
    """The k largest logits of each row of (B, V) and their ids, (B, k) each, sorted: what
    `torch.topk` returns (up to the order of ties), faster for a batch of rows over a large
    vocabulary. The row is cut into blocks; the k best values lie in the k blocks with the best
    maxima (any other block's maximum has k larger values above it), so a full-row top-k is
    replaced by a cheap max per block and a top-k over k blocks."""
    if logits.dim() != 2 or logits.size(0) < 8 or logits.size(1) // block < 4 * k:
        return torch.topk(logits, k, dim=-1)  # few rows or blocks: plain top-k is quicker
    b, v = logits.shape
    n = v // block
    blocks = logits[:, : n * block].reshape(b, n, block)                    # (B, n, block)
    best = torch.topk(blocks.amax(dim=-1), k, dim=-1).indices              # (B, k)
    values = blocks.gather(1, best[:, :, None].expand(-1, -1, block)).flatten(1)  # (B, k*block)
    ids = (best[:, :, None] * block + torch.arange(block, device=logits.device)).flatten(1)
    if n * block < v:  # the tail that fills no block is always a candidate
        values = torch.cat([values, logits[:, n * block :]], 1)
        tail = torch.arange(n * block, v, device=logits.device).expand(b, -1)
        ids = torch.cat([ids, tail], 1)
    top, at = torch.topk(values, k, dim=-1)                                 # (B, k)
    return top, ids.gather(1, at)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability sums to at least p; others get -inf."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # A token is dropped when the mass before it already reaches p; the top token always stays.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def repetition_penalty_filter(logits: Tensor, previous: Tensor, penalty: float) -> Tensor:
    """Make tokens already in `previous` (B, T) less likely (CTRL-style): positive logits are
    divided by the penalty and negative ones multiplied, so the push is always downwards."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = torch.gather(logits, -1, previous)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, previous, seen)


def penalize_rows(logits: Tensor, histories: Sequence[Sequence[int]],
                  penalties: Sequence[float]) -> Tensor:
    """`repetition_penalty_filter` for each row of logits (R, V) with its own token history
    and penalty (rows' histories differ in length, so they are penalised one by one)."""
    rows = [i for i, penalty in enumerate(penalties) if penalty != 1.0]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        previous = torch.tensor([list(histories[i])], dtype=torch.long, device=logits.device)
        logits[i:i + 1] = repetition_penalty_filter(logits[i:i + 1], previous, penalties[i])
    return logits


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """Temperature, then top-k, then top-p: the order Hugging Face `generate` uses too."""
    if temperature > 0:
        logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Pick one token id per row of logits (B, V) -> (B,). Temperature 0 is greedy (argmax)."""
    return sample_with_probability(logits, temperature, top_k, top_p, generator)[0]


def sample_with_probability(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                            top_p: float | None = None, generator: torch.Generator | None = None
                            ) -> tuple[Tensor, Tensor]:
    """Like `sample_next`, and also the probability (B,) each pick had in the distribution it
    was drawn from (for greedy: the plain softmax). The same settings for every row:
    `sample_rows` with one random number per row from `generator`."""
    return sample_rows(logits, *row_settings(logits, temperature, top_k, top_p),
                       uniform(logits.size(0), generator, logits.device))[:2]


def row_settings(logits: Tensor, temperature: float, top_k: int | None,
                 top_p: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Scalar settings as the per-row tensors (R,) `sample_rows` takes: top-k None is the
    vocabulary size and top-p None is 1 (both off)."""
    r, v = logits.shape
    return (torch.full((r,), float(temperature), device=logits.device),
            torch.full((r,), top_k or v, dtype=torch.long, device=logits.device),
            torch.full((r,), float(top_p or 1.0), device=logits.device))


def sample_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                uniform: Tensor, alternatives: int = 0
                ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Sample one token per row of `logits` (R, V), each row with its own settings: the rule of
    `filter_logits` (temperature, then top-k, then top-p) in one batched pass. temperature (R,)
    with 0 = greedy; top_k (R,) long, V = off; top_p (R,), 1 = off; uniform (R,) in [0, 1), one
    random number per row (inverse-CDF sampling over the tokens sorted by probability, so a
    row's pick depends only on its own logits, settings and number, not on the other rows).

    Returns ids (R,), their probabilities (R,) under the distribution they were drawn from
    (the plain softmax for greedy rows), and the `alternatives` most likely tokens
    (probabilities (R, A), ids (R, A)) of that distribution."""
    logits = logits.float()
    r, v = logits.shape
    greedy = temperature == 0                                               # (R,)
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = logits / scale[:, None]                                        # (R, V)
    # Only the K best tokens of any row can be drawn (greedy rows need 1): a top-K selection is
    # much cheaper than sorting the whole vocabulary for every row at every step.
    needed = torch.where(greedy, torch.ones_like(top_k), top_k)
    width = min(v, max(int(needed.max()), alternatives, 1))
    if width < v:
        ordered, order = top_k_values(scaled, width)                        # (R, K), sorted
    else:
        ordered, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    rank = torch.arange(width, device=logits.device)                        # (K,)
    k = torch.where(greedy, torch.full_like(top_k, width), top_k)
    ordered = ordered.masked_fill(rank[None] >= k[:, None], float("-inf"))  # top-k
    # Greedy rows report the plain softmax over the whole vocabulary; a pass over the whole
    # vocabulary that sampled rows do not need, so it runs only when one is greedy.
    any_greedy = bool(greedy.any())
    norm = torch.logsumexp(ordered, dim=-1)                                 # (R,)
    if any_greedy:
        norm = torch.where(greedy, torch.logsumexp(scaled, dim=-1), norm)
    probs = torch.exp(ordered - norm[:, None])                              # (R, K)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    nucleus = (top_p < 1) & ~greedy
    drop = nucleus[:, None] & (mass_before >= top_p[:, None])               # top-p
    kept = ordered.masked_fill(drop, float("-inf"))
    norm = torch.where(greedy, norm, torch.logsumexp(kept, dim=-1))
    probs = torch.exp(kept - norm[:, None])                                 # (R, K) sorted
    position = inverse_cdf(probs, uniform)                                  # (R, 1)
    position = torch.where(greedy[:, None], torch.zeros_like(position), position)
    ids = order.gather(-1, position).squeeze(-1)
    if any_greedy:
        ids = torch.where(greedy, logits.argmax(dim=-1), ids)  # argmax's choice among ties
    chosen = probs.gather(-1, position).squeeze(-1)
    a = min(alternatives, width)
    return ids, chosen, (probs[:, :a], order[:, :a])


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """For each row of probs (B, K) and its number u (B,) in [0, 1): the first index (B, 1)
    whose running total passes u × the row's total."""
    cdf = probs.cumsum(dim=-1)                                               # (B, K)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]                         # (B, 1)
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.size(-1) - 1)


def uniform(rows: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """The one random number per row (rows,) in [0, 1) that each sampled token costs."""
    return torch.rand(rows, generator=generator, device=device)
