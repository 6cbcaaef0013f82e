"""The fused projection + label-smoothed cross-entropy against PyTorch's unfused computation:
values and gradients in fp32, bf16 and under autocast, on the native kernel and without it."""

import pytest
import torch
import torch.nn.functional as F

from scriven.accel import native
from scriven.accel.losses import linear_cross_entropy


@pytest.fixture(params=["native", "pytorch"])
def path(request, monkeypatch):
    """Run a test with the native kernels (where this CPU has them) and without."""
    if request.param == "pytorch":
        monkeypatch.setenv(native.NATIVE_ENV, "0")
    else:
        request.applymarker(pytest.mark.native)
        native.library.cache_clear()
        if native.library() is None:
            pytest.skip("no native kernels here")
    native.library.cache_clear()
    yield request.param
    native.library.cache_clear()


def inputs(n=45, d=24, v=37, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, b, y


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fp32_equals_linear_then_cross_entropy(bias, smoothing, path):
    h, w, b, y = inputs(bias=bias)
    fused = linear_cross_entropy(h, w, b, y, smoothing, block_rows=16)  # 3 blocks, the last short
    plain = F.cross_entropy(F.linear(h, w, b), y, label_smoothing=smoothing)
    torch.testing.assert_close(fused, plain)
    for a, e in zip(grads(fused, [h, w, b]), grads(plain, [h, w, b])):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("vocab", [37, 64, 200])  # a tail shorter than a vector, none, longer
def test_bf16_matches_cross_entropy_of_the_same_bf16_logits(vocab, path):
    h, w, b, y = inputs(n=70, v=vocab, dtype=torch.bfloat16)
    fused = linear_cross_entropy(h, w, b, y, 0.1, block_rows=32)
    # The reference: the same bf16 matmul, then fp32 everything after it.
    plain = F.cross_entropy(F.linear(h, w).float() + b, y, label_smoothing=0.1)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    for a, e in zip(grads(fused, [h, w, b]), grads(plain, [h, w, b])):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a.float(), e.float(), rtol=0.02, atol=2e-3)  # bf16 rounding


def test_autocast_runs_the_matmuls_in_bf16_and_returns_fp32_gradients(path):
    h, w, b, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(h, w, b, y, 0.1)
        plain = F.cross_entropy(F.linear(h, w, b).float(), y, label_smoothing=0.1)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=0.01, atol=0.01)
    for a, e in zip(grads(fused, [h, w, b]), grads(plain, [h, w, b])):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=0.05, atol=5e-3)


def test_the_incoming_gradient_scales_every_gradient(path):
    h, w, b, y = inputs()
    once = grads(linear_cross_entropy(h, w, b, y, 0.1), [h, w, b])
    thrice = grads(3 * linear_cross_entropy(h, w, b, y, 0.1), [h, w, b])
    for a, e in zip(thrice, once):
        torch.testing.assert_close(a, 3 * e)


def test_the_result_does_not_depend_on_the_block_size(path):
    h, w, b, y = inputs(dtype=torch.bfloat16)
    results = [linear_cross_entropy(h, w, b, y, 0.1, block_rows=r) for r in (1, 7, 45, 1024)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0])


def test_bad_labels_and_shapes_are_named(path):
    h, w, b, y = inputs(dtype=torch.bfloat16)
    with pytest.raises(IndexError, match="out of range 0..36"):
        linear_cross_entropy(h, w, b, torch.full_like(y, 37))
    with pytest.raises(IndexError, match="out of range"):
        linear_cross_entropy(h, w, b, torch.full_like(y, -1))
    with pytest.raises(ValueError, match="labels must be"):
        linear_cross_entropy(h, w, b, y[:-1])
    with pytest.raises(ValueError, match=r"weight \(V, D\)"):
        linear_cross_entropy(h, w[:, :5], b, y)
    with pytest.raises(ValueError, match="no rows"):
        linear_cross_entropy(h[:0], w, b, y[:0])
