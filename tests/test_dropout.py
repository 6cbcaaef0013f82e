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
