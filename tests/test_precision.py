import pytest
import torch
import torch.nn.functional as F

from scriven.errors import ScrivenError
from scriven.precision import FrozenLinear, PackedInt8, quantize_int8


def test_int8_quantization_is_within_half_a_step_per_row():
    w = torch.randn(50, 40) * torch.linspace(0.01, 5, 50)[:, None]  # rows of very different size
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 0.03), ("int8", 0.03)])
@pytest.mark.parametrize("rows", [1, 16])
def test_frozen_linear_computes_the_layer_in_its_precision(precision, tolerance, rows):
    torch.manual_seed(0)
    w, b, x = torch.randn(300, 64), torch.randn(300), torch.randn(rows, 64)
    y = FrozenLinear(w, b, precision)(x)
    expected = F.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (rows, 300)
    assert (y - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.fixture(params=["packed", "float"])
def int8_kernel(request, monkeypatch):
    """Each int8 test runs on PyTorch's int8 matmul (where this CPU has one) and without it."""
    if request.param == "packed" and not PackedInt8.available():
        pytest.skip("PyTorch has no int8 matmul on this CPU")
    if request.param == "float":
        monkeypatch.setattr(PackedInt8, "ENGINES", ())
    return request.param


def test_int8_runs_where_it_is_asked_to(int8_kernel):
    layer = FrozenLinear(torch.randn(300, 64), torch.randn(300), "int8")
    assert (layer.packed is not None) == (int8_kernel == "packed")
    assert layer.kernel.startswith("int8") == (int8_kernel == "packed")


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_int8_is_close_to_the_layer_and_rounds_each_row_on_its_own(int8_kernel, rows):
    """A row's numbers do not depend on its batch-mates, even where one of them is a hundred
    times larger (PyTorch's int8 op alone would round all rows on the largest one's scale)."""
    torch.manual_seed(rows)
    w, b = torch.randn(300, 64), torch.randn(300)
    layer = FrozenLinear(w, b, "int8")
    x = torch.randn(rows, 64)
    x[0] *= 100
    batch = layer(x)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(rows)])
    assert torch.equal(alone, batch)
    expected = F.linear(x, w, b)
    assert ((batch - expected).abs().amax(1) <= 0.03 * expected.abs().amax(1)).all()


def test_int8_of_a_zero_row_is_the_bias(int8_kernel):
    b = torch.randn(300)
    y = FrozenLinear(torch.randn(300, 64), b, "int8")(torch.zeros(2, 64))
    assert torch.allclose(y, b.expand(2, -1), rtol=0.01)  # the float path may hold it in bf16


def test_unknown_precision_is_named():
    with pytest.raises(ScrivenError, match="precision"):
        FrozenLinear(torch.randn(3, 3), None, "int4")
