import math

import pytest
import torch

from scriven.errors import ScrivenError
from scriven.sampling import (
    BLOCKED_SCAN_MIN,
    SCAN_BLOCK,
    filter_logits,
    inverse_cdf,
    repetition_penalty_filter,
    sample_next,
    sample_rows,
    sample_with_probability,
    top_k_filter,
    top_k_values,
    top_p_filter,
    validate,
)


def logits(batch=3, vocab=50, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed))


def test_top_k_of_one_equals_argmax():
    x = logits()
    for seed in range(5):
        got = sample_next(x, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, x.argmax(-1))


def test_temperature_zero_is_greedy():
    x = logits()
    assert torch.equal(sample_next(x, temperature=0), x.argmax(-1))


def test_top_p_of_one_changes_nothing():
    x = logits()
    assert torch.equal(top_p_filter(x, 1.0), x)


def test_top_k_keeps_exactly_k_highest():
    x = logits()
    kept = torch.isfinite(top_k_filter(x, 7))
    assert kept.sum(-1).tolist() == [7, 7, 7]
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, x.topk(7).indices, True))


def test_top_p_keeps_smallest_set_reaching_p():
    x = logits(batch=1, vocab=200)
    p = 0.6
    kept = torch.isfinite(top_p_filter(x, p))[0]
    probs = torch.softmax(x, -1)[0]
    mass = probs[kept].sum().item()
    assert mass >= p
    # dropping the least likely kept token would fall below p
    assert mass - probs[kept].min().item() < p
    # every kept token is more likely than every dropped one
    assert probs[kept].min() >= probs[~kept].max()


def test_top_p_always_keeps_the_top_token():
    x = torch.tensor([[10.0, 0.0, 0.0]])
    assert torch.isfinite(top_p_filter(x, 1e-9)).sum() == 1


def test_fast_top_k_sampling_matches_filtered_distribution():
    # sample_next's top-k path samples from k values; compare frequencies with the filter.
    x = logits(batch=1, vocab=20, seed=3)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(x, 0.8, top_k=4, top_p=0.9, generator=g) for _ in range(4000)])
    expected = torch.softmax(filter_logits(x, 0.8, 4, 0.9), -1)[0]
    freq = torch.bincount(draws.flatten(), minlength=20).float() / draws.numel()
    assert torch.allclose(freq, expected, atol=0.03)
    assert (freq[expected == 0] == 0).all()


def test_repetition_penalty_lowers_seen_tokens_only():
    x = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = repetition_penalty_filter(x, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_sampling_is_reproducible_with_a_seed():
    x = logits()
    a = sample_next(x, 1.0, generator=torch.Generator().manual_seed(7))
    b = sample_next(x, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, word", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=51), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_parameters_are_named(kwargs, word):
    args = dict(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, vocab_size=50)
    args.update(kwargs)
    with pytest.raises(ScrivenError, match=word):
        validate(**args)


@pytest.mark.parametrize("rows, vocab, k", [(16, 5000, 10), (9, 4096, 3), (64, 1200, 1),
                                            (8, 12157, 40), (2, 5000, 10), (16, 300, 10)])
def test_blockwise_top_k_equals_torch_topk(rows, vocab, k):
    torch.manual_seed(rows + vocab + k)
    logits = torch.randn(rows, vocab) * 3
    logits[0, -1] = 100.0  # the best token in the tail that fills no block
    values, ids = top_k_values(logits, k)
    expected_values, expected_ids = torch.topk(logits, k, dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(ids, expected_ids)


def test_blockwise_top_k_with_ties_returns_a_valid_top_k():
    logits = torch.zeros(16, 4096)
    logits[:, 100:105] = 1.0
    values, ids = top_k_values(logits, 8)
    assert torch.equal(values, torch.topk(logits, 8).values)
    assert torch.equal(logits.gather(1, ids), values)


SETTINGS = [(1.0, None, None), (0.6, None, None), (0.7, 10, None), (1.3, None, 0.9), (0.0, None, None), (0.8, 5, 0.5)]


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_one_row_of_the_batched_sampler_equals_the_scalar_path(temperature, top_k, top_p):
    x = logits(batch=4, vocab=300, seed=3)
    ids, probs = sample_with_probability(x, temperature, top_k, top_p,
                                         torch.Generator().manual_seed(9))
    u = torch.rand(4, generator=torch.Generator().manual_seed(9))  # the numbers it drew
    for r in range(4):
        one_id, one_prob, _ = sample_rows(x[r:r + 1], torch.tensor([temperature]),
                                          torch.tensor([top_k or 300]),
                                          torch.tensor([top_p or 1.0]), u[r:r + 1])
        assert int(one_id) == int(ids[r]) and float(one_prob) == pytest.approx(float(probs[r]))


def test_a_row_draws_the_same_whatever_the_other_rows_ask():
    x = logits(batch=len(SETTINGS), vocab=300, seed=4)
    temperature, top_k, top_p = (torch.tensor([s[i] or d for s in SETTINGS])
                                 for i, d in ((0, 0.0), (1, 300), (2, 1.0)))
    u = torch.rand(len(SETTINGS), generator=torch.Generator().manual_seed(2))
    ids, probs, _ = sample_rows(x, temperature, top_k, top_p, u)
    for r in range(len(SETTINGS)):
        alone = sample_rows(x[r:r + 1], temperature[r:r + 1], top_k[r:r + 1], top_p[r:r + 1],
                            u[r:r + 1])
        assert int(alone[0]) == int(ids[r]) and float(alone[1]) == pytest.approx(float(probs[r]))


@pytest.mark.parametrize("rows, vocab", [(64, 12_157), (3, 100_003), (256, 8 * SCAN_BLOCK)])
def test_blocked_inverse_cdf_picks_what_a_running_sum_picks(rows, vocab):
    assert rows * vocab >= BLOCKED_SCAN_MIN  # the blocked way, against the plain definition
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(rows, vocab, generator=g), dim=-1)
    probs[:, -5:] = 0  # a tail nothing can be drawn from, past the last whole block
    cdf = probs.double().cumsum(dim=-1)
    agree = total = 0
    for _ in range(20):
        u = torch.rand(rows, generator=g)
        got = inverse_cdf(probs, u)
        expected = torch.searchsorted(cdf, u.double()[:, None] * cdf[:, -1:], right=True)
        assert (probs.gather(1, got) > 0).all()
        agree += int((got == expected).sum())
        total += rows
    assert agree >= total - 2  # only where u falls within float rounding of a boundary


def test_blocked_inverse_cdf_at_the_ends_of_the_range():
    probs = torch.full((64, 5000), 1 / 5000)
    ends = torch.tensor([0.0, 1 - 2**-24] * 32)
    got = inverse_cdf(probs, ends).squeeze(1)
    assert got[0::2].eq(0).all() and got[1::2].eq(4999).all()
