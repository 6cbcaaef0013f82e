"""The native int8 kernels: each one against an exact integer emulation in PyTorch, and the
fallbacks when they cannot be built. The generation kernels run on both their builds (AVX-512
VNNI, and AVX2 for CPUs without AVX-512), which give the same numbers bit for bit."""

import os
import shutil

import pytest
import torch

from scriven import precision
from scriven.accel import native
from scriven.models.lstm import LSTMConfig, LSTMLanguageModel
from scriven.precision import quantize_int8
from scriven.stepper import LSTMStepper

needs_kernels = pytest.mark.native
# Generation tests run once per build of the generation kernels (`generation_build`).
generation_kernels = pytest.mark.generation_kernels
on_each_build = pytest.mark.usefixtures("generation_build")


@pytest.fixture(params=[native.FULL.name, native.AVX2.name])
def generation_build(request, monkeypatch):
    """Select one build for the test. The AVX-512 build may be missing (it skips, unless
    SCRIVEN_REQUIRE_NATIVE=1); the AVX2 build must load wherever the CPU has AVX2 and FMA and a
    C compiler exists, so CI proves it on every run."""
    monkeypatch.setenv(native.NATIVE_ENV, "1" if request.param == native.FULL.name else "avx2")
    native.library.cache_clear()
    native.generation_library.cache_clear()
    lib = native.generation_library()
    if lib is None or lib.build != request.param:
        reason = (f"needs scriven's {request.param} generation kernels "
                  f"({native.generation_unavailable() or 'the AVX-512 build does not load here'})")
        buildable = (native.cpu_has(*native.AVX2.cpu_flags)
                     and shutil.which(os.environ.get("CC", "cc")) is not None)
        if os.environ.get("SCRIVEN_REQUIRE_NATIVE") == "1" or (
                request.param == native.AVX2.name and buildable):
            pytest.fail(reason)
        pytest.skip(reason)
    yield request.param
    native.library.cache_clear()
    native.generation_library.cache_clear()


@pytest.fixture
def fresh_library():
    """library() is cached per process: clear it around a test that changes what it sees."""
    native.library.cache_clear()
    native.generation_library.cache_clear()
    yield
    native.library.cache_clear()
    native.generation_library.cache_clear()


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


@generation_kernels
@on_each_build
@pytest.mark.parametrize("rows, n, k", [(1, 37, 10), (3, 130, 64), (8, 64, 5), (20, 130, 70), (33, 64, 128)])  # 16+: AMX
def test_int8_linear_equals_its_integer_emulation(rows, n, k):
    g = torch.Generator().manual_seed(rows)
    w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
    y = native.linear_int8(native.PackedInt8.pack(w, b, (k,)), x)
    assert y.shape == (rows, n)
    assert torch.allclose(y, emulated_linear(w, b, x, (k,)), rtol=1e-4, atol=1e-4)
    assert (y - (x @ w.T + b)).abs().max() <= 0.05 * (x @ w.T + b).abs().max()  # and near fp32


@generation_kernels
@on_each_build
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
    native.lstm_step_int8(packed, x, h0, c0, h1, c1)
    assert torch.allclose(c1, c_ref, atol=1e-5) and torch.allclose(h1, h_ref, atol=1e-5)


@generation_kernels
@on_each_build
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


@generation_kernels
@on_each_build
@pytest.mark.parametrize("rows, vocab, k", [(1, 12157, 10), (5, 33, 32), (4, 1000, 1), (64, 500, 64)])
def test_native_top_k_sampling_at_the_edges_draws_what_the_pytorch_sampler_draws(rows, vocab, k):
    """Row tails shorter than 16, k of 1, k one short of V, the largest k, -inf logits kept.
    (At k = V PyTorch's sampler does not filter, so it walks the ids in another order.)"""
    from scriven.sampling import sample_shared

    g = torch.Generator().manual_seed(k)
    x = torch.randn(rows, vocab, generator=g) * 3
    x[0, ::3] = float("-inf")
    u = torch.rand(rows, generator=g)
    ids, probs = native.sample_top_k(x, k, 0.7, u)
    ref_ids, ref_probs, _ = sample_shared(x, 0.7, k, None, u)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(probs, ref_probs, atol=1e-6)


@generation_kernels
@on_each_build
def test_native_top_k_with_settings_per_row_draws_what_sample_rows_draws(monkeypatch):
    """A server's batch: each row its own k and temperature. `sample_rows` hands top-k rows to
    the kernel (none when a row also trims by top-p) and gets PyTorch's picks."""
    from scriven import accel
    from scriven.sampling import sample_rows

    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 700, generator=g) * 3
    x[1, ::2] = float("-inf")
    k = torch.tensor([1, 5, 64, 20, 2, 63, 10, 33, 7])
    temperature = torch.tensor([0.3, 1.0, 0.7, 1.5, 0.9, 1.0, 0.5, 2.0, 0.8])
    real, calls = accel.sample_top_k, []
    for _ in range(10):
        u = torch.rand(9, generator=g)
        for top_p, kernel in ((torch.ones(9), True), (torch.tensor([1.0] * 8 + [0.9]), False)):
            monkeypatch.setattr(accel, "sample_top_k", lambda *a: calls.append(1) or real(*a))
            ids, probs, _ = sample_rows(x, temperature, k, top_p, u)
            assert bool(calls) == kernel
            calls.clear()
            monkeypatch.setattr(accel, "sample_top_k", lambda *a: None)
            ref_ids, ref_probs, _ = sample_rows(x, temperature, k, top_p, u)
            assert torch.equal(ids, ref_ids)
            assert torch.allclose(probs, ref_probs, atol=1e-6)
    native_ids, _ = native.sample_top_k(x, k, temperature, u)
    assert torch.equal(native_ids, sample_rows(x, temperature, k, torch.ones(9), u)[0])


@generation_kernels
@on_each_build
@pytest.mark.parametrize("rows, vocab, temperature", [(1, 12157, 1.0), (5, 33, 0.7), (4, 1, 1.0),
                                                      (64, 500, 1.3), (3, 16, 1.0), (2, 9, 0.5)])
def test_native_plain_sampling_draws_what_the_pytorch_sampler_draws(rows, vocab, temperature):
    """The whole vocabulary at a temperature: chunk tails shorter than 16 and 8, one token,
    -inf logits never drawn, many draws per row width."""
    from scriven.sampling import sample_shared

    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(rows, vocab, generator=g) * 3
    if vocab > 1:
        x[0, ::3] = float("-inf")
    for _ in range(10):
        u = torch.rand(rows, generator=g)
        ids, probs = native.sample_plain(x / temperature, u)
        ref_ids, ref_probs, _ = sample_shared(x, temperature, None, None, u)
        assert torch.equal(ids, ref_ids)
        assert torch.allclose(probs, ref_probs, atol=1e-6)
        assert not x[ids[:, None].eq(torch.arange(vocab)) & x.isinf()].any()


@needs_kernels
def test_the_avx2_build_gives_the_avx512_builds_numbers_bit_for_bit(monkeypatch, fresh_library):
    """Integer dot products are exact in both, and the float steps run in the same order, so an
    AVX2 laptop generates exactly what a Xeon does from the same seed (batches of 8+ rows run on
    AMX tiles in the full build here, and still agree)."""
    def outputs():
        g = torch.Generator().manual_seed(0)
        out = []
        for rows, n, k in [(1, 37, 10), (5, 130, 70), (33, 300, 128)]:
            w, b, x = (torch.randn(n, k, generator=g), torch.randn(n, generator=g),
                       torch.randn(rows, k, generator=g))
            out.append(native.linear_int8(native.PackedInt8.pack(w, b, (k,)), x))
        m = LSTMLanguageModel(LSTMConfig(vocab_size=500, embed_dim=40, hidden_dim=72,
                                         num_layers=2)).eval()
        torch.manual_seed(1)
        m.apply(lambda mod: [torch.nn.init.normal_(p) for p in mod.parameters(recurse=False)])
        ids = torch.randint(0, 500, (9,), generator=g)
        state = (torch.randn(2, 9, 72, generator=g), torch.randn(2, 9, 72, generator=g))
        logits, h, c = native.LSTMStepInt8(m.embed.weight, [
            (m.lstm.weight_ih_l0, m.lstm.weight_hh_l0, m.lstm.bias_ih_l0 + m.lstm.bias_hh_l0),
            (m.lstm.weight_ih_l1, m.lstm.weight_hh_l1, m.lstm.bias_ih_l1 + m.lstm.bias_hh_l1)],
            m.head.weight, m.head.bias)(ids, *state)
        u = torch.rand(9, generator=g)
        return [*out, logits, h, c, *native.sample_top_k(logits, 20, 0.8, u),
                *native.sample_plain(logits * 5, u)]

    assert native.generation_library().build == native.FULL.name
    full = outputs()
    monkeypatch.setenv(native.NATIVE_ENV, "avx2")
    native.library.cache_clear()
    native.generation_library.cache_clear()
    assert native.library() is None and native.unavailable() == f"{native.NATIVE_ENV}=avx2"
    assert native.generation_library().build == native.AVX2.name
    assert all(torch.equal(a, b) for a, b in zip(full, outputs(), strict=True))


def test_disabled_by_environment(monkeypatch, fresh_library):
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.library() is None
    monkeypatch.setattr(precision, "LOW_PRECISION_MIN", 0)  # every layer in int8
    monkeypatch.setattr(precision, "INT8_MATMUL_MIN", 0)
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
def test_a_compiler_that_fails_says_why_and_leaves_plain_pytorch(monkeypatch, tmp_path,
                                                                fresh_library):
    monkeypatch.setenv("SCRIVEN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists, always fails
    assert native.library() is None
    assert "could not be built" in native.unavailable()
    assert not list((tmp_path / "native").glob("*.so"))  # no half-written library left behind


@needs_kernels
def test_the_library_is_built_once_into_a_private_cache(monkeypatch, tmp_path, fresh_library):
    monkeypatch.setenv("SCRIVEN_CACHE", str(tmp_path))
    (tmp_path / "native").mkdir(mode=0o700)
    other = tmp_path / "native" / "kernels-0000000000000000.so"
    other.write_bytes(b"another scriven version's build")
    assert native.library() is not None
    built = [p for p in (tmp_path / "native").glob("*.so") if p != other]
    assert len(built) == 1 and other.exists()  # another version's library is left alone
    assert built[0].stat().st_mode & 0o077 == 0
    stamp = os.stat(built[0]).st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None
    assert os.stat(built[0]).st_mtime_ns == stamp  # reused, not rebuilt


@needs_kernels
def test_a_damaged_cached_library_is_rebuilt(monkeypatch, tmp_path, fresh_library):
    monkeypatch.setenv("SCRIVEN_CACHE", str(tmp_path))
    assert native.library() is not None
    (built,) = (tmp_path / "native").glob("*.so")
    damaged = built.with_suffix(".tmp")  # replaced, not rewritten: this process maps it
    damaged.write_bytes(b"\x7fELF truncated")
    os.replace(damaged, built)
    native.library.cache_clear()
    assert native.library() is not None  # loaded again after a rebuild
    assert built.stat().st_size > 1000


@needs_kernels
@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_cache_others_can_write_is_refused(monkeypatch, tmp_path, fresh_library, mode):
    monkeypatch.setenv("SCRIVEN_CACHE", str(tmp_path))
    (tmp_path / "native").mkdir()
    os.chmod(tmp_path / "native", mode)
    assert native.library() is None
    assert "writable by group or others" in native.unavailable()


@needs_kernels
def test_a_library_others_can_write_is_refused(monkeypatch, tmp_path, fresh_library):
    monkeypatch.setenv("SCRIVEN_CACHE", str(tmp_path))
    assert native.library() is not None
    (built,) = (tmp_path / "native").glob("*.so")
    os.chmod(built, 0o766)
    native.library.cache_clear()
    assert native.library() is None
    assert "writable by group or others" in native.unavailable()


@pytest.mark.parametrize("spec", [native.FULL, native.AVX2], ids=lambda spec: spec.name)
def test_the_kernels_compile_without_warnings(tmp_path, spec):
    """Built with -Werror here; the product builds with warnings on but not fatal."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or not native.cpu_has(*spec.cpu_flags):
        pytest.skip(f"no C compiler, or a CPU the {spec.name} build cannot target")
    native.build(compiler, tmp_path / "k.so", ("-Werror",), spec)


@needs_kernels
@pytest.mark.parametrize("call", [
    lambda: native.sample_top_k(torch.randn(2, 100), 0, 1.0, torch.rand(2)),
    lambda: native.sample_top_k(torch.randn(2, 10), 11, 1.0, torch.rand(2)),
    lambda: native.sample_top_k(torch.randn(2, 100).double(), 5, 1.0, torch.rand(2)),
    lambda: native.sample_top_k(torch.randn(2, 100), torch.tensor([3, 0]), 1.0, torch.rand(2)),
    lambda: native.sample_top_k(torch.randn(2, 100), torch.tensor([3, 4, 5]), 1.0, torch.rand(2)),
    lambda: native.sample_top_k(torch.randn(2, 100), 3, torch.tensor([1.0, 0.0]), torch.rand(2)),
    lambda: native.sample_plain(torch.randn(2, 100).double(), torch.rand(2)),
    lambda: native.sample_plain(torch.randn(2, 100), torch.rand(3)),
    lambda: native.sample_plain(torch.randn(2, 0), torch.rand(2)),
    lambda: native.layer_norm_forward(torch.randn(3, 2048), torch.ones(2048), torch.zeros(2048),
                                      1e-5),
    lambda: native.layer_norm_forward(torch.randn(3, 32).t(), torch.ones(3), torch.zeros(3), 1e-5),
    lambda: native.dropout(torch.randn(10).double(), 1 << 30, 2.0, 1, 2),
    lambda: native.cross_entropy_grad_bf16(torch.randn(4, 8).bfloat16(), torch.zeros(3).long(),
                                           None, 1.0, 0.0, 1.0, None),
    lambda: native.attention_forward(torch.randn(1, 3, 64), torch.randn(1, 300, 64),
                                     torch.randn(1, 300, 64),
                                     native.AttentionArgs(4, None, 0.25, 0, 1.0, 0, 0)),
])
def test_bindings_refuse_what_the_kernels_cannot_take(call):
    with pytest.raises(ValueError, match="native kernel"):
        call()


@generation_kernels
@on_each_build
def test_native_top_k_sampling_draws_what_the_pytorch_sampler_draws():
    from scriven import accel
    from scriven.sampling import sample_shared

    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1000, generator=g) * 3
    for _ in range(20):
        u = torch.rand(6, generator=g)
        ids, probs = accel.sample_top_k(x, 10, 0.7, u)
        ref_ids, ref_probs, _ = sample_shared(x, 0.7, 10, None, u)
        assert torch.equal(ids, ref_ids)
        assert torch.allclose(probs, ref_probs, atol=1e-6)
    assert accel.sample_top_k(x, 65, 0.7, u) is None  # more than the kernel keeps
    assert accel.sample_top_k(x.double(), 10, 0.7, u) is None
    # k at the vocabulary size cuts nothing: the PyTorch sampler walks ids, so the kernel
    # declines rather than draw other tokens from the same numbers.
    small = x[:, :40].contiguous()
    assert accel.sample_top_k(small, 40, 0.7, u) is None
    ids, _ = accel.sample_top_k(small, 39, 0.7, u)
    assert torch.equal(ids, sample_shared(small, 0.7, 39, None, u)[0])


@generation_kernels
@on_each_build
def test_top_k_draws_run_on_the_native_sampler_for_any_decoder_and_draw_the_same(monkeypatch):
    """int8 (the native step) and fp32 alike: top-k alone goes to the kernel, and generation
    gives the tokens PyTorch's sampler gives from the same seed; with top-p too it does not."""
    from scriven import accel
    from scriven.generation import sample_ids

    m = LSTMLanguageModel(LSTMConfig(vocab_size=300, embed_dim=32, hidden_dim=32, num_layers=1)).eval()
    prompt = torch.randint(0, 300, (3, 4), generator=torch.Generator().manual_seed(0))

    def draws(stepper, top_p=None):
        g = torch.Generator().manual_seed(0)
        return [ids.tolist() for ids, _, _ in sample_ids(stepper, prompt, 12, 0.8, 5, top_p, 1.0, g)]

    real, calls = accel.sample_top_k, []
    for held_in in ("int8", "fp32"):
        stepper = LSTMStepper(m, held_in)
        monkeypatch.setattr(accel, "sample_top_k", lambda *a: calls.append(1) or real(*a))
        fast = draws(stepper)
        assert len(calls) == 12
        draws(stepper, top_p=0.9)
        assert len(calls) == 12
        calls.clear()
        monkeypatch.setattr(accel, "sample_top_k", lambda *a: None)
        assert fast == draws(stepper)


@generation_kernels
@on_each_build
def test_plain_draws_run_on_the_native_sampler_for_any_decoder_and_draw_the_same(monkeypatch):
    """A fp32 model (no native step) at temperature only: the kernel draws, and generation gives
    the tokens PyTorch's sampler gives from the same seed. Where it does not apply it declines."""
    from scriven import accel
    from scriven.generation import sample_ids

    m = LSTMLanguageModel(LSTMConfig(vocab_size=300, embed_dim=16, hidden_dim=24, num_layers=1)).eval()
    prompt = torch.randint(0, 300, (3, 4), generator=torch.Generator().manual_seed(0))

    def draws():
        g = torch.Generator().manual_seed(5)
        return [ids.tolist() for ids, _, _ in sample_ids(m, prompt, 30, temperature=0.9, generator=g)]

    real, calls = accel.sample_plain, []
    monkeypatch.setattr(accel, "sample_plain", lambda *a: calls.append(1) or real(*a))
    fast = draws()
    assert len(calls) == 30
    monkeypatch.setattr(accel, "sample_plain", lambda *a: None)
    assert fast == draws()
    x, u = torch.randn(2, 50), torch.rand(2)
    assert real(x.double(), u) is None and real(x[None], u) is None and real(x[:, :0], u) is None


@generation_kernels
@on_each_build
def test_native_step_rejects_an_id_outside_the_vocabulary():
    m = LSTMLanguageModel(LSTMConfig(vocab_size=50, embed_dim=8, hidden_dim=8, num_layers=1)).eval()
    stepper = LSTMStepper(m, "int8")
    state = m.initial_state(1)
    with pytest.raises(IndexError, match="out of range"):
        stepper.step(torch.tensor([50]), state)
