"""The GPU paths: the properties the CPU tests check, on CUDA, plus CPU ↔ GPU agreement and
checkpoints that move between the two. Skipped where no CUDA GPU is present (as in CI)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LM, crash_after, weights
from conftest import TINY_TRANSLATOR as TINY_TR

import scriven.lm as lm_module
import scriven.translation as translate_module
from scriven.accel.losses import linear_cross_entropy
from scriven.attention import KVCache, MultiHeadAttention, causal_mask, padding_mask
from scriven.generation import LoadedLM, generate
from scriven.lm import train_lm
from scriven.models.transformer import Transformer, TransformerConfig
from scriven.search import beam_search, greedy_search
from scriven.translation import train_translate
from scriven.translator import LoadedTranslator, translate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_on_cuda_equals_the_cpu(need_weights):
    torch.manual_seed(0)
    cpu = MultiHeadAttention(16, 4).eval()
    gpu = MultiHeadAttention(16, 4).eval().to(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    x, memory = torch.randn(2, 6, 16), torch.randn(2, 5, 16)
    ids = torch.tensor([[4, 5, 6, 7, 8], [4, 5, 0, 0, 0]])
    for kwargs in ({"mask": causal_mask(6)}, {"memory": memory, "mask": padding_mask(ids, 0)}):
        want, want_w = cpu(x, need_weights=need_weights, **kwargs)
        got, got_w = gpu(x.to(CUDA), need_weights=need_weights,
                         **{k: v.to(CUDA) for k, v in kwargs.items()})
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=0)
        if need_weights:
            torch.testing.assert_close(got_w.cpu(), want_w, atol=1e-5, rtol=0)


def test_padding_and_the_cache_change_nothing_on_cuda():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval().to(CUDA)
    x, memory = torch.randn(1, 3, 16, device=CUDA), torch.randn(1, 4, 16, device=CUDA)
    out, _ = mha(x, memory=memory)
    padded = torch.cat([memory, torch.randn(1, 3, 16, device=CUDA)], dim=1)
    ids = torch.tensor([[9, 9, 9, 9, 0, 0, 0]], device=CUDA)
    out_p, _ = mha(x, memory=padded, mask=padding_mask(ids, 0))
    torch.testing.assert_close(out_p, out, atol=1e-5, rtol=0)

    seq = torch.randn(2, 7, 16, device=CUDA)
    full, _ = mha(seq, mask=causal_mask(7, device=CUDA))
    cache = KVCache()
    steps = [mha(seq[:, t:t + 1], cache=cache)[0] for t in range(7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_loss_on_cuda_equals_linear_then_cross_entropy(autocast):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(45, 24, generator=g).to(CUDA).requires_grad_()
    w = (torch.randn(37, 24, generator=g) * 0.3).to(CUDA).requires_grad_()
    b = torch.randn(37, generator=g).to(CUDA).requires_grad_()
    y = torch.randint(0, 37, (45,), generator=g).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = linear_cross_entropy(h, w, b, y, label_smoothing=0.1, block_rows=16)
        want = F.cross_entropy(F.linear(h, w, b).float(), y, label_smoothing=0.1)
    got_grads = torch.autograd.grad(loss, (h, w, b))
    want_grads = torch.autograd.grad(want, (h, w, b))
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(loss, want, atol=tol, rtol=0)
    for got, ref in zip(got_grads, want_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def tiny_transformer() -> Transformer:
    cfg = TransformerConfig(src_vocab_size=17, tgt_vocab_size=17, d_model=16, n_heads=2, d_ff=32,
                            encoder_layers=1, decoder_layers=2, dropout=0.1, max_len=24)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        model.output.bias[3] = 0.8  # make <eos> plausible, so that sentences end
    return model.to(CUDA)


def test_search_on_cuda_cached_equals_recomputed_and_beam_one_equals_greedy():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from recompute import recompute_greedy  # the benchmark baseline
    model = tiny_transformer()
    sentences = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [4]]
    src = torch.tensor([s + [0] * (6 - len(s)) for s in sentences], device=CUDA)
    greedy = greedy_search(model, src, 2, 3, max_len=12)
    for sentence, out in zip(sentences, greedy):
        assert out == recompute_greedy(model, torch.tensor(sentence, device=CUDA), 2, 3, 12)
    beams = beam_search(model, src, beam_size=1, bos_id=2, eos_id=3, max_len=12)
    assert [hyps[0][0] for hyps in beams] == greedy


@pytest.fixture(scope="module")
def gpu_run(pair_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("translator") / "run"
    train_translate(pair_file, out, max_steps=80, eval_every=40, device="cuda", **TINY_TR)
    return out


def test_translator_trains_on_cuda_with_bf16_autocast(gpu_run):
    log = [json.loads(x) for x in (gpu_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(losses) == 2 and losses[-1] < losses[0]
    config = json.loads((gpu_run / "latest" / "config.json").read_text())
    assert config["train"]["amp"] == "auto" and config["train"]["device"] == "cuda"
    assert all(v.dtype == torch.float32 for v in weights(gpu_run).values())


def test_a_gpu_checkpoint_translates_the_same_on_the_cpu(gpu_run):
    on_gpu, on_cpu = LoadedTranslator.load(gpu_run, "cuda"), LoadedTranslator.load(gpu_run, "cpu")
    assert next(on_gpu.model.parameters()).is_cuda
    src = torch.tensor([[5, 9, 14, 22, 3], [7, 8, 3, 0, 0]])
    tgt = torch.tensor([[2, 11, 12, 13], [2, 40, 41, 0]])
    with torch.no_grad():
        want = on_cpu.model.eval()(src, tgt)
        got = on_gpu.model.eval()(src.to(CUDA), tgt.to(CUDA))
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    sentences = [f"{s} sees the {o}." for s in ("He", "She") for o in ("cat", "dog", "sea")]
    assert translate(on_gpu, sentences, beam=4) == translate(on_cpu, sentences, beam=4)


def test_translator_resume_on_cuda_equals_uninterrupted(pair_file, tmp_path, monkeypatch):
    args = dict(TINY_TR, max_steps=17, eval_every=5, bleu_sentences=3, dropout=0.3, device="cuda")
    train_translate(pair_file, tmp_path / "full", **args)
    restore = crash_after(monkeypatch, translate_module.TranslationTask, steps=10)
    with pytest.raises(KeyboardInterrupt):
        train_translate(pair_file, tmp_path / "cut", **args)
    restore()
    train_translate(pair_file, tmp_path / "cut", resume=True, **args)
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize("model", ["lstm", "gpt"])
def test_language_model_trains_and_generates_on_cuda(tiny_text, tmp_path, model):
    train_lm(str(tiny_text), tmp_path / "run", model=model, max_steps=40, lr=1e-2,
             device="cuda", **TINY_LM)
    lm = LoadedLM.load(tmp_path / "run", "cuda")
    assert next(lm.model.parameters()).is_cuda
    a = generate(lm, "Anna", max_new_tokens=12, seed=7)
    assert a == generate(lm, "Anna", max_new_tokens=12, seed=7)  # seeded sampling repeats
    assert a[0].startswith("Anna") and len(a[0]) > len("Anna")
    greedy_gpu = generate(lm, "Anna", max_new_tokens=12, temperature=0)
    greedy_cpu = generate(tmp_path / "run", "Anna", max_new_tokens=12, temperature=0,
                          device="cpu")
    assert greedy_gpu == greedy_cpu


# cuDNN's LSTM draws its between-layer dropout masks from a generator of its own that no
# checkpoint can hold, so the LSTM case runs without dropout (README, "Checked on a GPU").
@pytest.mark.parametrize("model, dropout", [("gpt", 0.3), ("lstm", 0.0)])
def test_language_model_resume_on_cuda_equals_uninterrupted(tiny_text, tmp_path, monkeypatch,
                                                            model, dropout):
    args = dict(TINY_LM, preset="seed", model=model, max_steps=17, dropout=dropout,
                device="cuda")
    train_lm(str(tiny_text), tmp_path / "full", **args)
    restore = crash_after(monkeypatch, lm_module.LMTask, steps=10)
    with pytest.raises(KeyboardInterrupt):
        train_lm(str(tiny_text), tmp_path / "cut", **args)
    restore()
    train_lm(str(tiny_text), tmp_path / "cut", resume=True, **args)
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
