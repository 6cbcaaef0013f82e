"""Hashed dropout: the native kernel and the PyTorch formula draw the same mask; it keeps about
1 - p of the elements, scales them, is reproducible from torch's seed, and its backward pass
uses the forward's mask."""

import pytest
import torch
import torch.nn.functional as F

from scriven import dropout as hashed
from scriven import native

lib = native.library()


@pytest.mark.skipif(lib is None, reason="no native kernels here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 70001])  # tails, and one call on threads
def test_native_kernel_equals_the_pytorch_formula(dtype, n):
    x = torch.randn(n).to(dtype)
    fast = native.dropout(lib, x, hashed.drop_threshold(0.25), 1 / 0.75, 7, 123456789)
    keep = hashed.keep_mask(n, 0.25, 7, 123456789)
    slow = torch.where(keep, x * (1 / 0.75), torch.zeros((), dtype=dtype))
    assert torch.equal(fast != 0, keep & (x != 0))
    torch.testing.assert_close(fast, slow)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keeps_about_one_minus_p_and_scales(p):
    x = torch.ones(200_000)
    y = hashed.dropout(x, p)
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.01
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))


def test_identity_when_not_training_or_p_zero():
    x = torch.randn(100)
    assert hashed.dropout(x, 0.3, training=False) is x
    assert hashed.dropout(x, 0.0) is x
    module = hashed.Dropout(0.3).eval()
    assert module(x) is x


def test_reproducible_from_the_torch_seed_and_fresh_each_call():
    x = torch.randn(1000)
    torch.manual_seed(5)
    a, b = hashed.dropout(x, 0.3), hashed.dropout(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(hashed.dropout(x, 0.3), a)
    assert not torch.equal(a != 0, b != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_uses_the_forward_mask(dtype):
    x = torch.randn(4, 33).to(dtype).requires_grad_()
    y = hashed.dropout(x, 0.4)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    expected = (y != 0).to(dtype) * (1 / 0.6)
    torch.testing.assert_close(grad, expected)


def test_matches_torch_dropout_in_distribution_of_outputs():
    """Same expectation as F.dropout: the mean of many dropped copies approaches the input."""
    x = torch.randn(64)
    ours = torch.stack([hashed.dropout(x, 0.2) for _ in range(2000)]).mean(0)
    theirs = torch.stack([F.dropout(x, 0.2) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(ours, x, atol=0.12, rtol=0)
    torch.testing.assert_close(theirs, x, atol=0.12, rtol=0)


@pytest.mark.skipif(lib is None, reason="no native kernels here")
def test_without_native_kernels_the_same_mask(monkeypatch):
    x = torch.randn(3, 50)
    torch.manual_seed(1)
    fast = hashed.dropout(x, 0.3)
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    native.library.cache_clear()
    try:
        torch.manual_seed(1)
        slow = hashed.dropout(x, 0.3)
    finally:
        monkeypatch.delenv(native.NATIVE_ENV)
        native.library.cache_clear()
    torch.testing.assert_close(fast, slow)


def _fused_reference(x, residual, relu, p, seeds):
    keep = hashed.keep_mask(x.numel(), p, *seeds).view(x.shape)
    h = (F.relu(x) if relu else x).float()
    out = torch.where(keep, h / (1 - p), torch.zeros(()))
    return out + residual.float() if residual is not None else out


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["residual", "relu"])
def test_fused_residual_and_relu_equal_the_unfused_formula(monkeypatch, native_on, dtype, mode):
    if native_on and lib is None:
        pytest.skip("no native kernels here")
    if not native_on:
        monkeypatch.setenv(native.NATIVE_ENV, "0")
    native.library.cache_clear()
    try:
        x = torch.randn(5, 4099).to(dtype).requires_grad_()  # a tail of 3 past the 16s
        residual = torch.randn(5, 4099).to(dtype).requires_grad_() if mode == "residual" else None
        torch.manual_seed(2)
        y = hashed.dropout(x, 0.3, residual=residual, relu=mode == "relu")
        torch.manual_seed(2)
        seeds = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
        expected = _fused_reference(x.detach(), residual, mode == "relu", 0.3, seeds)
        tol = dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(y.float(), expected.detach(), **tol)
        g = torch.randn(y.shape).to(dtype)
        y.backward(g)
        kept = hashed.keep_mask(x.numel(), 0.3, *seeds).view(x.shape)
        if mode == "relu":
            kept = kept & (x.detach() > 0)
        torch.testing.assert_close(x.grad, torch.where(kept, g / 0.7, torch.zeros((), dtype=dtype)),
                                   **tol)
        if residual is not None:
            assert torch.equal(residual.grad, g)  # the residual path passes gradients through
    finally:
        monkeypatch.delenv(native.NATIVE_ENV, raising=False)
        native.library.cache_clear()


def test_fused_forms_in_eval_mode_and_under_mixed_dtypes():
    x, r = torch.randn(3, 40), torch.randn(3, 40)
    torch.testing.assert_close(hashed.dropout(x, 0.5, training=False, residual=r), x + r)
    torch.testing.assert_close(hashed.dropout(x, 0.5, training=False, relu=True), F.relu(x))
    # A bf16 branch onto an fp32 residual stream (autocast) keeps the stream in fp32.
    y = hashed.dropout(x.bfloat16(), 0.5, residual=r)
    assert y.dtype == torch.float32
    dropped = (y - r).abs() < 1e-6
    assert 0.3 < dropped.float().mean() < 0.7


def test_fused_forms_reject_bad_combinations():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="not both"):
        hashed.dropout(x, 0.1, residual=x, relu=True)
    with pytest.raises(ValueError, match="residual"):
        hashed.dropout(x, 0.1, residual=torch.randn(2, 9))


def test_masks_of_different_calls_are_independent():
    """Two calls' masks agree only by chance (p² + (1-p)² of the time), shifted or not."""
    a = hashed.keep_mask(100_000, 0.5, 12345, 678)
    b = hashed.keep_mask(100_000, 0.5, 12345 + 7, 91011)  # offsets 7 apart
    for shift in (0, 7):
        agree = (a[shift:] == b[: b.numel() - shift]).float().mean().item()
        assert abs(agree - 0.5) < 0.01
    neighbours = (a[1:] == a[:-1]).float().mean().item()  # no correlation along the tensor
    assert abs(neighbours - 0.5) < 0.01
