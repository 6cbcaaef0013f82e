"""Attention: agrees with PyTorch's references, masks are exact, the KV cache is transparent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scriven.attention import (
    KVCache,
    MultiHeadAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
)
from scriven.errors import ScrivenError

ATOL = 1e-5


def _qkv(b: int = 2, h: int = 3, tq: int = 4, tk: int = 5, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=g), torch.randn(b, h, tk, d, generator=g),
            torch.randn(b, h, tk, d, generator=g))


@pytest.mark.parametrize("need_weights", [False, True])
def test_sdpa_matches_torch(need_weights: bool) -> None:
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True  # every row may attend somewhere
    out, w = scaled_dot_product_attention(q, k, v, mask, need_weights=need_weights)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert (w is not None) == need_weights
    if w is not None:
        assert w.shape == (2, 3, 4, 5)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 4))


def test_masked_positions_get_exactly_zero_weight() -> None:
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    mask[0, 0, :, 3:] = False
    mask[1, 0, 2, 1] = False
    _, w = scaled_dot_product_attention(q, k, v, mask, need_weights=True)
    assert w is not None
    assert torch.all(w.masked_select(~mask.expand_as(w)) == 0.0)


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_are_zero_not_nan(need_weights: bool) -> None:
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    mask[1, 0, 2, :] = False
    out, w = scaled_dot_product_attention(q, k, v, mask, need_weights=need_weights)
    assert torch.isfinite(out).all()
    assert torch.all(out[1, :, 2] == 0)
    if w is not None:
        assert torch.all(w[1, :, 2] == 0)


def test_mask_must_be_boolean() -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError):
        scaled_dot_product_attention(q, k, v, torch.ones(1, 1, 4, 5))


def test_causal_and_padding_masks() -> None:
    m = causal_mask(3)
    assert m.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # A chunk of 2 queries after 3 cached positions sees everything up to itself.
    m = causal_mask(2, past=3)
    assert m.shape == (2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    ids = torch.tensor([[5, 6, 0], [7, 0, 0]])
    p = padding_mask(ids, pad_id=0)
    assert p.shape == (2, 1, 1, 3)
    assert p[:, 0, 0].tolist() == [[True, True, False], [True, False, False]]


def _copy_from_torch(mha: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    wq, wk, wv = ref.in_proj_weight.chunk(3)
    bq, bk, bv = ref.in_proj_bias.chunk(3)
    with torch.no_grad():
        mha.q_proj.weight.copy_(wq)
        mha.k_proj.weight.copy_(wk)
        mha.v_proj.weight.copy_(wv)
        mha.q_proj.bias.copy_(bq)
        mha.k_proj.bias.copy_(bk)
        mha.v_proj.bias.copy_(bv)
        mha.out_proj.weight.copy_(ref.out_proj.weight)
        mha.out_proj.bias.copy_(ref.out_proj.bias)


def _pair(d: int = 16, h: int = 4) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(d, h, batch_first=True).eval()
    mha = MultiHeadAttention(d, h, dropout=0.0).eval()
    _copy_from_torch(mha, ref)
    return mha, ref


def test_self_attention_matches_nn_multihead_attention() -> None:
    mha, ref = _pair()
    x = torch.randn(2, 6, 16)
    allowed = causal_mask(6)
    out, w = mha(x, mask=allowed, need_weights=True)
    ref_out, ref_w = ref(x, x, x, attn_mask=~allowed, average_attn_weights=False)  # True = blocked
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=ATOL, rtol=0)


def test_cross_attention_with_padding_matches_nn_multihead_attention() -> None:
    mha, ref = _pair()
    x = torch.randn(2, 3, 16)
    memory = torch.randn(2, 5, 16)
    ids = torch.tensor([[4, 5, 6, 7, 8], [4, 5, 0, 0, 0]])
    out, _ = mha(x, memory=memory, mask=padding_mask(ids, 0))
    ref_out, _ = ref(x, memory, memory, key_padding_mask=ids == 0)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)


def test_padding_the_keys_does_not_change_results() -> None:
    mha, _ = _pair()
    x = torch.randn(1, 3, 16)
    memory = torch.randn(1, 4, 16)
    out, w = mha(x, memory=memory, need_weights=True)
    padded = torch.cat([memory, torch.randn(1, 3, 16)], dim=1)  # 3 garbage positions
    ids = torch.tensor([[9, 9, 9, 9, 0, 0, 0]])
    out_p, w_p = mha(x, memory=padded, mask=padding_mask(ids, 0), need_weights=True)
    torch.testing.assert_close(out_p, out, atol=ATOL, rtol=0)
    assert w is not None and w_p is not None
    torch.testing.assert_close(w_p[..., :4], w, atol=ATOL, rtol=0)
    assert torch.all(w_p[..., 4:] == 0)


def test_causal_mask_hides_the_future() -> None:
    mha, _ = _pair()
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4] += 5.0  # change token 4
    out_x, _ = mha(x, mask=causal_mask(6))
    out_y, _ = mha(y, mask=causal_mask(6))
    torch.testing.assert_close(out_x[:, :4], out_y[:, :4], atol=ATOL, rtol=0)
    assert not torch.allclose(out_x[:, 4:], out_y[:, 4:])


def test_cached_incremental_self_attention_equals_full() -> None:
    mha, _ = _pair()
    x = torch.randn(2, 7, 16)
    full, _ = mha(x, mask=causal_mask(7))
    cache = KVCache()
    steps = []
    for t in range(5):  # one token at a time: no mask needed, all cached keys are in the past
        out, _ = mha(x[:, t : t + 1], cache=cache)
        steps.append(out)
    out, _ = mha(x[:, 5:7], cache=cache, mask=causal_mask(2, past=5))  # then a 2-token chunk
    steps.append(out)
    assert cache.length == 7
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_cross_attention_cache_projects_memory_once() -> None:
    mha, _ = _pair()
    x = torch.randn(2, 3, 16)
    memory = torch.randn(2, 5, 16)
    full, _ = mha(x, memory=memory)
    cache = KVCache()
    first, _ = mha(x[:, :1], memory=memory, cache=cache)
    key = cache.key
    # Memory is ignored once cached: garbage memory gives the same answer.
    rest, _ = mha(x[:, 1:], memory=torch.zeros_like(memory), cache=cache)
    assert cache.key is key
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=ATOL, rtol=0)


def test_cache_reorder_selects_batch_rows() -> None:
    mha, _ = _pair()
    x = torch.randn(3, 4, 16)
    cache = KVCache()
    mha(x[:, :3], cache=cache)
    index = torch.tensor([2, 2, 0])
    cache.reorder(index)
    out, _ = mha(x[index, 3:4], cache=cache)
    full, _ = mha(x[index], mask=causal_mask(4))
    torch.testing.assert_close(out, full[:, 3:4], atol=ATOL, rtol=0)


def test_bad_head_count_is_a_user_error() -> None:
    with pytest.raises(ScrivenError, match="d_model"):
        MultiHeadAttention(10, 4, 0.1)
    with pytest.raises(ScrivenError, match="dropout"):
        MultiHeadAttention(8, 4, 1.5)
