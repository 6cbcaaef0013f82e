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


# ---- The native kernel for short sequences (heads read in place, dropout hashed) ----

needs_native = pytest.mark.native


def _reference(q, k, v, heads, mask, p=0.0, seeds=(0, 0)):
    """The general path's formula in float32 on (B, T, D) inputs, dropout by `keep_mask`."""
    from scriven.accel.dropout import keep_mask

    b, tq, d = q.shape
    tk, dh = k.size(1), d // heads
    qh, kh, vh = (t.float().view(b, -1, heads, dh).transpose(1, 2) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / dh**0.5                           # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    w = torch.softmax(scores, -1).nan_to_num(0.0)  # rows with nothing allowed: zero
    if p > 0:
        w = w * keep_mask(b * heads * tq * tk, p, *seeds).view(b, heads, tq, tk) / (1 - p)
    return (w @ vh).transpose(1, 2).reshape(b, tq, d)


def _short_case(dtype, causal, seed=0, t=7, s=9):
    g = torch.Generator().manual_seed(seed)
    b, d = 5, 64
    tk = t if causal else s
    q, k, v = (torch.randn(b, n, d, generator=g).to(dtype).requires_grad_() for n in (t, tk, tk))
    lengths = torch.tensor([tk, 3, 1, tk - 1, 0])  # the last row may attend to nothing
    mask = (torch.arange(tk)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, Tk)
    if causal:
        mask = mask & causal_mask(t)
    return q, k, v, mask


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("lengths", [(7, 9), (19, 21)])  # the kernel's two ways to score keys
def test_short_attention_and_its_gradients_equal_the_formula(dtype, causal, p, lengths):
    from scriven.accel.attention import short_attention

    q, k, v, mask = _short_case(dtype, causal, t=lengths[0], s=lengths[1])
    torch.manual_seed(3)
    out = short_attention(q, k, v, 4, mask, p)
    torch.manual_seed(3)  # the kernel's dropout seeds come from torch's generator
    seeds = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist() if p > 0 else (0, 0)
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _reference(q2, k2, v2, 4, mask, p, seeds)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    out.backward(grad.to(dtype))
    ref.backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    for mine, theirs in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(mine.grad.float(), theirs.grad, atol=tol, rtol=tol)
    assert out[4].abs().max() == 0 and q.grad[4].abs().max() == 0  # nothing to attend: zero


@needs_native
def test_short_attention_dropout_keeps_the_expected_share_and_is_seeded():
    from scriven.accel.attention import short_attention

    q = k = v = torch.randn(8, 12, 64)
    torch.manual_seed(0)
    a = short_attention(q, k, v, 4, None, 0.5)
    torch.manual_seed(0)
    b = short_attention(q, k, v, 4, None, 0.5)
    c = short_attention(q, k, v, 4, None, 0.5)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)
    # With values of 1 each output is its row's kept weights / (1 - p): 1 on average.
    kept = short_attention(q, k, torch.ones_like(v), 4, None, 0.5)
    assert 0.85 < kept.mean().item() < 1.15
    assert kept.std() > 0.1  # without dropout every output would be exactly 1


@needs_native
def test_short_attention_declines_what_it_cannot_do():
    from scriven.accel.attention import SHORT_MAX_LEN, short_attention

    q = torch.randn(2, 3, 64)
    long = torch.randn(2, SHORT_MAX_LEN + 1, 64)
    assert short_attention(q, long, long, 4, None, 0.0) is None          # too many keys
    assert short_attention(q, q, q, 8, None, 0.0) is None                # head size 8
    per_head = torch.ones(2, 4, 3, 3, dtype=torch.bool)
    assert short_attention(q, q, q, 4, per_head, 0.0) is None            # mask per head
    assert short_attention(q.double(), q.double(), q.double(), 4, None, 0.0) is None
    assert short_attention(q, q[:, :0], q[:, :0], 4, None, 0.0) is None          # no keys
    with pytest.raises(ValueError, match="boolean"):
        short_attention(q, q, q, 4, torch.ones(3, 3), 0.0)


@needs_native
@pytest.mark.parametrize("cross", [False, True])
def test_multi_head_attention_gives_the_same_result_on_both_paths(cross, monkeypatch):
    """The module's output and parameter gradients do not depend on which path ran."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 4).eval()
    x, memory = torch.randn(3, 5, 64), torch.randn(3, 7, 64)
    ids = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    mask = padding_mask(ids, 0) if cross else causal_mask(5)

    def run():
        mha.zero_grad()
        out, _ = mha(x, memory=memory if cross else None, mask=mask)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in mha.parameters()]

    from scriven.accel.attention import short_attention

    calls = []
    mha.kernel = lambda *a: calls.append(1) or short_attention(*a)
    native_out, native_grads = run()
    assert calls, "the native path did not run"
    mha.kernel = None
    general_out, general_grads = run()
    torch.testing.assert_close(native_out, general_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(native_grads, general_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_projections_are_made_once_whichever_path_runs():
    """A kernel that declines (returns None) hands its projections to SDPA: each projection
    runs once per call either way."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4).eval()
    counts = {"q": 0, "k": 0, "v": 0}
    for name in counts:
        getattr(mha, f"{name}_proj").register_forward_hook(
            lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    x = torch.randn(2, 5, 32)
    plain, _ = mha(x)
    mha.kernel = lambda *a: None
    declined, _ = mha(x)
    assert counts == {"q": 2, "k": 2, "v": 2}
    torch.testing.assert_close(plain, declined)
