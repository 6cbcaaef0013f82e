"""The accelerator's Linear: its AMX weight-gradient kernel gives the exact product (up to bf16
rounding) for any number of rows, strides and thread counts, the module matches nn.Linear's
gradients, and it keeps nn.Linear's parameters."""

import pytest
import torch
from torch import nn

from scriven.accel import native
from scriven.accel.linear import AmxLinear as Linear
from scriven.accel.linear import fits

needs_amx = pytest.mark.amx


def _close_to_exact(got: torch.Tensor, exact: torch.Tensor) -> None:
    """Within bf16 rounding of the float64 product (one ulp is 2^-8 of the value)."""
    err = (got.double() - exact).abs()
    assert bool((err <= exact.abs() * 2**-7 + 1e-2 * exact.abs().max()).all()), err.max()


@needs_amx
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,m,n", [(1, 32, 32), (37, 32, 96), (515, 256, 64), (1100, 64, 256),
                                      (31, 8000, 32)])
def test_weight_grad_kernel_is_the_transposed_product(rows, m, n, threads):
    """Row counts off the 32-row tile and across 512-row chunks, either operand the wider one,
    and a gradient that is a column slice of a wider tensor (row stride > width)."""
    g = torch.Generator().manual_seed(rows)
    grad = torch.randn(rows, m + 32, generator=g).bfloat16()[:, 16 : 16 + m]
    x = torch.randn(rows, n, generator=g).bfloat16()
    exact = grad.double().t() @ x.double()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.weight_grad_bf16(grad, x)
    finally:
        torch.set_num_threads(old)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    _close_to_exact(got, exact)


@needs_amx
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients_match_nn_linear(bias, monkeypatch):
    """The module takes the kernel (counted) and its input, weight and bias gradients agree with
    nn.Linear's in float64."""
    calls = []
    kernel = native.weight_grad_bf16
    monkeypatch.setattr(native, "weight_grad_bf16", lambda *a: calls.append(1) or kernel(*a))
    torch.manual_seed(0)
    ours, ref = Linear(64, 96, bias=bias), nn.Linear(64, 96, bias=bias)
    ours.load_state_dict(ref.state_dict())
    ours, ref = ours.bfloat16(), ref.double()
    x = torch.randn(3, 41, 64).bfloat16()
    dy = torch.randn(3, 41, 96).bfloat16()
    xo, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    ours(xo).backward(dy)
    ref(xr).backward(dy.double())
    assert calls == [1]
    _close_to_exact(ours.weight.grad, ref.weight.grad)
    _close_to_exact(xo.grad, xr.grad)
    if bias:
        _close_to_exact(ours.bias.grad, ref.bias.grad)


def test_linear_falls_back_and_keeps_nn_linear_state():
    """Float32 and inference take nn.Linear's path; the state dict is the same; sizes off 32
    are not swapped in."""
    assert not fits(nn.Linear(20, 48)) and fits(nn.Linear(32, 64))
    torch.manual_seed(0)
    ours, ref = Linear(20, 48), nn.Linear(20, 48)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(5, 20, requires_grad=True)
    ours(x).sum().backward()
    assert torch.allclose(ours.weight.grad, torch.ones(48, 1) * x.detach().sum(0))
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
