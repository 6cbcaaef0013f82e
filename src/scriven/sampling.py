"""Decoding rules as small pure functions on logits, composed in a fixed order by `sample_next`.

Every filter takes logits (..., V) and returns logits of the same shape, with removed tokens at
-inf, so each can be tested alone: top-k of 1 equals argmax, top-p of 1 changes nothing,
temperature 0 means greedy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .accel import native
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
    replaced by a cheap max per block and a top-k over k blocks. Where the native kernels run
    (`scriven.native`), a small k takes one pass over each row instead."""
    lib = native.library()
    if (lib is not None and logits.dim() == 2 and k <= native.MAX_TOP_K
            and logits.dtype == torch.float32 and logits.device.type == "cpu"):
        return native.top_k(logits, k)
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
    was drawn from (for greedy: the plain softmax)."""
    logits = logits.float()
    if temperature == 0:
        ids = logits.argmax(dim=-1)                                          # (B,)
        best = logits.gather(-1, ids[:, None]).squeeze(-1)
        return ids, torch.exp(best - torch.logsumexp(logits, dim=-1))
    if top_k is not None and top_k < logits.size(-1):
        lib = native.library()
        if (lib is not None and top_p is None and top_k <= native.MAX_TOP_K
                and logits.device.type == "cpu" and logits.dim() == 2):
            # The same steps and the same random number, in one native call.
            return native.sample_top_k(logits, top_k, temperature,
                                       uniform(logits.size(0), generator, logits.device))
        # Same distribution as top_k_filter, but softmax and top-p run over k values, not V.
        values, indices = top_k_values(logits, top_k)                        # (B, k)
        probs = torch.softmax(filter_logits(values, temperature, None, top_p), dim=-1)
        choice = draw(probs, generator)                                      # (B, 1)
        return indices.gather(-1, choice).squeeze(-1), probs.gather(-1, choice).squeeze(-1)
    probs = torch.softmax(filter_logits(logits, temperature, None, top_p), dim=-1)
    choice = draw(probs, generator)
    return choice.squeeze(-1), probs.gather(-1, choice).squeeze(-1)


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index (B, 1) per row of probs (B, K), each with its probability: inverse-CDF
    sampling, which costs less than torch.multinomial and is what the server's batched
    sampler does too."""
    return inverse_cdf(probs, uniform(probs.size(0), generator, probs.device))


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """For each row of probs (B, K) and its number u (B,) in [0, 1): the first index (B, 1)
    whose running total passes u × the row's total."""
    cdf = probs.cumsum(dim=-1)                                               # (B, K)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]                         # (B, 1)
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.size(-1) - 1)


def uniform(rows: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """The one random number per row (rows,) in [0, 1) that each sampled token costs."""
    return torch.rand(rows, generator=generator, device=device)
