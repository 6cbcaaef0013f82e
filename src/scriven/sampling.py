"""Decoding rules as small pure functions on logits, composed in a fixed order by `sample_rows`
(one batched sampler, each row with its own settings; `sample_next` is its scalar form).

Every filter takes logits (..., V) and returns logits of the same shape, with removed tokens at
-inf, so each can be tested alone: top-k of 1 equals argmax, top-p of 1 changes nothing,
temperature 0 means greedy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import accel
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
    was drawn from (for greedy: the plain softmax): `sample_shared` with one random number per
    row from `generator`."""
    u = uniform(logits.size(0), generator, logits.device) if temperature else None
    return sample_shared(logits, temperature, top_k, top_p, u)[:2]


def row_settings(logits: Tensor, temperature: float, top_k: int | None,
                 top_p: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Scalar settings as the per-row tensors (R,) `sample_rows` takes: top-k None is the
    vocabulary size and top-p None is 1 (both off)."""
    r, v = logits.shape
    return (torch.full((r,), float(temperature), device=logits.device),
            torch.full((r,), top_k or v, dtype=torch.long, device=logits.device),
            torch.full((r,), float(top_p or 1.0), device=logits.device))


Sampled = tuple[Tensor, Tensor, tuple[Tensor, Tensor]]  # ids, probabilities, alternatives


def sample_shared(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                  uniform: Tensor | None, alternatives: int = 0) -> Sampled:
    """`sample_rows` for settings every row shares (generation's batch of samples): the same
    passes and the same picks, the pass chosen once from the settings. Greedy (temperature 0)
    needs no random numbers: `uniform` may then be None."""
    logits = logits.float()
    v = logits.size(-1)
    kind = _GREEDY if temperature == 0 else (
        _FILTERED if (top_k or v) < v or (top_p or 1.0) < 1 else _PLAIN)
    if kind == _PLAIN:  # the common case: building per-row settings cost ~40 % of a one-row draw
        return _draw(logits if temperature == 1 else logits / temperature, uniform,
                     min(alternatives, v))
    if kind == _FILTERED and (top_p or 1.0) >= 1 and not alternatives:
        picked = _native_top_k(logits, top_k, temperature, uniform)
        if picked is not None:
            return picked
    return _PASSES[kind](logits, *row_settings(logits, temperature, top_k, top_p), uniform,
                         min(alternatives, v))


def sample_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                uniform: Tensor, alternatives: int = 0) -> Sampled:
    """Sample one token per row of `logits` (R, V), each row with its own settings: the rule of
    `filter_logits` (temperature, then top-k, then top-p). temperature (R,) with 0 = greedy;
    top_k (R,) long, V = off; top_p (R,), 1 = off; uniform (R,) in [0, 1), one random number
    per row (inverse-CDF sampling). A row's pick depends only on its own logits, settings and
    number, never on the other rows, so a seeded request gives the same text in any batch.

    Returns ids (R,), their probabilities (R,) under the distribution they were drawn from
    (the plain softmax for greedy rows), and the `alternatives` most likely tokens
    (probabilities (R, A), ids (R, A)) of that distribution, most likely first."""
    logits = logits.float()
    r, v = logits.shape
    alternatives = min(alternatives, v)
    # Each kind of row has its own cheapest pass: filtered rows need their best tokens sorted,
    # the others do not (a sort of the whole vocabulary per row costs some 70 softmaxes).
    kinds = torch.where(temperature == 0, _GREEDY,
                        torch.where((top_k < v) | (top_p < 1), _FILTERED, _PLAIN))  # (R,)
    counts = torch.bincount(kinds, minlength=len(_PASSES)).tolist()
    if max(counts) == r:  # one kind of row: no gathering
        return _PASSES[counts.index(r)](logits, temperature, top_k, top_p, uniform, alternatives)
    ids = torch.empty(r, dtype=torch.long, device=logits.device)
    probs = torch.empty(r, device=logits.device)
    alt_p = torch.empty(r, alternatives, device=logits.device)
    alt_i = torch.empty(r, alternatives, dtype=torch.long, device=logits.device)
    for kind, count in enumerate(counts):
        if count:
            i = (kinds == kind).nonzero().squeeze(1)
            ids[i], probs[i], (alt_p[i], alt_i[i]) = _PASSES[kind](
                logits[i], temperature[i], top_k[i], top_p[i], uniform[i], alternatives)
    return ids, probs, (alt_p, alt_i)


def _greedy_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                 uniform: Tensor | None, alternatives: int) -> Sampled:
    """Argmax, with its probability under the plain softmax (the settings do not matter)."""
    ids = logits.argmax(dim=-1)                                             # (R,)
    best = logits.gather(-1, ids[:, None]).squeeze(-1)
    chosen = torch.exp(best - torch.logsumexp(logits, dim=-1))
    return ids, chosen, _top(lambda: torch.softmax(logits, dim=-1), alternatives, ids)


def _plain_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                uniform: Tensor, alternatives: int) -> Sampled:
    """Temperature only: the whole vocabulary, in its own order."""
    if bool((temperature != 1).any()):  # dividing a whole batch of logits by 1 costs a pass
        logits = logits / temperature[:, None]
    return _draw(logits, uniform, alternatives)


def _draw(logits: Tensor, uniform: Tensor, alternatives: int) -> Sampled:
    """One token per row from the softmax of logits (R, V), already divided by the temperature.
    Where the native kernels run, they draw by the same rule (`accel.sample_plain`): PyTorch's
    softmax and running sums over a large vocabulary can cost more than the model's step."""
    if not alternatives:
        picked = accel.sample_plain(logits, uniform)
        if picked is not None:
            return picked[0], picked[1], _top(None, 0, picked[0])
    probs = torch.softmax(logits, dim=-1)                                   # (R, V)
    ids = inverse_cdf(probs, uniform)                                       # (R, 1)
    return ids.squeeze(-1), probs.gather(-1, ids).squeeze(-1), \
        _top(lambda: probs, alternatives, ids.squeeze(-1))


def _native_top_k(logits: Tensor, top_k: int | Tensor, temperature: float | Tensor,
                  uniform: Tensor) -> Sampled | None:
    """Top-k alone (no top-p, no alternatives) in one pass a row on the native kernels where they
    run, the same picks as `_filtered_rows`; None where they do not apply."""
    picked = accel.sample_top_k(logits, top_k, temperature, uniform)
    return None if picked is None else (picked[0], picked[1], _top(None, 0, picked[0]))


def _filtered_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                   uniform: Tensor, alternatives: int) -> Sampled:
    """Top-k and/or top-p: over each row's best tokens, sorted by probability (only the K best
    of any row can be drawn, and a top-K selection is much cheaper than a sort of all V).
    Temperature keeps the order, so it scales the K kept logits, not all V."""
    v = logits.size(-1)
    trims_p = bool((top_p < 1).any())
    if not alternatives and not trims_p:
        picked = _native_top_k(logits, top_k, temperature, uniform)
        if picked is not None:
            return picked
    width = min(v, max(int(top_k.max()), alternatives, 1))
    if width < v:
        ordered, order = top_k_values(logits, width)                        # (R, K), sorted
    else:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
    ordered = ordered / temperature[:, None]
    if bool((top_k < width).any()):
        rank = torch.arange(width, device=logits.device)                    # (K,)
        ordered = ordered.masked_fill(rank[None] >= top_k[:, None], float("-inf"))  # top-k
    probs = torch.softmax(ordered, dim=-1)                                  # (R, K)
    if trims_p:
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= top_p[:, None]                                # top-p
        probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
    position = inverse_cdf(probs, uniform)                                  # (R, 1)
    a = min(alternatives, width)
    return (order.gather(-1, position).squeeze(-1), probs.gather(-1, position).squeeze(-1),
            (probs[:, :a], order[:, :a]))


_GREEDY, _PLAIN, _FILTERED = 0, 1, 2
_PASSES = (_greedy_rows, _plain_rows, _filtered_rows)


def _top(probs: Callable[[], Tensor], count: int, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The `count` most likely tokens (probabilities (R, A), ids (R, A)); the distribution is
    computed only when some are asked for."""
    if not count:
        return ids.new_empty(ids.size(0), 0, dtype=torch.float), ids.new_empty(ids.size(0), 0)
    return torch.topk(probs(), count, dim=-1)


SCAN_BLOCK = 128  # see inverse_cdf
BLOCKED_SCAN_MIN = 2**18


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """For each row of probs (B, K) and its number u (B,) in [0, 1): the first index (B, 1)
    whose running total passes u × the row's total.

    A whole vocabulary is not summed running: a running sum is one long chain of additions,
    and over 64 rows of 12,000 tokens it cost more than the softmax. Large batches of wide rows
    are cut into blocks instead: the block totals (plain sums, which vectorise) and their
    running sum find the block that holds the pick, and only that block is summed running.
    Below 2^18 probabilities the blocks' extra calls cost more than they save (measured).
    Both ways pick by the same rule; they may differ where u falls within rounding of a
    boundary between two tokens."""
    r, k = probs.shape
    target = u.to(probs.dtype)[:, None]                                      # (B, 1)
    if r * k < BLOCKED_SCAN_MIN or k < 8 * SCAN_BLOCK:
        cdf = probs.cumsum(dim=-1)                                           # (B, K)
        return torch.searchsorted(cdf, target * cdf[:, -1:], right=True).clamp_(max=k - 1)
    whole = k - k % SCAN_BLOCK
    totals = probs[:, :whole].reshape(r, -1, SCAN_BLOCK).sum(dim=-1)         # (B, N)
    if whole < k:
        totals = torch.cat([totals, probs[:, whole:].sum(dim=-1, keepdim=True)], dim=1)
    running = totals.cumsum(dim=-1)                                          # (B, N)
    target = target * running[:, -1:]
    block = torch.searchsorted(running, target, right=True).clamp_(max=totals.size(1) - 1)
    before = running.gather(1, block) - totals.gather(1, block)              # (B, 1)
    index = block * SCAN_BLOCK + torch.arange(SCAN_BLOCK, device=probs.device)  # (B, S)
    inside = probs.gather(1, index.clamp(max=k - 1)).masked_fill_(index >= k, 0)
    step = torch.searchsorted(before + inside.cumsum(dim=-1), target, right=True)
    return (block * SCAN_BLOCK + step.clamp_(max=SCAN_BLOCK - 1)).clamp_(max=k - 1)


def uniform(rows: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """The one random number per row (rows,) in [0, 1) that each sampled token costs."""
    return torch.rand(rows, generator=generator, device=device)
