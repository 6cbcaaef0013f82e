"""Exports give the model's numbers on their runtimes: ONNX step logits and greedy generation
equal PyTorch's, CTranslate2 scores, greedy and beam translations equal scriven's; mistakes are
clear one-line errors."""

import itertools
import json
import sys

import pytest
import torch
from conftest import TINY_TRANSLATOR, make_pairs, make_text, one_thread

from scriven import checkpoint as ck
from scriven import runtimes
from scriven.cli import main
from scriven.errors import ScrivenError
from scriven.export import EXPORT_VERSION, export, read_info
from scriven.generation import generate
from scriven.models import build_model
from scriven.tokenizers import BOS_ID, EOS_ID, BPETokenizer, WordTokenizer
from scriven.translation import train_translate
from scriven.translator import translate

ort = pytest.importorskip("onnxruntime", reason="ONNX exports need onnxruntime "
                          "(pip install 'scriven[export]')")
pytest.importorskip("onnx", reason="ONNX exports need onnx (pip install 'scriven[export]')")
ctranslate2 = pytest.importorskip("ctranslate2", reason="translator exports need ctranslate2 "
                                  "(pip install 'scriven[export]')")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def word_tokenizer():
    return WordTokenizer.train(make_text(100))


def save_random(path, kind, config, tokenizer, scale=0.0, seed=0):
    """A randomly initialised model as a checkpoint; `scale` adds noise to every weight (so
    biases and norms are not their initial zeros and ones)."""
    torch.manual_seed(seed)
    model = build_model(kind, config).eval()
    if scale:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
    data = {"dataset": "tiny", "attribution": "made up for the test"}
    ck.save(path, ck.Checkpoint(kind, {"model": config, "data": data}, ck.model_weights(model),
                                tokenizer.to_json_str()))
    return model


LSTM_CONFIGS = {
    "plain": dict(embed_dim=16, hidden_dim=16, num_layers=2, dropout=0.0, tie_embeddings=False),
    "tied with projection": dict(embed_dim=16, hidden_dim=24, num_layers=2, dropout=0.0,
                                 tie_embeddings=True),
}
GPT_CONFIGS = {
    "learned": dict(d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0, max_len=16),
    "sinusoidal": dict(d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0, max_len=16,
                       positions="sinusoidal"),
    "alibi, head bias": dict(d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0, max_len=16,
                             positions="alibi", head_bias=True),
}
LM_CASES = [("lstm", n, c) for n, c in LSTM_CONFIGS.items()] + \
           [("gpt", n, c) for n, c in GPT_CONFIGS.items()]


@pytest.fixture(scope="module", params=LM_CASES, ids=[f"{k}-{n}" for k, n, _ in LM_CASES])
def lm_export(request, tmp_path_factory, word_tokenizer):
    kind, _, config = request.param
    config = dict(config, vocab_size=word_tokenizer.vocab_size)
    root = tmp_path_factory.mktemp(kind)
    model = save_random(root / "ckpt", kind, config, word_tokenizer, scale=0.05)
    return model, root / "ckpt", export(root / "ckpt", "onnx", root / "export")


def test_onnx_prompt_and_step_logits_equal_pytorch(lm_export, word_tokenizer):
    model, _, out = lm_export
    stepper, _ = runtimes.load_lm(out)
    v = word_tokenizer.vocab_size
    torch.manual_seed(1)
    ids = torch.randint(0, v, (3, 6))
    with torch.no_grad():
        expected, state = model(ids)                                      # (B, T, V)
        logits, runtime_state = stepper.read(ids)
        assert torch.allclose(logits, expected[:, -1], atol=1e-4, rtol=0)
        for _ in range(4):
            nxt = torch.randint(0, v, (3,))
            expected, state = model(nxt[:, None], state)
            logits, runtime_state = stepper.step(nxt, runtime_state)
            assert torch.allclose(logits, expected[:, -1], atol=1e-4, rtol=0)


def test_onnx_greedy_generation_gives_the_same_tokens(lm_export):
    _, ckpt, out = lm_export
    # 30 new tokens run a GPT with max_len 16 past a full cache (the newest half is re-read).
    expected = generate(ckpt, "anna said", max_new_tokens=30, temperature=0, device="cpu")
    assert generate(out, "anna said", max_new_tokens=30, temperature=0) == expected


def test_onnx_sampling_follows_the_seed(lm_export):
    _, ckpt, out = lm_export
    options = dict(max_new_tokens=12, temperature=0.8, top_k=5, seed=3, num_samples=2)
    assert generate(out, "levin", **options) == generate(ckpt, "levin", device="cpu", **options)


def test_export_json_says_what_the_export_is(lm_export):
    _, _, out = lm_export
    info = read_info(out)
    assert info["scriven_export"] == EXPORT_VERSION and info["format"] == "onnx"
    assert info["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert info["data"]["attribution"] == "made up for the test"
    assert info["sampling"]["temperature"] == 1.0
    assert (out / "tokenizer.json").is_file() and (out / "step.onnx").is_file()


@pytest.mark.parametrize("kind", ["lstm", "gpt"])
def test_int8_onnx_export_generates(kind, tmp_path, word_tokenizer):
    config = dict(next(iter((LSTM_CONFIGS if kind == "lstm" else GPT_CONFIGS).values())),
                  vocab_size=word_tokenizer.vocab_size)
    save_random(tmp_path / "ckpt", kind, config, word_tokenizer)
    out = export(tmp_path / "ckpt", "onnx", tmp_path / "int8", quantization="int8")
    assert read_info(out)["quantization"] == "int8"
    text = generate(out, "anna said", max_new_tokens=5, temperature=0)[0]
    assert text.lower().startswith("anna said")


# ---------------------------------------------------------------------------------------------
# Translators on CTranslate2


@pytest.fixture(scope="module")
def bpe():
    pairs = make_pairs(200)
    return BPETokenizer.train([a for a, _ in pairs] + [b for _, b in pairs], vocab_size=300)


TRANSLATOR_LAYOUTS = list(itertools.product(
    [True, False], ["sinusoidal", "learned"],
    [(True, False, "relu"), (False, True, "gelu")]))


@pytest.mark.parametrize("norm_first, positions, variant", TRANSLATOR_LAYOUTS,
                         ids=[f"{'pre' if n else 'post'}-{p}-{'tied' if v[0] else 'untied'}"
                              for n, p, v in TRANSLATOR_LAYOUTS])
def test_ct2_scores_equal_scriven_log_probabilities(norm_first, positions, variant, bpe,
                                                    tmp_path):
    share, bias, activation = variant
    v = bpe.vocab_size
    config = dict(src_vocab_size=v, tgt_vocab_size=v, d_model=32, n_heads=4, d_ff=64,
                  encoder_layers=2, decoder_layers=2, dropout=0.0, activation=activation,
                  norm_first=norm_first, positions=positions, max_len=64,
                  share_embeddings=share, bias=bias)
    model = save_random(tmp_path / "ckpt", "transformer", config, bpe, scale=0.05)
    out = export(tmp_path / "ckpt", "ctranslate2", tmp_path / "export")
    translator = runtimes.load_translator(out, "cpu").translator
    pairs = make_pairs(200)[:4]
    sources = [bpe.encode(a) for a, _ in pairs]
    targets = [bpe.encode(b) for _, b in pairs]
    scored = translator.score_batch([[bpe.id_to_token(i) for i in s] for s in sources],
                                    [[bpe.id_to_token(i) for i in t] for t in targets])
    for src, tgt, result in zip(sources, targets, scored):
        with torch.no_grad():
            logits = model(torch.tensor([src]), torch.tensor([[BOS_ID, *tgt]]))[0]  # (T, V)
        expected = torch.log_softmax(logits, -1)[torch.arange(len(tgt) + 1),
                                                 torch.tensor([*tgt, EOS_ID])]
        assert torch.allclose(torch.tensor(result.log_probs), expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def trained(pair_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("translator")
    train_translate(pair_file, root / "run", max_steps=150, eval_every=150, **TINY_TRANSLATOR)
    return root / "run" / "best", export(root / "run", "ctranslate2", root / "export")


SENTENCES = [a for a, _ in make_pairs(40, seed=5)]


@pytest.mark.parametrize("beam", [1, 4])
def test_ct2_translations_equal_scriven(trained, beam):
    ckpt, out = trained
    options = dict(beam=beam, length_penalty=0.0, batch_size=8)
    assert translate(out, SENTENCES, **options) == translate(ckpt, SENTENCES, device="cpu",
                                                             **options)


def test_ct2_n_best(trained):
    _, out = trained
    hyps = translate(out, SENTENCES[0], beam=4, n_best=3)
    assert len(hyps) == 3 and all(isinstance(t, str) and isinstance(s, float) for t, s in hyps)
    assert [s for _, s in hyps] == sorted((s for _, s in hyps), reverse=True)


def test_cli_export_then_translate_and_generate(trained, tmp_path, word_tokenizer, capsys):
    ckpt, _ = trained
    assert main(["export", str(ckpt), "--format", "ctranslate2", "--out", str(tmp_path / "ct2"),
                 "--quantization", "int8"]) == 0
    assert main(["translate", str(tmp_path / "ct2"), SENTENCES[0]]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == str(tmp_path / "ct2") and printed[1]
    config = dict(LSTM_CONFIGS["plain"], vocab_size=word_tokenizer.vocab_size)
    save_random(tmp_path / "lm", "lstm", config, word_tokenizer)
    assert main(["export", str(tmp_path / "lm"), "--format", "onnx", "--out",
                 str(tmp_path / "onnx")]) == 0
    assert main(["generate", str(tmp_path / "onnx"), "anna said", "--temperature", "0",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].lower().startswith("anna said")


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def lstm_ckpt(tmp_path_factory, word_tokenizer):
    path = tmp_path_factory.mktemp("lstm") / "ckpt"
    save_random(path, "lstm", dict(LSTM_CONFIGS["plain"], vocab_size=word_tokenizer.vocab_size),
                word_tokenizer)
    return path


def test_a_missing_runtime_package_is_named(lstm_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an import finds uninstalled
    with pytest.raises(ScrivenError, match=r"needs the Python package 'onnxruntime'.*"
                                           r"scriven\[export\]"):
        export(lstm_ckpt, "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("format, message", [
    ("ctranslate2", "holds a lstm model, which exports to onnx, not ctranslate2"),
    ("tflite", "format 'tflite' unknown"),
])
def test_a_wrong_format_is_refused(lstm_ckpt, tmp_path, format, message):
    with pytest.raises(ScrivenError, match=message):
        export(lstm_ckpt, format, tmp_path / "out")


def test_a_bad_quantization_is_refused(lstm_ckpt, tmp_path):
    with pytest.raises(ScrivenError, match="quantization 'int4' is not one of float32, int8"):
        export(lstm_ckpt, "onnx", tmp_path / "out", quantization="int4")


def test_out_must_not_be_some_other_directory(lstm_ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ScrivenError, match="exists and is not an export"):
        export(lstm_ckpt, "onnx", tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_an_export_of_the_wrong_kind_is_refused(lstm_ckpt, tmp_path):
    out = export(lstm_ckpt, "onnx", tmp_path / "out")
    with pytest.raises(ScrivenError, match="holds a lstm model; this needs transformer"):
        translate(out, "I see the cat.")
    assert main(["translate", str(out), "I see the cat."]) == 2


def test_an_export_from_a_newer_scriven_is_refused(lstm_ckpt, tmp_path):
    out = export(lstm_ckpt, "onnx", tmp_path / "out")
    info = json.loads((out / "export.json").read_text())
    info["scriven_export"] = EXPORT_VERSION + 1
    (out / "export.json").write_text(json.dumps(info))
    with pytest.raises(ScrivenError, match="upgrade scriven or export again"):
        generate(out, "anna said", max_new_tokens=2)


def test_precision_is_fixed_at_export_time(lstm_ckpt, tmp_path):
    out = export(lstm_ckpt, "onnx", tmp_path / "out")
    with pytest.raises(ScrivenError, match="--quantization int8"):
        generate(out, "anna said", max_new_tokens=2, precision="int8")


def test_an_older_gpt_exports_with_its_trained_context(tmp_path, word_tokenizer):
    """A GPT from before max_len followed seq_len (16 positions, trained on 8-token windows):
    its export slides at the trained window, as the checkpoint does."""
    config = dict(GPT_CONFIGS["learned"], vocab_size=word_tokenizer.vocab_size)
    model = save_random(tmp_path / "gpt", "gpt", config, word_tokenizer, scale=0.05)
    saved = ck.load(tmp_path / "gpt")
    ck.save(tmp_path / "old", ck.Checkpoint("gpt", {**saved.config, "train": {"seq_len": 8}},
                                            ck.model_weights(model), saved.tokenizer_json))
    out = export(tmp_path / "old", "onnx", tmp_path / "old-onnx")
    assert read_info(out)["context"] == 8 and runtimes.load_lm(out)[0].context == 8
    options = dict(max_new_tokens=20, seed=4, num_samples=3)
    expected = generate(tmp_path / "old", "anna said", device="cpu", **options)
    assert generate(out, "anna said", **options) == expected
    # the window matters: reading 16 positions gives other text
    assert generate(tmp_path / "gpt", "anna said", device="cpu", **options) != expected
