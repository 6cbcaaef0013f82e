"""Hashed dropout (the accelerator's `nn.Dropout`): the native kernel and the PyTorch formula draw
the same mask; it keeps about 1 - p of the elements, scales them, is reproducible from torch's
seed, and its backward pass uses the forward's mask."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scriven.accel import dropout as hashed
from scriven.accel import native

pytestmark = pytest.mark.native


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 70001])  # tails, and one call on threads
def test_native_kernel_equals_the_pytorch_formula(dtype, n):
    x = torch.randn(n).to(dtype)
    fast = native.dropout(x, hashed.drop_threshold(0.25), 1 / 0.75, 7, 123456789)
    keep = hashed.keep_mask(n, 0.25, 7, 123456789)
    slow = torch.where(keep, x * (1 / 0.75), torch.zeros((), dtype=dtype))
    assert torch.equal(fast != 0, keep & (x != 0))
    torch.testing.assert_close(fast, slow)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keeps_about_one_minus_p_and_scales(p):
    x = torch.ones(200_000)
    y = hashed.HashDropout(p)(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.01
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))


def test_identity_when_not_training_and_nn_dropout_where_the_kernel_does_not_apply():
    x = torch.randn(100)
    torch.testing.assert_close(hashed.HashDropout(0.3).eval()(x), x)
    torch.testing.assert_close(hashed.HashDropout(0.0)(x), x)
    torch.manual_seed(3)
    doubles = hashed.HashDropout(0.3)(x.double())  # a dtype the kernel does not take
    torch.manual_seed(3)
    torch.testing.assert_close(doubles, nn.Dropout(0.3)(x.double()))


def test_reproducible_from_the_torch_seed_and_fresh_each_call():
    x, drop = torch.randn(1000), hashed.HashDropout(0.3)
    torch.manual_seed(5)
    a, b = drop(x), drop(x)
    torch.manual_seed(5)
    assert torch.equal(drop(x), a)
    assert not torch.equal(a != 0, b != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_uses_the_forward_mask(dtype):
    x = torch.randn(4, 33).to(dtype).requires_grad_()
    y = hashed.HashDropout(0.4)(x)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    expected = (y != 0).to(dtype) * (1 / 0.6)
    torch.testing.assert_close(grad, expected)


def test_matches_torch_dropout_in_distribution_of_outputs():
    """Same expectation as F.dropout: the mean of many dropped copies approaches the input."""
    x, drop = torch.randn(64), hashed.HashDropout(0.2)
    ours = torch.stack([drop(x) for _ in range(2000)]).mean(0)
    theirs = torch.stack([F.dropout(x, 0.2) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(ours, x, atol=0.12, rtol=0)
    torch.testing.assert_close(theirs, x, atol=0.12, rtol=0)


@pytest.mark.filterwarnings("ignore")
def test_masks_of_different_calls_are_independent():
    """Two calls' masks agree only by chance (p² + (1-p)² of the time), shifted or not."""
    a = hashed.keep_mask(100_000, 0.5, 12345, 678)
    b = hashed.keep_mask(100_000, 0.5, 12345 + 7, 91011)  # offsets 7 apart
    for shift in (0, 7):
        agree = (a[shift:] == b[: b.numel() - shift]).float().mean().item()
        assert abs(agree - 0.5) < 0.01
    neighbours = (a[1:] == a[:-1]).float().mean().item()  # no correlation along the tensor
    assert abs(neighbours - 0.5) < 0.01
