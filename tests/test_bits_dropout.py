"""The portable dropout (16 random bits per element, drawn 64 at a time): it drops at the rate
asked for within 2^-16, scales what it keeps so the expectation is unchanged, is reproducible
from torch's seed, and its backward pass uses the forward's mask."""

import pytest
import torch

from scriven.accel.dropout import BitsDropout, bits_keep_mask, bits_threshold


@pytest.mark.parametrize("p", [0.0, 1e-6, 0.1, 0.3, 0.5, 0.999])
def test_the_rate_is_p_rounded_to_16_bits(p):
    threshold, q = bits_threshold(p)
    assert abs(q - p) <= 2**-17 + 1e-12
    assert -32768 <= threshold <= 32767
    assert threshold + 32768 == round(q * 65536)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keeps_about_one_minus_p_and_scales_to_the_same_mean(p):
    torch.manual_seed(0)
    x = torch.ones(400_003)  # not a multiple of 4: the last 64-bit word is cut
    y = BitsDropout(p)(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - bits_threshold(p)[1])))


def test_bits_are_not_correlated_between_neighbours():
    torch.manual_seed(1)
    keep, _ = bits_keep_mask(torch.Size([200_000]), 0.5)
    k = keep.float()
    both = (k[:-1] * k[1:]).mean().item()   # independent halves: 1/4
    assert abs(both - 0.25) < 0.01
    every_fourth = k.view(-1, 4).mean(0)     # each 16-bit lane of a word drops alike
    assert torch.all((every_fourth - 0.5).abs() < 0.01)


def test_backward_uses_the_forward_mask_and_the_seed_repeats_it():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(5)
    y = BitsDropout(0.3)(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, y != 0)
    torch.manual_seed(5)
    assert torch.equal(BitsDropout(0.3)(x), y)


def test_evaluation_and_p_zero_change_nothing():
    x = torch.randn(10, 10)
    d = BitsDropout(0.5).eval()
    assert torch.equal(d(x), x)
    assert torch.equal(BitsDropout(0.0)(x), x)
