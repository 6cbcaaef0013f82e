"""The native int8 kernels: each one against an exact integer emulation in PyTorch, and the
fallbacks when they cannot be built."""

import os

import pytest
import torch

from scriven import native
from scriven.models.lstm import LSTMConfig, LSTMLanguageModel, LSTMStepper
from scriven.precision import quantize_int8

lib = native.library()
needs_kernels = pytest.mark.skipif(lib is None, reason="no AVX-512 VNNI CPU or C compiler here")


@pytest.fixture
def fresh_library():
    """library() is cached per process: clear it around a test that changes what it sees."""
    native.library.cache_clear()
    yield
    native.library.cache_clear()


def emulated_linear(w, b, x, segments):
    """What the kernel computes, in exact integer arithmetic: int8 weights per row, each
    segment of each input row rounded to 8 bits with its own absmax / 127 scale."""
    q, ws = quantize_int8(w)                                      # (N, K), (N,)
    out, start = torch.zeros(x.size(0), w.size(0), dtype=torch.float64), 0
    for width in segments:
        part = x[:, start : start + width]
        xs = part.abs().amax(1, keepdim=True) / 127
        xs = torch.where(xs > 0, xs, torch.ones_like(xs))
        xq = torch.round(part * (1 / xs)).to(torch.int64)
        dots = xq @ q[:, start : start + width].to(torch.int64).T   # exact
        out += dots.double() * xs.double()
        start += width
    return (out * ws.double() + (0 if b is None else b.double())).float()


@needs_kernels
@pytest.mark.parametrize("rows, n, k", [(1, 37, 10), (3, 130, 64), (8, 64, 5), (20, 130, 70), (33, 64, 128)])  # 16+: AMX
def test_int8_linear_equals_its_integer_emulation(rows, n, k):
    g = torch.Generator().manual_seed(rows)
    w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
    y = native.linear_int8(lib, native.PackedInt8.pack(w, b, (k,)), x)
    assert y.shape == (rows, n)
    assert torch.allclose(y, emulated_linear(w, b, x, (k,)), rtol=1e-4, atol=1e-4)
    assert (y - (x @ w.T + b)).abs().max() <= 0.05 * (x @ w.T + b).abs().max()  # and near fp32


@needs_kernels
@pytest.mark.parametrize("rows, e, h", [(1, 10, 7), (2, 16, 32), (17, 70, 20)])  # 16+ rows: AMX
def test_lstm_layer_step_equals_its_emulation(rows, e, h):
    g = torch.Generator().manual_seed(e)
    w_ih, w_hh = torch.randn(4 * h, e, generator=g), torch.randn(4 * h, h, generator=g)
    bias = torch.randn(4 * h, generator=g)
    x, h0, c0 = (torch.randn(rows, d, generator=g) for d in (e, h, h))
    gates = emulated_linear(torch.cat([w_ih, w_hh], 1), bias, torch.cat([x, h0], 1), (e, h))
    i, f, cand, o = gates.chunk(4, 1)                           # PyTorch's gate order
    c_ref = f.sigmoid() * c0 + i.sigmoid() * cand.tanh()
    h_ref = o.sigmoid() * c_ref.tanh()
    packed = native.PackedInt8.pack(torch.cat([w_ih, w_hh], 1), bias, (e, h))
    h1, c1 = torch.empty(rows, h), torch.empty(rows, h)
    native.lstm_step_int8(lib, packed, x, h0, c0, h1, c1)
    assert torch.allclose(c1, c_ref, atol=1e-5) and torch.allclose(h1, h_ref, atol=1e-5)


@needs_kernels
def test_whole_int8_step_matches_the_stepper_without_kernels(monkeypatch):
    torch.manual_seed(0)
    m = LSTMLanguageModel(LSTMConfig(vocab_size=300, embed_dim=24, hidden_dim=24, num_layers=2,
                                     dropout=0.0)).eval()
    ids = torch.randint(0, 300, (3, 5))
    with torch.no_grad():
        fast = LSTMStepper(m, "int8")
        assert fast.native is not None
        logits, state = LSTMStepper(m).read(ids)
        got, (h, c) = fast.step(ids[:, 0], state)
        exact, (h_ref, c_ref) = LSTMStepper(m).step(ids[:, 0], state)
    assert got.shape == exact.shape and h.shape == h_ref.shape and c.shape == c_ref.shape
    assert (got - exact).abs().max() <= 0.03 * exact.abs().max()
    assert (h - h_ref).abs().max() <= 0.03


@needs_kernels
@pytest.mark.parametrize("rows, vocab, k", [(1, 12157, 10), (5, 33, 33), (4, 1000, 1), (64, 500, 64)])
def test_top_k_equals_torch_topk(rows, vocab, k):
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(k))
    x[0, ::3] = float("-inf")
    values, ids = native.top_k(lib, x, k)
    ref_values, ref_ids = torch.topk(x, k)
    assert torch.equal(values, ref_values)
    finite = ref_values > float("-inf")  # ties at -inf may come in any order
    assert torch.equal(ids[finite], ref_ids[finite])


def test_disabled_by_environment(monkeypatch, fresh_library):
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.library() is None
    monkeypatch.setattr(LSTMStepper, "LOW_PRECISION_MIN", 0)  # every layer in int8
    m = LSTMLanguageModel(LSTMConfig(vocab_size=300, embed_dim=32, hidden_dim=32, num_layers=2)).eval()
    stepper = LSTMStepper(m, "int8")
    assert stepper.native is None  # PyTorch's int8 path instead, and it still works
    ids = torch.randint(0, 300, (2, 4))
    with torch.no_grad():
        _, state = LSTMStepper(m).read(ids)
        exact = LSTMStepper(m).step(ids[:, 0], state)[0]
        approx = stepper.step(ids[:, 0], state)[0]
    assert (approx - exact).abs().max() <= 0.05 * exact.abs().max()


@needs_kernels
def test_a_compiler_that_fails_gives_a_warning_and_the_pytorch_path(monkeypatch, tmp_path, fresh_library):
    monkeypatch.setenv("SCRIVEN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists, always fails
    with pytest.warns(UserWarning, match="native kernels unavailable"):
        assert native.library() is None
    assert not list((tmp_path / "native").glob("*"))  # no half-written library left behind


@needs_kernels
def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path, fresh_library):
    monkeypatch.setenv("SCRIVEN_CACHE", str(tmp_path))
    (tmp_path / "native").mkdir()
    (tmp_path / "native" / "kernels-0000000000000000.so").write_bytes(b"an earlier build")
    assert native.library() is not None
    built = list((tmp_path / "native").glob("*"))  # the earlier build is gone
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = os.stat(built[0]).st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None
    assert os.stat(built[0]).st_mtime_ns == stamp  # reused, not rebuilt


@needs_kernels
def test_native_top_k_sampling_draws_what_the_pytorch_path_draws(monkeypatch, fresh_library):
    from scriven.sampling import sample_with_probability

    x = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1)) * 3

    def draws():
        g = torch.Generator().manual_seed(5)
        return [sample_with_probability(x, 0.7, 10, None, g) for _ in range(20)]

    fast = draws()
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    native.library.cache_clear()
    slow = draws()
    for (ids, probs), (ref_ids, ref_probs) in zip(fast, slow):
        assert torch.equal(ids, ref_ids)
        assert torch.allclose(probs, ref_probs, atol=1e-6)


@needs_kernels
def test_native_step_rejects_an_id_outside_the_vocabulary():
    m = LSTMLanguageModel(LSTMConfig(vocab_size=50, embed_dim=8, hidden_dim=8, num_layers=1)).eval()
    stepper = LSTMStepper(m, "int8")
    state = m.initial_state(1)
    with pytest.raises(IndexError, match="out of range"):
        stepper.step(torch.tensor([50]), state)
