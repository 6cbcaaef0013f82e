"""The accelerator's layer norm: the native kernel gives nn.LayerNorm's output and gradients,
falls back to it where the kernel does not apply, and keeps its parameters (checkpoints load
either way)."""

import pytest
import torch
from torch import nn

from scriven.accel import native
from scriven.accel.layernorm import NativeLayerNorm as LayerNorm
from scriven.accel.layernorm import fits


def _pair(d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ours, ref = LayerNorm(d), nn.LayerNorm(d)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
        ref.bias.copy_(0.2 * torch.randn(d, generator=g))
    ours.load_state_dict(ref.state_dict())
    return ours.to(dtype), ref.to(dtype), g


@pytest.mark.native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 256), (5, 48), (1, 1, 16)])
def test_native_equals_nn_layer_norm_with_gradients(dtype, shape):
    """Against nn.LayerNorm in float64: output and gradients of x, weight and bias within the
    dtype's rounding (bf16 sums over rows in float here, so it is compared with the exact
    values rather than with PyTorch's bf16 kernel)."""
    ours, ref, g = _pair(shape[-1], dtype)
    ref = ref.double()
    x = (3 * torch.randn(shape, generator=g) + 1).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    outs = []
    for module, xd, dyd in ((ours, x, dy), (ref, x.double(), dy.double())):
        xi = xd.clone().requires_grad_()
        y = module(xi)
        y.backward(dyd)
        outs.append((y, xi.grad, module.weight.grad, module.bias.grad))
    for a, b in zip(*outs):
        assert a.dtype == dtype
        scale = float(b.detach().abs().max())
        rtol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * scale)


def test_inference_and_inputs_the_kernel_does_not_take_use_pytorchs(monkeypatch):
    def not_here(*args):
        raise AssertionError("the native kernel ran")

    monkeypatch.setattr(native, "layer_norm_forward", not_here)
    ours, ref, g = _pair(32, torch.float32)
    x = torch.randn(4, 32, generator=g)
    torch.testing.assert_close(ours(x), ref(x))  # needs no gradient: inference
    with torch.no_grad():
        torch.testing.assert_close(ours(x.clone().requires_grad_()), ref(x))
    x = torch.randn(32, 4, generator=g).t().requires_grad_()  # not contiguous
    torch.testing.assert_close(ours(x), ref(x))
    x = torch.randn(4, 32, generator=g).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks the dtype itself
        torch.testing.assert_close(ours(x), ref(x))
    assert not fits(nn.LayerNorm(20)) and not fits(nn.LayerNorm(2048)) and fits(nn.LayerNorm(32))


def test_state_dict_is_nn_layer_norms():
    assert LayerNorm(32).state_dict().keys() == nn.LayerNorm(32).state_dict().keys()
