import pytest
import torch
import torch.nn.functional as F

from scriven.errors import ScrivenError
from scriven.precision import FrozenLinear, quantize_int8


def test_int8_quantization_is_within_half_a_step_per_row():
    w = torch.randn(50, 40) * torch.linspace(0.01, 5, 50)[:, None]  # rows of very different size
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 0.03), ("int8", 0.03)])
@pytest.mark.parametrize("rows", [1, 16])  # int8 takes the packed kernel for few rows, bf16 for many
def test_frozen_linear_computes_the_layer_in_its_precision(precision, tolerance, rows):
    torch.manual_seed(0)
    w, b, x = torch.randn(300, 64), torch.randn(300), torch.randn(rows, 64)
    y = FrozenLinear(w, b, precision)(x)
    expected = F.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (rows, 300)
    assert (y - expected).abs().max() <= tolerance * expected.abs().max()


def test_int8_gives_the_same_rows_alone_and_in_a_batch():
    torch.manual_seed(0)
    layer = FrozenLinear(torch.randn(300, 64), None, "int8")
    x = torch.randn(16, 64)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(16)])
    assert torch.allclose(alone, layer(x), rtol=0.02, atol=0.05)


def test_unknown_precision_is_named():
    with pytest.raises(ScrivenError, match="precision"):
        FrozenLinear(torch.randn(3, 3), None, "int4")
